"""Detection probes on curves with known answers; weight dynamics on models with known changes."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from torch import nn

from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.plots import divergence_step, draw_marks, looks_log_spaced, plot_run, pyplot
from dgrun.probes import PROBES, Evaluation, build
from dgrun.probes.dynamics import scale_invariant_weights
from dgrun.probes.transitions import curve, detect

META = Meta("synthetic", "vector", (4,), 2, None, None, {})


def probe(name: str, **options):
    return build({name: options}, meta=META, seed=0)[0]


def log_steps(limit: int, per_decade: int = 20) -> np.ndarray:
    """dgrun's log evaluation schedule: round(10 ** (k / per_decade))."""
    k = np.arange(int(per_decade * math.log10(limit)) + 1)
    return np.unique(np.round(10 ** (k / per_decade)))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rows_of(steps, **columns) -> list[dict]:
    return [{"step": int(s), **{k: float(v[i]) for k, v in columns.items()}}
            for i, s in enumerate(steps)]


# ---------------------------------------------------------------- grokking

def grokking_rows():
    steps = np.arange(0, 3001, 10)
    train = np.clip(steps / 40, 0, 1)             # 0.99 first reached at step 40 (1.0)
    test = np.where(steps >= 1200, 0.995, 0.3)     # 0.99 first reached at step 1200
    test[steps == 700] = 0.96                      # a 0.95 threshold is reached at 700
    rows = rows_of(steps, train_acc=train, test_acc=test)
    rows[5]["test_acc"] = float("nan")             # blanks and NaN never reach a threshold
    rows[6]["test_acc"] = None
    return rows


def test_grokking_steps_delay_and_marks():
    p = probe("grokking")
    summary = p.summarize(grokking_rows())
    assert summary == {"grokking": {
        "memorization_step": 40, "generalization_step": 1200, "delay_ratio": 30.0,
        "delay_steps": 1160, "grokked": True, "train_threshold": 0.99,
        "test_threshold": 0.99, "min_delay_ratio": 5.0}}
    marks = p.marks(summary)
    assert [m[0] for m in marks] == [40, 1200]
    assert "memorization" in marks[0][1] and "generalization" in marks[1][1]
    # Thresholds are options: a looser test threshold moves generalization to step 700.
    looser = probe("grokking", test_threshold=0.95).summarize(grokking_rows())["grokking"]
    assert looser["generalization_step"] == 700 and looser["delay_ratio"] == 17.5


def test_grokking_not_reached_or_not_delayed():
    steps = np.arange(0, 1001, 10)
    never = rows_of(steps, train_acc=np.ones(len(steps)), test_acc=np.full(len(steps), 0.5))
    out = probe("grokking").summarize(never)["grokking"]
    assert out["memorization_step"] == 0 and out["generalization_step"] is None
    assert out["delay_ratio"] is None and out["delay_steps"] is None and out["grokked"] is False
    assert [m[0] for m in probe("grokking").marks({"grokking": out})] == [0]
    # Ordinary learning: test follows train closely, a ratio of 2 is no grokking.
    quick = rows_of(steps, train_acc=(steps >= 100) * 1.0, test_acc=(steps >= 200) * 1.0)
    out = probe("grokking").summarize(quick)["grokking"]
    assert out["delay_ratio"] == 2.0 and out["grokked"] is False
    assert probe("grokking", min_delay_ratio=2).summarize(quick)["grokking"]["grokked"] is True


def test_grokking_rejects_bad_thresholds():
    with pytest.raises(UserError, match="train_threshold"):
        probe("grokking", train_threshold=99)
    with pytest.raises(UserError, match="has no option"):
        probe("grokking", threshold=0.9)


# ---------------------------------------------------------------- transitions

def parity_curve(steps, rng):
    """Sparse parity's test accuracy: 50% for 2000 steps, then 100% within ~150 steps."""
    return 0.5 + 0.5 * sigmoid((steps - 2100) / 30) + rng.normal(0, 0.015, len(steps))


