"""One run, assembled: decide -> build -> fit -> record.

    decide   from the run directory alone: fresh, resume, continue, finished, or refused
             (dgrun.resume), before any data is read or any file is touched
    build    data, model, optimizer, schedule, objective, probes, the plan (all plain
             arguments: each builder is usable from Python without Hydra)
    fit      dgrun.train.fit, with a Recorder as its hooks
    record   summary.json, plots (dgrun.record)

The only module that knows both the config and the components.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dgrun import models, optim, probes, progress, runtime, trackers
from dgrun.config import RunConfig, TrainerConfig
from dgrun.data import augment as augmentation
from dgrun.data import pipeline, subset
from dgrun.data.bundle import Bundle
from dgrun.losses import LOSSES
from dgrun.objectives import OBJECTIVES, Objective
from dgrun.preemption import PreemptionGuard
from dgrun.record import Facts, Recorder
from dgrun.resume import decide
from dgrun.rundir import RunDir
from dgrun.seeding import seed_everything, set_rng_state
from dgrun.status import FAILED, PREEMPTED
from dgrun.train import Plan, State, fit

log = logging.getLogger("dgrun")


def log_points(per_decade: int, limit: int = 10**12) -> set[int]:
    points, k = set(), 0
    while (p := round(10 ** (k / per_decade))) <= limit:
        points.add(p)
        k += 1
    return points


def make_plan(t: TrainerConfig, n_train: int, seed: int) -> tuple[Plan, set[int]]:
    batch = n_train if t.batch_size is None else min(t.batch_size, n_train)
    spe = math.ceil(n_train / batch)
    budgets = [(t.max_steps, "max_steps")]
    if t.max_epochs is not None:
        budgets.append((t.max_epochs * spe, "max_epochs"))
    budgets = [b for b in budgets if b[0] is not None]
    max_steps, reason = min(budgets) if budgets else (None, "max_time_s")
    unit = spe if t.unit == "epoch" else 1
    if t.eval_schedule == "log":
        eval_points = log_points(t.eval_per_decade)
        is_eval = eval_points.__contains__
    else:
        is_eval = lambda step: step % (t.eval_every * unit) == 0  # noqa: E731
    snapshot_points = log_points(4) if t.snapshots == "log" else set()
    every = t.checkpoint_every * unit
    is_ckpt = lambda step: (every > 0 and step % every == 0) or step in snapshot_points  # noqa
    plan = Plan(seed=seed, batch_size=batch, steps_per_epoch=spe, max_steps=max_steps,
                max_time_s=t.max_time_s, is_eval_step=is_eval, is_checkpoint_step=is_ckpt,
                stop_at_interpolation=t.stop_at_interpolation,
                interpolation_threshold=t.interpolation_threshold,
                interpolation_loss=t.interpolation_loss, grad_clip=t.grad_clip,
                eval_batch_size=t.eval_batch_size, max_steps_reason=reason,
                stall_patience=t.stall_patience, stall_min_delta=t.stall_min_delta,
                min_lr=t.min_lr, precision=t.precision, channels_last=t.channels_last)
    return plan, snapshot_points


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
    bundle = pipeline.load(cfg.dataset.name, cfg.dataset_options, seed=cfg.corruption_seed,
                           corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                           apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline,
                           subset_fraction=cfg.subset.fraction, subset_seed=cfg.subset_seed,
                           ).to(device)
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
        per_example_loss=lambda out, y: loss(out, y, reduction="none"), **cfg.objective.options)
    specs = {p.name: p.options for p in cfg.probes}
    if cfg.trainer.track_examples:
        specs.setdefault("examples", {})
    probe_list = probes.build(specs, meta=meta, seed=cfg.seed, loss=cfg.trainer.loss)
    # Compiled for training steps only: the module itself keeps plain state_dict keys, and
    # evaluation (varying batch shapes) does not trigger recompiles.
    forward = torch.compile(model) if cfg.trainer.compile else model
    return Parts(bundle, model, optimizer, scheduler, objective, eval_loss, forward, augment,
                 probe_list, plan, snapshot_points)


def restore(parts: Parts, payload: dict) -> State:
    """Put a checkpoint back: module, optimizer, schedule, probes, every RNG, the counters."""
    state = State(**payload["state"])
    parts.model.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    parts.scheduler.load_state_dict(payload["scheduler"])
    parts.objective.load_state_dict(payload.get("objective", {}))
    saved = payload.get("probes", {})
    for probe in parts.probes:
        if probe.name in saved:
            probe.load_state_dict(saved[probe.name])
    set_rng_state(payload["rng"])
    state.status, state.stop_reason = "running", None
    return state


def describe(cfg: RunConfig, bundle: Bundle, device: torch.device) -> dict[str, Any]:
    """What the run applied, as summary.json records it (a report labels runs by this)."""
    corrupted = int(bundle.train.corrupted.sum())
    return {
        "seed": cfg.seed, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "corruption": {"name": cfg.corruption.name, "prob": cfg.corruption.prob,
                       "seed": cfg.corruption_seed,
                       "apply_to_test": cfg.corruption.apply_to_test,
                       "train_rows_changed": corrupted},
        "optimizer": cfg.optimizer.name, "objective": cfg.objective.name,
        "input_shape": list(bundle.meta.input_shape),
        "train_size": len(bundle.train), "test_size": len(bundle.test),
        "device": str(device), "threads": torch.get_num_threads(),
        **describe_subset(cfg, bundle),
    }


def describe_subset(cfg: RunConfig, bundle: Bundle) -> dict[str, Any]:
    """summary.json's `subset` (its rows: subset.npy), when the run trains on one."""
    if bundle.subset is None:
        return {}
    return {"subset": {"fraction": cfg.subset.fraction, "seed": cfg.subset_seed,
                       "size": len(bundle.subset), "file": subset.RECORD_FILE}}


