"""Grad-CAM (Selvaraju et al. 2017) for convolutional models, over checkpoints.

For a target class c and a conv layer with activations A (channels k, positions ij):
    gradcam   map = ReLU(sum_k alpha_k A_k),  alpha_k = mean_ij dy_c/dA_kij
    hirescam  map = ReLU(sum_k dy_c/dA_k * A_k)   (Draelos & Carin 2020: the element-wise
              product; faithful to where a linear head looks, where Grad-CAM's channel
              averaging spreads over every place the weighted channels fire)
upsampled (bilinear) to the input size and scaled to [0, 1] per image. The layer is the last
nn.Conv2d the forward pass calls, unless named.

Written here rather than taken from pytorch-grad-cam (grad-cam on PyPI): that package ships
only as an sdist, pulls in OpenCV, and computes on NumPy image by image; this is the same
arithmetic batched on the model's device in a few lines.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgrun.analysis.base import (ANALYSES, Checkpoint, Result, RunArtifacts, kept_weights,
                                 last_module_called, load, model_device, pixels01,
                                 require_checkpoints, spread)
from dgrun.analysis.options import Count, Index
from dgrun.analysis.figures import plt, save
from dgrun.data.bundle import Split
from dgrun.errors import UserError
from dgrun.registry import Registry

CAMS = Registry("class activation map")


@CAMS.register("gradcam")
def _gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1)


@CAMS.register("hirescam")
def _hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads * acts).sum(1)


def conv_layer(model: nn.Module, x: Tensor, name: Optional[str] = None) -> tuple[str, nn.Module]:
    """The named module, or the last nn.Conv2d called on `x`."""
    if name is None:
        return last_module_called(model, x, nn.Conv2d)
    modules = dict(model.named_modules())
    if name not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise UserError(f"the model has no layer named {name!r}",
                        f"name one of its conv layers: {', '.join(convs) or 'none'}")
    return name, modules[name]


def class_activation_maps(model: nn.Module, x: Tensor, target: Tensor, *,
                          layer: Optional[str] = None, method: str = "gradcam") -> Tensor:
    """(B, H, W) maps in [0, 1] for model inputs `x` (B, C, H, W) and target classes (B,).

    Each image's map depends only on its own logit: the batch's target logits are summed
    before one backward pass, and every image's activations only reach its own logit."""
    cam = CAMS.get(method)
    model.eval()
    _, module = conv_layer(model, x[:1], layer)
    caught: list[Tensor] = []
    hook = module.register_forward_hook(lambda m, i, out: caught.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            acts = caught[-1]
            score = logits.gather(1, target[:, None].to(logits.device)).sum()
            grads, = torch.autograd.grad(score, acts)
    finally:
        hook.remove()
    maps = F.relu(cam(acts.detach(), grads)).unsqueeze(1)
    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps / peak[:, None, None]


def pick_images(y: Tensor, classes: Sequence[int], per_class: int) -> Tensor:
    """The first `per_class` rows of each class, in class order."""
    y = y.cpu()
    return torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in classes])


