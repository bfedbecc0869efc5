"""Nanda et al. 2023's progress measures for grokking, on `dataset=modular`, for any model.

At each evaluation the model's logits over all p^2 pairs (a, b) and p classes c are written in
the Fourier basis over (a, b, c) (`dgrun.probes.fourier`; for operation x + y the directions
cos/sin(w_k (a + b - c)), w_k = 2 pi k / p; for x - y, a - b - c). Columns:

    restricted_loss      the loss of the logits with only the key-frequency components and the
                         constant kept, over all p^2 pairs (the labels the operation defines).
                         Those logits depend on (a, b, c) only through a + b - c, so the loss
                         is the same for every pair: train and test alike.
    excluded_loss        the loss, on the training split, of the logits with exactly those
                         components removed
    num_key_frequencies  how many key frequencies this evaluation found
    fourier_gini         the Gini coefficient of the embedding's norm per frequency (0: spread
                         evenly, -> 1: a few frequencies hold it all)
    sum_sq_weights       the total squared weights (weight_norm squared)

Losses use the run's own training loss (trainer.loss), so they share the axis of train_loss and
test_loss: cross-entropy's chance level is log p; MSE's is that of constant logits.

Key frequencies, from the logits' spectrum: frequency k is key when the logits' components along
cos/sin(w_k (a + s b - c)) hold at least `min_share` times an even share of the logits'
variance (their squared norm over all p^3 entries, about the mean), an even share being
1/(p//2) (the threshold is then ~1% at p = 97). A random model spreads its variance over the
whole p^3 table, so each frequency holds ~2/p^3; a memorizing one puts a little more on the
profile of its correct answers (a spike at a + b - c = 0, flat over frequencies): at most 0.2%
per frequency on the quadratic MLP while it memorizes (steps 18-56 of the grokking default,
measured). Neither has a key frequency. Nanda's transformer ends with a few frequencies holding
most of it (3 in the reduced run of experiments/grokking/README.md); Gromov's quadratic MLP with
all 48, each ~2%. The embedding's spectrum (the token embedding's rows 0..p-1;
for a model on one-hot inputs without an embedding, the first layer's weights for each operand,
side by side) gives `fourier_gini` and, in summary.json, `embedding_frequencies`: the fewest
frequencies holding 90% of its squared norm, to set next to the logits' key frequencies.

The key frequencies are those found at each evaluation (a live probe cannot know the final
ones); `key_frequencies: [..]` fixes them, and `dgrun analyze RUN progress` recomputes the
curves over the run's checkpoints with the last checkpoint's key frequencies, as Nanda et al.
do. Other operations (x * y, x / y, ...) are not sums in Z_p: the probe then writes only
fourier_gini and sum_sq_weights and says so in summary.json.

Phases (summary.json `modular_progress.phases`, marked on the plots), from the columns:
    memorization       [0, circuit_formation_step)
    circuit formation  starts where excluded_loss starts rising: the step of its running
                       minimum when it first climbs `rise` (0.1) of the way from that minimum
                       back to chance (the loss of all-zero logits: log p for cross-entropy,
                       1 for MSE), so float noise on a memorized ~1e-6 loss does not count
    cleanup            starts where restricted_loss falls: the first step after that where it
                       is at most `fall` times its value at the start of circuit formation;
                       ends (cleanup_end_step) where test_loss falls: the first step after
                       that where it is at most `fall` times its value at cleanup's start
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from dgrun.errors import UserError
from dgrun.losses import LOSSES
from dgrun.metrics import number
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe
from dgrun.probes.fourier import (OPERATION_SIGNS, diagonal_profile_of, frequency_norms, gini,
                                  key_frequencies, key_profile, spectrum_of)

PHASE_LABELS = (("circuit_formation_step", "circuit formation starts"),
                ("cleanup_step", "cleanup starts"), ("cleanup_end_step", "cleanup ends"))


# --- the embedding a model gives its operands ------------------------------------------------

def _token_embedding(model: nn.Module, p: int, vocab: int) -> Tensor:
    return model.token_embedding.weight[:p]


def _first_layer(model: nn.Module, p: int, vocab: int) -> Tensor:
    # One-hot operands times w_in: rows i*vocab .. i*vocab + p-1 are operand i's embedding.
    blocks = model.w_in.shape[0] // vocab
    return torch.cat([model.w_in[i * vocab:i * vocab + p] for i in range(blocks)], dim=1)


EMBEDDINGS = {"token_embedding": _token_embedding, "w_in": _first_layer}


def operand_embedding(model: nn.Module, p: int, vocab: int) -> Optional[Tensor]:
    """(p, d): how the model embeds the numbers 0..p-1, or None if it has no such layer."""
    for attribute, read in EMBEDDINGS.items():
        if hasattr(model, attribute):
            return read(model, p, vocab).detach()
    return None


# --- the measures, on one model's logits -----------------------------------------------------

def all_pairs(p: int, device=None) -> Tensor:
    """(p^2, 3) tokens [a, b, "="] for every pair, row-major in (a, b)."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    return torch.stack([a, b, torch.full_like(a, p)], dim=1).to(device)


