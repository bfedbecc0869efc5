"""`trainer.ensemble=N`: the runs `seed=S`, ..., `seed=S+N-1`, trained in one process.

Member k is the run `seed=S+k` (its own initialization, batch order, corruption draw, dropout
and augmentation noise) and writes a complete run directory, `<run dir>/member_<k>/`, whose
summary.json holds the config that run would have (seed S+k, trainer.ensemble 1): `dgrun
report` and `dgrun show` list N runs, and `dgrun seed=S+k hydra.run.dir=<run dir>/member_<k>`
(same other overrides) resumes or extends one member on its own. The command's own record
(.hydra/) goes to `<run dir>/.ensemble/`, where no report looks for runs; `ensemble.json`
lists the members.

The members train in lockstep through dgrun.stacked (stacked parameters, one vmapped forward,
one optimizer): the same numbers as N separate runs up to float rounding (batched matmuls
round differently). Each member applies the loop's rules on its own rows; a member that ends
(threshold, stall, divergence) writes its final record and is frozen while the others go on.

Data. A corruption is drawn from the member's seed (unless corruption.seed fixes it), so each
member holds its own copy of the corrupted data: labels, or pixels too for the pixel
corruptions (N times the memory on the device). Otherwise one copy is shared. Data that
streams (Split.stream) is drawn from the dataset's own seed, the same batch for every seed:
one draw per step feeds every member that shares the data, as N separate runs would see it.

Resume. Whenever one active member writes a checkpoint, they all do, so the members that
still train always share their newest checkpoint step; a re-run resumes them all from it (a
member whose newer checkpoint a kill left half-way through the round falls back to its
previous one). Ended members stay in the stack, frozen at their final checkpoint, so the stack
and its arithmetic are those of the uninterrupted ensemble: the resumed run ends identical.
Members that would continue from different steps (ended at different thresholds) are refused.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dgrun import checkpoint, models, optim, probes, progress, runtime, trackers
from dgrun.config import RunConfig
from dgrun.data import augment as augmentation
from dgrun.data import pipeline
from dgrun.data.bundle import Bundle
from dgrun.ensemble_fit import Parts, fit
from dgrun.errors import UserError
from dgrun.files import write_json
from dgrun.losses import LOSSES
from dgrun.objectives import OBJECTIVES
from dgrun.preemption import PreemptionGuard
from dgrun.record import Facts, Recorder
from dgrun.resume import Decision, decide
from dgrun.run import claim_tracker_files, describe, make_plan
from dgrun.rundir import RunDir
from dgrun.seeding import seed_everything, set_rng_state
from dgrun.stacked import Stack, member_optimizer_state, stacked_optimizer_state
from dgrun.status import DIVERGED, FAILED, PREEMPTED
from dgrun.train import State

log = logging.getLogger("dgrun")

# Optimizers whose update of an entry depends on that entry alone: over stacked parameters
# they update every member exactly as alone. (One with per-tensor norms, LAMB or LARS, would
# mix the members.)
ELEMENTWISE = ("sgd", "adam", "adamw")


@dataclass
class Member:
    k: int
    cfg: RunConfig                       # the run's config as `seed=S+k` would have it
    config: dict[str, Any]
    record: RunDir
    decision: Decision
    payload: Optional[dict] = None       # the checkpoint it starts from (or is frozen at)
    bundle: Optional[Bundle] = None
    augment: Optional[Callable] = None
    objective: Any = None
    probes: list = field(default_factory=list)
    state: State = field(default_factory=State)
    recorder: Optional[Recorder] = None  # None: ended before this process started
    summary: Optional[dict] = None       # its final summary, once it has ended

    @property
    def trains(self) -> bool:
        return not self.decision.finished


def member_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"member_{k}"


def member_config(config: dict[str, Any], k: int) -> dict[str, Any]:
    """The resolved config of the separate run that member k is."""
    out = copy.deepcopy(config)
    out["seed"] = int(config["seed"]) + k
    out["trainer"] = {**out["trainer"], "ensemble": 1}
    return out


def member_overrides(overrides: Optional[list[str]], seed: int) -> list[str]:
    keep = [o for o in overrides or []
            if o.split("=", 1)[0].lstrip("+~") not in ("seed", "trainer.ensemble")]
    return keep + [f"seed={seed}"]


def check(cfg: RunConfig) -> None:
    """Refuse what an ensemble cannot train exactly as N separate runs, in one line."""
    if cfg.optimizer.name not in ELEMENTWISE:
        raise UserError(f"trainer.ensemble needs an elementwise optimizer ({', '.join(ELEMENTWISE)})"
                        f"; '{cfg.optimizer.name}' would mix the members' updates",
                        "use trainer.ensemble=1 (or a sweep over seed) with this optimizer")


def lockstep(members: list[Member]) -> int:
    """The step every member that trains starts from; sets each one's `payload` to its
    checkpoint at that step (or none: it starts fresh)."""
    steps = {m.k: m.decision.payload["state"]["step"] if m.decision.payload else 0
             for m in members if m.trains}
    start = min(steps.values())
    for m in members:
        if not m.trains:
            m.payload = checkpoint.load_latest(m.record.checkpoints)
        elif steps[m.k] == start:
            m.payload = m.decision.payload
        elif start == 0:  # a kill during the first checkpoint round: start over with the rest
            m.decision = replace(m.decision, action="fresh", payload=None, clear=True,
                                 why="the other members have no checkpoint yet")
        else:
            m.payload = _checkpoint_at(m, start, steps)
    return start


def _checkpoint_at(m: Member, step: int, steps: dict[int, int]) -> dict:
    for path in checkpoint.candidates(m.record.checkpoints):
        try:
            payload = checkpoint.load_file(path)
        except ValueError:
            continue
        if payload["state"]["step"] == step:
            return payload
    where = ", ".join(f"member_{k} at step {s}" for k, s in steps.items())
    raise UserError(f"the members of this ensemble would go on from different steps ({where})",
                    f"train them one by one (dgrun seed=S hydra.run.dir={m.record.path.parent}"
                    "/member_K, the same other overrides), or trainer.resume=false")


def run(cfg: RunConfig, run_dir: Path, config: dict[str, Any], *,
        job_num: Optional[int] = None, overrides: Optional[list[str]] = None,
        on_start: Optional[Callable[[RunDir], None]] = None, parallel_jobs: int = 1) -> dict:
    """Train the ensemble into run_dir/member_<k>/ (see the module docstring); returns the
    ensemble's summary (ensemble.json). Like dgrun.run.run, nothing is written before every
    member's decision is known and every check has passed."""
    check(cfg)
    run_dir = Path(run_dir)
    if RunDir(run_dir).has_record():
        raise UserError(f"{run_dir} holds a single run; an ensemble writes member_<k>/ folders",
                        "use a new hydra.run.dir for the ensemble")
    members = []
    for k in range(cfg.trainer.ensemble):
        mcfg = replace(cfg, seed=cfg.seed + k, trainer=replace(cfg.trainer, ensemble=1))
        record = RunDir(member_path(run_dir, k))
        mconfig = member_config(config, k)
        members.append(Member(k, mcfg, mconfig, record, decide(record, mconfig, mcfg.trainer)))
    if not any(m.trains for m in members):
        print(f"dgrun: {run_dir}: all {len(members)} members already finished; nothing to do",
              file=sys.stderr)
        return aggregate([m.decision.summary or {} for m in members], run_dir)
    start = lockstep(members)
    sinks = [trackers.build(cfg.logger) if m.trains else None for m in members]
    device = runtime.configure(threads=runtime.start_threads(cfg.threads, parallel_jobs),
                               deterministic=cfg.deterministic, device=cfg.device,
                               job_num=job_num)
    stack, parts = build(cfg, members, device)
    if cfg.threads == "auto" and device.type == "cpu":  # the whole stack's step counts
        x = members[0].bundle.train.x[:1]
        batch = members[0].bundle.prepare(x.expand(parts.plan.batch_size, *x.shape[1:]))
        macs = runtime.step_macs(stack.views[0], batch) * len(members)
        torch.set_num_threads(runtime.auto_threads(macs, parallel_jobs))
    restore(stack, parts, members)
    meta, plan = members[0].bundle.meta, parts.plan
    log.info("%s | %s (%d params) x %d: seeds %d..%d | %s p=%s | %d train / %d test | %s | "
             "%d steps/epoch | %s", meta.name, cfg.model.name,
             models.count_params(stack.views[0]), len(members), cfg.seed,
             cfg.seed + len(members) - 1, cfg.corruption.name, cfg.corruption.prob,
             len(members[0].bundle.train), len(members[0].bundle.test), device,
             plan.steps_per_epoch, f"from step {start}" if start else "from the start")
    # From here on files are written.
    head = RunDir(run_dir / ".ensemble")
    head.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(head)
    guard = PreemptionGuard()
    for m, m_sinks in zip(members, sinks):
        if m.trains:
            m.recorder = _recorder(m, m_sinks, stack, parts, guard, overrides, device, start)
    try:
        with guard, parts.bar:
            fit(stack, parts, members, guard, start)
    except BaseException as e:
        for m in members:
            if m.recorder is not None and m.state.status == "running":
                m.state.status, m.recorder.facts.error = FAILED, f"{type(e).__name__}: {e}"
                m.recorder.sinks.finish(m.recorder.write_summary(m.state))
        raise
    summary = aggregate([m.summary or m.decision.summary or {} for m in members], run_dir)
    write_json(run_dir / "ensemble.json", summary)
    log.info("%s: %d members: %s", run_dir, len(members), summary["stop_reason"])
    if summary["status"] == PREEMPTED:
        guard.forward()
    return summary


