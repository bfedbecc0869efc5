"""`dgrun analyze` on runs the README's own commands produce: files written, known answers,
one-line errors. (The analyses' arithmetic is tested in test_analysis.py.)"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import FAST, cli_here, train_here


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Digits with 30% of the labels redrawn, per-example tracking and log-spaced snapshots."""
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    train_here(run_dir, "corruption=partial_labels", "corruption.prob=0.3",
               "trainer.track_examples=true", "trainer.snapshots=log", "trainer.max_epochs=40",
               "trainer.stop_at_interpolation=false", "optimizer=adam", *FAST)
    return run_dir


def test_cartography_puts_the_corrupted_rows_in_the_hard_to_learn_region(noisy_run, capsys):
    code, out, _ = cli_here(capsys, "analyze", str(noisy_run), "cartography")
    assert code == 0
    folder = noisy_run / "analysis" / "cartography"
    assert f"{folder / 'data_map.png'}" in out
    table = pd.read_csv(folder / "examples.csv")
    corrupted = table[table["corrupted"].astype(bool)]
    clean = table[~table["corrupted"].astype(bool)]
    hard = lambda part: (part["region"] == "hard-to-learn").mean()  # noqa: E731
    assert hard(corrupted) > 0.8 and hard(clean) < 0.2
    assert json.loads((folder / "summary.json").read_text())


def test_attribution_features_and_dynamics_write_their_tables_and_figures(noisy_run, capsys):
    for what, files in (("attribution", ["top.csv", "corrupted_in_top_k.png"]),
                        ("features", ["probe.csv", "linear_probe.png"]),
                        ("dynamics", ["curves.csv", "dynamics.png"]),
                        ("robustness", ["corruptions.csv", "robustness.png"])):
        options = {"attribution": ["num_test=3", "top_k=3", "methods=[trak,knn]",
                                   "num_checkpoints=2"],
                   "robustness": ["n=64", "n_adv=16", "severities=[1,5]"]}.get(what, [])
        assert cli_here(capsys, "analyze", str(noisy_run), what, *options)[0] == 0
        for name in files:
            assert (noisy_run / "analysis" / what / name).stat().st_size > 0, (what, name)


def test_analyze_errors_are_one_line(noisy_run, tmp_path, capsys):
    cases = [(["analyze", str(noisy_run), "cartograpy"], "unknown analysis 'cartograpy'"),
             (["analyze", str(noisy_run), "robustness", "step=7"],
              "kept no checkpoint at step 7"),
             (["analyze", str(noisy_run), "attribution", "colour=red"], "no option 'colour'"),
             (["analyze", str(tmp_path), "dynamics"], "no run directories under")]
    for args, message in cases:
        code, _, err = cli_here(capsys, *args)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
    untracked = tmp_path / "plain"
    train_here(untracked, "trainer.max_epochs=2", *FAST)
    code, _, err = cli_here(capsys, "analyze", str(untracked), "cartography")
    assert code == 2 and "trainer.track_examples=true" in err