def logit_key_frequencies(logits: Tensor, sign: int, min_share: float = 0.5) -> list[int]:
    """Frequencies whose a + s b - c components hold >= min_share x an even share (1/(p//2))
    of the (p, p, p) logits' variance."""
    return LogitView(logits, sign).key_frequencies(min_share)


class LogitView:
    """One evaluation's (p, p, p) logits seen through their diagonal profile D[n] (n = a + s b
    - c): every measure here needs only D, the logits' mean and variance, and the logits of
    the training rows, so the p^3 table is read twice (one float64 copy, one pass each for D
    and the variance) instead of once per measure."""

    def __init__(self, logits: Tensor, sign: int):
        self.logits, self.sign, self.p = logits, sign, logits.shape[0]
        wide = logits.detach().double()
        flat = wide.flatten()
        # The squared norm about the mean, as sum x^2 - N mean^2: two BLAS-speed passes
        # (var_mean's Welford pass took 5 ms at p = 97), exact enough in float64.
        self.variance = max(0.0, float(flat @ flat) - float(flat.sum()) ** 2 / flat.numel())
        self.mean = logits.mean()
        self.profile = diagonal_profile_of(wide, sign).cpu()

    def key_frequencies(self, min_share: float = 0.5) -> list[int]:
        if self.variance <= 0:
            return []
        share = spectrum_of(self.profile, self.p) / self.variance
        half = self.p // 2
        return [k + 1 for k in range(half) if float(share[k]) >= min_share / half]

    def measures(self, keys: Sequence[int], eval_sum, train_pairs: Tensor,
                 train_labels: Tensor) -> dict[str, float]:
        """restricted_loss over all pairs and excluded_loss over the training rows.

        train_pairs: (N,) flat indices a * p + b of the training rows; eval_sum(logits, y) the
        summed loss."""
        p, logits = self.p, self.logits
        # The key part K[n] as a function of n; on pair (a, b), class c it is K[(t - c) mod p],
        # t = (a + s b) mod p the pair's answer.
        wide = key_profile(self.profile, list(keys))
        # Restricted logits on pair (a, b) are mean + K[(t - c) mod p] with label t: the same
        # row for every pair up to a cyclic relabelling of the classes, which no loss sees. So
        # one row (t = 0) gives the loss of all p^2, in float64: one row's float32 rounding
        # is not averaged away as p^2 rows' was (3e-4 of a loss near 5e-4).
        row = float(self.mean) + wide[(-torch.arange(p)) % p]
        restricted = eval_sum(row.unsqueeze(0), torch.zeros(1, dtype=torch.int64))
        k = wide.to(logits.device, logits.dtype)
        classes = torch.arange(p, device=logits.device)
        a, b = train_pairs // p, train_pairs % p
        answer = (a + self.sign * b) % p
        excluded = logits.reshape(p * p, p)[train_pairs] - \
            k[(answer[:, None] - classes[None, :]) % p]
        return {"restricted_loss": float(restricted),
                "excluded_loss": float(eval_sum(excluded.float(), train_labels)) /
                len(train_pairs)}