def build(cfg: RunConfig, members: list[Member], device: torch.device) -> tuple[Stack, Parts]:
    """Each member's data, model, objective and probes as its own run builds them, then the
    stack, one optimizer and schedule over it, and the plan."""
    # One copy of the data unless the data, their subset or their corruption are drawn from
    # each member's seed.
    per_member = cfg.corruption.name != "none" and cfg.corruption.seed is None
    per_member |= cfg.subset.fraction is not None and cfg.subset.seed is None  # own subsets
    per_member |= cfg.data_follows_seed  # own data: dataset.seed / split_seed null
    shared = None if per_member else _load(cfg, device)
    modules = []
    for m in members:
        seed_everything(m.cfg.seed)  # what a separate run seeds before building
        m.bundle = _load(m.cfg, device) if per_member else shared
        meta = m.bundle.meta
        m.augment = augmentation.build(cfg.pipeline.get("augment"), seed=m.cfg.seed,
                                       modality=meta.modality, input_shape=meta.input_shape)
        # The dataset loaders draw from their own generators only, so after the shared load
        # (or none) the model's initialization is that of the separate run.
        modules.append(models.create(cfg.model.name, meta.input_shape, meta.num_classes,
                                     meta.modality, vocab_size=meta.vocab_size,
                                     **cfg.model.options).to(device))
        loss, eval_loss = LOSSES.build(cfg.trainer.loss,
                                       label_smoothing=cfg.trainer.label_smoothing)
        m.objective = OBJECTIVES.build(
            cfg.objective.name, train=m.bundle.train,
            num_groups=len(meta.extra.get("groups", [0])),
            per_example_loss=lambda out, y, loss=loss: loss(out, y, reduction="none"),
            **cfg.objective.options)
        m.probes = probes.build({p.name: p.options for p in cfg.probes}, meta=meta,
                                seed=m.cfg.seed, loss=cfg.trainer.loss)
    stack = Stack(modules)
    del modules
    plan, snapshot_points = make_plan(cfg.trainer, len(members[0].bundle.train), cfg.seed)
    optimizer, scheduler = optim.build(torch.nn.ParameterList(stack.parameters()),
                                       cfg.optimizer.name, cfg.optimizer.options,
                                       cfg.scheduler.name, cfg.scheduler.options,
                                       steps_per_epoch=plan.steps_per_epoch,
                                       total_steps=plan.max_steps)
    bar = progress.make(cfg.trainer.progress, plan.max_steps, cfg.trainer.log_every_s)
    return stack, Parts(cfg, plan, snapshot_points, optimizer, scheduler, eval_loss, bar, device)


