"""What a run says on the terminal besides its log: the config it will train with and where
its record goes (at the start), and how it ended (at the end). `quiet=true` turns both off."""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def show_config(cfg: DictConfig, run_dir: Path) -> None:
    from rich.tree import Tree

    tree = Tree(f"[bold]dgrun[/] -> {run_dir}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for group, node in resolved.items():
        if isinstance(node, dict):
            branch = tree.add(f"[bold]{group}[/]" + (f": {node['name']}" if "name" in node
                                                    else ""))
            for key, value in node.items():
                if key != "name":
                    branch.add(f"{key}: {value}")
        else:
            tree.add(f"[bold]{group}[/]: {node}")
    _console().print(tree)


def show_summary(summary: dict, run_dir: Path) -> None:
    from rich.markup import escape

    from dgrun.probes.closing import closing_lines

    final, at = summary.get("final") or {}, summary.get("interpolation") or {}

    def num(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"[bold]{summary.get('status')}[/] ({summary.get('stop_reason')}) after "
             f"{summary.get('steps')} steps, {summary.get('time_s', 0):.1f} s of training",
             f"train acc {num(final.get('train_acc'))}, test acc {num(final.get('test_acc'))}",
             f"interpolation at step {at['step']} ({at['time_s']:.1f} s), test acc there "
             f"{num(at.get('test_acc'))}" if at.get("reached") else
             "interpolation threshold not reached",
             *(escape(line) for line in closing_lines(summary)),
             f"record: {run_dir}"]
    _console().print("\n".join(lines), soft_wrap=True)  # one line per number, for grep too
