"""One run, or an ensemble's N member runs, assembled: hold -> decide -> build -> fit -> record.

    hold     the run directory's lock (dgrun.rundir.RunLock; an ensemble's and each member's):
             one writer; a second command is refused in one line naming the holder
    decide   from the run directory alone: fresh, resume, continue, finished, or refused
             (dgrun.resume), before any data is read or any file is touched. A finished run
             missing a derived file (summary.json, plots, a tracker's finish) is repaired from
             its final checkpoint, without training
    build    data, model, optimizer, schedule, objective, probes, the plan (all plain
             arguments: each builder is usable from Python without Hydra; dgrun.assemble)
    restore  a checkpoint back, every piece of it on the run's device
    fit      dgrun.train.fit with a Recorder as its hooks; an ensemble's members go through
             dgrun.ensemble_fit.fit over their stacked parameters (dgrun.ensemble)
    record   summary.json, plots (dgrun.record); `failed` and the reason when fit raises

The only module that knows both the config and the components, and the one place that
decides, holds, restores and records, for one run or N members.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dgrun import ensemble, heap, models, optim, probes, progress, runtime, trackers
from dgrun.assemble import (claim_tracker_files, describe, load_data, log_points,  # noqa: F401
                            make_plan, restore_extras)
from dgrun.config import RunConfig
from dgrun.data import augment as augmentation
from dgrun.data.bundle import Bundle
from dgrun.ensemble_fit import fit as fit_members
from dgrun.files import write_json
from dgrun.losses import LOSSES
from dgrun.objectives import OBJECTIVES, Objective
from dgrun.preemption import PreemptionGuard
from dgrun.record import TRACKERS_UNFINISHED, Facts, Recorder, missing_derived
from dgrun.resume import Decision, decide
from dgrun.rundir import RunDir, RunLock, sweep_temporary
from dgrun.seeding import seed_everything, set_rng_state
from dgrun.status import FAILED, PREEMPTED
from dgrun.train import Plan, State, fit

log = logging.getLogger("dgrun")


@dataclass
class Parts:
    """Everything `fit` needs, built from the config."""
    bundle: Bundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    eval_loss: Callable
    forward: Callable             # what training steps call: the model, or torch.compile of it
    augment: Optional[Callable]
    probes: list[probes.Probe]
    plan: Plan
    snapshot_points: set[int]


def build(cfg: RunConfig, device: torch.device) -> Parts:
    bundle = load_data(cfg, device)
    meta = bundle.meta
    augment = augmentation.build(cfg.pipeline.get("augment"), seed=cfg.seed,
                                 modality=meta.modality, input_shape=meta.input_shape)
    model = models.create(cfg.model.name, meta.input_shape, meta.num_classes, meta.modality,
                          vocab_size=meta.vocab_size, **cfg.model.options).to(device)
    if cfg.trainer.channels_last and meta.modality == "image":
        model = model.to(memory_format=torch.channels_last)
    plan, snapshot_points = make_plan(cfg.trainer, len(bundle.train), cfg.seed)
    optimizer, scheduler = optim.build(model, cfg.optimizer.name, cfg.optimizer.options,
                                       cfg.scheduler.name, cfg.scheduler.options,
                                       steps_per_epoch=plan.steps_per_epoch,
                                       total_steps=plan.max_steps)
    loss, eval_loss = LOSSES.build(cfg.trainer.loss, label_smoothing=cfg.trainer.label_smoothing)
    objective = OBJECTIVES.build(
        cfg.objective.name, train=bundle.train, num_groups=len(meta.extra.get("groups", [0])),
        per_example_loss=lambda out, y: loss(out, y, reduction="none"), mean_loss=loss,
        **cfg.objective.options)
    specs = {p.name: p.options for p in cfg.probes}
    if cfg.trainer.track_examples:
        specs.setdefault("examples", {})
    probe_list = probes.build(specs, meta=meta, seed=cfg.seed, loss=cfg.trainer.loss)
    # Compiled for training steps only: the module itself keeps plain state_dict keys, and
    # evaluation (varying batch shapes) does not trigger recompiles.
    forward = torch.compile(model) if cfg.trainer.compile else model
    return Parts(bundle, model, optimizer, scheduler, objective, eval_loss, forward, augment,
                 probe_list, plan, snapshot_points)


def restore(parts: Parts, payload: dict, device: Optional[torch.device] = None) -> State:
    """Put a checkpoint back: module, optimizer, schedule, probes, every RNG, the counters.

    Checkpoints load onto the CPU; every piece goes to the run's `device` (default: where its
    data lives): the module and optimizer copy into their own tensors, the objective's and the
    probes' state is moved (dgrun.assemble.restore_extras)."""
    device = device if device is not None else parts.bundle.train.x.device
    state = State(**payload["state"])
    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])  # cast to each parameter's device
    parts.scheduler.load_state_dict(payload["scheduler"])
    restore_extras(payload, parts.objective, parts.probes, device)
    set_rng_state(payload["rng"])
    state.status, state.stop_reason = "running", None
    return state


