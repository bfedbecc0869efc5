"""The analysis library on known answers: small tensors and models, no run directory."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dgrun.analysis import ANALYSES, ExampleTrace, RunArtifacts, analyze
from dgrun.analysis.attention import (attention_over_checkpoints, fourier_over_checkpoints,
                                      frequency_norms, key_frequencies, plot_attention)
from dgrun.analysis.attribution import Attribution, attribute, lrs_at, plot_attribution
from dgrun.analysis.cartography import cartography, learned_steps
from dgrun.analysis.color import color_bias, plot_color, rgb_to_hsv
from dgrun.analysis.dynamics import dynamics, marks_from_summary
from dgrun.analysis.features import feature_dynamics, penultimate_features, plot_features
from dgrun.analysis.gradcam import (class_activation_maps, conv_layer, gradcam_over_checkpoints,
                                    plot_gradcam)
from dgrun.analysis.gradients import OUTPUTS, Projector, projected_gradients
from dgrun.analysis.transition import (bias_attribution, find_step, plot_bias, plot_transition,
                                       transition_attribution)
from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.errors import UserError

torch.set_num_threads(1)

CENTERS = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])


def blobs(n: int, seed: int, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 2, generator=g) * spread + CENTERS[y], y


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def train(model, x, y, *, steps: int, lr: float, every: int, adam: bool = True,
          track: bool = False):
    """Full-batch training; checkpoints every `every` steps; optionally p(true label) and
    correctness of every row at each checkpoint (what trainer.track_examples records)."""
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=lr)
    checkpoints, probs, right = [], [], []
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            checkpoints.append((step, snapshot(model)))
            if track:
                with torch.no_grad():
                    logits = model(x)
                probs.append(logits.softmax(1).gather(1, y[:, None]).squeeze(1))
                right.append(logits.argmax(1) == y)
    return (checkpoints, torch.stack(probs), torch.stack(right)) if track else checkpoints


@pytest.fixture(scope="module")
def noisy_blobs():
    """90 rows in 3 blobs, six labels flipped, one for each (true, wrong) pair of classes; a
    MLP that fits the clean rows by step 100 and memorizes the flipped ones by 1000."""
    torch.manual_seed(0)
    x, y = blobs(90, seed=0)
    flip = torch.tensor([3, 6, 4, 7, 5, 8])      # classes 0, 0, 1, 1, 2, 2
    corrupted = torch.zeros(90, dtype=torch.bool)
    corrupted[flip] = True
    noisy = y.clone()
    noisy[flip] = torch.tensor([1, 2, 2, 0, 0, 1])
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    checkpoints = train(model, x, noisy, steps=1000, lr=3e-3, every=100)
    return model, checkpoints, Split(x, noisy, corrupted), flip


# --- attribution -----------------------------------------------------------------------------

def test_a_duplicated_training_point_is_the_top_influence_for_its_copy(noisy_blobs):
    # The copies are of flipped rows early in training, before they are memorized: their loss
    # gradients are large, so every method should find the source row. (A copy of a row the
    # model already fits well has a vanishing loss gradient, and TRAK rightly gives it little
    # influence: removing it would not change the prediction.)
    model, checkpoints, train_split, flip = noisy_blobs
    test = Split(train_split.x[flip], train_split.y[flip])
    early = checkpoints[:2]
    result = attribute(model, early, train_split, test, lrs=lrs_at(
        [{"step": s, "lr": 3e-3} for s, _ in early], [s for s, _ in early]),
        top_k=5, proj_dim=64)
    top = result.tables["top"]
    for method in ("trak", "tracin", "grad_cosine", "knn"):
        first = top[(top["method"] == method) & (top["rank"] == 1)]
        assert first["train_index"].tolist() == flip.tolist(), method
        # The copies are of corrupted rows: the top influence is a corrupted row.
        assert result.summary["per_method"][method]["top1_corrupted_fraction"] == 1.0
    cos = top[(top["method"] == "grad_cosine") & (top["rank"] == 1)]["score"]
    assert np.allclose(cos, 1.0, atol=1e-5)  # a gradient's cosine with itself
    assert result.summary["per_method"]["trak"]["mean_corrupted_in_top_k"] > \
        result.summary["chance_corrupted_in_top_k"]
    assert set(result.tables["agreement"]["method_a"]) == {"trak", "tracin", "grad_cosine"}


def test_trak_on_least_squares_matches_the_closed_form():
    # Linear regression fitted exactly: f(x) = w.x + b. Its gradient is x~ = (x, 1), so TRAK
    # with the regression output is x~_z (X~^T X~)^-1 x~_i r_i, and dividing by (1 - h_ii)
    # gives the exact leave-one-out change of the prediction (a textbook identity).
    g = torch.Generator().manual_seed(1)
    n, d = 30, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 + \
        0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    xz = torch.randn(5, d, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)

    def fit(rows):
        coef = torch.linalg.lstsq(design[rows], y[rows, None]).solution[:, 0]
        return coef[:d], coef[d]

    w, b = fit(torch.arange(n))
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
        model.bias.fill_(b)
    residual = y - (x @ w + b)
    gram_inv = torch.linalg.inv(design.T @ design)
    expected = torch.cat([xz, torch.ones(5, 1, dtype=torch.float64)], 1) @ gram_inv @ \
        design.T * residual[None]
    for proj_dim in (None, 16):  # exact gradients; a random projection to k > D
        scores = Attribution(model, [(0, snapshot(model))], x, y, xz, torch.zeros(5),
                             output="regression", proj_dim=proj_dim).scores("trak").double()
        assert torch.allclose(scores, expected, atol=1e-4, rtol=1e-3), proj_dim
    leverage = torch.einsum("ij,jk,ik->i", design, gram_inv, design)
    loo = torch.empty(5, n, dtype=torch.float64)
    for i in range(n):
        wi, bi = fit(torch.cat([torch.arange(i), torch.arange(i + 1, n)]))
        loo[:, i] = (xz @ w + b) - (xz @ wi + bi)
    assert torch.allclose(expected / (1 - leverage)[None], loo, atol=1e-9)


def test_per_example_gradients_and_tracin_match_autograd_one_by_one():
    torch.manual_seed(0)
    x, y = blobs(12, seed=2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    names = [n for n, _ in model.named_parameters()]
    numels = {n: p.numel() for n, p in model.named_parameters()}
    phi, q = projected_gradients(model, x, y, output=OUTPUTS.get("margin"),
                                 projector=Projector(numels, None), names=names, batch_size=5)
    loss_grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        loss_grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    loss_grads = torch.stack(loss_grads)
    # Cross-entropy = log(1 + e^-margin) exactly, so grad L = -(1 - p) grad margin.
    assert torch.allclose(-q[:, None] * phi, loss_grads, atol=1e-5)
    checkpoint = [(7, snapshot(model))]
    a = Attribution(model, checkpoint, x[:8], y[:8], x[8:], y[8:], lrs={7: 0.5}, proj_dim=None)
    assert torch.allclose(a.scores("tracin"), 0.5 * loss_grads[8:] @ loss_grads[:8].T,
                          atol=1e-5)
    with pytest.raises(UserError, match="learning rate"):
        Attribution(model, checkpoint, x[:8], y[:8], x[8:], y[8:]).scores("tracin")
    # A seeded projection: the same matrix on every call, a new one per ensemble member.
    one = Projector(numels, 32, seed=3, model_id=0)
    grads = {n: torch.randn(4, *p.shape) for n, p in model.named_parameters()}
    assert torch.equal(one(grads), Projector(numels, 32, seed=3, model_id=0)(grads))
    assert not torch.allclose(one(grads), Projector(numels, 32, seed=3, model_id=1)(grads))
    # Too big to keep: redrawn chunk by chunk for every batch, the same matrix.
    redrawn = Projector(numels, 32, seed=3, model_id=0, cache_bytes=0, chunk_floats=64)
    assert not redrawn.cache and torch.allclose(one(grads), redrawn(grads), atol=1e-6)
    assert torch.allclose(redrawn(grads), redrawn(grads))


def test_attribution_figures(noisy_blobs, tmp_path):
    model, checkpoints, train_split, flip = noisy_blobs
    test = Split(train_split.x[flip[:3]], train_split.y[flip[:3]])
    result = attribute(model, checkpoints[-2:], train_split, test, methods=("trak", "knn"),
                       top_k=4, proj_dim=32)
    paths = plot_attribution(result, tmp_path)
    assert [p.name for p in paths] == ["corrupted_in_top_k.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


# --- transition and bias ---------------------------------------------------------------------

def test_influence_of_a_memorized_row_on_its_copy_collapses_across_the_transition(noisy_blobs,
                                                                                  tmp_path):
    # Before memorization a flipped row is the top influence on its own copy (large 1 - p);
    # once memorized, p -> 1 and TRAK's reweighting takes its influence to ~0: the largest
    # change of all training rows is that row's, downwards.
    model, checkpoints, train_split, flip = noisy_blobs
    pair = [checkpoints[0], checkpoints[-1]]
    for j in flip[1:4].tolist():  # rows still wrong at step 100
        test = Split(train_split.x[[j]], train_split.y[[j]])
        result = transition_attribution(model, pair, train_split, test, step=500, proj_dim=64)
        changes = result.tables["changes"]
        first = changes.iloc[0]
        assert first["train_index"] == j and first["rank"] == 1
        assert first["before"] > 0.2 and abs(first["after"]) < 0.1 and first["change"] < 0
        assert result.summary["test_selection"] == "wrong before, right after"
        assert result.summary["before_steps"] == [100] and result.summary["after_steps"] == [1000]
    assert plot_transition(result, tmp_path)[0].exists()
    with pytest.raises(UserError, match="both sides"):
        transition_attribution(model, pair, train_split, test, step=5000)


def test_find_step_reads_the_summary():
    summary = {"grokking": {"generalization_step": None},
               "groups": {"worst_group_catch_up_step": 1200}}
    assert find_step(summary) == (1200, "groups.worst_group_catch_up_step")
    assert find_step({"grokking": {"generalization_step": 900}})[0] == 900
    assert find_step({}) == (None, "")


def spurious_split(n: int, rho: float, g: torch.Generator) -> Split:
    """Label y, attribute a = y with probability rho; a weak core feature and a strong,
    clean spurious one. Groups 2y + a: 1 = (y 0, a 1) and 2 = (y 1, a 0) are the minority."""
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.where(torch.rand(n, generator=g) < rho, y, 1 - y)
    core = (2 * y - 1) * 0.5 + torch.randn(n, generator=g)
    spur = (2 * a - 1) * 2.0 + 0.3 * torch.randn(n, generator=g)
    x = torch.stack([core, spur, *torch.randn(3, n, generator=g)], 1)
    return Split(x, y, group=2 * y + a)


def test_bias_attribution_finds_the_majority_group_teaching_the_shortcut(tmp_path):
    g = torch.Generator().manual_seed(0)
    train_split, test = spurious_split(400, 0.95, g), spurious_split(400, 0.5, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 2))
    checkpoints = train(model, train_split.x, train_split.y, steps=200, lr=0.1, every=100,
                        adam=False)
    result = bias_attribution(model, checkpoints, train_split, test, proj_dim=64)
    s = result.summary
    assert s["worst_test_group"] in (1, 2) and s["worst_group_accuracy"] < 0.5
    worst = s["worst_test_group"]
    # Its own minority group helps it most per row; the majority group with the same
    # attribute and the other label pushes it down most as a whole.
    assert s["most_positive_train_group_on_worst"] == worst
    assert s["most_negative_train_group_on_worst"] == {1: 3, 2: 0}[worst]
    assert (result.tables["pushers"]["push_on_worst_group"] < 0).all()
    assert plot_bias(result, tmp_path)[0].exists()
    with pytest.raises(UserError, match="group ids"):
        bias_attribution(model, checkpoints, train_split.replace(group=None), test)


# --- cartography -----------------------------------------------------------------------------

def test_cartography_statistics_and_learning_step_on_a_known_matrix():
    steps = [10, 20, 30, 40]
    p = torch.tensor([[0.9, 0.9, 0.9, 0.9],    # easy
                      [0.1, 0.1, 0.1, 0.1],    # hard
                      [0.1, 0.9, 0.1, 0.9],    # ambiguous
                      [0.2, 0.4, 0.6, 0.8]]).T  # learned at step 30, p > 0.5 from there
    result = cartography(p, steps, corrupted=torch.tensor([False, True, False, False]))
    ex = result.tables["examples"]
    assert np.allclose(ex["confidence"], [0.9, 0.1, 0.5, 0.5])
    assert np.allclose(ex["variability"], [0.0, 0.0, 0.4, math.sqrt(0.05)])
    assert np.allclose(ex["correctness"], [1.0, 0.0, 0.5, 0.5])
    assert ex["region"].tolist() == ["easy-to-learn", "hard-to-learn", "ambiguous",
                                     "ambiguous"]
    assert ex["learned_step"].tolist()[0] == 10 and math.isnan(ex["learned_step"][1])
    assert ex["learned_step"].tolist()[2:] == [40, 30]
    assert result.summary["corrupted_hard_to_learn_share"] == 1.0
    assert result.summary["num_never_learned"] == 1
    # Tracked correctness overrides the p > 0.5 stand-in.
    right = torch.ones(4, 4, dtype=torch.bool)
    assert learned_steps(right, steps).tolist() == [10.0] * 4
    assert learned_steps(torch.tensor([[1], [0], [1]]).bool(), [1, 2, 3]).tolist() == [3.0]
    with pytest.raises(UserError, match="evaluations, examples"):
        cartography(p, steps[:2])
    # The untrained model at step 0 is not part of the map: the same numbers as without it.
    untrained = torch.cat([torch.full((1, 4), 0.5), p])
    again = cartography(untrained, [0, *steps]).tables["examples"]
    assert again[["confidence", "variability", "learned_step"]].equals(
        ex[["confidence", "variability", "learned_step"]])
    assert cartography(untrained, [0, *steps]).summary["num_evaluations"] == 4


def test_corrupted_rows_sit_in_the_hard_to_learn_region_after_real_training(tmp_path):
    # Partial labels: 20% of the rows get another class. A small MLP trained briefly fits the
    # clean blobs and not the flipped rows: they end up unconfident and stable.
    torch.manual_seed(0)
    x, y = blobs(600, seed=3)
    g = torch.Generator().manual_seed(4)
    corrupted = torch.rand(600, generator=g) < 0.2
    noisy = torch.where(corrupted, (y + 1 + torch.randint(0, 2, (600,), generator=g)) % 3, y)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    checkpoints, probs, right = train(model, x, noisy, steps=300, lr=1e-2, every=10,
                                      track=True)
    steps = [s for s, _ in checkpoints]
    result = cartography(probs, steps, correct=right, corrupted=corrupted, labels=noisy)
    s = result.summary
    assert s["corrupted_hard_to_learn_share"] > 0.8 and s["clean_hard_to_learn_share"] < 0.1
    assert s["mean_confidence_corrupted"] < 0.3 < 0.7 < s["mean_confidence_clean"]
    regions = result.tables["regions"].set_index("region")
    assert regions.loc["hard-to-learn", "corrupted_share"] > 0.8
    assert s["late_corrupted_share"] > 0.5  # the never-learned are the corrupted rows
    # Through the registry, as `dgrun analyze RUN_DIR cartography` will call it.
    run = RunArtifacts(Bundle(Split(x, noisy, corrupted), Split(x, y),
                              Meta("blobs", "vector", (2,), 3)), model,
                       examples=ExampleTrace(steps, probs, right))
    paths = analyze("cartography", run, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["data_map.png", "examples.csv", "learned_step.png", "regions.csv",
                     "summary.json"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["corrupted_hard_to_learn_share"] == s["corrupted_hard_to_learn_share"]
    run.examples = None
    with pytest.raises(UserError, match="track_examples"):
        analyze("cartography", run, tmp_path)


# --- Grad-CAM --------------------------------------------------------------------------------

class RegionModel(nn.Module):
    """Two identity 1x1 convs (colour channels pass through); class 0's logit is the mean red
    over the top-left quadrant, class 1's the mean green over the bottom-right one."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 3, 1, bias=False)
        self.last = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(3)[:, :, None, None])
            self.last.weight.copy_(torch.eye(3)[:, :, None, None])

    def forward(self, x):
        a = torch.relu(self.last(torch.relu(self.first(x))))
        return torch.stack([a[:, 0, :8, :8].mean((1, 2)), a[:, 1, 8:, 8:].mean((1, 2))], 1)