def run(cfg: RunConfig, run_dir: Path, config: dict[str, Any], *,
        job_num: Optional[int] = None, overrides: Optional[list[str]] = None,
        on_start: Optional[Callable[[RunDir], None]] = None, parallel_jobs: int = 1) -> dict:
    """Train one run into `run_dir`, or continue it, or leave it be when it has finished.

    config: the resolved config (stored with every checkpoint: a resume must match it).
    job_num: the job's number in a sweep (picks its GPU when several are visible).
    parallel_jobs: jobs of a local sweep running at once (threads=auto divides the CPUs).
    on_start: called once the run will train, before anything is written (the CLI writes
    `.hydra/` there, so a refused or finished run's directory stays exactly as it was).
    """
    if cfg.trainer.ensemble > 1:  # N seeds in this process, one run directory each
        from dgrun import ensemble
        return ensemble.run(cfg, run_dir, config, job_num=job_num, overrides=overrides,
                            parallel_jobs=parallel_jobs,
                            on_start=on_start)
    record = RunDir(run_dir)
    decision = decide(record, config, cfg.trainer)
    if decision.finished:
        # On the terminal only: a run left as it was gets no new line in its log file either.
        print(f"dgrun: {run_dir} already finished: {decision.why}; nothing to do",
              file=sys.stderr)
        return decision.summary
    record.path.mkdir(parents=True, exist_ok=True)
    if decision.clear:
        log.warning("%s: replacing the previous run's record (%s)", run_dir, decision.why)
        record.clear()
    if on_start is not None:
        on_start(record)
    sinks = trackers.build(cfg.logger)  # before the data: a tracker that cannot start says so
    auto = cfg.threads == "auto"
    device = runtime.configure(threads=runtime.start_threads(cfg.threads, parallel_jobs),
                               deterministic=cfg.deterministic, device=cfg.device,
                               job_num=job_num)
    seed_everything(cfg.seed)
    parts = build(cfg, device)
    if auto and device.type == "cpu":
        batch = parts.bundle.train.x[:1].expand(parts.plan.batch_size,
                                                *parts.bundle.train.x.shape[1:])
        macs = runtime.step_macs(parts.model, parts.bundle.prepare(batch))
        torch.set_num_threads(runtime.auto_threads(macs, parallel_jobs))
    facts = Facts(described=describe(cfg, parts.bundle, device),
                  params=models.count_params(parts.model), config=config, overrides=overrides,
                  train_size=len(parts.bundle.train), batch_size=parts.plan.batch_size,
                  subset_rows=parts.bundle.subset)
    state = State()
    if decision.payload is not None:
        state = restore(parts, decision.payload)
        facts.resumed_at_steps = list((decision.summary or {}).get("resumed_at_steps", []))
        facts.resumed_at_steps.append(state.step)
        log.info("%s: %s from step %d (%s)", run_dir,
                 "resuming" if decision.action == "resume" else "continuing", state.step,
                 decision.why)
    claim_tracker_files(record, cfg.logger)
    sinks.start(record.path, config, resume=decision.payload is not None)
    return train(cfg, parts, state, record, facts, sinks)