def _load(cfg: RunConfig, device: torch.device) -> Bundle:
    return pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                         corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                         apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline,
                         subset_fraction=cfg.subset.fraction, subset_seed=cfg.subset_seed,
                         ).to(device)


def restore(stack: Stack, parts: Parts, members: list[Member]) -> None:
    """Put each member's checkpoint into its slices; the optimizer and schedule state (shared
    counters) from the first member that trains."""
    for m in members:
        if m.payload is not None:
            stack.load_member(m.k, m.payload["model"])
            m.objective.load_state_dict(m.payload.get("objective", {}))
            saved = m.payload.get("probes", {})
            for probe in m.probes:
                if probe.name in saved:
                    probe.load_state_dict(saved[probe.name])
        if m.trains and m.payload is not None:
            m.state = State(**m.payload["state"])
            m.state.status, m.state.stop_reason = "running", None
        elif not m.trains:  # ended: frozen at its final checkpoint, never recorded again
            m.state = State(**m.payload["state"]) if m.payload else State(status=DIVERGED)
    lead = next(m for m in members if m.trains)
    if lead.payload is not None:
        states = [m.payload["optimizer"] if m.payload else None for m in members]
        parts.optimizer.load_state_dict(
            stacked_optimizer_state(states, stack.parameters(), lead.k))
        parts.scheduler.load_state_dict(lead.payload["scheduler"])
        set_rng_state(lead.payload["rng"])
    stack.freeze([m.k for m in members if not m.trains])


