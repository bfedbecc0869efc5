"""Probe `robustness`: corruption and adversarial accuracy over training, for image data.

    probes:
      robustness: {corruptions: all, severities: [1, 2, 3, 4, 5], n: 256, every: 5,
                   attack: pgd, norm: linf, eps: 0.0313725, steps: 10, n_adv: 128}

On every `every`-th evaluation (the first included) it adds the columns

    corruption_acc             mean accuracy over the chosen corruptions and severities
    corruption_acc_<name>      mean over severities, one per corruption
    adv_acc                    accuracy under the attack (absent with attack: none)

measured on a fixed seeded subset of n test images (the first n_adv of them are attacked).
The corrupted copies are made once, stored as uint8 on the data's device (n * corruptions *
severities images, as CIFAR-10-C stores them) and rebuilt identically after a resume; only
the model changes between evaluations. Other evaluations return {} (blank cells).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from torch import Tensor

from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.metrics import number
from dgrun.probes.base import Evaluation, Probe
from dgrun.robustness.attacks import AttackSpec, adversarial_accuracy
from dgrun.robustness.corruptions import SEVERITIES, names
from dgrun.robustness.suite import (accuracy, corrupted_uint8, seeded_subset,
                                    summarize_corruptions, unit_pixels)


class RobustnessProbe(Probe):
    def __init__(self, *, seed: int, corruptions: str | Iterable[str], severities: list[int],
                 n: int, every: int, attack: Optional[AttackSpec], n_adv: int,
                 attack_batch_size: int):
        self.seed, self.corruptions, self.severities = seed, corruptions, severities
        self.n, self.every, self.spec, self.n_adv = n, every, attack, n_adv
        self.attack_batch_size = attack_batch_size
        self.evaluations = 0
        self._x: Optional[Tensor] = None
        self._y: Optional[Tensor] = None
        self._corrupted: dict[tuple[str, int], Tensor] = {}

    def _build(self, test: Split) -> None:
        """The fixed subset and its corrupted copies, once per process."""
        subset = seeded_subset(len(test), self.n, self.seed).to(test.y.device)
        self._x, self._y = unit_pixels(test.x[subset]), test.y[subset]
        chosen = names(self.corruptions, channels=self._x.shape[1])
        self._corrupted = {(name, s): corrupted_uint8(self._x, name, s, self.seed)
                           for name in chosen for s in self.severities}

    def measure(self, ev: Evaluation) -> dict[str, Tensor]:
        due = self.evaluations % self.every == 0
        self.evaluations += 1
        if not due:
            return {}
        if self._x is None:
            self._build(ev.test)
        columns: dict[str, Tensor] = {}
        if self._corrupted:
            accs = {key: accuracy(ev.predict, images, self._y)
                    for key, images in self._corrupted.items()}
            columns = summarize_corruptions(accs, per_severity=False)
        if self.spec is not None:
            k = min(self.n_adv, len(self._x))
            columns["adv_acc"] = adversarial_accuracy(
                ev.model, ev.prepare, self._x[:k], self._y[:k], self.spec, seed=self.seed,
                batch_size=self.attack_batch_size)
        return columns

    def summarize(self, rows: list[dict]) -> dict:
        measured = [r for r in rows if number(r.get("corruption_acc")) is not None
                    or number(r.get("adv_acc")) is not None]
        if not measured:
            return {}
        last = measured[-1]
        out: dict[str, float | int] = {"measured_step": int(last["step"])}
        for key in ("corruption_acc", "adv_acc"):
            series = [(r["step"], number(r.get(key))) for r in measured]
            series = [(s, v) for s, v in series if v is not None]
            if not series:
                continue
            best_step, best = max(series, key=lambda p: (p[1], -p[0]))  # earliest best
            out[key] = series[-1][1]
            out[f"{key}_best"] = best
            out[f"{key}_best_step"] = int(best_step)
        for key, value in last.items():
            if key.startswith("corruption_acc_") and number(value) is not None:
                out[key] = number(value)
        if "corruption_acc" in out and number(last.get("test_acc")) is not None:
            # How much of the clean test accuracy the corruptions take away, at the last
            # measurement (the clean figure is the whole test split's).
            out["corruption_gap"] = number(last["test_acc"]) - out["corruption_acc"]
        return {"robustness": out}

    # No mark of its own: the best corruption accuracy is often a wiggle (0.9134 vs 0.9127 at
    # the end); summary.json keeps it, and the figure shows the whole curve.

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks: Sequence[tuple[int, str]] = ()) -> list[Path]:
        from dgrun.plots import (draw_marks, legend_outside, looks_log_spaced, pyplot,
                                 save_figure, step_extent)

        plt = pyplot()

        measured = [r for r in rows if number(r.get("corruption_acc")) is not None
                    or number(r.get("adv_acc")) is not None]
        if not measured:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        log_x = looks_log_spaced([number(r["step"]) for r in rows])
        if log_x:
            rows = [r for r in rows if number(r["step"]) > 0]
            measured = [r for r in measured if number(r["step"]) > 0]
        per_name = sorted({k for r in measured for k in r if k.startswith("corruption_acc_")})
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True)
        attack = ("adversarial" if self.spec is None else
                  f"{self.spec.kind.upper()} {self.spec.norm}, eps {eps_text(self.spec.eps)}")
        for key, label in (("test_acc", "clean test"), ("corruption_acc",
                                                        f"corrupted (mean of {len(per_name)})"),
                           ("adv_acc", attack)):
            _line(top, rows if key == "test_acc" else measured, key, label, linewidth=1.8)
        draw_marks(top, marks, log_x, step_extent(rows, log_x))
        top.set_title("robustness over training")
        # One colour per corruption (tab20 has 20), named in the legend: which one is which.
        colours = plt.get_cmap("tab20").colors
        final = {k: number(measured[-1].get(k)) for k in per_name}
        for i, key in enumerate(sorted(per_name, key=lambda k: -(final[k] or 0))):
            name = key[len("corruption_acc_"):]
            _line(bottom, measured, key, f"{name} ({_fmt(final[key])})",
                  color=colours[i % len(colours)], linewidth=1.0)
        bottom.set_title("each corruption, mean over severities (final accuracy)", fontsize=9)
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            if log_x:
                ax.set_xscale("log")
            legend_outside(ax, ncol=1)
        return [save_figure(fig, out_dir / "robustness.png")]

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations = int(state["evaluations"])



def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def eps_text(eps: float) -> str:
    """A pixel-space budget as people write it: 8/255 when it is a whole number of grey levels."""
    grey = eps * 255
    return f"{round(grey)}/255" if abs(grey - round(grey)) < 1e-6 else f"{eps:.3g}"


def _line(ax, rows: list[dict], key: str, label: Optional[str], **style) -> None:
    points = [(r["step"], number(r.get(key))) for r in rows]
    points = [(s, v) for s, v in points if v is not None]
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], label=label, **style)


@PROBES.register("robustness")
def robustness(*, meta: Meta, seed: int, corruptions: str | Iterable[str] = "all",
               severities: int | Iterable[int] = SEVERITIES, n: int = 256, every: int = 1,
               attack: Optional[str] = "pgd", norm: str = "linf", eps: float = 8 / 255,
               steps: int = 10, step_size: Optional[float] = None, random_start: bool = True,
               n_adv: int = 128, attack_batch_size: int = 256) -> RobustnessProbe:
    """Corruption accuracy (CIFAR-10-C's suite) and adversarial accuracy (attack: pgd, fgsm or
    none; eps in pixel units) on a seeded subset of n test images, every `every` evaluations."""
    if meta.modality != "image":
        raise UserError(f"probe 'robustness' needs image data; '{meta.name}' is {meta.modality} "
                        "data", "remove probes.robustness or use an image dataset")
    if len(meta.input_shape) != 3 or meta.input_shape[0] not in (1, 3):
        raise UserError(f"probe 'robustness' needs images with 1 or 3 channels; '{meta.name}' "
                        f"has input shape {meta.input_shape}", "remove probes.robustness")
    for key, value in (("n", n), ("every", every), ("n_adv", n_adv),
                       ("attack_batch_size", attack_batch_size)):
        if int(value) != value or value < 1:
            raise UserError(f"probes.robustness.{key}={value!r} must be a positive integer",
                            f"e.g. probes.robustness.{key}=1")
    severities = [int(severities)] if isinstance(severities, int) else [int(s) for s in severities]
    for s in severities:
        if s not in SEVERITIES:
            raise UserError(f"probes.robustness.severities has {s}; severities are 1 to 5",
                            "e.g. probes.robustness.severities=[1,3,5]")
    corruptions = corruptions if isinstance(corruptions, str) else [str(c) for c in corruptions]
    chosen = names(corruptions, channels=meta.input_shape[0])  # unknown/colour-only names fail
    if not (chosen and severities) and attack in (None, "none"):
        raise UserError("probe 'robustness' has no corruptions and no attack to measure",
                        "set probes.robustness.corruptions=all or probes.robustness.attack=pgd")
    spec = None if attack in (None, "none") else AttackSpec(
        kind=str(attack), norm=norm, eps=float(eps), steps=int(steps),
        step_size=None if step_size is None else float(step_size),
        random_start=bool(random_start))
    return RobustnessProbe(seed=seed, corruptions=corruptions, severities=severities, n=int(n),
                           every=int(every), attack=spec, n_adv=int(n_adv),
                           attack_batch_size=int(attack_batch_size))