def quadrant_mass(maps: torch.Tensor) -> torch.Tensor:
    """(B, 4) share of each map in the quadrants TL, TR, BL, BR of a 16x16 image."""
    q = maps.reshape(len(maps), 2, 8, 2, 8).sum((2, 4)).reshape(len(maps), 4)
    return q / q.sum(1, keepdim=True)


def test_gradcam_puts_the_map_on_the_region_the_logit_reads(tmp_path):
    x = torch.zeros(2, 3, 16, 16)
    x[:, 0, 2:6, 2:6] = 1.0     # red square, top-left: what class 0 reads
    x[:, 1, 10:14, 10:14] = 1.0  # green square, bottom-right: what class 1 reads
    model = RegionModel()
    assert conv_layer(model, x)[0] == "last"
    maps = class_activation_maps(model, x, torch.tensor([0, 1]))
    mass = quadrant_mass(maps)
    assert mass[0, 0] > 0.95 and mass[1, 3] > 0.95
    assert maps.amax((1, 2)).allclose(torch.ones(2)) and maps.min() >= 0
    # A second red square outside the read region: Grad-CAM averages gradients per channel
    # and so lights both squares; HiResCAM's element-wise product keeps only the one read.
    x2 = x[:1].clone()
    x2[:, 0, 10:14, 2:6] = 1.0
    both = quadrant_mass(class_activation_maps(model, x2, torch.tensor([0])))
    assert both[0, 0] == pytest.approx(0.5, abs=0.05) and both[0, 2] == pytest.approx(0.5, abs=0.05)
    hires = quadrant_mass(class_activation_maps(model, x2, torch.tensor([0]), method="hirescam"))
    assert hires[0, 0] > 0.95
    # Over checkpoints: a checkpoint whose last conv drops red has no class-0 map there.
    off = snapshot(model)
    off["last.weight"] = off["last.weight"].clone()
    off["last.weight"][0] = 0
    split = Split((x * 255).to(torch.uint8), torch.tensor([0, 1]))
    result = gradcam_over_checkpoints(model, [(0, off), (1, snapshot(model))], split,
                                      indices=torch.tensor([0, 1]),
                                      prepare=lambda t: t.float() / 255)
    table = result.tables["maps"]
    at_one = table[table["step"] == 1].set_index("index")
    assert at_one.loc[0, "peak_row"] < 8 and at_one.loc[0, "peak_col"] < 8
    assert at_one.loc[1, "center_row"] > 8 and at_one.loc[1, "center_col"] > 8
    assert result.arrays["maps"][0, 0].max() == 0  # red dropped: nothing to show
    assert result.summary["layer"] == "last"
    assert len(plot_gradcam(result, tmp_path)) == 2
    with pytest.raises(UserError, match="no layer named"):
        conv_layer(model, x, "nope")


