"""trainer.ensemble=N: N seeds in one process, each a complete run equal to its separate run."""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import composer, read_metrics, read_summary, train_job
from dgrun import checkpoint, ensemble
from dgrun.config import Component
from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError
from dgrun.probes import PROBES, Probe
from dgrun.report import find_run_dirs
from dgrun.run import build, restore, run
from dgrun.seeding import derive_seed, seed_everything
from dgrun.stacked import (Stack, draw_masks, member_optimizer_state,
                           stacked_optimizer_state)

SMALL = ["model.width=64", "threads=1", "trainer.progress=none", "quiet=true"]


@pytest.fixture(scope="module")
def job():
    """job(overrides) -> (RunConfig, resolved config); train(dir, overrides) runs it."""
    yield from composer(*SMALL)


train = train_job


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


def assert_close_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ra:
            assert (ra[key] == rb[key] == "") or abs(float(ra[key]) - float(rb[key])) <= tol, \
                (ra["step"], key, ra[key], rb[key])


def weights(run_dir: Path) -> dict:
    return checkpoint.load_latest(run_dir / "checkpoints")["model"]


# ------------------------------------------------------------------ equal to separate runs
def compare(job, ens: Path, tmp_path: Path, knobs) -> set[int]:
    """Each member against the separate run `seed=k` with the same knobs -> the steps run."""
    steps = set()
    for k in range(2):
        single = train(job, tmp_path / f"seed{k}", f"seed={k}", *knobs)
        member = ens / f"member_{k}"
        assert_close_rows(rows(member), rows(tmp_path / f"seed{k}"))
        got = read_summary(member)
        assert (got["status"], got["stop_reason"], got["steps"]) == \
               (single["status"], single["stop_reason"], single["steps"])
        assert got["interpolation"]["step"] == single["interpolation"]["step"]
        assert got["config"] == read_summary(tmp_path / f"seed{k}")["config"]  # seed k, N=1
        assert got["seed"] == k and got["ensemble"] == {"size": 2, "member": k}
        if "+probes.ensemble_test_probe={}" in knobs:
            assert got["model_probe"]["last_first_mean"] == \
                pytest.approx(single["model_probe"]["last_first_mean"], abs=1e-6)
            assert checkpoint.load_latest(member / "checkpoints")["probes"] == \
                {"ensemble_test_probe": {"seen": len(rows(member))}}
        assert (member / "plots" / "accuracy.png").is_file()
        steps.add(got["steps"])
    return steps


# lr 0.1: the members fit their data at different evaluations, so one is frozen while the
# other goes on, and each has its own interpolation step.
FIT = ("optimizer.lr=0.1", "trainer.max_epochs=30")


@pytest.fixture(scope="module")
def fitted(job, tmp_path_factory) -> Path:
    ens = tmp_path_factory.mktemp("fitted") / "ens"
    summary = train(job, ens, "trainer.ensemble=2", *FIT)
    assert summary["members"][1]["dir"] == str(ens / "member_1")
    return ens


def test_a_time_budget_ending_on_an_evaluation_step_records_that_step_once(job, tmp_path):
    ens = tmp_path / "ens"
    train(job, ens, "trainer.ensemble=2", "trainer.max_epochs=null", "trainer.max_time_s=1e-9",
          "trainer.unit=step", "trainer.eval_every=1")
    for k in range(2):
        assert read_summary(ens / f"member_{k}")["stop_reason"] == "max_time_s"
        assert [int(r["step"]) for r in read_metrics(ens / f"member_{k}")] == [0, 1]


def test_members_stop_on_their_own_as_separate_runs_do(job, fitted, tmp_path):
    steps = compare(job, fitted, tmp_path, FIT)
    assert len(steps) == 2, "the members were meant to stop at different steps"
    assert all(read_summary(fitted / f"member_{k}")["stop_reason"] == "interpolation"
               for k in range(2))


