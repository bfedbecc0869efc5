"""Robustness: the CIFAR-10-C corruption suite, the CIFAR-10-C file loader, FGSM/PGD in pixel
space, and the `robustness` probe.

Known answers throughout: library references (scipy, Pillow, colorsys) for the filters, noise
statistics for the noises, closed-form worst cases of linear models for the attacks.
"""
from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.probes import PROBES, Evaluation
from dgrun.probes import build as build_probes
from dgrun.robustness import (CORRUPTIONS, AttackSpec, attack, corrupt, evaluate_cifar10c,
                              evaluate_robustness, load_cifar10c, names)
from dgrun.robustness import filters
from dgrun.robustness.blur import _zoom_factors
from dgrun.robustness.rng import Draws

torch.set_num_threads(1)

ALL = ["brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "gaussian_blur",
       "gaussian_noise", "glass_blur", "impulse_noise", "jpeg_compression", "pixelate",
       "saturate", "shot_noise", "speckle_noise", "zoom_blur"]
RANDOM = {"elastic_transform", "fog", "gaussian_noise", "glass_blur", "impulse_noise",
          "shot_noise", "speckle_noise"}


def _photos(size: int = 32, k: int = 8) -> torch.Tensor:
    """k real RGB images: crops of scikit-learn's two sample photographs, area-downsampled."""
    from sklearn.datasets import load_sample_image

    images = []
    for name in ("china.jpg", "flower.jpg"):
        photo = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1) / 255.0
        h, w = photo.shape[1:]
        for i in range(k // 2):
            top, left = (i * 97) % (h - 256), (i * 151) % (w - 256)
            crop = photo[:, top:top + 256, left:left + 256]
            images.append(F.adaptive_avg_pool2d(crop[None], size)[0])
    return torch.stack(images).float()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return _photos()


def _digits(n: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images[:n].astype(np.float32) / 16).unsqueeze(1)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# ---------------------------------------------------------------- the registry and contract

def test_registry_names_and_grey_images():
    assert CORRUPTIONS.names() == ALL
    assert names("all", channels=3) == ALL
    assert names("all", channels=1) == [n for n in ALL if n != "saturate"]
    assert names(["fog", "contrast"]) == ["fog", "contrast"]
    assert names("none") == [] and names([]) == []
    with pytest.raises(UserError, match="unknown image corruption 'snowfall'"):
        names(["snowfall"])
    with pytest.raises(UserError, match="changes only colour"):
        corrupt(_digits(2), "saturate", 1)
    with pytest.raises(UserError, match="float pixels"):
        corrupt(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "fog", 1)
    with pytest.raises(UserError, match="severity 6"):
        corrupt(torch.zeros(2, 3, 8, 8), "fog", 6)


def _imports_within(package_dir, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports at its top level (a submodule imported
    from the package counts as that submodule, not as the package's __init__)."""
    import ast

    modules = {p.stem for p in package_dir.glob("*.py")}
    graph = {}
    for module in modules:
        tree = ast.parse((package_dir / f"{module}.py").read_text())
        edges = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == package:
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
                edges.add(node.module.split(".")[-1])
        graph[module] = edges - {"__init__"}
    return graph


def test_the_corruption_registry_is_its_own_room_with_no_import_circle():
    from pathlib import Path

    import dgrun.robustness as package

    graph = _imports_within(Path(package.__file__).parent, "dgrun.robustness")
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", f"import circle: {' -> '.join(path + [other])}"
            if other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "registry" in graph["blur"] and "corruptions" not in graph["blur"]


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (4, 1, 8, 8), (2, 3, 20, 28)])
def test_every_corruption_keeps_shape_range_and_is_seeded(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for name in names("all", channels=shape[1]):
        for severity in (1, 5):
            out = corrupt(x, name, severity, seed=3)
            assert out.shape == x.shape and out.dtype == x.dtype, name
            assert float(out.min()) >= 0 and float(out.max()) <= 1, name
            assert torch.equal(out, corrupt(x, name, severity, seed=3)), name
            other = corrupt(x, name, severity, seed=4)
            if name in RANDOM:
                assert not torch.equal(out, other), f"{name}: the seed changes the noise"
            elif name not in RANDOM:
                assert torch.equal(out, other), f"{name} draws no noise"
        # A different severity draws a different stream, and a different chunk too.
        if name in {"gaussian_noise", "impulse_noise"}:
            assert not torch.equal(corrupt(x, name, 2, seed=3), corrupt(x, name, 2, seed=3,
                                                                        chunk=1))


# ---------------------------------------------------------------- severity ordering

MONOTONE = ["brightness", "contrast", "defocus_blur", "fog", "gaussian_blur", "gaussian_noise",
            "impulse_noise", "jpeg_compression", "pixelate", "shot_noise", "speckle_noise",
            "zoom_blur"]


@pytest.mark.parametrize("name", MONOTONE)
def test_distance_from_the_clean_image_grows_with_severity(photos, name):
    distances = [_distance(corrupt(photos, name, s, seed=0), photos) for s in range(1, 6)]
    assert all(b > a for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0
    grey = photos.mean(dim=1, keepdim=True)
    grey_distances = [_distance(corrupt(grey, name, s, seed=0), grey) for s in range(1, 6)]
    assert all(b > a for a, b in zip(grey_distances, grey_distances[1:])), grey_distances


def test_saturate_moves_away_from_the_image_in_each_direction(photos):
    # The published severities scale saturation by 0.3, 0.1 (less colour), then 1.5, 2 + 0.1,
    # 2.5 + 0.2 (more): the distance grows within each direction, not across the switch.
    d = [_distance(corrupt(photos, "saturate", s), photos) for s in range(1, 6)]
    assert d[0] < d[1] and d[2] < d[3] < d[4], d


def test_glass_blur_more_shuffling_at_equal_blur_moves_further(photos):
    # Severities 2 and 4 share sigma 0.25, 3 and 5 share sigma 0.4; 4 and 5 shuffle twice.
    d = [_distance(corrupt(photos, "glass_blur", s, seed=0), photos) for s in range(1, 6)]
    assert d[3] > d[1] and d[4] > d[2], d


def test_elastic_local_displacement_grows_with_severity():
    # The published severities shrink the global affine jitter (8% -> 3% of the side) while
    # the local displacement grows. A linear ramp stays linear under any affine warp (and
    # bilinear sampling is exact on it), so its interior residual from the best-fitting plane
    # measures the local displacement alone: zero at severity 1 (alpha = 0), then growing.
    h = w = 32
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = (0.2 + 0.6 * (0.6 * cols + 0.4 * rows) / (w - 1)).float()
    x = ramp.expand(16, 3, h, w).contiguous()
    design = torch.stack([torch.ones(20 * 20), rows[6:-6, 6:-6].reshape(-1).float(),
                          cols[6:-6, 6:-6].reshape(-1).float()], dim=1).double()

    def residual(out: torch.Tensor) -> float:
        inner = out[:, 0, 6:-6, 6:-6].reshape(len(out), -1).double().T
        fit = design @ torch.linalg.lstsq(design, inner).solution
        return float((inner - fit).pow(2).mean().sqrt())

    r = [residual(corrupt(x, "elastic_transform", s, seed=1)) for s in range(1, 6)]
    assert r[0] < 1e-5, r
    assert all(b > a for a, b in zip(r, r[1:])), r


# ---------------------------------------------------------------- against the libraries

def test_gaussian_blur_matches_scipy(photos):
    for sigma in (0.4, 0.6, 0.7, 0.8, 1.0):
        ref = np.stack([ndimage.gaussian_filter(im, sigma=(0, sigma, sigma), mode="nearest")
                        for im in photos.double().numpy()])
        got = corrupt(photos.double(), "gaussian_blur", [0.4, 0.6, 0.7, 0.8, 1.0].index(sigma) + 1)
        np.testing.assert_allclose(got.numpy(), np.clip(ref, 0, 1), atol=1e-12)


def test_defocus_blur_is_a_correlation_with_the_antialiased_disk(photos):
    # The generator's disk: a 17x17 aliased disk, smoothed by OpenCV's 3x3 Gaussian, applied
    # with cv2.filter2D (reflect-101 borders = scipy's 'mirror').
    for severity, (radius, alias) in enumerate([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2),
                                                (1.5, 0.1)], start=1):
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
        disk /= disk.sum()
        g = np.exp(-np.array([-1.0, 0.0, 1.0]) ** 2 / (2 * alias ** 2))
        kernel = ndimage.correlate(disk, np.outer(g, g) / g.sum() ** 2, mode="mirror")
        x = photos[:2].double()
        ref = np.stack([[ndimage.correlate(ch, kernel, mode="mirror") for ch in im]
                        for im in x.numpy()])
        np.testing.assert_allclose(corrupt(x, "defocus_blur", severity).numpy(),
                                   np.clip(ref, 0, 1), atol=1e-12)


def test_zoom_matches_scipy_clipped_zoom():
    rng = np.random.default_rng(0)
    for size in (32, 13, 8):
        image = rng.random((size, size, 3))
        for factor in np.concatenate([_zoom_factors(1.26), [1.5, 2.0]]):
            crop = int(np.ceil(size / factor))
            top = (size - crop) // 2
            zoomed = ndimage.zoom(image[top:top + crop, top:top + crop], (factor, factor, 1),
                                  order=1)
            trim = (zoomed.shape[0] - size) // 2
            ref = zoomed[trim:trim + size, trim:trim + size]
            got = filters.zoom(torch.from_numpy(image).permute(2, 0, 1)[None], float(factor))
            np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=1e-12)


def test_pixelate_is_pillows_box_resize_bit_for_bit():
    rng = np.random.default_rng(0)
    for size in (32, 17, 8):
        u8 = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
        for severity, fraction in enumerate((0.95, 0.9, 0.85, 0.75, 0.65), start=1):
            small = int(size * fraction)
            ref = np.stack([np.asarray(Image.fromarray(im).resize((small, small), Image.BOX)
                                       .resize((size, size), Image.BOX)) for im in u8])
            got = torch.round(corrupt(x, "pixelate", severity) * 255).to(torch.uint8)
            assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), ref), (size, severity)