def run(cfg: RunConfig, run_dir: Path, config: dict[str, Any], *,
        job_num: Optional[int] = None, overrides: Optional[list[str]] = None,
        on_start: Optional[Callable[[RunDir], None]] = None, parallel_jobs: int = 1) -> dict:
    """Train one run into `run_dir` (or, for trainer.ensemble=N, N member runs into its
    member_<k>/ folders), or continue it, or leave it be when it has finished.

    config: the resolved config (stored with every checkpoint: a resume must match it).
    job_num: the job's number in a sweep (picks its GPU when several are visible).
    parallel_jobs: jobs of a local sweep running at once (threads=auto divides the CPUs).
    on_start: called once the run will train, before anything is written (the CLI writes
    `.hydra/` there, so a refused or finished run's directory stays exactly as it was).
    """
    run_dir = Path(run_dir)
    size = cfg.trainer.ensemble
    if size > 1:
        ensemble.check(cfg, run_dir)
    members = [ensemble.member_path(run_dir, k) for k in range(size)] if size > 1 else []
    with contextlib.ExitStack() as locks:
        for path in [run_dir, *members]:  # before any decision: one writer while it is made
            locks.enter_context(RunLock(path))
        setup = Setup(job_num, overrides, parallel_jobs)
        if size > 1:
            return _run_ensemble(cfg, run_dir, config, setup, on_start)
        return _run_one(cfg, run_dir, config, setup, on_start)


@dataclass
class Setup:
    """How this command runs its runs (not what they compute)."""
    job_num: Optional[int]
    overrides: Optional[list[str]]
    parallel_jobs: int

    def device(self, cfg: RunConfig) -> torch.device:
        return runtime.configure(threads=runtime.start_threads(cfg.threads, self.parallel_jobs),
                                 deterministic=cfg.deterministic, device=cfg.device,
                                 job_num=self.job_num)

    def auto_threads(self, cfg: RunConfig, device: torch.device, model, bundle: Bundle,
                     batch_size: int, copies: int = 1, recorded: Optional[int] = None
                     ) -> Optional[str]:
        """threads=auto on the CPU: set (a resumed run's `recorded` count, else
        runtime.resolve_auto_threads's choice); returns why, None when not auto."""
        if cfg.threads != "auto" or device.type != "cpu":
            return None
        x = bundle.train.x[:1]
        threads, why = runtime.resolve_auto_threads(
            model, bundle.prepare(x.expand(batch_size, *x.shape[1:])),
            parallel_jobs=self.parallel_jobs, recorded=recorded, members=copies)
        log.info("threads=auto: %d, from %s", threads, why)
        return why


def _decide(record: RunDir, config: dict, cfg: RunConfig) -> Decision:
    """Held, so the temporary files of half-done writes here are a dead process's: sweep
    them, then decide."""
    for path in sweep_temporary(record.path):
        log.info("%s: removed %s (left by an interrupted write)", record.path, path.name)
    return decide(record, config, cfg.trainer)


def _prepare(record: RunDir, decision: Decision) -> None:
    """The directory ready to be written: made, and an earlier record removed if replaced."""
    record.path.mkdir(parents=True, exist_ok=True)
    if decision.clear:
        log.warning("%s: replacing the previous run's record (%s)", record.path, decision.why)
        record.clear(analyses=True)


def _facts(cfg: RunConfig, config: dict, bundle: Bundle, model, device: torch.device,
           batch_size: int, overrides: Optional[list[str]], decision: Decision,
           start: Optional[int]) -> Facts:
    facts = Facts(described=describe(cfg, bundle, device), params=models.count_params(model),
                  config=config, overrides=overrides, train_size=len(bundle.train),
                  batch_size=batch_size, subset_rows=bundle.subset)
    before = decision.summary or {}
    if start is not None:  # resumed or continued at `start`
        facts.resumed_at_steps = list(before.get("resumed_at_steps", [])) + [start]
    return facts