class ModelProbe(Probe):
    """Measures through ev.model, ev.predict and ev.logits; keeps a count in its state."""

    def __init__(self):
        self.seen = 0

    def measure(self, ev):
        self.seen += 1
        first = next(ev.model.parameters())
        return {"probe_first_mean": first.mean(), "probe_seen": self.seen,
                "probe_test_max": ev.logits("test").max(dim=1).values.mean(),
                "probe_predict": ev.predict(ev.test.x[:50]).mean()}

    def summarize(self, rows):
        return {"model_probe": {"last_first_mean": rows[-1]["probe_first_mean"]}} if rows else {}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


@pytest.fixture(scope="module", autouse=True)
def test_components():
    """This module's probe and streamed dataset, registered only while its tests run: the
    registries must agree with conf/ for every other module (test_config checks it)."""
    PROBES.register("ensemble_test_probe")(lambda *, meta, seed: ModelProbe())
    DATASETS.register("ensemble_test_stream", modality="vector")(_stream_dataset)
    yield
    PROBES.unregister("ensemble_test_probe")
    DATASETS.unregister("ensemble_test_stream")


@pytest.mark.parametrize("knobs", [
    # dropout masks, per-member gradient clipping, Adam's state, label noise drawn per member,
    # a probe that measures through the member's module
    ("model.dropout=0.3", "trainer.grad_clip=0.5", "optimizer=adam", "trainer.max_epochs=3",
     "corruption=partial_labels", "corruption.prob=0.3", "dataset.augment={crop:1,flip:true}",
     "+probes.ensemble_test_probe={}"),
    # pixels drawn per member: each holds its own noise images (full batch: no batch order)
    ("corruption=gaussian_pixels", "trainer.batch_size=null", "trainer.max_epochs=4"),
])
def test_members_equal_separate_runs(job, tmp_path, knobs):
    train(job, tmp_path / "ens", "trainer.ensemble=2", *knobs)
    compare(job, tmp_path / "ens", tmp_path, knobs)


STREAM_CALLS: list[int] = []