# Where each tracker writes inside the run directory by default (MLflow: unless it is given
# its own tracking_uri), so `trainer.resume=false` removes those too.
TRACKER_FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


def claim_tracker_files(record: RunDir, logger: dict[str, dict]) -> None:
    if not logger:
        return
    record.claim(record.path / trackers.STATE_FILE)
    for name, options in logger.items():
        if name in TRACKER_FOLDERS and not options.get("tracking_uri"):
            record.folder(TRACKER_FOLDERS[name], whole=True)


def train(cfg: RunConfig, parts: Parts, state: State, record: RunDir, facts: Facts,
          sinks: Optional[trackers.TrackerSet] = None) -> dict:
    t, meta, plan = cfg.trainer, parts.bundle.meta, parts.plan
    log.info("%s | %s (%d params) | %s p=%s | %d train / %d test | %s | %d steps/epoch",
             meta.name, cfg.model.name, facts.params, cfg.corruption.name, cfg.corruption.prob,
             len(parts.bundle.train), len(parts.bundle.test), facts.described["device"],
             plan.steps_per_epoch)
    guard = PreemptionGuard()
    bar = progress.make(t.progress, plan.max_steps, t.log_every_s)
    recorder = Recorder(record, facts, model=parts.model, optimizer=parts.optimizer,
                        scheduler=parts.scheduler, probes=parts.probes, snapshots=t.snapshots,
                        snapshot_points=parts.snapshot_points, bar=bar, guard=guard,
                        objective=parts.objective, sinks=sinks or trackers.TrackerSet({}))
    state.steps_per_epoch = plan.steps_per_epoch
    recorder.start(state)
    try:
        with guard, bar:
            state = fit(parts.model, parts.bundle.train, parts.bundle.test, parts.optimizer,
                        parts.scheduler, parts.objective, parts.eval_loss, plan, state, recorder,
                        augment=parts.augment, prepare=parts.bundle.prepare, probes=parts.probes,
                        val=parts.bundle.val, forward=parts.forward)
    except BaseException as e:
        state.status = FAILED
        facts.error = f"{type(e).__name__}: {e}"
        recorder.sinks.finish(recorder.write_summary(state))
        raise
    summary = recorder.finish(state, log_x=t.eval_schedule == "log",
                              title=f"{cfg.model.name} on {meta.name}, "
                                    f"corruption: {cfg.corruption.name}")
    final = summary["final"]
    log.info("%s: %s (%s) after %d steps; train_acc %.4f test_acc %.4f; interpolation %s",
             record.path, state.status, state.stop_reason, state.step,
             final.get("train_acc", float("nan")), final.get("test_acc", float("nan")),
             f"at step {state.interpolation['step']}" if state.interpolation["reached"]
             else "not reached")
    if state.status == PREEMPTED:
        guard.forward()
    return summary
