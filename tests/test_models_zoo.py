"""Model zoo: exact parameter counts (Zhang et al. 2017, Table 1), shapes, gradients, errors."""
from __future__ import annotations

import pytest
import torch

from dgrun.errors import UserError
from dgrun.models import count_params, create

torch.set_num_threads(1)

CIFAR28 = (3, 28, 28)
ZOO = ["mlp1", "mlp3", "alexnet", "inception", "wrn", "resnet18"]
# Small variants keep the forward/backward tests fast; counts below use the real defaults.
SMALL = {"wrn": {"depth": 10, "width": 1}, "resnet18": {"width": 8}}


@pytest.mark.parametrize("name, options, expected", [
    ("alexnet", {}, 1_387_786),
    ("inception", {"bn": True}, 1_649_402),
    ("inception", {"bn": False}, 1_649_402),
    ("mlp1", {}, 1_209_866),
    ("mlp3", {}, 1_735_178),
    ("wrn", {}, 1_549_530),  # WRN-16-3
    ("wrn", {"depth": 10, "width": 4}, 1_198_810),
    ("resnet18", {}, 11_173_962),
])
def test_exact_param_counts(name, options, expected):
    assert count_params(create(name, CIFAR28, 10, "image", **options)) == expected


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 28, 28), (2, 3, 32, 32)])
def test_forward_shape_and_finite(name, shape):
    torch.manual_seed(0)
    model = create(name, shape[1:], 7, "image", **SMALL.get(name, {}))
    out = model(torch.randn(*shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create(name, (1, 8, 8), 10, "image", **SMALL.get(name, {}))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1]))
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_inception_bn_false_has_no_batchnorm():
    model = create("inception", CIFAR28, 10, "image", bn=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["alexnet", "inception", "wrn", "resnet18"])
@pytest.mark.parametrize("modality", ["vector", "tokens"])
def test_image_models_reject_other_modalities(name, modality):
    with pytest.raises(UserError, match="cannot take"):
        create(name, (64,), 10, modality)


@pytest.mark.parametrize("depth", [12, 4, 0])
def test_wrn_bad_depth(depth):
    with pytest.raises(UserError, match=f"6n\\+4.*got {depth}") as info:
        create("wrn", CIFAR28, 10, "image", depth=depth)
    assert "model.depth" in info.value.fix