def _run_one(cfg: RunConfig, run_dir: Path, config: dict, setup: Setup,
             on_start: Optional[Callable[[RunDir], None]]) -> dict:
    record = RunDir(run_dir)
    decision = _decide(record, config, cfg)
    if decision.finished:
        return _finished(cfg, record, config, setup, decision)
    _prepare(record, decision)
    if on_start is not None:
        on_start(record)
    sinks = trackers.build(cfg.logger)  # before the data: a tracker that cannot start says so
    device = setup.device(cfg)
    seed_everything(cfg.seed)
    parts = build(cfg, device)
    threads_why = setup.auto_threads(
        cfg, device, parts.model, parts.bundle, parts.plan.batch_size,
        recorded=(decision.summary or {}).get("threads") if decision.payload else None)
    state = State()
    if decision.payload is not None:
        state = restore(parts, decision.payload, device)
        log.info("%s: %s from step %d (%s)", run_dir,
                 "resuming" if decision.action == "resume" else "continuing", state.step,
                 decision.why)
    facts = _facts(cfg, config, parts.bundle, parts.model, device, parts.plan.batch_size,
                   setup.overrides, decision, state.step if decision.payload else None)
    if threads_why:
        facts.described["threads_why"] = threads_why
    claim_tracker_files(record, cfg.logger)
    sinks.start(record.path, config, resume=decision.payload is not None)
    return train(cfg, parts, state, record, facts, sinks)


def _finished(cfg: RunConfig, record: RunDir, config: dict, setup: Setup,
              decision: Decision, quiet: bool = False, described: Optional[dict] = None) -> dict:
    """A finished run: nothing to train; its derived files re-made if any is missing
    (`described`: what its summary says besides dgrun.assemble.describe, e.g. its ensemble)."""
    missing = missing_derived(record)
    if not missing or decision.payload is None:
        # On the terminal only: a run left as it was gets no new line in its log file either.
        if not quiet:
            print(f"dgrun: {record.path} already finished: {decision.why}; nothing to do",
                  file=sys.stderr)
        return decision.summary
    summary = repair(cfg, record, config, setup, decision, tracker=TRACKERS_UNFINISHED in missing,
                     described=described or {})
    print(f"dgrun: {record.path} already finished: {decision.why}; repaired what was missing "
          f"({', '.join(missing)}) from its final checkpoint, without training", file=sys.stderr)
    return summary


def repair(cfg: RunConfig, record: RunDir, config: dict, setup: Setup, decision: Decision,
           tracker: bool, described: dict) -> dict:
    """Write a finished run's summary.json, plots (and its trackers' finish when `tracker`)
    again from its final checkpoint: the record of the last moments a kill took away."""
    device = setup.device(cfg)
    seed_everything(cfg.seed)
    parts = build(cfg, device)
    ended = decision.payload["state"]
    state = restore(parts, decision.payload, device)
    state.status, state.stop_reason = ended["status"], ended["stop_reason"]
    before = decision.summary or {}
    facts = _facts(cfg, config, parts.bundle, parts.model, device, parts.plan.batch_size,
                   before.get("overrides", setup.overrides), decision, None)
    facts.resumed_at_steps = list(before.get("resumed_at_steps", []))
    facts.described.update(described)
    # What the run trained with, not what this repair's process happens to use.
    facts.described.update({k: before[k] for k in ("threads", "threads_why") if k in before})
    if isinstance(before.get("wall_s"), (int, float)):
        facts.started = time.time() - before["wall_s"]
    sinks = trackers.build(cfg.logger) if tracker else trackers.TrackerSet({})
    if tracker:
        sinks.start(record.path, config, resume=True)
    recorder = _recorder(cfg, parts, record, facts, PreemptionGuard(),
                         progress.NoProgress(None, 0), sinks)
    recorder.write_subset()  # the same rows: drawn from the same seed as the run's
    return recorder.finish(state, log_x=cfg.trainer.eval_schedule == "log",
                           title=_title(cfg, parts))


def _title(cfg: RunConfig, parts: "Parts") -> str:
    return f"{cfg.model.name} on {parts.bundle.meta.name}, corruption: {cfg.corruption.name}"


def _recorder(cfg: RunConfig, parts: "Parts", record: RunDir, facts: Facts,
              guard: PreemptionGuard, bar, sinks: trackers.TrackerSet) -> Recorder:
    return Recorder(record, facts, model=parts.model, optimizer=parts.optimizer,
                    scheduler=parts.scheduler, probes=parts.probes,
                    snapshots=cfg.trainer.snapshots, snapshot_points=parts.snapshot_points,
                    bar=bar, guard=guard, objective=parts.objective, sinks=sinks)


def record_failure(recorder: Recorder, state: State, error: BaseException) -> None:
    """The record says `failed` and why, if it can still be written (a full disk may not
    let it: the last checkpoint and rows already written stay as they were)."""
    state.status = FAILED
    recorder.facts.error = f"{type(error).__name__}: {error}"
    try:
        summary = recorder.write_summary(state)
    except OSError as e:
        log.warning("%s: could not record the failure (%s)", recorder.record.path, e)
        recorder.sinks.close()
        return
    recorder.sinks.finish(summary)


