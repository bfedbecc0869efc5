"""Nanda et al.'s progress measures, checked on models whose answers are known before any
training: a hand-built network that *is* the trigonometric algorithm, and random networks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgrun.data.algorithmic import modular
from dgrun.errors import UserError
from dgrun.models.token_mlp import QuadraticMLP
from dgrun.models.transformer import Transformer
from dgrun.probes import Evaluation, build
from dgrun.probes.fourier import gini, logit_spectrum
from dgrun.probes.modular_progress import all_pairs, detect_phases

P = 97
KEYS = [4, 17, 32, 41, 46]


class TrigAlgorithm(nn.Module):
    """Logits exactly sum_k scale * cos(w_k (a + s b - c)) over the chosen frequencies, computed
    the way Nanda et al. found the transformer does: embed a and b as cos/sin(w_k x), combine
    them with the angle-addition identities, and read c off with cos/sin(w_k c)."""

    def __init__(self, p: int, keys: list[int], sign: int = 1, scale: float = 4.0):
        super().__init__()
        self.sign, self.scale = sign, scale
        w = 2 * math.pi * torch.tensor(keys, dtype=torch.float64) / p
        x = torch.arange(p + 1, dtype=torch.float64)[:, None]   # row p is the "=" token
        table = torch.cat([torch.cos(w * x), torch.sin(w * x)], dim=1)
        table[p] = 0
        self.token_embedding = nn.Embedding.from_pretrained(table.float())
        c = torch.arange(p, dtype=torch.float64)[:, None]
        self.register_buffer("read", torch.cat([torch.cos(w * c), torch.sin(w * c)], 1).float())
        self.k = len(keys)

    def forward(self, tokens):
        e = self.token_embedding(tokens)
        ca, sa = e[:, 0, :self.k], e[:, 0, self.k:]
        cb, sb = e[:, 1, :self.k], self.sign * e[:, 1, self.k:]
        cos_sum, sin_sum = ca * cb - sa * sb, sa * cb + ca * sb      # cos/sin(w (a + s b))
        cos_c, sin_c = self.read[:, :self.k], self.read[:, self.k:]
        return self.scale * (cos_sum @ cos_c.T + sin_sum @ sin_c.T)


def measure(model, operation="add", loss="cross_entropy", **options):
    bundle = modular(p=P, operation=operation, train_fraction=0.3)
    probe, = build({"modular_progress": options}, meta=bundle.meta, seed=0, loss=loss)
    ev = Evaluation(model, bundle.train, bundle.test)
    row = {k: float(v) for k, v in probe.measure(ev).items()}
    return row, probe, bundle


def full_loss(model, operation="add"):
    bundle = modular(p=P, operation=operation, train_fraction=0.3)
    x = torch.cat([bundle.train.x, bundle.test.x])
    y = torch.cat([bundle.train.y, bundle.test.y])
    with torch.no_grad():
        return float(F.cross_entropy(model(x).double(), y))  # float32 CE rounds ~1e-4 off at 5e-4


@pytest.mark.parametrize("operation,sign", [("add", 1), ("sub", -1)])
def test_the_trigonometric_algorithm_is_all_key_frequencies(operation, sign):
    model = TrigAlgorithm(P, KEYS, sign)
    row, probe, _ = measure(model, operation)
    assert probe.last["key_frequencies"] == KEYS
    assert row["num_key_frequencies"] == 5
    # Keeping only the key components keeps everything: the same logits, the same loss.
    assert row["restricted_loss"] == pytest.approx(full_loss(model, operation), rel=1e-4)
    assert row["restricted_loss"] < 0.5 * math.log(P)
    # Removing them leaves constant logits: chance, log p.
    assert row["excluded_loss"] == pytest.approx(math.log(P), rel=1e-4)
    # The embedding holds exactly those frequencies, and nothing else.
    assert probe.last["embedding_frequencies"] == KEYS
    assert row["fourier_gini"] == pytest.approx(1 - 5 / (P // 2), abs=0.02)
    assert row["sum_sq_weights"] == pytest.approx(
        sum(float(p.pow(2).sum()) for p in model.parameters()))


def test_a_half_algorithm_half_noise_model_keeps_its_frequencies_and_loses_the_noise():
    torch.manual_seed(0)
    noise = torch.randn(P * P, P) * 3

    class Mixed(TrigAlgorithm):
        def forward(self, tokens):
            return super().forward(tokens) + noise[tokens[:, 0] * P + tokens[:, 1]]

    # Noise of std 3 on every logit, the algorithm at amplitude 1 per frequency: the noise
    # holds ~97% of the logits' variance, yet each key frequency stands far above it.
    row, probe, _ = measure(Mixed(P, KEYS, scale=1.0))
    assert probe.last["key_frequencies"] == KEYS
    # Restricting removes the noise: a loss far below the noisy model's own (measured 0.94
    # vs 4.28); excluding the algorithm leaves noise alone, worse than chance (8.4 > log p).
    assert row["restricted_loss"] < full_loss(Mixed(P, KEYS, scale=1.0)) - 2
    assert row["excluded_loss"] > math.log(P)


@pytest.mark.parametrize("make", [
    lambda: QuadraticMLP(P + 1, 2, P, width=128),
    lambda: Transformer(P + 1, 3, P, d_model=32, n_heads=4, d_mlp=64),
])
def test_a_random_model_has_no_key_frequencies(make):
    torch.manual_seed(0)
    row, probe, _ = measure(make())
    assert probe.last["key_frequencies"] == [] and row["num_key_frequencies"] == 0
    # Nothing kept but the constant: the restricted loss is chance.
    assert row["restricted_loss"] == pytest.approx(math.log(P), rel=1e-3)
    assert row["fourier_gini"] < 0.2


def test_fixed_key_frequencies_and_the_mse_loss():
    model = TrigAlgorithm(P, KEYS, scale=0.02)  # about the amplitude MSE would choose
    row, probe, _ = measure(model, loss="mse", key_frequencies=KEYS[:2])
    assert probe.last["key_frequencies"] == KEYS[:2]
    # Three of the five components are gone from the restricted logits and left in the
    # excluded ones: both land between the full model and constant logits.
    bundle = modular(p=P, train_fraction=0.3)
    with torch.no_grad():
        out = model(bundle.train.x)
    full = float((out - F.one_hot(bundle.train.y, P)).pow(2).sum(1).mean())
    constant = float((model(all_pairs(P)).mean() - F.one_hot(bundle.train.y, P)
                      ).pow(2).sum(1).mean())
    assert full < row["restricted_loss"] < constant
    assert full < row["excluded_loss"] < constant


def test_operations_without_the_fourier_algorithm_get_weights_only():
    torch.manual_seed(0)
    row, probe, bundle = measure(QuadraticMLP(P + 1, 2, P, width=64), operation="mul")
    assert set(row) == {"fourier_gini", "sum_sq_weights"}
    assert "x * y" in probe.summarize([])["modular_progress"]["note"] or \
        "mul" in probe.summarize([])["modular_progress"]["note"]


def test_the_probe_refuses_other_datasets():
    from dgrun.data.algorithmic import sparse_parity
    with pytest.raises(UserError, match="dataset=modular"):
        build({"modular_progress": {}}, meta=sparse_parity(n=10, k=2).meta, seed=0)


def test_spectrum_and_gini_helpers():
    assert gini(torch.ones(10)) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0] * 9 + [1.0])) == pytest.approx(0.9)
    logits = TrigAlgorithm(P, [7])(all_pairs(P)).reshape(P, P, P)
    spectrum = logit_spectrum(logits, 1)
    variance = float((logits.double() - logits.double().mean()).pow(2).sum())
    assert float(spectrum[6]) == pytest.approx(variance, rel=1e-4)


def rows_of(**curves):
    steps = range(len(next(iter(curves.values()))))
    return [{"step": s * 100, **{k: v[s] for k, v in curves.items()}} for s in steps]


def test_phases_from_synthetic_curves():
    #                 0    100  200  300  400  500  600  700  800
    excluded = [4.0, 1.0, 0.2, 0.1, 0.3, 1.0, 2.0, 3.0, 4.0]
    restricted = [4.6, 4.6, 4.6, 4.6, 4.0, 3.0, 2.0, 1.0, 0.1]
    test = [4.6, 8.0, 9.0, 9.0, 9.0, 8.5, 8.5, 3.0, 0.1]
    found = detect_phases(rows_of(excluded_loss=excluded, restricted_loss=restricted,
                                  test_loss=test), chance=4.6)
    # excluded loss's minimum (0.1 at 300) before it climbs 10% of the way back to chance
    assert found["circuit_formation_step"] == 300
    assert found["cleanup_step"] == 600            # restricted <= half its value at 300
    assert found["cleanup_end_step"] == 700        # test loss <= half its value at 600
    assert found["phases"] == {"memorization": [0, 300], "circuit_formation": [300, 600],
                               "cleanup": [600, 700]}
    # A run that only memorizes: excluded loss never rises, no phase boundary is claimed.
    flat = detect_phases(rows_of(excluded_loss=[4.0, 1.0, 0.5, 0.4, 0.4],
                                 restricted_loss=[4.6] * 5, test_loss=[9.0] * 5), chance=4.6)
    assert flat["circuit_formation_step"] is None and flat["cleanup_step"] is None
    # Float noise on a memorized loss is not a rise: 1e-6 -> 3e-6 is 3x, but nowhere near chance.
    noisy = detect_phases(rows_of(excluded_loss=[4.0, 1e-6, 3e-6, 1e-6, 2e-6],
                                  restricted_loss=[4.6] * 5, test_loss=[9.0] * 5), chance=4.6)
    assert noisy["circuit_formation_step"] is None


def test_the_progress_analysis_uses_the_last_checkpoints_frequencies(tmp_path):
    from dgrun.analysis import RunArtifacts, analyze

    bundle = modular(p=P, train_fraction=0.3)
    model = TrigAlgorithm(P, KEYS)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    # The algorithm growing in: embedding scaled by 0 (constant logits), 1/2, then 1.
    checkpoints = [(step, {**trained, "token_embedding.weight":
                           trained["token_embedding.weight"] * scale})
                   for step, scale in ((0, 0.0), (100, 0.5), (200, 1.0))]
    run = RunArtifacts(bundle=bundle, model=model, checkpoints=checkpoints,
                       summary={"config": {"trainer": {"loss": "cross_entropy"}}})
    written = analyze("progress", run, tmp_path)
    assert {p.name for p in written} >= {"progress.csv", "summary.json",
                                         "progress_measures.png"}
    import json
    import pandas as pd
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["key_frequencies"] == KEYS and summary["key_frequencies_from_step"] == 200
    table = pd.read_csv(tmp_path / "progress.csv")
    assert list(table["num_key_frequencies"]) == [0, 5, 5]
    restricted = list(table["restricted_loss"])
    assert restricted[0] == pytest.approx(math.log(P), rel=1e-4)
    assert restricted[0] > restricted[1] > restricted[2]
    # test_loss is float32 cross-entropy, which rounds ~1e-4 off at the final loss of ~5e-4
    # (the restricted loss is computed in float64).
    assert list(table["restricted_loss"]) == pytest.approx(list(table["test_loss"]), rel=3e-4)
    assert list(table["excluded_loss"]) == pytest.approx([math.log(P)] * 3, rel=1e-4)
    with pytest.raises(UserError, match="dataset.operation=add or sub"):
        analyze("progress", RunArtifacts(bundle=modular(p=P, operation="mul"), model=model,
                                         checkpoints=checkpoints), tmp_path)


def test_the_grokking_preset_writes_the_measures_and_report_draws_them(tmp_path, capsys):
    from conftest import cli_here, read_metrics, read_summary, train_here

    run_dir = tmp_path / "sweep" / "0"
    train_here(run_dir, "phenomenon=grokking", "trainer.max_steps=60", "threads=1",
               "trainer.eval_schedule=linear", "trainer.eval_every=10", "trainer.unit=step",
               "+probes.sharpness={every: 10, sample: 256}")
    rows = read_metrics(run_dir)
    for column in ("restricted_loss", "excluded_loss", "fourier_gini", "sum_sq_weights",
                   "num_key_frequencies", "sharpness"):
        assert column in rows[0], column
    # mse on untrained logits: both start near the loss of the model itself
    assert float(rows[0]["excluded_loss"]) == pytest.approx(float(rows[0]["train_loss"]),
                                                            rel=0.05)
    summary = read_summary(run_dir)
    assert summary["modular_progress"]["operation"] == "add"
    assert "phases" in summary["modular_progress"]
    assert summary["sharpness"]["final"] > 0
    assert (run_dir / "plots" / "progress_measures.png").exists()
    assert (run_dir / "plots" / "sharpness.png").exists()
    code, out, err = cli_here(capsys, "report", str(tmp_path / "sweep"), "--curve",
                              "restricted_loss")
    assert code == 0, err
    assert (tmp_path / "sweep" / "report" / "restricted_loss_curves.png").exists()


@pytest.mark.slow
def test_the_default_grokking_run_shows_the_three_phases_in_order(run_dir):
    from conftest import read_summary, train_here

    train_here(run_dir, "phenomenon=grokking", "threads=1")
    found = read_summary(run_dir)["modular_progress"]
    assert found["circuit_formation_step"] < found["cleanup_step"] < found["cleanup_end_step"]
    assert found["circuit_formation_step"] > read_summary(run_dir)["grokking"][
        "memorization_step"]


def test_log_spaced_evaluations_ending_just_after_a_log_step_are_still_log_spaced():
    from dgrun.plots import looks_log_spaced

    # nanda2023 at 2,000 steps evaluates at ..., 1778, 1995, 2000: the last gap is 5.
    assert looks_log_spaced([0, 1, 2, 3, 5, 10, 32, 100, 316, 1000, 1778, 1995, 2000])
    assert not looks_log_spaced([0, 50, 100, 150, 200, 210])   # linear, short final gap


def test_a_one_hot_models_first_layer_is_its_embedding():
    from dgrun.probes.modular_progress import operand_embedding

    model = QuadraticMLP(P + 1, 2, P, width=4)
    w = 2 * math.pi * torch.tensor([5.0, 23.0]) / P
    x = torch.arange(P, dtype=torch.float32)[:, None]
    with torch.no_grad():
        model.w_in.zero_()
        model.w_in[:P] = torch.cat([torch.cos(w * x), torch.sin(w * x)], 1)   # operand a
        model.w_in[P + 1:2 * P + 1] = torch.cat([torch.cos(w * x), -torch.sin(w * x)], 1)
    embedding = operand_embedding(model, P, P + 1)
    assert embedding.shape == (P, 8)  # a's and b's weights side by side
    row, probe, _ = measure(model)
    assert probe.last["embedding_frequencies"] == [5, 23]
    assert row["fourier_gini"] > 0.9


def test_the_probe_state_carries_the_key_frequencies_across_a_resume():
    row, probe, bundle = measure(TrigAlgorithm(P, KEYS))
    resumed, = build({"modular_progress": {}}, meta=bundle.meta, seed=0)
    resumed.load_state_dict(probe.state_dict())
    assert resumed.summarize([])["modular_progress"]["key_frequencies"] == KEYS


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "hinge"])
@pytest.mark.parametrize("sign", [1, -1])
def test_the_measures_from_the_diagonal_profile_equal_the_whole_tables(loss, sign):
    """LogitView reads the p^3 logits once and computes the restricted loss from one row: it
    must equal the loss of the whole restricted table over every pair, and the excluded
    loss that of the whole excluded table on the training pairs."""
    from dgrun.losses import LOSSES
    from dgrun.probes.fourier import key_component, logit_spectrum
    from dgrun.probes.modular_progress import LogitView

    p, keys = 13, [2, 5]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(p, p, p, generator=gen) * 3 + 0.5
    eval_sum = LOSSES.build(loss)[1]
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    truth = (a + sign * b) % p
    train_pairs = torch.randperm(p * p, generator=gen)[:60]
    labels = torch.randint(p, (60,), generator=gen)       # labels may be corrupted
    part = key_component(logits, sign, keys)
    whole_restricted = float(eval_sum((logits.mean() + part).reshape(p * p, p), truth)) / p ** 2
    whole_excluded = float(eval_sum((logits - part).reshape(p * p, p)[train_pairs],
                                    labels)) / 60
    view = LogitView(logits, sign)
    got = view.measures(keys, eval_sum, train_pairs, labels)
    assert got["restricted_loss"] == pytest.approx(whole_restricted, rel=1e-5)
    assert got["excluded_loss"] == pytest.approx(whole_excluded, rel=1e-6)
    centred = logits.double() - logits.double().mean()
    assert view.variance == pytest.approx(float(centred.pow(2).sum()), rel=1e-9)
    shares = logit_spectrum(logits, sign) / view.variance
    assert view.key_frequencies(0.5) == [k + 1 for k in range(p // 2)
                                         if float(shares[k]) >= 0.5 / (p // 2)]
