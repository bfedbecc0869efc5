"""A channel that never changes (colored digits' blue) is centred, not divided by ~0: a change to
it reaches the model at its size in pixels, so noise and attacks mean what they say."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgrun.data import pipeline
from dgrun.data.pipeline import Normalize
from dgrun.robustness.attacks import AttackSpec, adversarial_accuracy


def test_standardize_leaves_a_constant_channel_at_pixel_scale():
    x = torch.zeros(4, 2, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # channel 1 stays 0 everywhere
    norm = Normalize.fit("standardize", x)
    assert norm.mean.flatten().tolist() == [0.5, 0.0]
    assert norm.std.flatten().tolist() == pytest.approx([math.sqrt(1 / 3), 1.0])
    moved = x.clone()
    moved[:, 1] += 0.01
    assert (norm(moved) - norm(x))[:, 1].flatten().tolist() == pytest.approx([0.01] * 4)
    assert norm(x)[:, 0].flatten().tolist() == pytest.approx([-0.866, -0.866, 0.866, 0.866],
                                                              abs=1e-3)


@pytest.mark.parametrize("name", ["colored_digits", "dominoes"])
def test_generated_image_sets_have_no_amplified_channel(name):
    bundle = pipeline.load(name, seed=0, preprocess="standardize")
    # No channel is scaled up by more than 1 / (one grey level): pixels in [0, 1] stay O(255).
    assert float(bundle.prepare.std.min()) >= pipeline.CONSTANT_CHANNEL_STD


def test_pgd_is_never_weaker_than_fgsm_on_colored_digits():
    bundle = pipeline.load("colored_digits", seed=0, preprocess="standardize")
    prepare, train, test = bundle.prepare, bundle.train, bundle.test
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(prepare(train.x)), train.y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        clean = float((model(prepare(test.x)).argmax(1) == test.y).float().mean())
    assert clean > 0.8
    for eps in (2 / 255, 8 / 255, 0.2):
        fgsm = float(adversarial_accuracy(model, prepare, test.x, test.y,
                                          AttackSpec("fgsm", eps=eps)))
        pgd = float(adversarial_accuracy(model, prepare, test.x, test.y,
                                         AttackSpec("pgd", eps=eps, steps=10)))
        assert pgd <= fgsm + 1e-6, (eps, pgd, fgsm)