def test_jpeg_is_pillows_codec_in_channel_order(photos):
    u8 = torch.round(photos[:2] * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for quality, severity in ((80, 1), (40, 5)):
        ref = []
        for im in u8:
            buffer = io.BytesIO()
            Image.fromarray(im).save(buffer, "JPEG", quality=quality)
            ref.append(np.asarray(Image.open(buffer)))
        got = corrupt(photos[:2], "jpeg_compression", severity)
        assert np.array_equal(torch.round(got * 255).permute(0, 2, 3, 1).numpy(), np.stack(ref))


def test_brightness_and_saturate_match_the_hsv_round_trip():
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0], x[0, :, 0, 1], x[0, :, 0, 2] = 0.3, 0.0, 1.0  # grey, black, white pixels
    tables = {"brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
              "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))}
    for name, table in tables.items():
        assert CORRUPTIONS.tags(name)["params"] == table
        for severity, c in enumerate(table, start=1):
            ref = np.zeros((3, 6, 6))
            for i in range(6):
                for j in range(6):
                    h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
                    if name == "brightness":
                        v = min(v + c, 1.0)
                    else:
                        s = min(max(s * c[0] + c[1], 0.0), 1.0)
                    ref[:, i, j] = colorsys.hsv_to_rgb(h, s, v)
            np.testing.assert_allclose(corrupt(x, name, severity)[0].numpy(), ref, atol=1e-6)


def test_elastic_sampler_matches_map_coordinates_with_reflection():
    rng = np.random.default_rng(0)
    image = rng.random((3, 12, 12))
    dy, dx = rng.uniform(-4, 4, (2, 12, 12))
    yy, xx = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    ref = np.stack([ndimage.map_coordinates(ch, (yy + dy, xx + dx), order=1, mode="reflect")
                    for ch in image])
    got = filters.sample_bilinear(torch.from_numpy(image)[None], torch.from_numpy(yy + dy)[None],
                                  torch.from_numpy(xx + dx)[None], "reflect")
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-12)