def train(cfg: RunConfig, parts: Parts, state: State, record: RunDir, facts: Facts,
          sinks: Optional[trackers.TrackerSet] = None) -> dict:
    t, meta, plan = cfg.trainer, parts.bundle.meta, parts.plan
    log.info("%s | %s (%d params) | %s p=%s | %d train / %d test | %s | %d steps/epoch",
             meta.name, cfg.model.name, facts.params, cfg.corruption.name, cfg.corruption.prob,
             len(parts.bundle.train), len(parts.bundle.test), facts.described["device"],
             plan.steps_per_epoch)
    guard = PreemptionGuard()
    bar = progress.make(t.progress, plan.max_steps, t.log_every_s)
    recorder = _recorder(cfg, parts, record, facts, guard, bar,
                         sinks or trackers.TrackerSet({}))
    state.steps_per_epoch = plan.steps_per_epoch
    try:
        recorder.start(state)
        with heap.settled():
            with guard, bar:
                state = fit(parts.model, parts.bundle.train, parts.bundle.test,
                            parts.optimizer, parts.scheduler, parts.objective, parts.eval_loss,
                            plan, state, recorder, augment=parts.augment,
                            prepare=parts.bundle.prepare, probes=parts.probes,
                            val=parts.bundle.val, forward=parts.forward)
            summary = recorder.finish(state, log_x=t.eval_schedule == "log",
                                      title=_title(cfg, parts))
    except BaseException as e:
        record_failure(recorder, state, e)
        raise
    final = summary["final"]
    log.info("%s: %s (%s) after %d steps; train_acc %.4f test_acc %.4f; interpolation %s",
             record.path, state.status, state.stop_reason, state.step,
             final.get("train_acc", float("nan")), final.get("test_acc", float("nan")),
             f"at step {state.interpolation['step']}" if state.interpolation["reached"]
             else "not reached")
    if state.status == PREEMPTED:
        guard.forward()
    return summary


# ------------------------------------------------------------------ N members in lockstep
def _run_ensemble(cfg: RunConfig, run_dir: Path, config: dict, setup: Setup,
                  on_start: Optional[Callable[[RunDir], None]]) -> dict:
    """The ensemble's members are runs like any other (decided, repaired, restored and
    recorded as above); dgrun.ensemble adds their stack and its restore, and
    dgrun.ensemble_fit their loop. Nothing is written before every member's decision is known
    and every check has passed."""
    members = ensemble.members(cfg, run_dir, config)
    for m in members:
        m.decision = _decide(m.record, m.config, m.cfg)
    if not any(m.trains for m in members):
        summaries = [_finished(m.cfg, m.record, m.config, setup, m.decision, quiet=True,
                               described={"ensemble": ensemble.describe(m, len(members))})
                     for m in members]
        print(f"dgrun: {run_dir}: all {len(members)} members already finished; nothing to do",
              file=sys.stderr)
        return ensemble.aggregate([s or {} for s in summaries], run_dir)
    start = ensemble.lockstep(members)
    sinks = [trackers.build(cfg.logger) if m.trains else None for m in members]
    device = setup.device(cfg)
    stack, parts = ensemble.build(cfg, members, device)
    resumed = [m.decision.summary for m in members if m.decision.payload is not None]
    setup.auto_threads(cfg, device, stack.views[0], members[0].bundle, parts.plan.batch_size,
                       copies=len(members),
                       recorded=(resumed[0] or {}).get("threads") if resumed else None)
    ensemble.restore(stack, parts, members)
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
            _prepare(m.record, m.decision)
            facts = _facts(m.cfg, m.config, m.bundle, stack.views[m.k], device,
                           plan.batch_size, ensemble.member_overrides(setup.overrides, m.cfg.seed),
                           m.decision, start if m.payload is not None else None)
            claim_tracker_files(m.record, m.cfg.logger)
            m_sinks.start(m.record.path, m.config, resume=m.payload is not None)
            m.recorder = ensemble.recorder(m, facts, m_sinks, stack, parts, guard)
    try:
        with heap.settled(), guard, parts.bar:
            fit_members(stack, parts, members, guard, start)
    except BaseException as e:
        for m in members:
            if m.recorder is not None and m.state.status == "running":
                record_failure(m.recorder, m.state, e)
        raise
    summary = ensemble.aggregate([m.summary or m.decision.summary or {} for m in members],
                                 run_dir)
    write_json(run_dir / "ensemble.json", summary)
    log.info("%s: %d members: %s", run_dir, len(members), summary["stop_reason"])
    if summary["status"] == PREEMPTED:
        guard.forward()
    return summary
