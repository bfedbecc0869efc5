"""Typed schemas for the composed Hydra config, and the validation that runs before any data
is touched.

The root, `trainer` and `corruption` are dataclasses registered in Hydra's ConfigStore, so a
typo'd key or a wrongly typed value is caught at composition. The component groups (dataset,
model, optimizer, scheduler) vary per choice: their schema is the registered builder's own
signature, checked here (unknown option, wrong type) together with value ranges.
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgrun.errors import UserError


def config_dir() -> Path:
    """The shipped configs: `dgrun/conf` in an installed wheel, the repo's `conf/` in a checkout
    (where an editable install would otherwise read a stale copy)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    raise UserError("the config directory is missing from this installation", "reinstall dgrun")


@dataclass
class TrainerConfig:
    batch_size: Optional[int] = 128      # null -> full batch
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = 500
    max_time_s: Optional[float] = None   # wall-clock budget for training
    unit: str = "epoch"                  # what eval_every / checkpoint_every count: epoch | step
    eval_every: int = 1
    eval_schedule: str = "linear"        # linear | log (log-spaced steps, for long runs)
    eval_per_decade: int = 20            # evaluations per factor of 10 steps with the log schedule
    eval_batch_size: int = 4096
    stop_at_interpolation: bool = True
    interpolation_threshold: float = 1.0  # full-train accuracy that counts as fitting
    interpolation_loss: Optional[float] = None  # or: full-train loss at or below this
    loss: str = "cross_entropy"          # cross_entropy | mse
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None    # max global gradient norm
    stall_patience: Optional[int] = None  # stop (stalled) after this many evaluations without
    stall_min_delta: float = 0.01        # a new best train acc or a train loss this much lower
    min_lr: Optional[float] = None       # stop (stalled) once the lr has decayed below this
    checkpoint_every: int = 0            # 0: only at the threshold, on signals and at the end
    snapshots: str = "none"              # none | log | every: extra checkpoints kept for analysis
    track_examples: bool = False         # per-example label probability at every evaluation
    precision: str = "fp32"              # fp32 | bf16 (autocast; on a GPU, about twice as fast)
    channels_last: bool = False          # NHWC image batches (faster convolutions on GPUs)
    compile: bool = False                # torch.compile the training step (a GPU, long runs)
    resume: bool = True
    progress: str = "auto"               # auto | rich | plain | none
    log_every_s: float = 10.0            # cadence of plain log lines (non-TTY)
    ensemble: int = 1                    # N > 1: seeds seed..seed+N-1 trained in one process,
                                         # into <run dir>/member_<k>/ (dgrun.ensemble)


@dataclass
class CorruptionConfig:
    name: str = "none"
    prob: float = 0.0
    apply_to_test: bool = True
    seed: Optional[int] = None           # null: the run's seed. Set it to hold the corrupted
                                         # data fixed while the initialization seed varies


@dataclass
class SubsetConfig:
    """`dataset.subset_fraction` / `dataset.subset_seed` (dgrun.data.subset)."""
    fraction: Optional[float] = None     # null: the whole training split
    seed: Optional[int] = None           # null: the run's seed (each ensemble member its own)


@dataclass
class RootSchema:
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    threads: Any = "auto"                # auto | N | null (torch's own choice); see runtime
    deterministic: bool = False
    quiet: bool = False                  # no config tree at the start, no summary at the end
    dataset: Any = field(default_factory=dict)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    model: Any = field(default_factory=dict)
    optimizer: Any = field(default_factory=dict)
    scheduler: Any = field(default_factory=dict)
    phenomenon: Any = field(default_factory=dict)
    probes: Any = field(default_factory=dict)  # {probe name: its options}; presets fill it
    objective: Any = field(default_factory=dict)
    logger: Any = field(default_factory=dict)  # {tracker name: its options}
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Zhang et al. 2017 train Inception at lr 0.1 and AlexNet and the MLPs at 0.01, with SGD. The
# paper gives no lr for other optimizers: those keep the usual default for Adam(W).
ZHANG_LR = {"inception": 0.1}
ADAM_LR = 1e-3
# ... and crop CIFAR's 32x32 images to the centre 28x28 (Table 1's sizes are at 28x28x3).
ZHANG_CROP = {32: 28}


def zhang_lr(model_name: str, optimizer_name: str = "sgd") -> float:
    if optimizer_name != "sgd":
        return ADAM_LR
    return ZHANG_LR.get(model_name, 0.01)


def zhang_crop(dataset_name: str) -> Optional[int]:
    """28 for a dataset registered with 32x32 images, else null (no crop)."""
    from dgrun.data import DATASETS

    if dataset_name not in DATASETS:
        return None
    shape = DATASETS.tags(dataset_name).get("shape")
    return ZHANG_CROP.get(shape[-1]) if shape else None