def test_glass_blur_reproduces_the_generators_sequential_copy(photos):
    # The generator's loop, literally: visit (h, w) bottom-right to top-left and run
    # `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on an (H, W, 3) uint8 array, whose views make
    # it a copy. Fed the offsets our corruption draws, it must give the same image.
    x = photos[:3].double()
    for severity in (2, 5):
        sigma, delta, iterations = CORRUPTIONS.tags("glass_blur")["params"][severity - 1]
        draws = Draws("cpu", 7, "corruption", "glass_blur", severity, 0)
        blurred = filters.gaussian_blur(x, sigma)
        arrays = (torch.floor(blurred * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy())
        n, h, w = arrays.shape[:3]
        for _ in range(iterations):
            offsets = draws.integers(-delta, delta, (2, n, h - 2 * delta, w - 2 * delta)).numpy()
            for k, a in enumerate(arrays):
                for i in range(h - delta, delta, -1):
                    for j in range(w - delta, delta, -1):
                        dy = offsets[0, k, i - delta - 1, j - delta - 1]
                        dx = offsets[1, k, i - delta - 1, j - delta - 1]
                        a[i, j], a[i + dy, j + dx] = a[i + dy, j + dx], a[i, j]
        ref = filters.gaussian_blur(torch.from_numpy(arrays).permute(0, 3, 1, 2).double() / 255,
                                    sigma).clamp(0, 1)
        got = corrupt(x, "glass_blur", severity, seed=7)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-12)