def test_gradcam_finds_the_last_conv_of_zoo_models():
    from dgrun.models import create
    torch.manual_seed(0)
    x = torch.rand(2, 3, 28, 28)
    for name, last in (("alexnet", "features.4"), ("resnet18", "blocks.7.conv2")):
        model = create(name, (3, 28, 28), 10, "image").eval()
        layer, module = conv_layer(model, x)
        assert isinstance(module, nn.Conv2d)
        assert layer == last
        maps = class_activation_maps(model, x, torch.tensor([3, 4]))
        assert maps.shape == (2, 28, 28) and torch.isfinite(maps).all()
        assert maps.amax((1, 2)).le(1.0 + 1e-6).all() and maps.min() >= 0


# --- features --------------------------------------------------------------------------------

def test_penultimate_features_and_the_linear_probe(tmp_path):
    torch.manual_seed(0)
    x, y = blobs(150, seed=5)
    xt, yt = blobs(90, seed=6)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    trained = train(model, x, y, steps=200, lr=1e-2, every=200)[-1]
    feats = penultimate_features(model, x)
    assert torch.allclose(feats, model[1](model[0](x)))  # the input of the last Linear
    dead = snapshot(model)
    dead["0.weight"] = torch.zeros_like(dead["0.weight"])
    dead["0.bias"] = torch.zeros_like(dead["0.bias"])   # constant features: nothing to decode
    result = feature_dynamics(model, [(0, dead), (200, trained[1])], Split(x, y), Split(xt, yt),
                              tsne=True)
    probe = result.tables["probe"].set_index("step")
    assert probe.loc[0, "probe_test_acc"] < 0.4
    assert probe.loc[200, "probe_test_acc"] > 0.95
    assert result.summary["best_probe_step"] == 200
    embed = result.tables["embedding"]
    assert {"pc1", "pc2", "tsne1", "tsne2"} <= set(embed) and len(embed) == 2 * 240
    names = sorted(p.name for p in plot_features(result, tmp_path))
    assert names == ["features_pca.png", "features_tsne.png", "linear_probe.png"]