def register_schemas() -> None:
    ConfigStore.instance().store(name="dgrun_schema", node=RootSchema)
    for name, resolver in (("dgrun.zhang_lr", zhang_lr), ("dgrun.zhang_crop", zhang_crop)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# Keys of the dataset section that the data pipeline consumes; the rest go to the loader.
PIPELINE_KEYS = ("name", "preprocess", "center_crop", "augment")
# ... and the subset keys, which conf/config.yaml gives every dataset (RunConfig.subset).
SUBSET_KEYS = ("subset_fraction", "subset_seed")


# Dataset options that seed how the data are drawn or split; null means the run's `seed`.
DATASET_SEEDS = ("seed", "split_seed")

# Builder arguments that come from the data or the run, never from a config file.
RESERVED = {"input_shape", "num_classes", "vocab_size", "steps_per_epoch", "total_steps"}


@dataclass
class Component:
    """A registry choice and the options for its builder."""
    name: str
    options: dict[str, Any]


@dataclass
class RunConfig:
    seed: int
    device: str
    threads: Any                       # "auto", an int, or None
    deterministic: bool
    dataset: Component
    pipeline: dict[str, Any]
    corruption: CorruptionConfig
    model: Component
    optimizer: Component
    scheduler: Component
    phenomenon: dict[str, Any]
    probes: list[Component]
    objective: Component
    logger: dict[str, dict[str, Any]]
    trainer: TrainerConfig
    subset: SubsetConfig = field(default_factory=SubsetConfig)

    @property
    def corruption_seed(self) -> int:
        return self.seed if self.corruption.seed is None else self.corruption.seed

    @property
    def dataset_options(self) -> dict[str, Any]:
        """The dataset builder's options with a null seed option (`dataset.seed`,
        `dataset.split_seed`) replaced by the run's seed: a seed sweep gives independent
        replicates (data drawn, split, initialization, order) unless the dataset seed is pinned."""
        return {key: self.seed if key in DATASET_SEEDS and value is None else value
                for key, value in self.dataset.options.items()}

    @property
    def data_follows_seed(self) -> bool:
        return any(self.dataset.options.get(key, 0) is None for key in DATASET_SEEDS)

    @property
    def subset_seed(self) -> int:
        return self.seed if self.subset.seed is None else self.subset.seed


# Value ranges, checked before anything is built. (low, high, low_inclusive, high_inclusive)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "corruption.prob": (0.0, 1.0, True, True),
    "dataset.subset_fraction": (0.0, 1.0, False, True),
    "optimizer.lr": (0.0, math.inf, False, False),
    "optimizer.weight_decay": (0.0, math.inf, True, False),
    "optimizer.momentum": (0.0, 1.0, True, False),
    "scheduler.gamma": (0.0, 1.0, False, True),
    "scheduler.warmup_steps": (0, math.inf, True, False),
    "scheduler.epoch_steps": (1, math.inf, True, False),
    "scheduler.min_lr_factor": (0.0, 1.0, True, True),
    "model.dropout": (0.0, 1.0, True, False),
    "model.width": (1, math.inf, True, False),
    "trainer.batch_size": (1, math.inf, True, False),
    "trainer.max_steps": (1, math.inf, True, False),
    "trainer.max_epochs": (1, math.inf, True, False),
    "trainer.max_time_s": (0.0, math.inf, False, False),
    "trainer.eval_every": (1, math.inf, True, False),
    "trainer.eval_per_decade": (1, math.inf, True, False),
    "trainer.eval_batch_size": (1, math.inf, True, False),
    "trainer.interpolation_threshold": (0.0, 1.0, False, True),
    "trainer.interpolation_loss": (0.0, math.inf, True, False),
    "trainer.label_smoothing": (0.0, 1.0, True, False),
    "trainer.grad_clip": (0.0, math.inf, False, False),
    "trainer.checkpoint_every": (0, math.inf, True, False),
    "trainer.stall_patience": (1, math.inf, True, False),
    "trainer.stall_min_delta": (0.0, 1.0, True, False),
    "trainer.min_lr": (0.0, math.inf, True, False),
    "trainer.log_every_s": (0.0, math.inf, False, False),
    "trainer.ensemble": (1, math.inf, True, False),
    "threads": (1, math.inf, True, False),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.unit": ("epoch", "step"),
    "trainer.eval_schedule": ("linear", "log"),
    "trainer.loss": ("cross_entropy", "mse", "hinge"),
    "trainer.snapshots": ("none", "log", "every"),
    "trainer.progress": ("auto", "rich", "plain", "none"),
    "trainer.precision": ("fp32", "bf16"),
}