def test_noise_statistics_are_the_published_ones():
    x = torch.full((64, 3, 16, 16), 0.5)  # mid grey: nothing clips at these severities
    noise = {"gaussian_noise": 0.10, "speckle_noise": 0.5 * 0.20,
             "shot_noise": (0.5 / 50) ** 0.5}
    for name, std in noise.items():
        diff = corrupt(x, name, 5, seed=0) - x
        assert abs(float(diff.std()) - std) < 0.03 * std, name
        assert abs(float(diff.mean())) < 0.01
    out = corrupt(x, "impulse_noise", 5, seed=0)
    flipped = out != 0.5
    assert abs(float(flipped.float().mean()) - 0.07) < 0.005
    assert abs(float((out[flipped] == 1).float().mean()) - 0.5) < 0.05
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())


def test_contrast_scales_deviations_from_each_channels_mean(photos):
    for severity, factor in enumerate((0.75, 0.5, 0.4, 0.3, 0.15), start=1):
        out = corrupt(photos, "contrast", severity)
        mean = photos.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(out, (photos - mean) * factor + mean)


# ---------------------------------------------------------------- CIFAR-10-C files

def test_cifar10c_loader_reads_the_published_layout(tmp_path):
    per = 4  # images per severity (10,000 in the release)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * per, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.repeat(np.arange(1, 6), per)  # severity stamped in a pixel
    labels = np.tile(np.arange(per) % 10, 5).astype(np.uint8)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    for severity in range(1, 6):
        x, y = load_cifar10c(tmp_path, "fog", severity)
        assert x.shape == (per, 3, 32, 32) and x.dtype == torch.uint8
        assert y.dtype == torch.int64 and y.tolist() == list(range(per))
        assert (x[:, 0, 0, 0] == severity).all()
        block = images[(severity - 1) * per:severity * per]
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), block)
    with pytest.raises(UserError) as missing:
        load_cifar10c(tmp_path, "snow", 1)
    message = str(missing.value)
    assert str(tmp_path / "snow.npy") in message and "\n" not in message
    np.save(tmp_path / "bad.npy", images[:7])
    with pytest.raises(UserError, match="expected"):
        load_cifar10c(tmp_path, "bad", 1)

    # The evaluation over the files: a model that reads the stamped pixel is right exactly
    # when the stamp, as a class, equals the label.
    class Stamp(nn.Module):
        def forward(self, x):
            return F.one_hot((x[:, 0, 0, 0] * 255).round().long() % 10, 10).float()

    result = evaluate_cifar10c(Stamp(), lambda x: x.float() / 255, tmp_path,
                               corruptions=["fog"], severities=[1, 3])
    assert result["corruption_acc_fog_1"] == 0.25  # labels 0..3, stamp 1: image 1 only
    assert result["corruption_acc_fog_3"] == 0.25
    assert result["corruption_acc"] == 0.25