@pytest.mark.parametrize("steps", [np.arange(0, 5001, 50.0), log_steps(5000)],
                         ids=["linear", "log"])
def test_transition_found_on_parity_plateau(steps):
    for seed in range(5):
        events = detect(steps, parity_curve(steps, np.random.default_rng(seed)))
        assert len(events) == 1, events
        e = events[0]
        assert 2000 <= e.step <= 2300 and e.start_step <= e.step <= e.end_step
        assert 1800 <= e.start_step and e.end_step <= 2600
        assert abs(e.before - 0.5) < 0.05 and abs(e.after - 1.0) < 0.05


def test_transition_found_on_grokking_jump_in_log_steps():
    steps = log_steps(100_000)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        # Test accuracy creeping up on the plateau, then 1% -> 99% within a factor ~1.7 of steps.
        acc = 0.01 + 0.02 * np.log10(steps) + 0.9 * sigmoid((np.log10(steps) - 4) / 0.05)
        events = detect(steps, acc + rng.normal(0, 0.01, len(steps)))
        assert len(events) == 1, events
        assert 0.5 * 10**4 <= events[0].step <= 2 * 10**4
        assert events[0].size > 0.8


def test_two_separate_jumps_are_both_found():
    steps = np.arange(0, 6001, 25.0)
    rng = np.random.default_rng(0)
    acc = 0.1 + 0.4 * sigmoid((steps - 1000) / 20) + 0.45 * sigmoid((steps - 3000) / 60)
    events = detect(steps, acc + rng.normal(0, 0.01, len(steps)))
    assert [round(e.step, -2) for e in events] == [1000, 3000]


LINEAR, LOG = np.arange(0, 5001, 50.0), log_steps(100_000)
SMOOTH = {
    "power-law loss, linear steps":
        (LINEAR, lambda s, r: np.log10(3 * (s + 1) ** -0.7) + r.normal(0, .02, len(s))),
    "power-law loss, log steps":
        (LOG, lambda s, r: np.log10(3 * (s + 1) ** -1.5) + r.normal(0, .02, len(s))),
    "exponential loss, linear steps":
        (LINEAR, lambda s, r: -s / 500 / math.log(10) + r.normal(0, .02, len(s))),
    "exponential loss, log steps":
        (LOG, lambda s, r: -s / 5000 / math.log(10) + r.normal(0, .02, len(s))),
    "exponential accuracy, linear steps":
        (LINEAR, lambda s, r: 1 - .9 * np.exp(-s / 300) + r.normal(0, .01, len(s))),
    "power-law accuracy, log steps":
        (LOG, lambda s, r: 1 - .9 * (1 + s / 100) ** -.5 + r.normal(0, .01, len(s))),
    "slow linear drift, linear steps":
        (LINEAR, lambda s, r: s / 5000 + r.normal(0, .01, len(s))),
    "slow linear drift, log steps":
        (LOG, lambda s, r: s / 100_000 + r.normal(0, .01, len(s))),
    "noise, linear steps":
        (LINEAR, lambda s, r: 0.5 + r.normal(0, .05, len(s))),
    "heavy noise, log steps":
        (LOG, lambda s, r: 0.5 + r.normal(0, .1, len(s))),
}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_no_transition_on_smooth_or_noisy_curves(name):
    steps, make = SMOOTH[name]
    for seed in range(20):
        values = make(steps, np.random.default_rng(seed))
        assert detect(steps, values) == [], f"{name}, seed {seed}"


