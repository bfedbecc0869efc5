"""One small registry class shared by every component family (datasets, models, optimizers...).

Hydra config groups and registry names agree: `model=wrn` picks the YAML `conf/model/wrn.yaml`,
whose `name: wrn` picks the builder registered here as "wrn".
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable

from dgrun.errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._tags: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **tags: Any) -> Callable[[Callable], Callable]:
        """Decorator: `@MODELS.register("mlp1", modalities=("image", "vector"))`."""

        def add(builder: Callable) -> Callable:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            self._tags[name] = tags
            return builder

        return add

    def unregister(self, name: str) -> None:
        """Remove `name` (a plugin or a test that registered a builder for a while)."""
        self.get(name)
        del self._builders[name], self._tags[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._builders if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise UserError(
                f"unknown {self.kind} '{name}'",
                f"choose one of: {', '.join(self.names())}",
            )
        return self._builders[name]

    def tags(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._tags[name]

    def options(self, name: str) -> list[str]:
        """The keyword options a builder takes (what a config may set besides `name`)."""
        params = inspect.signature(self.get(name)).parameters.values()
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def build(self, name: str, /, *args: Any, **options: Any) -> Any:
        """Build `name`, naming any option the builder does not take instead of a TypeError."""
        builder = self.get(name)
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        if not takes_any:
            unknown = sorted(set(options) - set(params))
            if unknown:
                raise UserError(
                    f"{self.kind} '{name}' has no option {', '.join(repr(u) for u in unknown)}",
                    f"its options are: {', '.join(self.options(name)) or 'none'}",
                )
        return builder(*args, **options)
