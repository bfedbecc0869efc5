"""Composing configs outside Hydra's main, to validate every job of a command up front.

`dgrun -m` and `dgrun slurm` both expand a sweep exactly as Hydra's BasicSweeper would (the
config's own `hydra.sweeper.params` first, then the command line's), compose each job's config,
and validate it, so a bad value anywhere in a sweep stops the command before any job starts.
Hydra's and OmegaConf's multi-line errors become one UserError line here.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from dgrun.errors import UserError


def _known_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{k}"
        keys.append(full)
        try:
            keys += _known_keys(node._get_node(k), full + ".")
        except Exception:
            pass
    return keys


def explain(error: BaseException, base_cfg=None) -> tuple[str, str]:
    """Turn a Hydra/OmegaConf composition error into (problem, fix)."""
    text = str(error)
    both = text + "\n" + str(error.__cause__ or "")
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, choice = m.groups()
        options = re.findall(r"^\t(\S+)$", text, re.M)
        return (f"unknown {group} '{choice}'",
                f"choose one of: {', '.join(options)}" if options else "see `dgrun --help`")
    m = re.search(r"Key '([^']+)' is not in struct", both) or re.search(
        r"Could not override '([^']+)'", text)
    if m:
        from dgrun.config import unknown_key

        full = re.search(r"full_key: (\S+)", both)
        key = full.group(1) if full else m.group(1)
        e = unknown_key(key, _known_keys(base_cfg) if base_cfg else [])
        return e.problem, e.fix
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", both)
    if m:
        full = re.search(r"full_key: (\S+)", both)
        key = full.group(1) if full else "a value"
        return (f"{key}={m.group(1)} is not of type {m.group(2)}",
                f"give {key} a value of type {m.group(2).lower()}")
    if "Ambiguous value for argument" in text:
        return text.splitlines()[0], "add -m (--multirun) to sweep over several values"
    first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
    return first.strip(), "see `dgrun --help`"


def expand(overrides: list[str], *, multirun: bool = True,
           config_dir_extra: Optional[str] = None, config_name: str = "config",
           limit: Optional[int] = None) -> tuple[list[list[str]], DictConfig]:
    """Every job's override list, each composed and validated (the first `limit` of them), and
    the composed config of the whole command (its `hydra` node holds e.g. the sweep dir)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from dgrun.config import config_dir, from_hydra, register_schemas

    register_schemas()
    search_path = create_config_search_path(str(config_dir()))
    if config_dir_extra:
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir_extra)}")
    hydra = Hydra.create_main_hydra2(task_name="dgrun", config_search_path=search_path)
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    def base():  # the default config, composed only to suggest a key after a typo
        try:
            return hydra.compose_config(config_name, [], run_mode=RunMode.RUN)
        except Exception:
            return None

    try:
        master = hydra.compose_config(config_name, overrides, run_mode=mode)
        if not multirun:
            from_hydra(master)
            return [list(overrides)], master
        params = OmegaConf.select(master, "hydra.sweeper.params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(overrides)
        parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(arguments)
        jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        for job in jobs[:limit]:
            from_hydra(hydra.compose_config(config_name, job, run_mode=mode))
        return jobs, master
    except UserError:
        raise
    except Exception as e:  # Hydra's and OmegaConf's composition errors
        raise UserError(*explain(e, base())) from e
    finally:
        GlobalHydra.instance().clear()
