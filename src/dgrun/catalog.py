"""`dgrun list` and `dgrun inspect`: what can be chosen, and what a model looks like, without
training anything.

    dgrun list                      every config group's choices, with one line each
    dgrun list model dataset=cifar10 dataset.center_crop=28
                                    models with their parameter counts on that data
    dgrun inspect model=inception dataset=cifar10 dataset.center_crop=28
                                    layers, output shapes and parameters of one model

The data's shape comes from the dataset's registration when it has one (vision datasets:
no files needed), otherwise from building the dataset (generated ones take a second).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from dgrun.errors import UserError

GROUPS = ("dataset", "corruption", "model", "optimizer", "scheduler", "objective", "phenomenon",
          "logger", "experiment")


def describe_choice(path: Path, width: int = 110) -> str:
    """A config file's opening comment, first sentence: every shipped YAML says what it is."""
    lines = [line.strip() for line in path.read_text().splitlines()
             if not line.strip().startswith("# @package")]
    comment = []
    for text in lines:
        if not text.startswith("#") or text == "#":
            if comment:
                break
            continue
        body = text.lstrip("#")
        if comment and body.startswith("  "):  # an indented example command ends the prose
            break
        comment.append(body)
    return first_sentence(comment, width)


# A full stop after these is not the end of a sentence ("Zhang et al. 2017", "e.g. dgrun").
ABBREVIATIONS = ("et al", "e.g", "i.e", "cf", "vs", "Fig", "Eq", "approx")


def first_sentence(lines: list[str], width: int = 110) -> str:
    """The first sentence of a paragraph (the lines up to the first blank one): up to the first
    full stop followed by a capital, outside brackets and not after an abbreviation."""
    words = []
    for line in lines:
        if not line.strip():
            if words:
                break
            continue
        words.append(line.strip())
    text = " ".join(words)
    sentence, depth = text, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if (char == "." and depth <= 0 and re.match(r" [A-Z(`]", text[i + 1:i + 3])
                and not text[:i].endswith(ABBREVIATIONS)):
            sentence = text[:i]
            break
    sentence = sentence.rstrip(".")
    return sentence if len(sentence) <= width else sentence[:width - 1].rstrip() + "…"


def data_meta(cfg):
    """The Meta a run with this config would see, read from registration tags if possible."""
    from dgrun.data import DATASETS, Meta
    from dgrun.data.pipeline import validate_pipeline

    name = cfg.dataset.name
    tags = DATASETS.tags(name)
    if "shape" in tags:
        meta = Meta(name, tags["modality"], tuple(tags["shape"]), tags["classes"])
    else:
        meta = DATASETS.build(name, **cfg.dataset_options).meta
    crop = cfg.pipeline.get("center_crop")
    validate_pipeline(**cfg.pipeline)
    if crop is not None and meta.modality == "image":
        if crop > min(meta.input_shape[1:]):
            raise UserError(f"dataset.center_crop={crop} is larger than the "
                            f"{meta.input_shape[1]}x{meta.input_shape[2]} images of '{name}'",
                            "use a smaller crop, or null")
        meta = replace(meta, input_shape=(meta.input_shape[0], crop, crop))
    return meta


def _compose(overrides: list[str]):
    from dgrun.compose import expand
    from dgrun.config import from_hydra

    _, master = expand(overrides, multirun=False)
    return from_hydra(master)