def embedding_measures(model: nn.Module, p: int, vocab: int) -> dict:
    embedding = operand_embedding(model, p, vocab)
    if embedding is None:
        return {"fourier_gini": None, "embedding_frequencies": None}
    norms = frequency_norms(embedding)
    return {"fourier_gini": gini(norms), "embedding_frequencies": key_frequencies(norms, 0.9)}


# --- phases ----------------------------------------------------------------------------------

def _curve(rows: list[dict], column: str) -> list[tuple[int, float]]:
    out = []
    for row in sorted(rows, key=lambda r: float(r["step"])):
        value = number(row.get(column))
        if value is not None and math.isfinite(value):
            out.append((int(float(row["step"])), value))
    return out


def chance_loss(eval_sum, p: int) -> float:
    """The loss of all-zero logits on one row (log p for cross-entropy, 1 for MSE)."""
    return float(eval_sum(torch.zeros(1, p), torch.zeros(1, dtype=torch.int64)))


def detect_phases(rows: list[dict], chance: float, rise: float = 0.1,
                  fall: float = 0.5) -> dict:
    """Nanda's three phase boundaries from the excluded, restricted and test loss columns
    (definitions in the module docstring); each None when not reached."""
    found = {"circuit_formation_step": None, "cleanup_step": None, "cleanup_end_step": None}
    low = None
    for step, value in _curve(rows, "excluded_loss"):
        if low is None or value < low[1]:
            low = (step, value)
        elif chance > low[1] and value >= low[1] + rise * (chance - low[1]):
            found["circuit_formation_step"] = low[0]
            break
    previous = "circuit_formation_step"
    for key, column in (("cleanup_step", "restricted_loss"), ("cleanup_end_step", "test_loss")):
        start = found[previous]
        if start is None:
            break
        curve = [(s, v) for s, v in _curve(rows, column) if s >= start]
        if not curve:
            break
        reference = curve[0][1]
        found[key] = next((s for s, v in curve if v <= fall * reference), None)
        previous = key
    b1, b2, b3 = (found[k] for k in ("circuit_formation_step", "cleanup_step",
                                      "cleanup_end_step"))
    found["phases"] = {"memorization": [0, b1], "circuit_formation": [b1, b2],
                       "cleanup": [b2, b3]}
    return found


# --- the probe -------------------------------------------------------------------------------