def test_transitions_probe_summary_columns_and_marks():
    steps = np.arange(0, 4001, 50)
    rng = np.random.default_rng(0)
    loss = np.where(steps < 2100, 0.69, 1e-3) * np.exp(rng.normal(0, 0.05, len(steps)))
    rows = rows_of(steps, train_acc=np.clip(steps / 3000, 0, 1),
                   test_acc=parity_curve(steps.astype(float), rng), test_loss=loss)
    rows[-1]["test_acc"] = float("inf")  # a non-finite tail is ignored, not a jump
    p = probe("transitions")
    out = p.summarize(rows)["transitions"]
    assert out["count"] == 2
    assert 2000 <= out["test_acc_step"] <= 2200
    assert out["test_acc_size"] == pytest.approx(0.5, abs=0.05)
    assert 2000 <= out["log10_test_loss_step"] <= 2200
    assert out["log10_test_loss_size"] == pytest.approx(math.log10(1e-3 / 0.69), abs=0.1)
    # A linear ramp is no transition; a metric without a column has none either.
    assert out["train_acc_step"] is None and out["train_acc_size"] is None
    assert out["log10_train_loss_step"] is None
    scalars = {k: v for k, v in out.items() if k != "events"}
    assert all(v is None or isinstance(v, (int, float)) for v in scalars.values())
    assert {e["metric"] for e in out["events"]} == {"test_acc", "log10_test_loss"}
    for e in out["events"]:
        assert set(e) >= {"metric", "step", "start_step", "end_step", "before", "after"}
    marks = p.marks({"transitions": out})
    assert [m[0] for m in marks] == [e["step"] for e in out["events"]]
    assert any("test_acc" in label for _, label in marks)
    # Only the metrics asked for.
    only = probe("transitions", metrics=["train_acc"]).summarize(rows)["transitions"]
    assert only["count"] == 0 and "test_acc_step" not in only


def test_transitions_curve_takes_log10_and_skips_blanks():
    rows = [{"step": 1, "test_loss": 10.0}, {"step": 2, "test_loss": 0.0},
            {"step": 3, "test_loss": None}, {"step": 4, "test_loss": "0.01"}]
    assert curve(rows, "log10_test_loss") == ([1.0, 4.0], [1.0, -2.0])
    with pytest.raises(UserError, match="min_jump"):
        probe("transitions", min_jump=0)


# ---------------------------------------------------------------- dynamics

def splits(n=16, d=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long()
    return Split(x, y), Split(x.clone(), y.clone())


def evaluation(model, lr=0.1, step=0):
    train, test = splits()
    return Evaluation(model, train, test, lr=lr, step=step)


def measured(p, model, **kw):
    return {k: float(v) for k, v in p.measure(evaluation(model, **kw)).items()}


def test_dynamics_known_parameter_change_plain_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    p = probe("dynamics")
    first = measured(p, model, lr=0.1)
    assert first["dist_from_init"] == 0 and first["l1_dist_from_init"] == 0
    assert p.basis == "all_weights" and p.tracked == ["0.weight", "2.weight"]
    with torch.no_grad():
        model[0].weight += 0.1       # 12 entries moved by 0.1
        model[2].bias -= 0.5         # 2 entries moved by 0.5
    now = measured(p, model, lr=0.1)
    assert now["dist_from_init"] == pytest.approx(math.sqrt(12 * .01 + 2 * .25), rel=1e-5)
    assert now["l1_dist_from_init"] == pytest.approx(12 * .1 + 2 * .5, rel=1e-5)
    weights2 = float(model[0].weight.detach().pow(2).sum() + model[2].weight.detach().pow(2).sum())
    assert now["effective_lr"] == pytest.approx(0.1 / weights2, rel=1e-5)
    assert now["tracked_weight_norm"] == pytest.approx(math.sqrt(weights2), rel=1e-5)


def bn_model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 2))


def test_scale_invariance_found_after_batchnorm_only():
    torch.manual_seed(0)
    model = bn_model()
    x = splits()[0].x
    running = model[1].running_mean.clone(), model[1].running_var.clone()
    model.eval()
    rng = torch.get_rng_state()
    assert scale_invariant_weights(model, x) == ["0.weight"]
    # No trace: running statistics, mode and the global RNG are as they were.
    assert torch.equal(model[1].running_mean, running[0])
    assert torch.equal(model[1].running_var, running[1])
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    # LayerNorm after a bias-free weight is scale-invariant too; a plain MLP has none.
    ln = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 2))
    assert scale_invariant_weights(ln, x) == ["0.weight"]
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert scale_invariant_weights(plain, x) == []


