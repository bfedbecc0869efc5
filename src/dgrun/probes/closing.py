"""A phenomenon's numbers in one line each, for the end of a run: read from summary.json alone
(its probe fields and final row), so a run's closing lines and `dgrun show` say the same.

One formatter per summary field, registered under the field's name; a field a run does not have
says nothing.
"""
from __future__ import annotations

from typing import Callable, Optional

from dgrun.registry import Registry

CLOSING = Registry("closing line")
Say = Callable[[dict, dict], Optional[str]]


def closing_lines(summary: dict) -> list[str]:
    lines = []
    for key in CLOSING.names():
        fields = summary.get(key)
        if isinstance(fields, dict) and fields:
            line = CLOSING.get(key)(fields, summary)
            if line:
                lines.append(line)
    return lines


def _acc(value) -> str:
    return "-" if value is None else f"{value:.2f}"


@CLOSING.register("grokking")
def _grokking(found: dict, summary: dict) -> Optional[str]:
    memorized, generalized = found.get("memorization_step"), found.get("generalization_step")
    train = f"train acc >= {found.get('train_threshold', 0):g}"
    test = f"test acc >= {found.get('test_threshold', 0):g}"
    if memorized is None:
        return f"grokking: not memorized ({train} never reached)"
    if generalized is None:
        return f"grokking: memorized at step {memorized} ({train}); {test} never reached"
    verdict = "grokked" if found.get("grokked") else "no grokking: generalized too soon after"
    return (f"grokking: memorized at step {memorized} ({train}), generalized at step "
            f"{generalized} ({test}): {found['delay_ratio']:.1f}x later ({verdict})")


@CLOSING.register("transitions")
def _transitions(found: dict, summary: dict) -> Optional[str]:
    events = found.get("events") or []
    if not events:
        return "transitions: none detected"
    shown = [f"{event_text(e)} at step {e['step']}" for e in events[:4]]
    more = f" (+{len(events) - 4} more)" if len(events) > 4 else ""
    return f"transitions: {'; '.join(shown)}{more}"


def event_text(event: dict) -> str:
    """A detected transition in the column's own units: "train_loss 0.87 -> 9e-05"."""
    metric = event["metric"]
    return (f"{_name(metric)} {_value(metric, event['before'])} -> "
            f"{_value(metric, event['after'])}")


def _name(metric: str) -> str:
    return metric[len("log10_"):] if metric.startswith("log10_") else metric


def _value(metric: str, value: float) -> str:
    """A log10_<column> event in the column's own units: a loss of 1e-4, not -4."""
    return f"{10 ** value:.2g}" if metric.startswith("log10_") else f"{value:.2f}"


@CLOSING.register("corruption")
def _corruption(found: dict, summary: dict) -> Optional[str]:
    final = summary.get("final") or {}
    if found.get("name") in (None, "none") or final.get("train_acc_corrupted") is None:
        return None
    clean = final.get("train_acc_clean")
    return (f"{found['name']} (p={found.get('prob', 0):g}): train acc on corrupted rows "
            f"{_acc(final['train_acc_corrupted'])}"
            + (f", on clean rows {_acc(clean)}" if clean is not None else "")
            + f"; test acc {_acc(final.get('test_acc'))}")


@CLOSING.register("groups")
def _groups(found: dict, summary: dict) -> Optional[str]:
    if found.get("final_worst_group_acc") is None:
        return None
    final = summary.get("final") or {}
    per_group = {k[len("test_acc_"):]: v for k, v in final.items()
                 if k.startswith("test_acc_") and isinstance(v, (int, float))}
    worst = f" ({min(per_group, key=per_group.get)})" if per_group else ""
    step = found.get("worst_group_catch_up_step")
    caught = (f"caught up (within {found['gap']:g} of average) at step {step}" if step is not None
              else f"never within {found['gap']:g} of average")
    return (f"worst group{worst}: {_acc(found['final_worst_group_acc'])} vs average "
            f"{_acc(found.get('final_avg_acc'))} at the end; widest gap "
            f"{_acc(found.get('max_gap'))} at step {found.get('max_gap_step')}; {caught}")


@CLOSING.register("robustness")
def _robustness(found: dict, summary: dict) -> Optional[str]:
    parts = []
    if found.get("corruption_acc") is not None:
        per_name = {k[len("corruption_acc_"):]: v for k, v in found.items()
                    if k.startswith("corruption_acc_") and k not in
                    ("corruption_acc_best", "corruption_acc_best_step")}
        weakest = min(per_name, key=per_name.get) if per_name else None
        parts.append(f"corruption acc {_acc(found['corruption_acc'])}"
                     + (f" (weakest: {weakest} {_acc(per_name[weakest])})" if weakest else ""))
    if found.get("adv_acc") is not None:
        spec = ((summary.get("config") or {}).get("probes") or {}).get("robustness") or {}
        attack = f"{spec.get('attack', 'adversarial').upper()}"
        eps = _eps(spec.get("eps"))
        parts.append(f"{attack} acc{eps} {_acc(found['adv_acc'])} (best "
                     f"{_acc(found.get('adv_acc_best'))} at step {found.get('adv_acc_best_step')})")
    if not parts:
        return None
    return f"robustness at step {found.get('measured_step')}: " + "; ".join(parts)


def _eps(eps) -> str:
    from dgrun.probes.robustness import eps_text

    return f" at eps {eps_text(eps)}" if isinstance(eps, (int, float)) else ""
