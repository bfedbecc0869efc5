"""Checking `dgrun analyze RUN WHAT key=value` options against the analysis's own signature.

Each adapter declares its options once, as typed keyword arguments; a range rides on the type
(`Count`, `Fraction`, ...). `check(what, adapter, options)` gives every value the declared type
(YAML reads `top_k=5` as 5, `eps=1e-3` as text) and refuses what does not fit in the one-line
form config keys use: `top_k='abc' is not a whole number; set top_k to a whole number`.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union

from dgrun.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = False

    def check(self, key: str, value: Any) -> None:
        from dgrun.config import check_range

        check_range(key, value, (self.low, self.high, self.low_inclusive, self.high_inclusive))


Count = Annotated[int, Range(1)]                       # how many of something: at least one
Index = Annotated[int, Range(0)]                       # a step, a class, a row: zero or more
Fraction = Annotated[float, Range(0.0, 1.0, True, True)]
Positive = Annotated[float, Range(0.0, math.inf, False)]
NonNegative = Annotated[float, Range(0.0)]
Severity = Annotated[int, Range(1, 5, True, True)]  # CIFAR-10-C's five levels

_SEQUENCES = (collections.abc.Sequence, list, tuple)
_UNIONS = (Union, types.UnionType)


def check(what: str, adapter: Callable, options: dict[str, Any]) -> dict[str, Any]:
    """`options` typed and range-checked for `adapter`'s keyword arguments, or UserError."""
    hints = typing.get_type_hints(adapter, include_extras=True)
    allowed = [p.name for p in inspect.signature(adapter).parameters.values()
               if p.kind == p.KEYWORD_ONLY]
    checked = {}
    for key, value in options.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            raise UserError(f"analysis '{what}' has no option '{key}'",
                            (f"did you mean {close[0]}? " if close else "")
                            + f"its options are: {', '.join(allowed) or 'none'}")
        checked[key] = coerce(key, value, hints.get(key, Any))
    return checked


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names (int, float, bool, str, Optional, unions, sequences,
    Annotated with a Range), or UserError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = coerce(key, value, args[0])
        for rule in args[1:]:
            if isinstance(rule, Range) and value is not None:
                for item in (value if isinstance(value, list) else [value]):
                    rule.check(key, item)
        return value
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        first_error = None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except UserError as e:
                first_error = first_error or e
        raise first_error
    if origin in _SEQUENCES:
        item = args[0] if args else Any
        values = value if isinstance(value, (list, tuple)) else [value]  # top_k=3 is [3]
        return [coerce(key, v, item) for v in values]
    if hint is Any:
        return value
    if value is None:
        raise UserError(f"{key} cannot be null", f"give {key} a value")
    return _SCALARS.get(hint, lambda k, v: v)(key, value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not true/false", f"set {key}=true or {key}=false")
    return value


def _int(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value!r} is not a whole number", f"set {key} to a whole number")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as text
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key}={value!r} is not a number", f"set {key} to a number")
    return float(value)


def _str(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        raise UserError(f"{key}={value!r} is not a single value", f"set {key} to one name")
    return str(value)


_SCALARS = {bool: _bool, int: _int, float: _float, str: _str}
