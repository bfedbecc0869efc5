"""`trainer.ensemble=N`: the runs `seed=S`, ..., `seed=S+N-1`, trained in one process.

What an ensemble adds to dgrun.run, which decides, holds, repairs and records its members like
any run: the members, their stacked parameters and one optimizer, their restore into the
stack, their recorders, the ensemble's summary (the loop: dgrun.ensemble_fit).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dgrun import checkpoint, models, optim, probes, progress, trackers
from dgrun.assemble import load_data, make_plan, restore_extras
from dgrun.config import RunConfig
from dgrun.data import augment as augmentation
from dgrun.data.bundle import Bundle
from dgrun.ensemble_fit import Parts
from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.objectives import OBJECTIVES
from dgrun.preemption import PreemptionGuard
from dgrun.record import Facts, Recorder
from dgrun.resume import Decision
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
    decision: Decision = None  # type: ignore[assignment]  (dgrun.run decides it)
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


def describe(m: Member, size: int) -> dict:
    """What a member's summary.json says of its ensemble."""
    return {"size": size, "member": m.k}


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


def check(cfg: RunConfig, run_dir: Optional[Path] = None) -> None:
    """Refuse what an ensemble cannot train exactly as N separate runs, in one line."""
    if cfg.optimizer.name not in ELEMENTWISE:
        raise UserError(f"trainer.ensemble needs an elementwise optimizer ({', '.join(ELEMENTWISE)})"
                        f"; '{cfg.optimizer.name}' would mix the members' updates",
                        "use trainer.ensemble=1 (or a sweep over seed) with this optimizer")
    if run_dir is not None and RunDir(run_dir).has_record():
        raise UserError(f"{run_dir} holds a single run; an ensemble writes member_<k>/ folders",
                        "use a new hydra.run.dir for the ensemble")


def members(cfg: RunConfig, run_dir: Path, config: dict[str, Any]) -> list[Member]:
    """The N separate runs the ensemble is: member k is `seed=S+k` in `member_<k>/`."""
    out = []
    for k in range(cfg.trainer.ensemble):
        mcfg = replace(cfg, seed=cfg.seed + k, trainer=replace(cfg.trainer, ensemble=1))
        out.append(Member(k, mcfg, member_config(config, k), RunDir(member_path(run_dir, k))))
    return out


def lockstep(members: list[Member]) -> int:
    """The step every member that trains starts from; sets each one's `payload` to its
    checkpoint at that step (or none: it starts fresh)."""
    steps = {m.k: m.decision.payload["state"]["step"] if m.decision.payload else 0
             for m in members if m.trains}
    start = min(steps.values())
    for m in members:
        if not m.trains:
            m.payload = m.decision.payload
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


def build(cfg: RunConfig, members: list[Member], device: torch.device) -> tuple[Stack, Parts]:
    """Each member's data, model, objective and probes as its own run builds them, then the
    stack, one optimizer and schedule over it, and the plan."""
    # One copy of the data unless the data, their subset or their corruption are drawn from
    # each member's seed.
    per_member = cfg.corruption.name != "none" and cfg.corruption.seed is None
    per_member |= cfg.subset.fraction is not None and cfg.subset.seed is None  # own subsets
    per_member |= cfg.data_follows_seed  # own data: dataset.seed / split_seed null
    shared = None if per_member else load_data(cfg, device)
    modules = []
    for m in members:
        seed_everything(m.cfg.seed)  # what a separate run seeds before building
        # A member's data is derived from its own config (seed S+k), as its separate run's.
        m.bundle = load_data(m.cfg, device) if per_member else shared
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


def restore(stack: Stack, parts: Parts, members: list[Member]) -> None:
    """Put each member's checkpoint into its slices (every piece on the run's device); the
    optimizer and schedule state (shared counters) from the first member that trains."""
    for m in members:
        if m.payload is not None:
            stack.load_member(m.k, m.payload["model"])
            restore_extras(m.payload, m.objective, m.probes, parts.device)
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


def recorder(m: Member, facts: Facts, sinks: trackers.TrackerSet, stack: Stack, parts: Parts,
             guard: PreemptionGuard) -> Recorder:
    """Member k's hooks: its slices of the stack saved as a single run's checkpoint."""
    facts.described["ensemble"] = describe(m, len(stack.views))
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
