"""Grokking and phase transitions through the real command: the presets show the phenomenon
and the probes find it."""
from __future__ import annotations

from conftest import read_metrics, read_summary, train_here


def test_the_grokking_default_groks_and_says_when(run_dir):
    train_here(run_dir, "phenomenon=grokking")
    summary = read_summary(run_dir)
    grok = summary["grokking"]
    assert summary["final"]["test_acc"] >= 0.99 and grok["grokked"]
    assert grok["memorization_step"] <= 40 and grok["generalization_step"] >= 150
    assert grok["delay_ratio"] >= 5
    rows = read_metrics(run_dir)
    at_memorization = next(r for r in rows if int(r["step"]) == grok["memorization_step"])
    assert float(at_memorization["test_acc"]) < 0.1  # memorized, not generalized
    for column in ("dist_from_init", "effective_lr", "l1_dist_from_init"):
        assert column in rows[0]
    steps = [int(r["step"]) for r in rows]
    assert steps[:5] == [0, 1, 2, 3, 4] and steps[-1] == 400  # log-spaced evaluations
    assert summary["transitions"]["test_acc_step"] is not None
    assert (run_dir / "plots" / "dynamics.png").exists()


def test_sparse_parity_plateaus_then_jumps_and_the_detector_finds_it(run_dir):
    train_here(run_dir, "phenomenon=phase_transition", "dataset.n=30", "trainer.max_steps=2000",
               "trainer.eval_every=25")
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    jump = summary["transitions"]["test_acc_step"]
    assert jump is not None and summary["transitions"]["test_acc_size"] > 0.4
    before = [float(r["test_acc"]) for r in rows if 100 <= int(r["step"]) < jump - 100]
    assert before and max(before) < 0.65  # the plateau: chance for hundreds of steps
    assert summary["final"]["test_acc"] > 0.95
    l1 = [float(r["l1_dist_from_init"]) for r in rows if int(r["step"]) < jump]
    assert l1[-1] > 2 * l1[1]  # the weights move steadily through the plateau


def test_every_operation_and_the_token_models_train_through_the_command(tmp_path):
    for i, args in enumerate((["dataset=modular", "dataset.operation=div", "model=mlp_embed"],
                              ["dataset=permutation", "model=transformer",
                               "model.d_model=32", "model.d_mlp=64"])):
        run_dir = tmp_path / str(i)
        train_here(run_dir, *args, "trainer.max_steps=5", "trainer.max_epochs=null", "threads=1")
        assert read_summary(run_dir)["status"] == "completed"
