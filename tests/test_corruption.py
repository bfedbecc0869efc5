"""Zhang et al.'s randomization tests: the properties each corruption promises."""
from __future__ import annotations

import pytest
import torch

from dgrun.data import DATASETS
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.data.corruption import CORRUPTIONS, apply


def image_bundle(n=2000, n_test=500, shape=(3, 8, 8), classes=10) -> Bundle:
    g = torch.Generator().manual_seed(0)
    split = lambda m: Split(torch.rand((m, *shape), generator=g),  # noqa: E731
                            torch.randint(classes, (m,), generator=g))
    return Bundle(split(n), split(n_test), Meta("toy", "image", shape, classes))


@pytest.mark.parametrize("prob", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_partial_labels_redraws_about_prob_of_the_labels(prob):
    b = image_bundle(n=20000)
    out = apply(b, "partial_labels", seed=0, prob=prob)
    changed = (out.train.y != b.train.y).float().mean().item()
    # A redrawn label keeps its class with probability 1/K, so the changed fraction is p(1-1/K).
    assert abs(changed - prob * 0.9) < 0.015
    assert torch.equal(out.train.corrupted, out.train.y != b.train.y)
    assert torch.equal(out.train.x, b.train.x)


def test_random_labels_are_uniform_and_not_a_class_permutation():
    b = image_bundle(n=20000)
    out = apply(b, "random_labels", seed=0)
    counts = torch.bincount(out.train.y, minlength=10).float() / len(out.train)
    assert torch.all((counts - 0.1).abs() < 0.01)
    # A fixed permutation c -> perm[c] would map each true class to a single new class.
    for c in range(10):
        assert len(out.train.y[b.train.y == c].unique()) == 10


def test_corruption_is_seeded_applied_to_test_unless_disabled():
    b = image_bundle()
    a1, a2 = apply(b, "random_labels", seed=3), apply(b, "random_labels", seed=3)
    assert torch.equal(a1.train.y, a2.train.y) and torch.equal(a1.test.y, a2.test.y)
    assert not torch.equal(apply(b, "random_labels", seed=4).train.y, a1.train.y)
    assert not torch.equal(a1.test.y, b.test.y)
    kept = apply(b, "random_labels", seed=3, apply_to_test=False)
    assert torch.equal(kept.test.y, b.test.y) and not kept.test.corrupted.any()


def test_shuffled_pixels_is_one_permutation_shared_by_train_and_test():
    b = image_bundle()
    out = apply(b, "shuffled_pixels", seed=0)
    flat = lambda x: x.reshape(len(x), 3, -1)  # noqa: E731
    src, dst = flat(b.train.x), flat(out.train.x)
    # Recover the permutation from the first image and check it explains every image.
    perm = torch.tensor([int((src[0, 0] == v).nonzero()[0]) for v in dst[0, 0]])
    assert not torch.equal(perm, torch.arange(64))
    assert torch.equal(src[:, :, perm], dst)
    assert torch.equal(flat(b.test.x)[:, :, perm], flat(out.test.x))
    assert torch.equal(out.train.y, b.train.y) and out.train.corrupted.all()


def test_random_pixels_permutes_each_image_differently():
    b = image_bundle(n=50)
    out = apply(b, "random_pixels", seed=0)
    src, dst = b.train.x.reshape(50, 3, -1), out.train.x.reshape(50, 3, -1)
    perms = []
    for i in range(50):
        # Same multiset of pixels, channels moving together.
        assert torch.equal(src[i, 0].sort().values, dst[i, 0].sort().values)
        perm = torch.tensor([int((src[i, 0] == v).nonzero()[0]) for v in dst[i, 0]])
        assert torch.equal(src[i][:, perm], dst[i])
        perms.append(tuple(perm.tolist()))
    assert len(set(perms)) == 50


def test_gaussian_pixels_match_the_training_set_per_channel_mean_and_std():
    b = image_bundle(n=5000)
    b.train.x[:, 1] = b.train.x[:, 1] * 0.2 + 0.6  # give the channels different statistics
    out = apply(b, "gaussian_pixels", seed=0)
    for c in range(3):
        ref, got = b.train.x[:, c], out.train.x[:, c]
        assert abs(got.mean() - ref.mean()) < 0.01 and abs(got.std() - ref.std()) < 0.01
    assert out.test.x.shape == b.test.x.shape and out.train.corrupted.all()


def test_pixel_corruptions_work_on_vector_data_too():
    b = DATASETS.build("mnist1d", num_samples=500)
    for name in ("shuffled_pixels", "random_pixels", "gaussian_pixels"):
        out = apply(b, name, seed=0)
        assert out.train.x.shape == b.train.x.shape


def test_every_registered_corruption_has_a_config_and_keeps_shapes():
    from dgrun.cli import config_dir

    b = image_bundle(n=100, n_test=20)
    for name in CORRUPTIONS.names():
        assert (config_dir() / "corruption" / f"{name}.yaml").exists()
        out = apply(b, name, seed=0, prob=0.5)
        assert out.train.x.shape == b.train.x.shape and out.test.y.shape == b.test.y.shape
