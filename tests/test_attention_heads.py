"""Per-head attention columns, and where the hidden-progress probes are on by default."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from dgrun.cli import config_dir
from dgrun.config import from_hydra, register_schemas
from dgrun.data.algorithmic import modular, sparse_parity
from dgrun.errors import UserError
from dgrun.models.transformer import Transformer
from dgrun.probes import Evaluation, build

P = 31


def measure(model, **options):
    bundle = modular(p=P, train_fraction=0.5)
    probe, = build({"attention_heads": options}, meta=bundle.meta, seed=0)
    return {k: float(v) for k, v in probe.measure(Evaluation(model, bundle.train,
                                                             bundle.test)).items()}, probe


def test_a_head_with_no_queries_or_keys_attends_uniformly():
    model = Transformer(P + 1, 3, P, n_layers=2, d_model=16, n_heads=2, d_mlp=16)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:32].zero_()  # q = k = 0: every score equal
    row, _ = measure(model)
    assert len(row) == 2 * 2 * (1 + 3)  # layers x heads x (entropy + 3 positions)
    for name in ("l0h0", "l0h1", "l1h0", "l1h1"):
        assert row[f"attn_entropy_{name}"] == pytest.approx(math.log(3), rel=1e-5)
        for t in range(3):
            assert row[f"attn_share_{name}_pos{t}"] == pytest.approx(1 / 3, rel=1e-5)


class Pointing(nn.Module):
    """Stands in for a transformer: head 0 looks only at position 1, head 1 splits 3:1 between
    positions 0 and 2."""

    def forward(self, x):
        return torch.zeros(len(x), P)

    def attention_maps(self, x):
        maps = torch.zeros(1, len(x), 2, 3, 3)
        maps[0, :, 0, -1, 1] = 1.0
        maps[0, :, 1, -1, 0], maps[0, :, 1, -1, 2] = 0.75, 0.25
        return maps


def test_entropy_and_shares_of_known_patterns():
    row, probe = measure(Pointing(), sample=8)
    assert row["attn_entropy_l0h0"] == pytest.approx(0.0, abs=1e-6)
    assert row["attn_share_l0h0_pos1"] == pytest.approx(1.0)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert row["attn_entropy_l0h1"] == pytest.approx(expected, rel=1e-5)
    assert row["attn_share_l0h1_pos0"] == pytest.approx(0.75)
    assert probe.summarize([row])["attention_heads"]["final_entropy"]["l0h0"] == \
        pytest.approx(0.0, abs=1e-6)


def test_models_and_data_without_attention_are_one_line():
    with pytest.raises(UserError, match="needs a transformer"):
        measure(nn.Sequential(nn.Flatten(), nn.Linear(3, P)))
    with pytest.raises(UserError, match="token dataset"):
        build({"attention_heads": {}}, meta=sparse_parity(n=5, k=2).meta, seed=0)


@pytest.mark.parametrize("overrides,expected", [
    (["phenomenon=grokking"], {"modular_progress"}),
    (["experiment=nanda2023"], {"modular_progress", "attention_heads"}),
    (["experiment=power2022"], {"modular_progress", "attention_heads"}),
    (["phenomenon=phase_transition"], {"parity_progress"}),
])
def test_the_presets_measure_hidden_progress_by_default(overrides, expected):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = from_hydra(compose("config", overrides=overrides))
    GlobalHydra.instance().clear()
    assert expected <= {p.name for p in cfg.probes}