# ---------------------------------------------------------------- attacks

class _Standardize:
    """A prepare with per-pixel scales, so pixel-space and input-space budgets differ."""

    def __init__(self, d: int):
        g = torch.Generator().manual_seed(1)
        self.mean = torch.rand(d, generator=g).view(1, 1, 1, d)
        self.std = (0.2 + torch.rand(d, generator=g)).view(1, 1, 1, d)

    def __call__(self, x):
        return (x - self.mean) / self.std


def _linear_problem(d: int = 12, n: int = 16):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, d, generator=g))
        model[1].bias.zero_()
    prepare = _Standardize(d)
    x = 0.3 + 0.4 * torch.rand(n, 1, 1, d, generator=g)  # inside the box, room on every side
    y = torch.randint(0, 2, (n,), generator=g)
    # Margin logit_y - logit_other is linear in pixels with weights v = (w_y - w_j) / std.
    w = model[1].weight.detach()
    v = (w[y] - w[1 - y]) / prepare.std.view(1, d)
    return model, prepare, x, y, v


def _margin(model, prepare, x, y):
    logits = model(prepare(x))
    return (logits.gather(1, y[:, None]) - logits.gather(1, (1 - y)[:, None])).squeeze(1)


def test_linf_attacks_reach_the_closed_form_worst_case():
    model, prepare, x, y, v = _linear_problem()
    eps = 0.05
    expected = eps * v.abs().sum(dim=1)  # the margin drops by eps * ||w_y - w_j||_1
    for spec in (AttackSpec("fgsm", eps=eps), AttackSpec("pgd", eps=eps, steps=10),
                 AttackSpec("pgd", eps=eps, steps=20, random_start=False)):
        adv = attack(model, prepare, x, y, spec, seed=0)
        with torch.no_grad():
            drop = _margin(model, prepare, x, y) - _margin(model, prepare, adv, y)
        torch.testing.assert_close(drop, expected, rtol=1e-5, atol=1e-5)
        assert float((adv - x).abs().max()) <= eps + 1e-7
    # FGSM is exactly one signed step of size eps from x.
    fgsm = attack(model, prepare, x, y, AttackSpec("fgsm", eps=eps))
    torch.testing.assert_close(fgsm, x - eps * v.sign().view_as(x), rtol=0, atol=1e-7)