class _ModelSlice:
    """What a Recorder saves as "model": member k as a single model's state_dict."""

    def __init__(self, stack: Stack, k: int):
        self.stack, self.k = stack, k

    def state_dict(self) -> dict:
        return self.stack.member_state_dict(self.k)


class _OptimizerSlice:
    """What a Recorder saves as "optimizer": the single model's optimizer state."""

    def __init__(self, optimizer: torch.optim.Optimizer, stack: Stack, k: int):
        self.optimizer, self.stack, self.k = optimizer, stack, k

    def state_dict(self) -> dict:
        return member_optimizer_state(self.optimizer.state_dict(), self.stack.parameters(),
                                      self.k)


def _recorder(m: Member, sinks: trackers.TrackerSet, stack: Stack, parts: Parts,
              guard: PreemptionGuard, overrides: Optional[list[str]], device: torch.device,
              start: int) -> Recorder:
    m.record.path.mkdir(parents=True, exist_ok=True)
    if m.decision.clear:
        log.warning("%s: replacing the previous run's record (%s)", m.record.path,
                    m.decision.why)
        m.record.clear()
    described = describe(m.cfg, m.bundle, device)
    described["ensemble"] = {"size": len(stack.views), "member": m.k}
    facts = Facts(described=described, params=models.count_params(stack.views[m.k]),
                  config=m.config, overrides=member_overrides(overrides, m.cfg.seed),
                  subset_rows=m.bundle.subset)
    if m.payload is not None:
        facts.resumed_at_steps = list((m.decision.summary or {}).get("resumed_at_steps", []))
        facts.resumed_at_steps.append(start)
    claim_tracker_files(m.record, m.cfg.logger)
    sinks.start(m.record.path, m.config, resume=m.payload is not None)
    recorder = Recorder(m.record, facts, model=_ModelSlice(stack, m.k),
                        optimizer=_OptimizerSlice(parts.optimizer, stack, m.k),
                        scheduler=parts.scheduler, probes=m.probes,
                        snapshots=parts.cfg.trainer.snapshots,
                        snapshot_points=parts.snapshot_points,
                        bar=progress.NoProgress(None, math.inf), guard=guard,
                        objective=m.objective, sinks=sinks)
    m.state.steps_per_epoch = parts.plan.steps_per_epoch
    recorder.start(m.state)
    return recorder


def aggregate(summaries: list[dict], run_dir: Path) -> dict:
    """The ensemble at a glance (ensemble.json; what the command prints and returns): the
    worst member status, the members' stop reason (counted when they differ), their mean
    final numbers."""
    order = (FAILED, PREEMPTED, "running", "diverged", "stopped", "completed")
    statuses = [s.get("status") or "running" for s in summaries]
    reasons: dict[str, int] = {}
    for s in summaries:
        reasons[str(s.get("stop_reason"))] = reasons.get(str(s.get("stop_reason")), 0) + 1
    finals = [s.get("final") or {} for s in summaries]
    keys = [k for k in finals[0] if all(isinstance(f.get(k), (int, float)) for f in finals)]
    reached = [s.get("interpolation") or {} for s in summaries]
    interpolation = {"reached": all(r.get("reached") for r in reached)}
    if interpolation["reached"]:
        interpolation.update(step=max(r["step"] for r in reached),
                             time_s=max(r["time_s"] for r in reached),
                             test_acc=sum(r["test_acc"] for r in reached) / len(reached))
    return {
        "status": min(statuses, key=lambda s: order.index(s) if s in order else 0),
        "stop_reason": next(iter(reasons)) if len(reasons) == 1 else
                       ", ".join(f"{n} {r}" for r, n in reasons.items()),
        "steps": max(s.get("steps") or 0 for s in summaries),
        "time_s": max(s.get("time_s") or 0.0 for s in summaries),
        "final": {k: sum(f[k] for f in finals) / len(finals) for k in keys},
        "interpolation": interpolation,
        "members": [{"dir": str(member_path(run_dir, k)), "seed": s.get("seed"),
                     "status": s.get("status"), "stop_reason": s.get("stop_reason"),
                     "steps": s.get("steps"), "test_acc": (s.get("final") or {}).get("test_acc")}
                    for k, s in enumerate(summaries)],
    }