def _check_range(key: str, value: Any) -> None:
    if key in RANGES:
        check_range(key, value, RANGES[key])


def check_range(key: str, value: Any, bounds: tuple[float, float, bool, bool]) -> None:
    """`value` within (low, high, low_inclusive, high_inclusive), or the one-line error."""
    if value is None:
        return
    lo, hi, lo_in, hi_in = bounds
    ok = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
    if not ok:
        left, right = "[" if lo_in else "(", "]" if hi_in else ")"
        raise UserError(f"{key}={value} is out of range {left}{lo}, {hi}{right}",
                        f"set {key} to a value in that range")


def unknown_key(key: str, known: list[str]) -> UserError:
    """The one line for a key no schema has, with the nearest known key."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return UserError(f"unknown config key '{key}'", f"{hint}`dgrun --cfg job` lists every key")


def _check_keys(raw: dict[str, Any]) -> None:
    """Keys added with `+` bypass Hydra's struct check: compare them with the schema here.

    The sections whose keys a registry checks (dataset, model, optimizer, ...) and the open
    mappings (probes, logger: one entry per chosen probe or tracker) are checked elsewhere."""
    sections = {"": RootSchema, "trainer.": TrainerConfig, "corruption.": CorruptionConfig}
    for prefix, schema in sections.items():
        node = raw if not prefix else raw.get(prefix[:-1])
        known = [f.name for f in fields(schema)]
        for key in node if isinstance(node, dict) else ():
            if key not in known:
                raise unknown_key(prefix + key, [prefix + k for k in known])
    phenomenon = raw.get("phenomenon") or {}
    for key in phenomenon if isinstance(phenomenon, dict) else ():
        if key != "name":  # a preset's label; what it sets lives in the other sections
            raise unknown_key(f"phenomenon.{key}", ["phenomenon.name"])


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Give a builder option the type its default has: sweeps hand over `0` for `0.0`."""
    if value is None or default is None or default is inspect.Parameter.empty:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} is not true/false", f"set {key}=true or {key}=false")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise UserError(f"{key}={value!r} is not a number", f"set {key} to a number")
    if isinstance(default, int) and isinstance(value, float):
        raise UserError(f"{key}={value} must be a whole number", f"set {key} to an integer")
    return value


def _component(section: str, node: Any, registry, skip: tuple[str, ...] = ("name",),
               label: Optional[str] = None, reserved: frozenset = frozenset(),
               name: Optional[str] = None) -> Component:
    """Check a choice's options against its builder. `name`: the choice, when the node is
    only options (a tracker or probe keyed by its name, which may have a `name` option)."""
    if name is None:
        if not isinstance(node, dict) or "name" not in node:
            raise UserError(f"the {section} config has no 'name'",
                            f"pick one with {section}=NAME")
        name = node["name"]
    else:
        skip = ()
    builder = registry.get(name)
    params = inspect.signature(builder).parameters
    allowed = set(registry.options(name)) - RESERVED - reserved
    options = {}
    for key, value in node.items():
        if key in skip:
            continue
        if key not in allowed:
            raise UserError(f"{label or f'{section} {name!r}'} has no option '{key}'",
                            f"its options are: {', '.join(sorted(allowed)) or 'none'}")
        full = f"{section}.{key}"
        value = _coerce(full, value, params[key].default)
        _check_range(full, value)
        options[key] = value
    return Component(name, options)


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain, resolved data, without Hydra's own `hydra` node."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True, throw_on_missing=True)
            if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}