class ModularProgressProbe(Probe):
    KEY = "modular_progress"

    def __init__(self, p: int, vocab: int, operation: str, eval_sum, *, min_share: float,
                 fixed_keys: Optional[list[int]], rise: float, fall: float):
        self.p, self.vocab, self.operation = p, vocab, operation
        self.sign = OPERATION_SIGNS.get(operation)
        self.eval_sum, self.min_share, self.fixed_keys = eval_sum, min_share, fixed_keys
        self.rise, self.fall = rise, fall
        self.last: dict = {}
        self._layout = None  # (the splits' x tensors, their flat pair indices, covers all)

    def _all_logits(self, ev: Evaluation) -> tuple[Tensor, Tensor]:
        """(p, p, p) logits over every pair, and the training rows' flat pair indices. The
        train and test splits together hold every pair once for x + y and x - y, so their
        logits (computed for this evaluation anyway) are reused rather than recomputed."""
        p = self.p
        splits = (ev.split("train").x, ev.split("test").x)
        if self._layout is None or any(a is not b for a, b in zip(self._layout[0], splits)):
            # The splits' rows never change during a run: their pair indices, and whether
            # they cover every pair, are worked out once (a sort of p^2 indices otherwise).
            flat = {name: x[:, 0] * p + x[:, 1] for name, x in zip(("train", "test"), splits)}
            both = torch.cat([flat["train"], flat["test"]])
            covers = len(both) == p * p and bool((both.sort().values == torch.arange(
                p * p, device=both.device)).all())
            self._layout = (splits, flat, covers)
        _, flat, covers = self._layout
        if covers:
            logits = torch.empty(p * p, p, device=flat["train"].device)
            logits[flat["train"]] = ev.logits("train")[:, :p]
            logits[flat["test"]] = ev.logits("test")[:, :p]
        else:
            logits = ev.predict(all_pairs(p, ev.train.x.device))[:, :p]
        return logits.reshape(p, p, p), flat["train"]

    def measure(self, ev: Evaluation) -> dict:
        values: dict = {"sum_sq_weights": torch.stack(
            [w.detach().float().pow(2).sum() for w in ev.model.parameters()]).sum()}
        embedded = embedding_measures(ev.model, self.p, self.vocab)
        if embedded["fourier_gini"] is not None:
            values["fourier_gini"] = embedded["fourier_gini"]
        self.last = {"embedding_frequencies": embedded["embedding_frequencies"]}
        if self.sign is None:
            return values
        logits, train_pairs = self._all_logits(ev)
        view = LogitView(logits, self.sign)
        keys = self.fixed_keys if self.fixed_keys is not None else \
            view.key_frequencies(self.min_share)
        values.update(view.measures(keys, self.eval_sum, train_pairs, ev.train.y))
        values["num_key_frequencies"] = len(keys)
        self.last["key_frequencies"] = keys
        return values

    def summarize(self, rows: list[dict]) -> dict:
        out = {"operation": self.operation, "p": self.p,
               "key_frequencies": self.last.get("key_frequencies"),
               "key_frequencies_fixed": self.fixed_keys is not None,
               "min_share": self.min_share,
               "embedding_frequencies": self.last.get("embedding_frequencies")}
        if self.sign is None:
            out["note"] = (f"restricted and excluded losses need x + y or x - y (the Fourier "
                           f"algorithm is over addition mod p), not {self.operation}")
            return {self.KEY: out}
        chance = chance_loss(self.eval_sum, self.p)
        out.update(detect_phases(rows, chance, self.rise, self.fall), chance_loss=chance,
                   rise=self.rise, fall=self.fall)
        return {self.KEY: out}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        found = summary.get(self.KEY) or {}
        return [(found[k], label) for k, label in PHASE_LABELS if found.get(k) is not None]

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks=()) -> list[Path]:
        from dgrun.probes.progress_figures import plot_progress
        return plot_progress(rows, self.marks(summary), out_dir)

    def state_dict(self) -> dict:
        return {"last": dict(self.last)} if self.last else {}

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last", {}))


@PROBES.register("modular_progress")
def modular_progress(*, meta, seed, loss: str = "cross_entropy", min_share: float = 0.5,
                     key_frequencies: Optional[list] = None, rise: float = 0.1,
                     fall: float = 0.5) -> ModularProgressProbe:
    """Restricted and excluded loss, key frequencies, Fourier Gini, phases (Nanda et al.)."""
    if meta.name != "modular":
        raise UserError(f"probe 'modular_progress' measures modular arithmetic, not "
                        f"dataset={meta.name}", "use dataset=modular, or drop it with "
                        "~probes.modular_progress")
    p = int(meta.extra["p"])
    if not (isinstance(min_share, (int, float)) and min_share > 0):
        raise UserError(f"probes.modular_progress.min_share must be positive, got "
                        f"{min_share!r}", "e.g. probes.modular_progress.min_share=0.5")
    if key_frequencies is not None and not (
            isinstance(key_frequencies, (list, tuple)) and all(
                isinstance(k, int) and 1 <= k <= p // 2 for k in key_frequencies)):
        raise UserError(f"probes.modular_progress.key_frequencies must be a list of integers "
                        f"in [1, {p // 2}], got {key_frequencies!r}",
                        "e.g. probes.modular_progress.key_frequencies=[14,35,41,42,52]")
    if not (0 < rise < 1 and 0 < fall < 1):
        raise UserError("probes.modular_progress needs 0 < rise < 1 and 0 < fall < 1",
                        "e.g. probes.modular_progress.rise=0.1 probes.modular_progress.fall=0.5")
    eval_sum = LOSSES.build(loss)[1]
    return ModularProgressProbe(p, meta.vocab_size or p + 1, meta.extra["operation"], eval_sum,
                                min_share=float(min_share),
                                fixed_keys=None if key_frequencies is None
                                else sorted(key_frequencies), rise=float(rise),
                                fall=float(fall))