def test_dynamics_effective_lr_uses_scale_invariant_weights():
    torch.manual_seed(0)
    model = bn_model()
    p = probe("dynamics")
    out = measured(p, model, lr=0.05)
    assert p.basis == "scale_invariant" and p.tracked == ["0.weight"]
    w2 = float(model[0].weight.detach().pow(2).sum())
    assert out["effective_lr"] == pytest.approx(0.05 / w2, rel=1e-5)
    summary = p.summarize([{"step": 0, **out}])["dynamics"]
    assert summary["basis"] == "scale_invariant" and summary["tracked_tensors"] == 1


def test_dynamics_state_round_trip_measures_the_same():
    torch.manual_seed(0)
    model = bn_model()
    p = probe("dynamics")
    measured(p, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = splits()[0]
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.x), train.y).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(p.state_dict(), buffer)   # as the checkpoint does
    buffer.seek(0)
    resumed = probe("dynamics")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert measured(resumed, model, step=5) == measured(p, model, step=5)
    assert resumed.tracked == p.tracked and resumed.basis == p.basis
    assert measured(p, model, step=5)["dist_from_init"] > 0
    # Without the state a probe starts from the current weights: the numbers would differ.
    assert measured(probe("dynamics"), model, step=5)["dist_from_init"] == 0


def test_dynamics_state_from_another_model_is_refused():
    p = probe("dynamics")
    measured(p, nn.Sequential(nn.Linear(4, 2)))
    other = probe("dynamics")
    other.load_state_dict(p.state_dict())
    with pytest.raises(UserError, match="does not match"):
        measured(other, nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))


def test_dynamics_plot(tmp_path):
    torch.manual_seed(0)
    model = bn_model()
    p = probe("dynamics")
    rows = []
    for step in (0, 1, 10, 100, 1000):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        rows.append({"step": step, "weight_norm": 1.0 + step, **measured(p, model, step=step)})
    paths = p.plots(rows, {}, tmp_path / "plots")
    assert paths == [tmp_path / "plots" / "dynamics.png"] and paths[0].stat().st_size > 0
    assert p.plots([], {}, tmp_path / "empty") == []


# ---------------------------------------------------------------- plots

def test_plot_run_marks_on_both_figures_and_diverged_rows(tmp_path, monkeypatch):
    legends = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):
        # savefig writes the atomic writer's temporary file, `.loss.png.tmp-<pid>`
        name = Path(getattr(path, "name", path)).name.lstrip(".").split(".tmp-")[0]
        legends[name] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    steps = list(range(0, 60, 5))
    rows = [{"step": s, "train_loss": 1.0 / (s + 1), "test_loss": 1.0 / (s + 1),
             "train_acc": min(1, s / 40), "test_acc": 0.5} for s in steps]
    rows[-2]["train_loss"] = float("nan")
    rows[-1]["train_loss"] = float("inf")
    rows[-1]["test_loss"] = float("inf")
    diverged = divergence_step(rows)
    assert diverged == 50 and divergence_step(rows[:-2]) is None
    marks = [(40, "memorization"), (45, "generalization"), (diverged, "diverged")]
    paths = plot_run(rows, tmp_path / "plots", interpolation_step=40, log_x=True,
                     title="t", marks=marks)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    for name in ("loss.png", "accuracy.png"):
        text = "\n".join(legends[name])
        assert "memorization (40)" in text and "diverged (50)" in text
        assert "interpolation (train acc 1.0) (40)" in text
    # The old call still works.
    assert len(plot_run(rows, tmp_path / "old", interpolation_step=None)) == 2


def test_marks_have_distinct_colours_and_log_spacing_is_recognised():
    plt = pyplot()
    fig, ax = plt.subplots()
    draw_marks(ax, [(s, f"m{s}") for s in range(1, 11)])
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.lines}
    assert len(styles) == 10
    plt.close(fig)
    assert looks_log_spaced(log_steps(10_000)) and not looks_log_spaced(range(0, 10_000, 100))


def test_probes_are_registered():
    assert {"grokking", "transitions", "dynamics"} <= set(PROBES.names())
