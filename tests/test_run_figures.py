"""A run's figures show its phenomenon: each preset's defining curve, one mark per event, a run
cut short saying so. Figures are checked through what matplotlib was asked to draw."""
from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from conftest import FAST, train_here
from dgrun.plots import looks_log_spaced, merge_marks


@pytest.fixture
def drawn(monkeypatch):
    """{file name: [(title, x scale, legend texts, line colours), ...per axes]} of every
    figure saved while the test runs."""
    figures = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):
        # savefig writes the atomic writer's temporary file, `.groups.png.tmp-<pid>`
        name = Path(getattr(path, "name", path)).name.lstrip(".").split(".tmp-")[0]
        figures[name] = [
            (ax.get_title(), ax.get_xscale(),
             [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
             [line.get_color() for line in ax.get_lines()]) for ax in fig.axes]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def test_near_coincident_marks_are_one_event():
    # phase_transition: four detectors within 100 of 4,000 steps, one event
    marks = [(1650, "test_acc"), (1700, "train_acc"), (1750, "train_loss"), (1750, "test_loss")]
    (event,) = merge_marks(marks, extent=(0, 4000))
    assert event[:2] == (1650, 1750) and event[2].count("\n") == 3
    # grokking on a log axis: memorization 16 with interpolation 40, generalization 251 apart
    events = merge_marks([(16, "memorization"), (40, "interpolation"), (200, "test_acc jump"),
                          (251, "generalization")], log_x=True, extent=(1, 400))
    assert [(a, b) for a, b, _ in events] == [(16, 40), (200, 251)]
    # far apart on a linear axis: separate
    assert len(merge_marks([(100, "a"), (2000, "b")], extent=(0, 4000))) == 2


def test_log_spacing_is_recognised_with_the_budgets_last_row():
    steps = sorted({int(v) for v in np.logspace(0, np.log10(398), 80)} | {0, 400})
    assert looks_log_spaced(steps)
    assert not looks_log_spaced([*range(0, 4000, 50), 4001])


def test_simplicity_bias_draws_worst_group_and_every_group(run_dir, drawn):
    train_here(run_dir, "phenomenon=simplicity_bias", "trainer.max_steps=150",
               "probes.dfr.every=1000", *FAST)
    assert (run_dir / "plots" / "groups.png").exists()
    ((title, scale, legend, _),) = drawn["groups.png"]
    assert "worst group" in title and scale == "log"
    assert {"test worst group", "test average", "test group y=1, color=red",
            "test group y=0, color=green"} <= set(legend)


def test_robustness_names_each_corruption_in_its_own_colour(run_dir, drawn):
    names = ["gaussian_noise", "contrast", "fog", "pixelate"]
    train_here(run_dir, "phenomenon=robustness", "trainer.max_epochs=2",
               f"probes.robustness.corruptions=[{','.join(names)}]",
               "probes.robustness.severities=[1]", "probes.robustness.n=64",
               "probes.robustness.n_adv=16", *FAST)
    headline, each = drawn["robustness.png"]
    assert any(text.startswith("PGD linf, eps 8/255") for text in headline[2])
    assert sorted(text.split(" (")[0] for text in each[2]) == sorted(names)
    assert len(set(each[3])) == len(names)  # no colour repeats


def test_a_stalled_run_says_so_on_its_figure(run_dir, drawn):
    # The paper's decay per digits epoch: the lr is gone long before random labels are fit.
    summary = train_here(run_dir, "phenomenon=rethinking", "corruption=random_labels",
                         "scheduler.epoch_steps=null", *FAST)
    assert summary["stop_reason"] == "stalled"
    for name in ("accuracy.png", "loss.png"):
        assert f"stopped (stalled) at step {summary['steps']}" in drawn[name][0][0]


def test_dynamics_is_log_x_with_the_runs_marks_in_a_log_step_run(run_dir, drawn):
    train_here(run_dir, "phenomenon=grokking", "trainer.max_steps=120", *FAST)
    panels = drawn["dynamics.png"]
    assert all(scale == "log" for _, scale, _, _ in panels[:3])
    assert any("memorization" in text for text in panels[0][2])


def test_a_probes_phases_are_each_their_own_line_on_its_figure(tmp_path, drawn, monkeypatch):
    """modular_progress's phases (circuit formation 200, cleanup 293 and its end 369, within
    a factor 3 on a log axis) are three moments: three lines with their own colours and
    legend entries, not one merged band; the legends sit beside the panels."""
    import re

    from dgrun.probes.progress_figures import plot_progress

    steps = [1, 2, 5, 10, 20, 50, 100, 200, 300, 400]
    rows = [{"step": s, "train_loss": 1 / s, "test_loss": 1.0, "restricted_loss": 0.5,
             "excluded_loss": 0.9, "num_key_frequencies": 0, "fourier_gini": 0.1,
             "sum_sq_weights": 100.0 + s} for s in steps]
    marks = [(200, "circuit formation starts"), (293, "cleanup starts"), (369, "cleanup ends")]
    axes = []
    record = matplotlib.figure.Figure.savefig  # the `drawn` fixture's recorder

    def keep(fig, *args, **kwargs):
        axes.extend(fig.axes)
        return record(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_progress(rows, marks, tmp_path)
    panels = drawn["progress_measures.png"]
    assert len(panels) == 4
    for _, scale, legend, colours in panels:
        assert scale == "log"
        assert [t for t in legend if re.search(r"\(\d+\)$", t)] == [
            "circuit formation starts (200)", "cleanup starts (293)", "cleanup ends (369)"]
        assert len(set(colours[-3:])) == 3
    for ax in axes:  # beside the panel: the legend's anchor is right of the axes
        assert ax.get_legend().get_bbox_to_anchor().x0 > ax.bbox.x1
