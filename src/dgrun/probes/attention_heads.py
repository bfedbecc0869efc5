"""Head specialization in transformers: how each head's attention settles over training.

For a model exposing `attention_maps(x) -> (layers, batch, heads, T, T)` (dgrun's
transformers), on a fixed seeded sample of `sample` training rows, the attention of the last
position (the one the model predicts from), averaged over the sample. Columns, per layer l and
head h:

    attn_entropy_l{l}h{h}         its entropy in nats (log T: uniform; 0: one position)
    attn_share_l{l}h{h}_pos{t}    its weight on input position t (the shares sum to 1)

Nanda et al.'s model reads a and b at positions 0 and 1 and ignores "=" at position 2; a head
that specializes moves its share off position 2. `dgrun analyze RUN attention` draws the same
quantities over saved checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.probes.base import Evaluation, Probe
from dgrun.seeding import derive_seed


def last_position_statistics(maps: Tensor) -> tuple[Tensor, Tensor]:
    """(layers, batch, heads, T, T) patterns -> the last position's attention entropy in nats
    (layers, heads) and its weight on each position (layers, heads, T), means over the batch."""
    last = maps[..., -1, :].float()                                    # (L, B, H, T)
    entropy = -(last * last.clamp_min(1e-12).log()).sum(-1).mean(1)
    return entropy, last.mean(1)


class AttentionHeadsProbe(Probe):
    KEY = "attention_heads"

    def __init__(self, seed: int, sample: int):
        self.seed, self.sample = seed, sample

    def measure(self, ev: Evaluation) -> dict:
        model = ev.model
        if not hasattr(model, "attention_maps"):
            raise UserError("probe 'attention_heads' needs a transformer (a model with "
                            "attention_maps)", "use model=transformer, or drop it with "
                            "~probes.attention_heads")
        rows = torch.randperm(len(ev.train), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "attention_heads")))[:self.sample].to(ev.train.y.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                entropy, share = last_position_statistics(
                    model.attention_maps(ev.prepare(ev.train.x[rows])))
        finally:
            model.train(was_training)
        values = {}
        for layer in range(entropy.shape[0]):
            for head in range(entropy.shape[1]):
                name = f"l{layer}h{head}"
                values[f"attn_entropy_{name}"] = entropy[layer, head]
                for t in range(share.shape[-1]):
                    values[f"attn_share_{name}_pos{t}"] = share[layer, head, t]
        return values

    def summarize(self, rows: list[dict]) -> dict:
        last = rows[-1] if rows else {}
        return {self.KEY: {
            "sample": self.sample,
            "final_entropy": {k[len("attn_entropy_"):]: last[k] for k in last
                              if k.startswith("attn_entropy_")},
        }}

    def plots(self, rows: list[dict], summary: dict, out_dir: Path,
              marks=()) -> list[Path]:
        from dgrun.probes.progress_figures import plot_panels
        heads = sorted({k[len("attn_entropy_"):] for r in rows[:1] for k in r
                        if k.startswith("attn_entropy_")})
        panels = [("entropy (nats)", [(f"attn_entropy_{h}", h) for h in heads], False)]
        positions = sorted({k.rsplit("_pos", 1)[1] for r in rows[:1] for k in r
                            if k.startswith("attn_share_")}, key=int)
        for t in positions:
            panels.append((f"share on position {t}",
                           [(f"attn_share_{h}_pos{t}", h) for h in heads], False))
        return plot_panels(rows, panels, [], Path(out_dir) / "attention_heads.png",
                           "Last position's attention per head")


@PROBES.register("attention_heads")
def attention_heads(*, meta, seed, sample: int = 512) -> AttentionHeadsProbe:
    """Per-head attention entropy and share on each input position (transformers)."""
    if meta.modality != "tokens":
        raise UserError(f"probe 'attention_heads' needs a token dataset and a transformer, "
                        f"not dataset={meta.name}", "drop it with ~probes.attention_heads")
    if not (isinstance(sample, int) and sample >= 1):
        raise UserError(f"probes.attention_heads.sample must be a positive integer, got "
                        f"{sample!r}", "e.g. probes.attention_heads.sample=512")
    return AttentionHeadsProbe(seed, sample)