# ---------------------------------------------------------------- dgrun list
def list_choices(group: Optional[str], overrides: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dgrun.config import config_dir

    groups = [] if group == "probe" else [group] if group else list(GROUPS)
    console = Console(width=None if sys.stdout.isatty() else 160)
    counts = _param_counts(overrides) if group == "model" else {}
    for name in groups:
        table = Table(title=f"{name}=...", title_justify="left", show_header=bool(counts))
        table.add_column("choice", style="bold")
        if counts:
            table.add_column(f"params on {counts['_data']}", justify="right")
        table.add_column("what it is")
        for path in sorted((config_dir() / name).glob("*.yaml")):
            cells = [path.stem]
            if counts:
                cells.append(counts.get(path.stem, "-"))
            # Descriptions quote commands and lists ("dgrun[mlflow]", "[x, y, =]"): plain text,
            # not rich markup.
            table.add_row(*cells, escape(describe_choice(path)))
        console.print(table)
    if group in (None, "probe"):
        from dgrun.probes import PROBES

        table = Table(title="+probes.NAME={...} (phenomenon presets choose some)",
                      title_justify="left", show_header=False)
        for name in PROBES.names():
            table.add_row(name, escape(first_sentence((PROBES.get(name).__doc__ or "")
                                                      .splitlines())))
        console.print(table)


def _param_counts(overrides: list[str]) -> dict[str, str]:
    from dgrun import models
    from dgrun.models import MODELS

    cfg = _compose(overrides)
    meta = data_meta(cfg)
    counts = {"_data": f"{meta.name} {'x'.join(map(str, meta.input_shape))}"}
    for name in MODELS.names():
        if meta.modality not in MODELS.tags(name).get("modalities", ("image", "vector")):
            counts[name] = f"(no {meta.modality} data)"
            continue
        try:
            model = models.create(name, meta.input_shape, meta.num_classes, meta.modality,
                                  vocab_size=meta.vocab_size)
        except UserError as e:
            counts[name] = f"({e.problem})"
            continue
        counts[name] = f"{models.count_params(model):,}"
    return counts


# ---------------------------------------------------------------- dgrun inspect
def inspect_model(overrides: list[str]) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from dgrun import models

    cfg = _compose(overrides)
    meta = data_meta(cfg)
    model = models.create(cfg.model.name, meta.input_shape, meta.num_classes, meta.modality,
                          vocab_size=meta.vocab_size, **cfg.model.options).eval()
    shapes: dict[str, tuple] = {}

    def remember(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
        return hook

    handles = [m.register_forward_hook(remember(n)) for n, m in model.named_modules() if n]
    dtype = torch.long if meta.modality == "tokens" else torch.float32
    with torch.no_grad():
        out = model(torch.zeros((2, *meta.input_shape), dtype=dtype))
    for h in handles:
        h.remove()
    table = Table(title=f"{cfg.model.name} on {meta.name} "
                        f"({'x'.join(map(str, meta.input_shape))}, {meta.num_classes} classes)",
                  title_justify="left")
    for column, justify in (("layer", "left"), ("type", "left"), ("output", "right"),
                            ("params", "right")):
        table.add_column(column, justify=justify)
    for name, module in model.named_modules():
        if not name:
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        leaf = not any(True for _ in module.children())
        if leaf or own:
            shape = shapes.get(name)
            table.add_row(name, type(module).__name__,
                          "x".join(map(str, shape[1:])) if shape else "-", f"{own:,}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"total: {models.count_params(model):,} parameters; output {tuple(out.shape[1:])} "
          "per example")


# ---------------------------------------------------------------- the commands
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message, f"see `{self.prog} --help`")


def list_main(argv: list[str]) -> int:
    p = _Parser(prog="dgrun list", description="Config groups and their choices; with `model`, "
                "parameter counts on the data the overrides choose.")
    p.add_argument("group", nargs="?", choices=[*GROUPS, "probe"], metavar="GROUP",
                   help=f"one of: {', '.join(GROUPS)}, probe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. dataset=cifar10 dataset.center_crop=28 (for parameter counts)")
    return _run(lambda: list_choices(*_split(p.parse_args(argv))))


def inspect_main(argv: list[str]) -> int:
    p = _Parser(prog="dgrun inspect", description="Layers, output shapes and parameter counts "
                "of the model a run with these overrides would train (nothing is trained).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model=inception dataset=cifar10 dataset.center_crop=28")
    return _run(lambda: inspect_model(p.parse_args(argv).overrides))


def _split(args) -> tuple[Optional[str], list[str]]:
    return args.group, list(args.overrides)


def _run(action) -> int:
    try:
        action()
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UserError as e:
        print(f"dgrun: error: {e}", file=sys.stderr)
        return 2
    return 0
