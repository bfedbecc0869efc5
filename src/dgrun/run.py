"""One run, assembled: validated config -> run directory, components, training, record.

The only module that knows both the config and the components. Everything it builds takes
plain arguments, so `train.fit` and the builders are usable from Python without Hydra.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from dgrun import checkpoint, models, optim, progress
from dgrun.config import RunConfig, TrainerConfig
from dgrun.data import augment as augmentation
from dgrun.data import pipeline
from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.metrics import MetricsFile, read_json, versions, write_json
from dgrun.plots import plot_run
from dgrun.preemption import PreemptionGuard
from dgrun.seeding import rng_state, seed_everything, set_rng_state
from dgrun.train import Plan, State, fit

log = logging.getLogger("dgrun")

# Keys a resumed run may change: the budget and how the run is watched, not what it computes.
RESUMABLE_KEYS = {
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time_s", "trainer.checkpoint_every",
    "trainer.snapshots", "trainer.progress", "trainer.log_every_s", "trainer.resume",
    "trainer.stop_at_interpolation", "trainer.eval_batch_size", "device", "threads",
}
RECORD_FILES = ("metrics.csv", "summary.json", "plots", "checkpoints")
FINISHED = ("completed", "diverged")


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
                eval_batch_size=t.eval_batch_size, max_steps_reason=reason)
    return plan, snapshot_points


def resolve_device(name: str, job_num: Optional[int] = None) -> torch.device:
    """`auto`: the GPU if there is one. In a sweep (job_num set) with several visible GPUs, job
    k takes cuda:(k % count), so jobs run in parallel (hydra/launcher=local) spread over them."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if job_num is not None and count > 1:
            return torch.device(f"cuda:{job_num % count}")
        return torch.device("cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible", "use device=cpu or auto")
    return torch.device(name)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        full = f"{prefix}{k}"
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, full + ".")
        elif a != b and full not in RESUMABLE_KEYS:
            out.append(f"{full}: {a} -> {b}")
    return out