# --- attention and the Fourier view ----------------------------------------------------------

class TinyTransformer(nn.Module):
    """Stand-in with the transformer's two public attributes: `token_embedding` and
    `attention_maps(x) -> (layers, batch, heads, T, T)`; one head attends uniformly to the
    causal prefix, the other only to the first token."""

    def __init__(self, vocab: int, d: int, seq: int = 3):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)
        self.seq = seq

    def forward(self, x):
        return self.head(self.token_embedding(x).mean(1))

    def attention_maps(self, x):
        t = x.shape[1]
        uniform = torch.tril(torch.ones(t, t))
        uniform = uniform / uniform.sum(1, keepdim=True)
        first = torch.zeros(t, t)
        first[:, 0] = 1
        heads = torch.stack([uniform, first])[None, None].expand(1, len(x), 2, t, t)
        return heads + 0 * self.token_embedding.weight.sum()


def cosine_embedding(p: int, d: int, freqs, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(p, dtype=torch.float)
    cols = [torch.cos(2 * math.pi * k * n / p + phase) for k in freqs for phase in (0.0, 1.0)]
    emb = torch.zeros(p, d)
    emb[:, :len(cols)] = torch.stack(cols, 1)
    return emb + noise * torch.randn(p, d, generator=g)


def test_key_frequencies_of_an_embedding_built_from_cosines(tmp_path):
    p, d = 97, 32
    clean = cosine_embedding(p, d, (4, 17, 31), noise=0.0, seed=0)
    norms = frequency_norms(clean)
    assert len(norms) == p // 2
    # Each column cos(2 pi k n / p + phase) has squared norm p / 2, all at frequency k.
    assert torch.allclose(norms[[3, 16, 30]], torch.full((3,), math.sqrt(p), dtype=torch.float64),
                          rtol=1e-5)
    assert norms[[i for i in range(p // 2) if i not in (3, 16, 30)]].max() < 1e-4
    assert key_frequencies(norms) == [4, 17, 31]
    model = TinyTransformer(p + 2, d)
    early, late = snapshot(model), snapshot(model)
    early["token_embedding.weight"] = torch.randn(p + 2, d, generator=torch.Generator()
                                                  .manual_seed(1))
    late["token_embedding.weight"][:p] = cosine_embedding(p, d, (4, 17, 31), 0.05, seed=2)
    result = fourier_over_checkpoints(model, [(0, early), (5000, late)], p)
    assert result.summary["key_frequencies"] == [4, 17, 31]
    assert result.summary["num_key_frequencies_first"] > 20  # random: no sparse set
    assert result.summary["key_share"] > 0.9
    names = [q.name for q in plot_attention(result, tmp_path)]
    assert names == ["fourier_embedding.png", "fourier_last.png"]


def test_attention_maps_over_checkpoints(tmp_path):
    model = TinyTransformer(10, 4)
    x = torch.randint(0, 10, (5, 3))
    result = attention_over_checkpoints(model, [(0, snapshot(model)), (9, snapshot(model))], x)
    heads = result.tables["heads"].set_index(["step", "head"])
    assert heads.loc[(0, 0), "last_entropy"] == pytest.approx(math.log(3))
    assert heads.loc[(0, 1), "last_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert heads.loc[(9, 1), ["key_0", "key_1", "key_2"]].tolist() == [1.0, 0.0, 0.0]
    assert result.arrays["maps"].shape == (2, 1, 2, 3, 3)
    assert [q.name for q in plot_attention(result, tmp_path)] == ["attention_maps.png",
                                                              "attention_heads.png"]
    run = RunArtifacts(Bundle(Split(x, x[:, 0]), Split(x, x[:, 0]),
                              Meta("toy", "tokens", (3,), 10, vocab_size=10)), model,
                       checkpoints=[(0, snapshot(model))], summary={})
    written = analyze("attention", run, tmp_path / "both", p=7)
    assert {"heads.csv", "frequencies.csv", "attention_maps.png", "fourier_embedding.png"} <= \
        {q.name for q in written}


# --- colour ----------------------------------------------------------------------------------

def colored_shapes(n_per_class: int, seed: int) -> Split:
    """Class 0 red, class 1 green, classes 2 and 3 the same blue (a vertical vs a horizontal
    bar of equal area): colour separates 0 and 1 and cannot tell 2 from 3."""
    g = torch.Generator().manual_seed(seed)
    hues = {0: (0.8, 0.1, 0.1), 1: (0.1, 0.8, 0.1), 2: (0.1, 0.1, 0.8), 3: (0.1, 0.1, 0.8)}
    xs, ys = [], []
    for c, rgb in hues.items():
        img = 0.5 + 0.05 * torch.randn(n_per_class, 3, 8, 8, generator=g)  # grey background
        color = torch.tensor(rgb)[None, :, None, None] * (
            1 + 0.1 * torch.randn(n_per_class, 1, 1, 1, generator=g))
        if c == 3:
            img[:, :, 3:5, 1:7] = color.expand(-1, -1, 2, 6)
        else:
            img[:, :, 1:7, 3:5] = color.expand(-1, -1, 6, 2)
        xs.append((img.clamp(0, 1) * 255).to(torch.uint8))
        ys.append(torch.full((n_per_class,), c))
    return Split(torch.cat(xs), torch.cat(ys))


def test_color_bias_finds_the_classes_colour_separates(tmp_path):
    from matplotlib.colors import rgb_to_hsv as reference
    pixels = torch.rand(4, 3, 5, 5)
    ours = rgb_to_hsv(pixels).permute(0, 2, 3, 1).numpy()
    assert np.allclose(ours, reference(pixels.permute(0, 2, 3, 1).numpy()), atol=1e-5)
    result = color_bias(colored_shapes(60, seed=0), colored_shapes(40, seed=1),
                        class_names=["red", "green", "blue bar |", "blue bar -"])
    per = result.tables["color_classifier"].set_index("class")
    assert result.summary["separable_classes"] == [0, 1]
    assert per.loc[0, "recall"] == 1.0 and per.loc[1, "recall"] == 1.0
    assert per.loc[2, "recall"] < 0.8 and per.loc[3, "recall"] < 0.8
    colors = result.tables["class_colors"].set_index("class")
    assert colors.loc[0, "mean_r"] > colors.loc[0, "mean_g"] + 0.1
    assert colors.loc[1, "mean_g"] > colors.loc[1, "mean_r"] + 0.1
    assert colors.loc[2, "dominant_hue"] == pytest.approx(colors.loc[3, "dominant_hue"])
    assert 0.55 < colors.loc[2, "dominant_hue"] < 0.75  # blue, 240 degrees
    assert len(plot_color(result, tmp_path)) == 2
    with pytest.raises(UserError, match="RGB"):
        color_bias(Split(torch.zeros(4, 1, 8, 8), torch.arange(4)))


# --- dynamics and the registry ---------------------------------------------------------------

def test_dynamics_marks_the_summary_steps(tmp_path):
    summary = {"interpolation": {"step": 100, "time_s": 3.0},
               "grokking": {"memorization_step": 100, "generalization_step": 900,
                            "best_test_acc_step": 950},
               "transitions": {"count": 1, "events": [{"step": 880, "metric": "test_acc"}]},
               "config": {"trainer": {"max_step": 5}}, "final": {"step": 1000}}
    marks = marks_from_summary(summary)
    assert [s for s, _ in marks] == [100, 880, 900]
    assert dict(marks)[900] == "grokking generalization" and dict(marks)[880] == "test acc"
    rows = [{"step": str(s), "lr": "0.001", "train_acc": str(min(1.0, s / 100)),
             "test_acc": str(0.1 if s < 900 else 0.99), "train_loss": str(1 / (1 + s)),
             "weight_norm": str(40 - s / 100), "dist_from_init": str(s / 50), "note": "x"}
            for s in range(0, 1001, 50)]
    result = dynamics(rows, marks)
    assert result.summary["panels"] == {"accuracy": ["train_acc", "test_acc"],
                                        "loss": ["train_loss"],
                                        "weight norm": ["weight_norm"],
                                        "distance from init": ["dist_from_init"]}
    at = result.tables["marks"].set_index("step")
    assert at.loc[900, "test_acc"] == 0.99 and at.loc[880, "test_acc"] == 0.1
    assert at.loc[900, "weight_norm"] == 31.0
    run = RunArtifacts(Bundle(Split(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)),
                              Split(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)),
                              Meta("toy", "vector", (2,), 2)), nn.Linear(2, 2),
                       rows=rows, summary=summary)
    written = analyze("dynamics", run, tmp_path)
    assert {p.name for p in written} == {"curves.csv", "marks.csv", "summary.json",
                                         "dynamics.png"}
    assert (tmp_path / "dynamics.png").stat().st_size > 20_000
    with pytest.raises(UserError, match="unknown analysis"):
        analyze("nope", run, tmp_path)
    with pytest.raises(UserError, match="no option"):
        analyze("dynamics", run, tmp_path, colums=["x"])


def test_registry_names():
    assert ANALYSES.names() == ["attention", "attribution", "bias", "cartography", "color",
                                "dynamics", "features", "gradcam", "influence", "memorization",
                                "progress", "robustness", "transition"]
    assert all(callable(ANALYSES.tags(n)["plot"]) for n in ANALYSES.names())


def test_adapters_leave_the_models_weights_as_they_were(noisy_blobs, tmp_path):
    model, checkpoints, train_split, flip = noisy_blobs
    before = snapshot(model)
    bundle = Bundle(train_split, Split(train_split.x[flip], train_split.y[flip]),
                    Meta("blobs", "vector", (2,), 3))
    rows = [{"step": s, "lr": 3e-3} for s, _ in checkpoints]
    run = RunArtifacts(bundle, model, checkpoints=checkpoints, rows=rows,
                       summary={"grokking": {"generalization_step": 500}})
    written = analyze("attribution", run, tmp_path / "a", num_checkpoints=2, num_test=4,
                      proj_dim=16, top_k=3)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["checkpoint_steps"] == [100, 1000] and summary["num_test"] == 4
    assert "top.csv" in {p.name for p in written}
    analyze("transition", run, tmp_path / "t", proj_dim=16, num_test=6)
    t = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert t["before_steps"] == [500] and t["after_steps"] == [600]
    analyze("features", run, tmp_path / "f", num_checkpoints=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