# ---------------------------------------------------------------- a run that is still writing
@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A checkpoint every epoch, each kept: last.pt, previous.pt and step_* for 12, 24, 36."""
    run_dir = tmp_path_factory.mktemp("snapshots") / "run"
    train_here(run_dir, "trainer.max_epochs=3", "trainer.checkpoint_every=1",
               "trainer.snapshots=every", *FAST)
    return run_dir


def test_analyze_reads_each_checkpoint_once_and_labels_it_with_that_reads_step(
        snapshot_run, tmp_path, monkeypatch):
    """A live run replaces last.pt between any two reads; here every read after the first
    returns an older checkpoint. The step must come from the read that gave the weights."""
    import shutil

    import torch

    from dgrun import checkpoint
    from dgrun.analysis.command import artifacts
    from dgrun.reopen import reopen

    kept = snapshot_run / "checkpoints"
    truth = {s: checkpoint.load_file(kept / f"step_{s:08d}.pt")["model"] for s in (12, 24, 36)}
    run = tmp_path / "run"
    shutil.copytree(snapshot_run, run)
    for step in (24, 36):  # as with snapshots=log: last.pt and previous.pt hold the only copies
        (run / "checkpoints" / f"step_{step:08d}.pt").unlink()
    real_load, reads = checkpoint.load_file, {}

    def rotating_load(path, map_location="cpu"):
        reads[path.name] = reads.get(path.name, 0) + 1
        if path.name == "last.pt" and reads[path.name] > 1:
            return real_load(kept / "step_00000012.pt", map_location)
        return real_load(path, map_location)

    monkeypatch.setattr(checkpoint, "load_file", rotating_load)
    loaded = artifacts(reopen(run)).checkpoints
    assert [step for step, _ in loaded] == [12, 24, 36]
    assert max(reads.values()) == 1, reads
    for step, state in loaded:
        assert all(torch.equal(state[k], truth[step][k]) for k in state), step


def test_a_checkpoint_that_vanishes_between_listing_and_reading_is_skipped_with_a_note(
        snapshot_run, tmp_path, monkeypatch, capsys):
    import shutil

    from dgrun import checkpoint

    run = tmp_path / "run"
    shutil.copytree(snapshot_run, run)
    real_candidates = checkpoint.candidates

    def listing_then_rotation(directory):
        files = real_candidates(directory)
        for name in ("previous.pt", "step_00000024.pt"):  # the run moved on meanwhile
            (directory / name).unlink()
        return files

    monkeypatch.setattr(checkpoint, "candidates", listing_then_rotation)
    code, out, err = cli_here(capsys, "analyze", str(run), "dynamics")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("dgrun: note:")]
    assert len(notes) == 2 and all("vanished" in line for line in notes), err
    assert len(err.strip().splitlines()) == 2 and "step_00000024.pt" in err
    assert (run / "analysis" / "dynamics" / "dynamics.png").is_file()


# ---------------------------------------------------------------- options, checked like config keys
@pytest.mark.parametrize("args,message", [
    (["attribution", "top_k=abc"], "top_k='abc' is not a whole number; set top_k to a whole"),
    (["attribution", "top_k=-3"], "top_k=-3 is out of range [1, inf)"),
    (["features", "num_test=0"], "num_test=0 is out of range [1, inf)"),
    (["cartography", "late_quantile=abc"], "late_quantile='abc' is not a number"),
    (["cartography", "late_quantile=1.5"], "late_quantile=1.5 is out of range [0.0, 1.0]"),
    (["features", "tsne=maybe"], "tsne='maybe' is not true/false"),
    (["robustness", "severities=[1,7]"], "severities=7 is out of range [1, 5]"),
    (["attribution", "topk=3"], "has no option 'topk'; did you mean top_k?"),
])
def test_analysis_options_are_type_and_range_checked_in_one_line(args, message, snapshot_run,
                                                                 capsys):
    code, _, err = cli_here(capsys, "analyze", str(snapshot_run), *args)
    assert code == 2 and err.startswith("dgrun: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (snapshot_run / "analysis" / args[0]).exists()  # refused before any work


def test_every_analysis_declares_typed_options_the_checker_reads():
    """Each option's default passes its own declared type and range, and values arrive typed:
    YAML's text `1e-3` as a float, one name where a list is declared as a list."""
    import inspect

    from dgrun.analysis import ANALYSES
    from dgrun.analysis.options import check

    for what in ANALYSES.names():
        adapter = ANALYSES.get(what)
        defaults = {p.name: p.default for p in inspect.signature(adapter).parameters.values()
                    if p.kind == p.KEYWORD_ONLY}
        assert defaults, what
        assert check(what, adapter, defaults).keys() == defaults.keys()
    assert check("features", ANALYSES.get("features"), {"probe_C": "1e-3", "num_test": 5.0}) == \
        {"probe_C": 0.001, "num_test": 5}
    assert check("attribution", ANALYSES.get("attribution"), {"methods": "trak"}) == \
        {"methods": ["trak"]}


# ---------------------------------------------------------------- runs you cannot write to
def test_analyze_out_writes_elsewhere_and_an_unwritable_run_is_one_line(snapshot_run, tmp_path,
                                                                        capsys):
    import shutil

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(snapshot_run, sweep / job, ignore=shutil.ignore_patterns("analysis"))
        (sweep / job / "analysis").write_text("")  # what a read-only run is to mkdir
    code, _, err = cli_here(capsys, "analyze", str(sweep), "dynamics")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(sweep / "0" / "analysis") in err and "pass --out DIR" in err

    out = tmp_path / "elsewhere"
    code, stdout, err = cli_here(capsys, "analyze", str(sweep), "dynamics", "--out", str(out))
    assert code == 0, err
    for job in ("0", "1"):
        assert (out / job / "dynamics" / "dynamics.png").stat().st_size > 0
        assert (sweep / job / "analysis").is_file()  # the runs untouched
    code, _, err = cli_here(capsys, "analyze", str(sweep / "1"), "dynamics", "--out", str(out))
    assert code == 0 and (out / "dynamics" / "curves.csv").is_file(), err