def from_hydra(cfg: DictConfig) -> RunConfig:
    """Turn the composed config into a validated RunConfig, or raise UserError."""
    # Importing the component packages fills the registries.
    from dgrun.data.corruption import CORRUPTIONS, PIXEL_CORRUPTIONS
    from dgrun.data import DATASETS
    from dgrun.data.pipeline import validate_pipeline
    from dgrun.models import MODELS, check_takes
    from dgrun.objectives import OBJECTIVES
    from dgrun.optim import OPTIMIZERS, SCHEDULERS

    raw = plain(cfg)
    _check_keys(raw)
    trainer = TrainerConfig(**raw["trainer"])
    for key, value in vars(trainer).items():
        _check_range(f"trainer.{key}", value)
    for key, allowed in CHOICES.items():
        value = getattr(trainer, key.split(".", 1)[1])
        if value not in allowed:
            raise UserError(f"{key}={value!r} is not a valid choice",
                            f"choose one of: {', '.join(allowed)}")
    if trainer.max_steps is None and trainer.max_epochs is None and trainer.max_time_s is None:
        raise UserError("training has no budget: trainer.max_steps, max_epochs and max_time_s "
                        "are all null", "set at least one of them")
    threads = raw.get("threads")
    if threads != "auto" and threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise UserError(f"threads={threads!r} is not a thread count",
                            "use threads=auto, threads=N (N >= 1) or threads=null")
        _check_range("threads", threads)
    device = str(raw["device"])
    if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        raise UserError(f"device={device!r} is not a device", "use auto, cpu, cuda or cuda:N")

    corruption = CorruptionConfig(**raw["corruption"])
    corruption.prob = float(corruption.prob)
    _check_range("corruption.prob", corruption.prob)
    applied = CORRUPTIONS.tags(corruption.name).get("applied_prob")
    if applied is not None and corruption.prob != applied:
        fix = ("drop corruption.prob: pixel corruptions change every image"
               if corruption.name in PIXEL_CORRUPTIONS else
               "use corruption=partial_labels corruption.prob=P to redraw a fraction P of labels")
        raise UserError(f"corruption '{corruption.name}' always applies with prob {applied:g}; "
                        f"corruption.prob={corruption.prob:g} would be ignored", fix)

    dataset_node = dict(raw["dataset"])
    pipeline = {k: dataset_node.get(k) for k in PIPELINE_KEYS if k != "name"}
    subset = _subset(*(dataset_node.pop(k, None) for k in SUBSET_KEYS))
    dataset = _component("dataset", dataset_node, DATASETS, skip=PIPELINE_KEYS)
    validate_pipeline(**pipeline)
    model = _component("model", raw["model"], MODELS)
    probes = _probes(raw.get("probes") or {})
    objective = _component("objective", raw.get("objective") or {"name": "erm"}, OBJECTIVES,
                           reserved=frozenset({"train", "num_groups", "per_example_loss",
                                               "mean_loss"}))
    logger = _trackers(raw.get("logger") or {})
    optimizer = _component("optimizer", raw["optimizer"], OPTIMIZERS)
    scheduler = _component("scheduler", raw["scheduler"], SCHEDULERS)

    # A model that cannot take this data fails here, before anything is loaded.
    modality = DATASETS.tags(dataset.name).get("modality")
    check_takes(model.name, modality, source=f" from dataset '{dataset.name}'")
    if modality == "tokens" and corruption.name in PIXEL_CORRUPTIONS:
        raise UserError(f"corruption '{corruption.name}' needs image or vector data",
                        "use a label corruption for token datasets")
    return RunConfig(
        seed=int(raw["seed"]), device=device, threads=threads,
        deterministic=bool(raw.get("deterministic", False)), dataset=dataset, pipeline=pipeline,
        corruption=corruption, model=model, optimizer=optimizer, scheduler=scheduler,
        phenomenon=dict(raw.get("phenomenon") or {}), probes=probes, objective=objective,
        logger=logger, trainer=trainer, subset=subset,
    )


def _subset(fraction: Any, seed: Any) -> SubsetConfig:
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise UserError(f"dataset.subset_fraction={fraction!r} is not a number",
                            "e.g. dataset.subset_fraction=0.5 (or null: the whole split)")
        fraction = float(fraction)
        _check_range("dataset.subset_fraction", fraction)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"dataset.subset_seed={seed!r} is not an integer",
                        "e.g. dataset.subset_seed=0 (or null: the run's seed)")
    return SubsetConfig(fraction, seed)


def _trackers(node: Any) -> dict[str, dict[str, Any]]:
    """Check the chosen trackers without importing their (slow) packages: known name, known
    options, package installed."""
    import importlib.util

    from dgrun.trackers import TRACKERS

    out = {}
    for name, options in node.items():
        component = _component(f"logger.{name}", options or {}, TRACKERS,
                               label=f"logger '{name}'", name=name)
        cls = TRACKERS.get(name)
        if importlib.util.find_spec(cls.requires) is None:
            raise UserError(f"logger '{name}' needs the '{cls.requires}' package, which is not "
                            "installed", f"pip install 'dgrun[{cls.extra}]' (or choose another "
                            "logger)")
        out[name] = component.options
    return out


def _probes(node: Any) -> list[Component]:
    from dgrun.probes import CONTEXT, PROBES

    if not isinstance(node, dict):
        raise UserError(f"probes must be a mapping of probe names to options, not {node!r}",
                        "e.g. +probes.transitions={}")
    out = []
    for name, options in node.items():
        if options is None:  # `probes.transitions: null` switches a preset's probe off
            continue
        if not isinstance(options, dict):
            raise UserError(f"probes.{name} must be a mapping of options, not {options!r}",
                            f"e.g. +probes.{name}={{}}")
        out.append(_component(f"probes.{name}", options, PROBES, label=f"probe '{name}'",
                              reserved=frozenset(CONTEXT), name=name))
    return out