def _stream_dataset(*, seed: int = 7) -> Bundle:
    """A teacher's labels on fresh Gaussian inputs each step, seeded by the dataset only."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=gen)

    def draw(g: torch.Generator, n: int):
        x = torch.randn(n, 16, generator=g)
        return x, (x @ teacher).argmax(dim=1)

    def stream(step: int, batch_size: int, device):
        STREAM_CALLS.append(step)
        x, y = draw(torch.Generator().manual_seed(derive_seed(seed, "stream", step)), batch_size)
        return x.to(device), y.to(device)

    x, y = draw(gen, 200)
    xt, yt = draw(gen, 100)
    return Bundle(Split(x, y, stream=stream), Split(xt, yt),
                  Meta("ensemble_test_stream", "vector", (16,), 4))


def test_streamed_batches_are_drawn_once_and_shared(job, tmp_path):
    cfg, config = job("trainer.max_steps=20", "trainer.max_epochs=null", "trainer.batch_size=32",
                      "trainer.stop_at_interpolation=false")
    cfg = replace(cfg, dataset=Component("ensemble_test_stream", {}),
                  pipeline={"preprocess": None, "center_crop": None, "augment": None})
    config = {**config, "dataset": {"name": "ensemble_test_stream"}}
    STREAM_CALLS.clear()
    ens = replace(cfg, trainer=replace(cfg.trainer, ensemble=3))
    run(ens, tmp_path / "ens", {**config, "trainer": {**config["trainer"], "ensemble": 3}})
    assert STREAM_CALLS == list(range(20))  # one draw a step, for all three members
    run(replace(cfg, seed=2), tmp_path / "seed2", {**config, "seed": 2})
    assert_close_rows(rows(tmp_path / "ens" / "member_2"), rows(tmp_path / "seed2"))


# ------------------------------------------------------------------ resume
# Dropout exercises the per-member masks; checkpoints every 7 steps land inside epochs and
# between evaluations. Member 0 fits its data at step 200, member 1 at step 275.
# dataset.split_seed=0: both members on seed 0's split (the steps above are for that split).
RESUMABLE = ["trainer.ensemble=2", "dataset.split_seed=0", "model.dropout=0.1",
             "trainer.unit=step", "trainer.eval_every=5",
             "trainer.checkpoint_every=7", "trainer.max_steps=300", "trainer.max_epochs=null",
             "optimizer.lr=0.1"]


def start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dgrun.cli", *RESUMABLE, *SMALL,
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def assert_same_ensemble(got: Path, reference: Path) -> None:
    for k in range(2):
        member, ref = got / f"member_{k}", reference / f"member_{k}"
        assert rows(member) == rows(ref)  # exactly
        a, b = weights(member), weights(ref)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert read_summary(member)["status"] == read_summary(ref)["status"]


def test_sigkill_then_resume_matches_an_uninterrupted_ensemble(job, tmp_path):
    killed = tmp_path / "killed"
    proc = start(killed)
    ckpt = killed / "member_1" / "checkpoints" / "previous.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists():  # two checkpoint rounds done: steps 7 and 14
        assert proc.poll() is None, f"ended before the kill point: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_summary(killed / "member_0")["status"] == "running"
    # As a kill half-way through a checkpoint round leaves it: member 1 one checkpoint behind,
    # so member 0 must go back to its previous checkpoint too.
    last = killed / "member_1" / "checkpoints"
    os.replace(last / "previous.pt", last / "last.pt")
    behind = checkpoint.load_latest(last)["state"]["step"]
    assert checkpoint.load_latest(killed / "member_0" / "checkpoints")["state"]["step"] > behind

    reference = tmp_path / "reference"  # snapshots: every checkpoint kept (a resumable key)
    train(job, reference, *RESUMABLE, "trainer.snapshots=every")
    ended = read_summary(reference / "member_0")
    assert ended["stop_reason"] == "interpolation" and ended["steps"] < 275
    train(job, killed, *RESUMABLE)
    assert_same_ensemble(killed, reference)
    # The command's .hydra/ went to .ensemble/, so a report sees the members as its runs.
    assert (killed / ".ensemble" / ".hydra" / "config.yaml").is_file()
    assert find_run_dirs([killed]) == [(killed / f"member_{k}").resolve() for k in range(2)]
    assert all(read_summary(killed / f"member_{k}")["resumed_at_steps"] == [behind]
               for k in range(2))

    # Killed after member 0 had ended: member 1's newest checkpoint is the first one after
    # that; member 0 stays as it ended, frozen in the stack, and is not written again.
    late = tmp_path / "late"
    shutil.copytree(reference, late)
    snaps = late / "member_1" / "checkpoints"
    after = min(int(p.stem[5:]) for p in snaps.glob("step_*.pt") if int(p.stem[5:]) > 200)
    shutil.copy(checkpoint.snapshot_path(snaps, after), snaps / "last.pt")
    untouched = (late / "member_0" / "summary.json").read_text()
    train(job, late, *RESUMABLE, "trainer.snapshots=every")
    assert_same_ensemble(late, reference)
    assert (late / "member_0" / "summary.json").read_text() == untouched
    assert read_summary(late / "member_1")["resumed_at_steps"] == [after]


def test_a_member_checkpoint_is_a_single_runs_checkpoint(job, fitted, tmp_path):
    member = tmp_path / "member_1"
    shutil.copytree(fitted / "member_1", member)
    payload = checkpoint.load_latest(member / "checkpoints")
    ended = payload["state"]["step"]
    cfg, _ = job("seed=1", *FIT)
    seed_everything(1)
    parts = build(cfg, torch.device("cpu"))
    state = restore(parts, payload)  # as dgrun.run restores a run of its own
    assert state.step == ended and parts.optimizer.state_dict()["state"]  # momentum too
    assert all(torch.equal(v, payload["model"][k]) for k, v in parts.model.state_dict().items())
    # ... and the member goes on as a separate run would: past its threshold, to 20 epochs
    s = train(job, member, "seed=1", *FIT, "trainer.stop_at_interpolation=false",
              "trainer.max_epochs=20")
    assert s["status"] == "completed" and s["steps"] == 240 > ended
    assert s["resumed_at_steps"] == [ended]


# ------------------------------------------------------------------ refusals
def test_refusals_are_one_line(job, tmp_path):
    cfg, config = job("trainer.ensemble=2")
    with pytest.raises(UserError, match="elementwise optimizer"):
        ensemble.check(replace(cfg, optimizer=Component("lars", {})))
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="holds a single run"):
        run(cfg, tmp_path / "single", config)

    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)
    with pytest.raises(UserError, match="random numbers other than F.dropout"):
        Stack([Noisy(), Noisy()])(torch.zeros(2, 3, 4), batched=True)

    class Branchy(nn.Linear):
        def forward(self, x):
            return super().forward(x) if x.sum().item() > 0 else x
    with pytest.raises(UserError, match="cannot run under torch.func.vmap"):
        Stack([Branchy(4, 4), Branchy(4, 4)])(torch.ones(2, 3, 4), batched=True)


def test_members_at_different_steps_are_refused(job, fitted):
    before = read_metrics(fitted / "member_0")
    with pytest.raises(UserError, match="different steps"):
        train(job, fitted, "trainer.ensemble=2", *FIT, "trainer.stop_at_interpolation=false")
    assert read_metrics(fitted / "member_0") == before  # nothing touched
    again = train(job, fitted, "trainer.ensemble=2", *FIT)  # both finished: nothing to do
    assert again["status"] == "completed" and again["stop_reason"] == "interpolation"


# ------------------------------------------------------------------ the stack's mechanics
def mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))


def test_per_member_clipping_and_optimizer_state_are_each_members_own():
    singles = [mlp(s) for s in range(3)]
    stack = Stack(singles)
    opt = torch.optim.Adam(stack.parameters(), lr=0.1)
    x, y = torch.randn(3, 5, 6), torch.randint(3, (3, 5))
    for step in range(2):
        out = stack(x, batched=True)
        F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(3, 5).mean(1) \
            .sum().backward()
        stack.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
    for k, model in enumerate(singles):
        single_opt = torch.optim.Adam(model.parameters(), lr=0.1)
        for step in range(2):
            F.cross_entropy(model(x[k]), y[k]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            single_opt.step()
            single_opt.zero_grad()
        for name, p in model.named_parameters():
            assert torch.allclose(stack.views[k].get_parameter(name), p, atol=1e-6)
        mine = member_optimizer_state(opt.state_dict(), stack.parameters(), k)
        ref = single_opt.state_dict()
        assert mine["param_groups"] == ref["param_groups"]
        for i in ref["state"]:
            for key in ref["state"][i]:
                assert torch.allclose(mine["state"][i][key], ref["state"][i][key], atol=1e-6)
    states = [member_optimizer_state(opt.state_dict(), stack.parameters(), k) for k in range(3)]
    again = stacked_optimizer_state(states, stack.parameters(), lead=0)
    for i, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(again["state"][i][key], v) for key, v in entry.items())


def test_dropout_masks_are_the_separate_runs_masks():
    singles = [mlp(s, dropout=0.5) for s in range(2)]
    stack = Stack(singles)
    x = torch.randn(2, 4, 6)
    seeds = [derive_seed(s, "step", 3) for s in range(2)]
    calls = stack.dropout_calls(x, batched=True)
    assert calls == [((4, 8), 0.5)]
    out = stack(x, True, draw_masks(calls, seeds, torch.device("cpu")))
    for k, model in enumerate(singles):
        torch.default_generator.manual_seed(seeds[k])
        assert torch.allclose(out[k], model(x[k]), atol=1e-6)


def test_frozen_members_keep_their_parameters_and_buffers():
    nets = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    stack = Stack(nets)
    opt = torch.optim.SGD(stack.parameters(), lr=0.5, momentum=0.9)
    stack.freeze([1])
    before = copy.deepcopy(stack.views[1].state_dict())
    for _ in range(3):
        stack(torch.randn(3, 8, 4), batched=True).pow(2).sum().backward()
        opt.step()
        stack.hold()
    after = stack.views[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(stack.views[0].state_dict()["1.running_mean"], before["1.running_mean"])
