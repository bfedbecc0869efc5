"""The CIFAR-10-C corruption suite as batched torch ops on (N, C, H, W) pixels in [0, 1].

    corrupt(x, "fog", 3, seed=0)     -> x corrupted at severity 3, float in [0, 1], same shape
    names("all", channels=3)         -> every registered corruption that applies to the images

Each corruption is registered with its five severities' parameters, taken from Hendrycks &
Dietterich's generator (github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py),
and follows the generator's algorithm: the library calls it made one image at a time
(scipy, scikit-image, OpenCV, Pillow) are reproduced as batched ops in filters.py and tested
against scipy, Pillow and colorsys. What differs is the random stream (torch, not numpy) and
float rounding; pixelate and JPEG round pixels to uint8 as the generator's PIL images do.
Motion blur, snow, frost and spatter need ImageMagick or the generator's frost photographs and
are not here; cifar10c.py reads the published files for all nineteen.

Randomness is keyed by (seed, name, severity, chunk): the same images get the same noise at
every call, on every device. Noise is drawn for the whole batch at once; callers that corrupt
a large set in fixed-size pieces (suite.CHUNK) pass each piece's index as `chunk`.

Sizes: parameters are CIFAR-10-C's, in pixels, for any image size, except where the
generator ties them to the 32-pixel side (elastic's displacements, the fog fractal's size,
pixelate's and zoom's fractions), which scale with the image.

Grey images (C = 1): an operation acts as it would on the RGB image (g, g, g), whose channels
stay equal. Saturate changes only colour, so it is the identity on grey pixels; it is tagged
`colour_only`, left out of "all" for grey images and refused when named for them.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from dgrun.errors import UserError
from dgrun.robustness.registry import CORRUPTIONS, SEVERITIES, Corruption, corruption  # noqa: F401
from dgrun.robustness.rng import Draws


def corrupt(x: Tensor, name: str, severity: int, *, seed: int = 0, chunk: int = 0) -> Tensor:
    """Corrupt float pixels x (N, C, H, W) in [0, 1], C in {1, 3}, at severity 1..5.

    Returns a new float tensor of the same shape and device, in [0, 1]. Deterministic in
    (x, name, severity, seed, chunk), whatever the device.
    """
    fn = CORRUPTIONS.get(name)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise UserError(f"image corruptions take float pixels (N, 1 or 3, H, W); got a "
                        f"{x.dtype} tensor of shape {tuple(x.shape)}",
                        "convert uint8 images with x.float() / 255")
    if severity not in SEVERITIES:
        raise UserError(f"corruption severity {severity!r} is not one of {SEVERITIES}",
                        "pick severities from 1 to 5")
    tags = CORRUPTIONS.tags(name)
    if tags["colour_only"] and x.shape[1] == 1:
        raise UserError(f"corruption '{name}' changes only colour and the images are grey",
                        f"leave '{name}' out for 1-channel images")
    draws = Draws(x.device, seed, "corruption", name, severity, chunk)
    return fn(x, tags["params"][severity - 1], draws).clamp(0, 1)


def names(which: str | Iterable[str] = "all", channels: int = 3) -> list[str]:
    """'all' -> every corruption that applies to `channels`-channel images, in registry order;
    'none' or [] -> []; a name or list of names -> those names, checked."""
    which = [which] if isinstance(which, str) else list(which)
    if which == ["all"]:
        return [n for n in CORRUPTIONS.names()
                if channels == 3 or not CORRUPTIONS.tags(n)["colour_only"]]
    if which == ["none"]:
        return []
    for n in which:
        if CORRUPTIONS.tags(n)["colour_only"] and channels == 1:
            raise UserError(f"corruption '{n}' changes only colour and the images are grey",
                            f"leave '{n}' out for 1-channel images")
    return which


# Importing the families registers them (they import the registry, not this module).
from dgrun.robustness import blur, digital, noise, weather  # noqa: E402,F401