def gradcam_over_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint], split: Split,
                             *, indices: Tensor, targets: Optional[Tensor] = None,
                             prepare: Callable[[Tensor], Tensor] = lambda t: t,
                             layer: Optional[str] = None, method: str = "gradcam") -> Result:
    """Maps of the rows `indices` of `split` at every checkpoint, for `targets` (default:
    each row's label).

    tables: `maps` (step, index, label, target, predicted, prob_target, peak_row, peak_col,
    center_row, center_col: the map's peak and centre of mass, in pixels).
    arrays: `images` (n, C, H, W) pixels in [0, 1], `maps` (checkpoints, n, H, W).
    """
    require_checkpoints(checkpoints, "Grad-CAM")
    if split.x.dim() != 4:
        raise UserError(f"Grad-CAM needs images (N, C, H, W), this data has shape "
                        f"{tuple(split.x.shape)}", "analyze an image dataset with a conv model")
    indices = indices.cpu()
    device = model_device(model)
    x_stored = split.x[indices.to(split.x.device)]
    labels = split.y.cpu()[indices]
    targets = labels if targets is None else targets.cpu()
    x = prepare(x_stored.to(device))
    rows, all_maps = [], []
    with kept_weights(model):
        name, _ = conv_layer(load(model, checkpoints[-1][1]), x[:1], layer)
        for step, state in checkpoints:
            load(model, state)
            maps = class_activation_maps(model, x, targets, layer=name, method=method)
            with torch.no_grad():
                probs = model(x).float().softmax(1).cpu()
            m = maps.detach().cpu()
            all_maps.append(m.numpy())
            h, w = m.shape[-2:]
            flat = m.flatten(1)
            peak = flat.argmax(1)
            mass = flat.sum(1).clamp_min(1e-12)
            rr = torch.arange(h, dtype=torch.float).repeat_interleave(w)
            cc = torch.arange(w, dtype=torch.float).repeat(h)
            rows.append(pd.DataFrame({
                "step": step, "index": indices.numpy(), "label": labels.numpy(),
                "target": targets.numpy(), "predicted": probs.argmax(1).numpy(),
                "prob_target": probs.gather(1, targets[:, None]).squeeze(1).numpy(),
                "peak_row": (peak // w).numpy(), "peak_col": (peak % w).numpy(),
                "center_row": ((flat * rr).sum(1) / mass).numpy(),
                "center_col": ((flat * cc).sum(1) / mass).numpy()}))
    summary = {"layer": name, "method": method, "checkpoint_steps": [s for s, _ in checkpoints],
               "num_images": len(indices), "targets": sorted(set(targets.tolist()))}
    return Result({"maps": pd.concat(rows, ignore_index=True)}, summary,
                  {"images": pixels01(x_stored.cpu()).numpy(), "maps": np.stack(all_maps)})


def plot_gradcam(result: Result, out_dir) -> list:
    images, maps = result.arrays["images"], result.arrays["maps"]
    table, s = result.tables["maps"], result.summary
    steps = s["checkpoint_steps"]
    first = table[table["step"] == steps[0]]
    paths = []
    for target in s["targets"]:
        cols = np.nonzero(first["target"].to_numpy() == target)[0][:8]
        if not len(cols):
            continue
        fig, axes = plt.subplots(len(steps) + 1, len(cols),
                                 figsize=(1.7 * len(cols) + 0.6, 1.7 * (len(steps) + 1)),
                                 squeeze=False)
        for j, col in enumerate(cols):
            img = np.transpose(images[col], (1, 2, 0))
            gray = img.mean(-1)  # the map's colours must not mix with the image's own
            axes[0, j].imshow(img[..., 0] if img.shape[-1] == 1 else img.clip(0, 1),
                              cmap="gray" if img.shape[-1] == 1 else None)
            axes[0, j].set_title(f"row {first['index'].iloc[col]}, y={first['label'].iloc[col]}",
                                 fontsize=7)
            for i, step in enumerate(steps):
                ax = axes[i + 1, j]
                ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
                heat = ax.imshow(maps[i, col], cmap="inferno", alpha=0.65, vmin=0, vmax=1)
                p = table[(table["step"] == step)]["prob_target"].iloc[col]
                ax.set_title(f"p={p:.2f}", fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, 0].set_ylabel("image", fontsize=8)
        for i, step in enumerate(steps):
            axes[i + 1, 0].set_ylabel(f"step {step}", fontsize=8)
        fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.6, label="map (0-1)")
        fig.suptitle(f"{s['method']} for class {target} at layer {s['layer']}\n"
                     "(rows: checkpoints; p = probability of the class)", fontsize=9)
        paths.append(save(fig, out_dir, f"{s['method']}_class{target}"))
    return paths


@ANALYSES.register("gradcam", plot=plot_gradcam)
def gradcam_from_run(run: RunArtifacts, /, *, classes: Optional[Sequence[Index]] = None,
                     per_class: Count = 6, num_checkpoints: Count = 4,
                     layer: Optional[str] = None,
                     method: str = "gradcam", split: str = "test") -> Result:
    """Test images of each class (first `per_class`; classes default to the first four),
    their own class as the target, at `num_checkpoints` checkpoints spread over the run."""
    b = run.bundle
    data = {"train": b.train, "test": b.test}.get(split)
    if data is None:
        raise UserError(f"split must be train or test, not {split!r}", "pass split=test")
    classes = list(range(min(4, b.meta.num_classes))) if classes is None else list(classes)
    return gradcam_over_checkpoints(run.model, spread(run.checkpoints, num_checkpoints), data,
                                    indices=pick_images(data.y, classes, per_class),
                                    prepare=b.prepare, layer=layer, method=method)