class Recorder:
    """The loop's hooks: where rows, checkpoints, progress and stop requests go."""

    def __init__(self, run_dir: Path, model, optimizer, scheduler, config: dict,
                 snapshots: str, snapshot_points: set[int], bar, guard: PreemptionGuard):
        self.run_dir, self.model, self.optimizer, self.scheduler = run_dir, model, optimizer, scheduler
        self.config, self.snapshots, self.snapshot_points = config, snapshots, snapshot_points
        self.bar, self.guard = bar, guard
        self.metrics = MetricsFile(run_dir / "metrics.csv")

    def on_step(self, state: State) -> None:
        self.bar.step(state.step)

    def on_eval(self, state: State, row: dict) -> None:
        self.metrics.append(row)
        self.bar.eval(row)

    def save(self, state: State, reason: str) -> None:
        # "log" keeps its log-spaced steps plus the threshold, the end and preemption points.
        keep = {"none": False, "every": True,
                "log": state.step in self.snapshot_points or reason != "periodic"}[self.snapshots]
        snapshot = state.step if keep else None
        payload = {"state": asdict(state), "model": self.model.state_dict(),
                   "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                   "config": self.config}
        checkpoint.save(payload, self.run_dir / "checkpoints", snapshot_step=snapshot)

    def stop_requested(self) -> Optional[str]:
        return self.guard.signal_name


def clear_record(run_dir: Path) -> None:
    """trainer.resume=false in a used directory: the user asked for a fresh run there."""
    for name in RECORD_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def summarize(cfg: RunConfig, state: State, params: int, started: float, extra: dict) -> dict:
    final = {k: v for k, v in (state.rows[-1] if state.rows else {}).items()
             if k not in ("step", "epoch", "time_s", "lr")}
    return {
        "status": state.status, "stop_reason": state.stop_reason,
        "steps": state.step, "epochs": extra.get("epochs"), "time_s": state.train_time_s,
        "params": params, "final": final, "interpolation": state.interpolation,
        "seed": cfg.seed, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "corruption": {"name": cfg.corruption.name, "prob": cfg.corruption.prob},
        "optimizer": cfg.optimizer.name, "device": extra.get("device"),
        "wall_s": time.time() - started, "resumed_at_steps": extra.get("resumed_at_steps", []),
        "versions": versions(), **({"error": extra["error"]} if "error" in extra else {}),
    }


def run(cfg: RunConfig, run_dir: Path, config: dict[str, Any],
        job_num: Optional[int] = None) -> dict:
    """Train one run into `run_dir` (resuming from its checkpoint if there is one).

    job_num: the job's number in a sweep (picks its GPU when several are visible).
    """
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.trainer
    payload = None
    if t.resume:
        payload = checkpoint.load_latest(run_dir / "checkpoints")
        if payload is not None:
            diffs = config_differences(payload["config"], config)
            if diffs:
                raise UserError(f"{run_dir} holds a run with a different config ({'; '.join(diffs)})",
                                "use a new hydra.run.dir, or trainer.resume=false to start over there")
    elif any((run_dir / f).exists() for f in RECORD_FILES):
        log.warning("trainer.resume=false: replacing the previous run's record in %s", run_dir)
        clear_record(run_dir)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = resolve_device(cfg.device, job_num)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so defaults (streams, events, synchronize) use it too
    seed_everything(cfg.seed)
    bundle = pipeline.load(cfg.dataset.name, cfg.dataset.options, seed=cfg.seed,
                           corruption_name=cfg.corruption.name, prob=cfg.corruption.prob,
                           apply_to_test=cfg.corruption.apply_to_test, **cfg.pipeline).to(device)
    meta = bundle.meta
    model = models.create(cfg.model.name, meta.input_shape, meta.num_classes, meta.modality,
                          vocab_size=meta.vocab_size, **cfg.model.options).to(device)
    params = models.count_params(model)
    plan, snapshot_points = make_plan(t, len(bundle.train), cfg.seed)
    optimizer, scheduler = optim.build(model, cfg.optimizer.name, cfg.optimizer.options,
                                       cfg.scheduler.name, cfg.scheduler.options,
                                       steps_per_epoch=plan.steps_per_epoch,
                                       total_steps=plan.max_steps)
    loss_fn, eval_loss = LOSSES.build(t.loss, label_smoothing=t.label_smoothing)
    augment = augmentation.build(cfg.pipeline.get("augment"), seed=cfg.seed, modality=meta.modality)

    state, extra = State(), {"device": str(device), "resumed_at_steps": []}
    metrics_rows = None
    if payload is not None:
        state = State(**payload["state"])
        old = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else {}
        extra["resumed_at_steps"] = old.get("resumed_at_steps", []) + [state.step]
        if state.status in FINISHED and not (plan.max_steps and state.step < plan.max_steps
                                             and state.stop_reason != "interpolation"):
            log.info("%s already finished (%s); nothing to do", run_dir, state.status)
            return old
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        state.status, state.stop_reason = "running", None
        metrics_rows = state.rows
        log.info("resuming %s from step %d", run_dir, state.step)

    log.info("%s | %s (%d params) | %s p=%s | %d train / %d test | %s | %d steps/epoch",
             meta.name, cfg.model.name, params, cfg.corruption.name, cfg.corruption.prob,
             len(bundle.train), len(bundle.test), device, plan.steps_per_epoch)
    summary_path = run_dir / "summary.json"
    extra["epochs"] = None
    write_json(summary_path, summarize(cfg, state, params, started, extra))
    guard = PreemptionGuard()
    bar = progress.make(t.progress, plan.max_steps, t.log_every_s)
    recorder = Recorder(run_dir, model, optimizer, scheduler, config, t.snapshots,
                        snapshot_points, bar, guard)
    recorder.metrics.rewrite(metrics_rows or [])
    try:
        with guard, bar:
            state = fit(model, bundle.train, bundle.test, optimizer, scheduler, loss_fn, eval_loss,
                        plan, state, recorder, augment=augment)
    except BaseException as e:
        state.status = "failed"
        extra["error"] = f"{type(e).__name__}: {e}"
        write_json(summary_path, summarize(cfg, state, params, started, extra))
        raise
    extra["epochs"] = state.step / plan.steps_per_epoch
    summary = summarize(cfg, state, params, started, extra)
    write_json(summary_path, summary)
    plot_run(state.rows, run_dir / "plots", interpolation_step=state.interpolation["step"],
             log_x=t.eval_schedule == "log",
             title=f"{cfg.model.name} on {meta.name}, {cfg.corruption.name}")
    log.info("%s: %s (%s) after %d steps; train_acc %.4f test_acc %.4f; interpolation %s",
             run_dir, state.status, state.stop_reason, state.step,
             summary["final"].get("train_acc", float("nan")),
             summary["final"].get("test_acc", float("nan")),
             f"at step {state.interpolation['step']}" if state.interpolation["reached"]
             else "not reached")
    if state.status == "preempted":
        guard.forward()
    return summary
