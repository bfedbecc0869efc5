"""Batched, on-device augmentation (random crop with padding, horizontal flip), as in airbench.

Noise for step s comes from a generator seeded by (seed, "augment", s), so a resumed run
augments every batch exactly as the uninterrupted run did.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dgrun.errors import UserError
from dgrun.seeding import derive_seed

Augment = Callable[[torch.Tensor, int], torch.Tensor]


def build(options: Optional[dict], *, seed: int, modality: str,
          input_shape: Optional[tuple[int, ...]] = None) -> Optional[Augment]:
    """`options` is the `dataset.augment` mapping ({crop: PADDING, flip: BOOL}) or null."""
    if not options:
        return None
    unknown = set(options) - {"crop", "flip"}
    if unknown:
        raise UserError(f"dataset.augment has no option {', '.join(sorted(unknown))}",
                        "its options are: crop (padding in pixels), flip (true/false)")
    pad, flip = int(options.get("crop") or 0), bool(options.get("flip", False))
    if pad < 0:
        raise UserError(f"dataset.augment.crop={pad} must be >= 0", "use e.g. 4, or 0 for none")
    if not pad and not flip:
        return None
    if modality != "image":
        raise UserError(f"dataset.augment needs image data, not {modality}",
                        "set dataset.augment=null")
    if pad and input_shape is not None:
        # Half the side or more and most crops are padding: the model would train on zeros.
        side = min(input_shape[-2:])
        if 2 * pad >= side:
            raise UserError(f"dataset.augment.crop={pad} pads the {input_shape[-2]}x"
                            f"{input_shape[-1]} images by half their size or more",
                            f"use a padding up to {(side - 1) // 2} (e.g. 4 for 32x32 images)")

    def augment(x: torch.Tensor, step: int) -> torch.Tensor:
        gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, "augment", step))
        n, _, h, w = x.shape
        if flip:
            mirror = torch.rand(n, device=x.device, generator=gen) < 0.5
            x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
        if pad:
            # Crop by gathering shifted windows from the padded batch: one op for the batch.
            padded = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
            dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
            rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
            x = padded[batch, chans, rows, cols]
        return x

    return augment