def test_l2_pgd_reaches_the_closed_form_worst_case():
    model, prepare, x, y, v = _linear_problem()
    eps = 0.1
    expected = eps * v.norm(dim=1)  # the margin drops by eps * ||w_y - w_j||_2
    exact = attack(model, prepare, x, y, AttackSpec("pgd", "l2", eps=eps, steps=5,
                                                    random_start=False))
    fgm = attack(model, prepare, x, y, AttackSpec("fgsm", "l2", eps=eps))
    started = attack(model, prepare, x, y, AttackSpec("pgd", "l2", eps=eps, steps=60,
                                                      step_size=eps / 4), seed=0)
    with torch.no_grad():
        clean = _margin(model, prepare, x, y)
        for adv, tol in ((exact, 1e-5), (fgm, 1e-5), (started, 1e-3)):
            torch.testing.assert_close(clean - _margin(model, prepare, adv, y), expected,
                                       rtol=tol, atol=tol)
            assert float((adv - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)


def test_attacks_clip_to_the_box_and_then_the_worst_case_is_the_room_left():
    model, prepare, x, y, v = _linear_problem()
    x = x.clone()
    x[:, ..., :4] = 0.99  # little room upwards
    x[:, ..., 4:8] = 0.01  # little room downwards
    eps = 0.05
    direction = -v.sign().view_as(x)  # the pixel moves that lower the margin
    room = torch.where(direction > 0, 1 - x, x).clamp(max=eps)
    expected = (v.abs().view_as(x) * room).flatten(1).sum(dim=1)
    for spec in (AttackSpec("pgd", eps=eps, steps=10), AttackSpec("fgsm", eps=eps)):
        adv = attack(model, prepare, x, y, spec, seed=0)
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        with torch.no_grad():
            drop = _margin(model, prepare, x, y) - _margin(model, prepare, adv, y)
        torch.testing.assert_close(drop, expected, rtol=1e-5, atol=1e-5)


def test_attack_is_seeded_and_leaves_the_model_alone():
    model, prepare, x, y, _ = _linear_problem()
    model.train()
    spec = AttackSpec("pgd", eps=0.05, steps=1, step_size=0.001)  # the start still shows
    a = attack(model, prepare, x, y, spec, seed=1)
    assert torch.equal(a, attack(model, prepare, x, y, spec, seed=1))
    assert not torch.equal(a, attack(model, prepare, x, y, spec, seed=2))
    # Batches of any size give the same images (the start is drawn for the whole set).
    assert torch.equal(a, attack(model, prepare, x, y, spec, seed=1, batch_size=5))
    assert model.training and all(p.grad is None for p in model.parameters())
    global_state = torch.get_rng_state()
    with torch.inference_mode():  # the loop may measure there; its tensors are then
        b = attack(model, prepare, x.clone(), y.clone(), spec, seed=1)  # inference tensors
    assert torch.equal(a, b) and torch.equal(global_state, torch.get_rng_state())
    with pytest.raises(UserError, match="attack kind 'cw'"):
        AttackSpec("cw")
    with pytest.raises(UserError, match="norm 'l1'"):
        AttackSpec("pgd", "l1")


# ---------------------------------------------------------------- the probe

def _digits_model():
    """An MLP trained for a moment on scikit-learn's digits, standardized pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = slice(0, 1400), slice(1400, None)
    mean, std = x[train].mean(), x[train].std()
    prepare = lambda p: (p.float() - mean) / std  # noqa: E731
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(prepare(x[train])), y[train]).backward()
        opt.step()
    meta = Meta("digits", "image", (1, 8, 8), 10)
    return model, prepare, Split(x[train], y[train]), Split(x[test], y[test]), meta


def test_probe_measures_every_nth_evaluation_and_summarizes():
    model, prepare, train, test, meta = _digits_model()
    options = {"corruptions": ["gaussian_noise", "contrast", "pixelate"], "severities": [1, 5],
               "n": 200, "every": 2, "attack": "pgd", "eps": 0.1, "steps": 5, "n_adv": 100}
    (probe,) = build_probes({"robustness": options}, meta=meta, seed=0)
    rows = []
    for step in range(5):
        ev = Evaluation(model, train, test, prepare=prepare, step=step * 10)
        row = {"step": step * 10, "test_acc": float(ev.correct("test").float().mean()),
               **{k: float(v) for k, v in probe.measure(ev).items()}}
        rows.append(row)
    measured = [r["step"] for r in rows if "corruption_acc" in r]
    assert measured == [0, 20, 40]
    assert set(rows[0]) == {"step", "test_acc", "corruption_acc", "adv_acc",
                            "corruption_acc_gaussian_noise", "corruption_acc_contrast",
                            "corruption_acc_pixelate"}
    assert set(rows[1]) == {"step", "test_acc"}
    # The model does not change here, so every measurement is the same.
    assert rows[0] == {**rows[2], "step": 0} == {**rows[4], "step": 0}
    clean = rows[0]["test_acc"]
    assert clean > 0.85
    assert rows[0]["adv_acc"] < clean - 0.2  # eps 0.1 in pixels breaks an undefended MLP
    assert rows[0]["corruption_acc"] < clean
    # The plain function on the same subset and seed gives the very same numbers.
    plain = evaluate_robustness(model, prepare, test.x, test.y, n=200, n_adv=100, seed=0,
                                corruptions=options["corruptions"], severities=[1, 5],
                                attack=AttackSpec("pgd", eps=0.1, steps=5))
    for key in ("corruption_acc", "adv_acc", "corruption_acc_contrast"):
        assert plain[key] == pytest.approx(rows[0][key], abs=1e-6), key
    assert plain["corruption_acc_contrast"] == pytest.approx(
        (plain["corruption_acc_contrast_1"] + plain["corruption_acc_contrast_5"]) / 2)

    summary = probe.summarize(rows)["robustness"]
    assert summary["corruption_acc"] == rows[4]["corruption_acc"]
    assert summary["corruption_acc_best_step"] == 0 and summary["measured_step"] == 40
    assert summary["corruption_gap"] == pytest.approx(clean - rows[0]["corruption_acc"])
    assert all(isinstance(v, (int, float)) for v in summary.values())
    assert probe.marks({"robustness": summary}) == []  # a best value is often a wiggle

    # Resume: the evaluation counter rides in the checkpoint.
    (again,) = build_probes({"robustness": options}, meta=meta, seed=0)
    again.load_state_dict(probe.state_dict())
    assert again.measure(Evaluation(model, train, test, prepare=prepare)) == {}  # 6th: skipped


def test_probe_best_step_and_plot_on_synthetic_rows(tmp_path):
    probe = PROBES.build("robustness", meta=Meta("d", "image", (3, 8, 8), 10), seed=0)
    rows = [{"step": 0, "test_acc": 0.5, "corruption_acc": 0.3, "adv_acc": 0.1},
            {"step": 10, "test_acc": 0.8},
            {"step": 20, "test_acc": 0.9, "corruption_acc": 0.7, "adv_acc": 0.05},
            {"step": 30, "test_acc": 0.95, "corruption_acc": 0.6, "adv_acc": 0.0}]
    s = probe.summarize(rows)["robustness"]
    assert (s["corruption_acc_best"], s["corruption_acc_best_step"]) == (0.7, 20)
    assert (s["adv_acc_best"], s["adv_acc_best_step"]) == (0.1, 0)
    assert s["corruption_acc"] == 0.6 and s["corruption_gap"] == pytest.approx(0.35)
    assert probe.summarize([{"step": 0, "test_acc": 0.5}]) == {}
    (path,) = probe.plots(rows, {}, tmp_path)
    assert path.exists() and path.stat().st_size > 0


def test_probe_refuses_data_it_cannot_measure():
    with pytest.raises(UserError, match="needs image data; 'mnist1d' is vector data"):
        PROBES.build("robustness", meta=Meta("mnist1d", "vector", (40,), 10), seed=0)
    grey = Meta("digits", "image", (1, 8, 8), 10)
    with pytest.raises(UserError, match="saturate"):
        PROBES.build("robustness", meta=grey, seed=0, corruptions=["saturate"])
    with pytest.raises(UserError, match="severities"):
        PROBES.build("robustness", meta=grey, seed=0, severities=[0])
    with pytest.raises(UserError, match="nothing|no corruptions and no attack"):
        PROBES.build("robustness", meta=grey, seed=0, corruptions="none", attack="none")
    # Normalized floats are not pixels: corruptions and eps would mean nothing.
    probe = PROBES.build("robustness", meta=grey, seed=0, attack="none")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    split = Split(torch.randn(20, 1, 8, 8) * 3, torch.zeros(20, dtype=torch.int64))
    with pytest.raises(UserError, match=r"pixels in \[0, 1\]"):
        probe.measure(Evaluation(model, split, split))
