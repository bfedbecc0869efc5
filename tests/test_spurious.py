"""Simplicity bias: grouped spurious datasets, worst-group metrics, group objectives, DFR."""
from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgrun import probes
from dgrun.data import DATASETS
from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.objectives import OBJECTIVES
from dgrun.probes import Evaluation
from dgrun.probes.dfr import last_linear
from dgrun.probes.groups import catch_up_step, slug

PER_EXAMPLE_CE = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731


def attr_of(split: Split, num_attr: int = 2) -> torch.Tensor:
    return split.group % num_attr


def agreement(split: Split, num_attr: int = 2) -> float:
    return float((attr_of(split, num_attr) == split.y % num_attr).float().mean())


def counts(split: Split, num_groups: int = 4) -> list[int]:
    return torch.bincount(split.group, minlength=num_groups).tolist()


def same(a: Split, b: Split) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.group, b.group)


# --- colored_digits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colored():
    return DATASETS.build("colored_digits", rho=0.9)


def test_colored_digits_groups_come_from_label_and_painted_colour(colored):
    b = colored
    assert b.meta.extra["groups"] == ["y=0,color=red", "y=0,color=green",
                                      "y=1,color=red", "y=1,color=green"]
    assert b.meta.input_shape == (3, 8, 8) and b.meta.modality == "image"
    for split in (b.train, b.val, b.test):
        assert split.x.dtype == torch.float32 and 0 <= split.x.min() and split.x.max() <= 1
        assert float(split.x[:, 2].abs().max()) == 0.0  # red and green only: no blue
        green = (split.x[:, 1].flatten(1).sum(1) > 0).long()  # the stroke's colour, from pixels
        assert float(split.x[green == 1, 0].abs().max()) == 0.0
        assert torch.equal(split.group, split.y * 2 + green)
    from sklearn.datasets import load_digits

    # Labels: y = 1 for digits 5..9. Each row's stroke intensity is one sklearn digit's image.
    digits = load_digits()
    gray = torch.from_numpy(digits.images.astype(np.float32) / 16).flatten(1)
    strokes = b.train.x.sum(1).flatten(1)
    nearest = torch.cdist(strokes, gray).argmin(1)
    assert torch.allclose(gray[nearest], strokes, atol=1e-6)
    assert torch.equal(b.train.y, (torch.from_numpy(digits.target)[nearest] >= 5).long())


def test_colored_digits_correlation_is_rho_in_train_random_or_flipped_in_test(colored):
    assert agreement(colored.train) == pytest.approx(0.9, abs=0.005)
    assert agreement(colored.test) == pytest.approx(0.5, abs=0.005)
    flipped = DATASETS.build("colored_digits", rho=0.9, test_color="flipped")
    assert agreement(flipped.test) == 0.0
    other_rho = DATASETS.build("colored_digits", rho=0.75)
    assert agreement(other_rho.train) == pytest.approx(0.75, abs=0.005)
    # Within each class too, not just overall.
    for c in (0, 1):
        rows = colored.train.y == c
        within = float((attr_of(colored.train)[rows] == c).float().mean())
        assert within == pytest.approx(0.9, abs=0.01)


def test_val_split_is_group_balanced_and_disjoint(colored):
    assert len(set(counts(colored.val))) == 1 and counts(colored.val)[0] > 50
    sizes = len(colored.train) + len(colored.val) + len(colored.test)
    assert sizes <= 1797 and len(colored.train) > 900
    # Held out: no val image appears in train (compare the grey strokes, colour aside).
    tr, va = colored.train.x.sum(1).flatten(1), colored.val.x.sum(1).flatten(1)
    assert float(torch.cdist(va, tr).min()) > 0


def test_colored_digits_is_deterministic_in_its_options(colored):
    again = DATASETS.build("colored_digits", rho=0.9)
    assert same(again.train, colored.train) and same(again.test, colored.test)
    assert same(again.val, colored.val)
    other = DATASETS.build("colored_digits", rho=0.9, seed=1)
    assert not torch.equal(other.train.y, colored.train.y)


def test_ten_class_colored_digits_use_ten_colours():
    b = DATASETS.build("colored_digits", binary=False, rho=0.8)
    assert b.meta.num_classes == 10 and len(b.meta.extra["groups"]) == 100
    assert agreement(b.train, 10) == pytest.approx(0.8, abs=0.01)
    assert agreement(b.test, 10) == pytest.approx(0.1, abs=0.01)
    val_counts = torch.bincount(b.val.group, minlength=100)
    present = val_counts[val_counts > 0]
    assert len(present) == 100 and int(present.max() - present.min()) <= 1


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="rho"):
        DATASETS.build("colored_digits", rho=1.5)
    with pytest.raises(UserError, match="test_color"):
        DATASETS.build("colored_digits", test_color="sideways")
    with pytest.raises(UserError, match="margin"):
        DATASETS.build("lms", margin=0.3)
    with pytest.raises(UserError, match="rule_length"):
        DATASETS.build("text_bias", rule_length=4)


# --- lms ----------------------------------------------------------------------------------------


def test_lms_linear_and_slab_coordinates_both_predict_in_train():
    b = DATASETS.build("lms", num_train=600, num_val=200, num_test=400, num_slab_coords=7,
                       num_slabs=5, margin=0.1)
    x, y = b.train.x, b.train.y
    assert x.shape == (600, 8) and b.meta.input_shape == (8,)
    assert torch.equal((x[:, 0] > 0).long(), y)  # rho=1: the linear side is the label
    assert float(x[:, 0].abs().min()) >= 0.1
    slab = torch.floor((x[:, 1:] + 1) / 0.4).long()  # which of 5 slabs of width 0.4
    assert torch.equal(slab % 2, y[:, None].expand_as(slab))  # slab j belongs to class j % 2
    inside = (x[:, 1:] + 1) - slab * 0.4
    assert float(inside.min()) >= 0.1 - 1e-6 and float(inside.max()) <= 0.3 + 1e-6  # the margin
    assert set(slab[y == 0].unique().tolist()) == {0, 2, 4}
    assert set(slab[y == 1].unique().tolist()) == {1, 3}
    # Test: the linear coordinate is randomized (groups balanced), the slabs still predict.
    assert counts(b.test) == [100, 100, 100, 100]
    assert torch.equal(b.test.group % 2, (b.test.x[:, 0] > 0).long())
    test_slab = torch.floor((b.test.x[:, 1:] + 1) / 0.4).long()
    assert torch.equal(test_slab % 2, b.test.y[:, None].expand_as(test_slab))
    assert counts(b.val) == [50, 50, 50, 50]


def test_lms_slab_randomized_test_breaks_the_slabs_only():
    b = DATASETS.build("lms", num_train=200, num_val=40, num_test=400, test_linear="aligned",
                       test_slabs="random", num_slab_coords=3)
    assert torch.equal((b.test.x[:, 0] > 0).long(), b.test.y)
    slab_class = torch.floor((b.test.x[:, 1] + 1) / 0.4).long() % 2
    assert float((slab_class == b.test.y).float().mean()) == pytest.approx(0.5, abs=0.01)


# --- dominoes -----------------------------------------------------------------------------------


def test_digit_dominoes_stack_a_simple_digit_over_the_labelled_one():
    from sklearn.datasets import load_digits

    b = DATASETS.build("dominoes", rho=0.8)
    assert b.meta.input_shape == (1, 16, 8)
    d = load_digits()
    gray = torch.from_numpy(d.images.astype(np.float32) / 16).flatten(1)
    digit = torch.from_numpy(d.target)
    for split in (b.train, b.test):
        top = torch.cdist(split.x[:, 0, :8].flatten(1), gray).argmin(1)
        bottom = torch.cdist(split.x[:, 0, 8:].flatten(1), gray).argmin(1)
        assert torch.equal(digit[top], attr_of(split))  # top: a 0 for attribute 0, a 1 for 1
        assert torch.equal((digit[bottom] >= 5).long(), split.y)
    assert agreement(b.train) == pytest.approx(0.8, abs=0.01)
    assert agreement(b.test) == pytest.approx(0.5, abs=0.01)
    assert len(set(counts(b.val))) <= 2 and max(counts(b.val)) - min(counts(b.val)) <= 1
    assert counts(DATASETS.build("dominoes").train)[1:3] == [0, 0]  # rho=1: fully predictive


# --- text_bias ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["majority", "parity"])
def test_text_bias_label_follows_its_rule_and_the_marker_correlates(rule):
    b = DATASETS.build("text_bias", rule=rule, num_train=2000, num_val=400, num_test=1000,
                       length=8, num_tokens=6, rho=0.9)
    assert b.meta.modality == "tokens" and b.meta.vocab_size == 8 and b.meta.input_shape == (8,)
    x, y = b.train.x, b.train.y
    assert torch.equal(x[:, 0] - 6, attr_of(b.train))  # the marker token carries the attribute
    content = x[:, 1:]
    assert int(content.max()) < 6
    high = (content >= 3).sum(1)
    truth = (high * 2 > 7).long() if rule == "majority" else high % 2
    assert torch.equal(truth, y)
    assert agreement(b.train) == pytest.approx(0.9, abs=0.005)
    assert agreement(b.test) == pytest.approx(0.5, abs=0.005)
    assert counts(b.val) == [100, 100, 100, 100]
    # Content is uniform given the label: every token is as common as every other.
    freq = torch.bincount(content.flatten(), minlength=6).float() / content.numel()
    assert float((freq - 1 / 6).abs().max()) < 0.02
    assert torch.equal(DATASETS.build("text_bias", rule=rule, num_train=2000, num_val=400,
                                      num_test=1000, length=8, num_tokens=6, rho=0.9).train.x, x)


# --- objectives ---------------------------------------------------------------------------------


def _toy_train(groups: list[int]) -> Split:
    g = torch.tensor(groups)
    return Split(torch.zeros(len(g), 1), g // 2, group=g)


def test_group_dro_moves_weight_toward_the_worse_group_by_its_formula():
    train = _toy_train([0, 0, 1, 1, 3])
    identity = lambda out, y: out[:, 0]  # noqa: E731  (the "loss" is the model output itself)
    dro = OBJECTIVES.build("group_dro", train=train, num_groups=4, per_example_loss=identity,
                           eta=0.5)
    out = torch.tensor([[1.0], [3.0], [0.5], [0.5], [4.0]], requires_grad=True)
    rows = torch.tensor([0, 1, 2, 3])  # groups 0 (losses 1 and 3) and 1 (losses 0.5, 0.5)
    loss = dro(out[rows], None, rows)
    group_loss = torch.tensor([2.0, 0.5, 0.0, 0.0])
    q = torch.full((4,), 0.25) * torch.exp(0.5 * group_loss)
    q = q / q.sum()
    assert torch.allclose(dro.q, q) and float(dro.q[0]) > float(dro.q[1]) > float(dro.q[2])
    assert float(loss.detach()) == pytest.approx(float(q @ group_loss), rel=1e-6)
    loss.backward()  # gradient: q_g / n_g for each row of group g, weights held fixed
    assert torch.allclose(out.grad[:4, 0], torch.stack([q[0] / 2, q[0] / 2, q[1] / 2, q[1] / 2]))
    # A second step multiplies again; resuming from state_dict gives the identical update.
    saved = dro.state_dict()
    again = OBJECTIVES.build("group_dro", train=train, num_groups=4, per_example_loss=identity,
                             eta=0.5)
    again.load_state_dict(saved)
    batch = torch.tensor([[2.0], [1.0]])
    rows = torch.tensor([4, 2])
    assert torch.equal(dro(batch, None, rows), again(batch, None, rows))
    assert torch.equal(dro.q, again.q)


def test_group_dro_adjustment_favours_small_groups():
    train = _toy_train([0] * 16 + [1] * 4)
    dro = OBJECTIVES.build("group_dro", train=train, num_groups=2, eta=1.0, adjustment=2.0,
                           per_example_loss=lambda out, y: out[:, 0])
    dro(torch.zeros(2, 1), None, torch.tensor([0, 19]))  # equal (zero) losses
    q = torch.tensor([0.5 * math.exp(2 / 4), 0.5 * math.exp(2 / 2)])
    assert torch.allclose(dro.q, q / q.sum())


def test_reweight_weighs_rows_by_inverse_group_frequency():
    train = _toy_train([0] * 6 + [1] * 2 + [3] * 2)  # group 2 empty: 3 groups present
    rw = OBJECTIVES.build("reweight", train=train, num_groups=4,
                          per_example_loss=lambda out, y: out[:, 0])
    assert torch.allclose(rw.weights, torch.tensor([10 / 18, 10 / 6, 0.0, 10 / 6]))
    everything = torch.arange(10)
    losses = torch.tensor([1.0] * 6 + [4.0] * 2 + [7.0] * 2)
    # Over the whole split: the plain mean of the group means, (1 + 4 + 7) / 3.
    assert float(rw(losses[:, None], None, everything)) == pytest.approx(4.0)
    erm = OBJECTIVES.build("erm", train=train, num_groups=4, per_example_loss=lambda o, y: o[:, 0])
    assert float(erm(losses[:, None], None, None)) == pytest.approx(float(losses.mean()))


def test_group_objectives_refuse_data_without_groups():
    plain = Split(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    for name in ("group_dro", "reweight"):
        with pytest.raises(UserError, match="needs a dataset with groups"):
            OBJECTIVES.build(name, train=plain, num_groups=1, per_example_loss=PER_EXAMPLE_CE)
    OBJECTIVES.build("erm", train=plain, num_groups=1, per_example_loss=PER_EXAMPLE_CE)


# --- groups probe -------------------------------------------------------------------------------


class Fixed(nn.Module):
    """Predicts the class stored in column 0 of each row (logits = one-hot of it)."""

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), 2).float() + 0 * self.anchor

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))


def test_groups_probe_gives_known_worst_and_per_group_accuracy():
    meta = Meta("toy", "vector", (1,), 2,
                extra={"groups": ["y=0,c=red", "y=0,c=green", "y=1,c=red", "y=1,c=green"]})
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    g = torch.tensor([0, 0, 0, 0, 1, 2, 3, 3, 3, 3])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 0, 1])  # group accs: 3/4, 0/1, 0/1, 3/4
    test = Split(pred[:, None].float(), y, group=g)
    train_g = torch.tensor([0, 0, 0, 0, 0, 3, 3, 3, 3, 3])  # groups 1 and 2 absent
    train = Split(pred[:, None].float(), y, group=train_g)
    (probe,) = probes.build({"groups": {}}, meta=meta, seed=0)
    row = probe.measure(Evaluation(Fixed(), train, test))
    row = {k: float(v) for k, v in row.items()}
    assert row["test_avg_acc"] == pytest.approx(0.6)
    assert row["test_worst_group_acc"] == 0.0
    assert row["test_acc_y_0_c_red"] == 0.75 and row["test_acc_y_1_c_green"] == 0.75
    assert row["test_acc_y_0_c_green"] == 0.0
    # Train lacks groups 1 and 2: no columns for them (never a NaN), worst over present ones.
    assert "train_acc_y_0_c_green" not in row and "train_acc_y_1_c_red" not in row
    assert row["train_acc_y_0_c_red"] == pytest.approx(0.6)
    assert row["train_acc_y_1_c_green"] == pytest.approx(0.6)
    assert row["train_worst_group_acc"] == pytest.approx(0.6)
    assert slug("y=0,color=red") == "y_0_color_red"


def test_catch_up_step_is_where_the_gap_closes_for_good():
    steps = [0, 10, 20, 30, 40, 50]
    avg = [0.50, 0.90, 0.90, 0.92, 0.93, 0.93]
    worst = [0.48, 0.10, 0.88, 0.50, 0.90, 0.91]  # closes at 20, reopens at 30, closes at 40
    assert catch_up_step(steps, avg, worst, gap=0.05) == 40
    assert catch_up_step(steps, avg, worst[:4], gap=0.05) is None
    assert catch_up_step(steps, avg, worst, gap=0.5) == 20
    assert catch_up_step(steps, avg, worst, gap=0.9) == 0
    meta = Meta("toy", "vector", (1,), 2, extra={"groups": ["a", "b"]})
    (probe,) = probes.build({"groups": {"gap": 0.05}}, meta=meta, seed=0)
    rows = [{"step": s, "test_avg_acc": a, "test_worst_group_acc": w}
            for s, a, w in zip(steps, avg, worst)]
    summary = probe.summarize(rows)["groups"]
    assert summary["worst_group_catch_up_step"] == 40
    assert summary["final_worst_group_acc"] == 0.91 and summary["max_gap_step"] == 10
    assert summary["best_worst_group_acc"] == 0.91
    assert all(not isinstance(v, (dict, list)) for v in summary.values())
    assert probe.marks({"groups": summary}) == [(40, "worst group catches up")]


def test_probes_refuse_data_without_groups():
    meta = Meta("digits", "image", (1, 8, 8), 10)
    for name in ("groups", "dfr"):
        with pytest.raises(UserError, match="needs a dataset with groups"):
            probes.build({name: {}}, meta=meta, seed=0)


# --- dfr probe ----------------------------------------------------------------------------------


def _core_spurious(n: int, agree: float, gen: torch.Generator) -> Split:
    """x = (core, spurious): core = label +- noise (always informative), spurious = a sign
    that agrees with the label in a fraction `agree` of rows."""
    y = torch.arange(n) % 2
    a = torch.where(torch.rand(n, generator=gen) < agree, y, 1 - y)
    core = (2 * y - 1) + 0.3 * torch.randn(n, generator=gen)
    spurious = (2 * a - 1).float() * 3
    return Split(torch.stack([core, spurious], 1), y, group=y * 2 + a)


def test_dfr_recovers_the_core_feature_the_trained_last_layer_ignores():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2)), model[0].bias.zero_()  # features = (core, spurious)
        model[1].weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 1.0]]))  # reads spurious only
        model[1].bias.zero_()
    train, val, test = (_core_spurious(400, 0.95, gen), _core_spurious(200, 0.5, gen),
                        _core_spurious(400, 0.5, gen))
    meta = Meta("toy", "vector", (2,), 2, extra={"groups": ["0a", "0b", "1a", "1b"]})
    group_probe, dfr_probe = probes.build({"groups": {}, "dfr": {"every": 2}}, meta=meta, seed=0)
    ev = Evaluation(model, train, test, val=val)
    own = group_probe.measure(ev)
    assert float(own["test_worst_group_acc"]) == 0.0  # the model follows the spurious sign
    row = dfr_probe.measure(ev)
    assert row["dfr_test_acc"] > 0.97 and row["dfr_test_worst_group_acc"] > 0.95
    # `every=2`: the next evaluation is skipped, the one after refits; the count resumes.
    assert dfr_probe.measure(ev) == {}
    assert dfr_probe.state_dict() == {"evaluations": 2}
    again = probes.build({"dfr": {"every": 2}}, meta=meta, seed=0)[0]
    again.load_state_dict(dfr_probe.state_dict())
    assert again.measure(ev) == row  # seeded fit: the same numbers
    summary = dfr_probe.summarize([{"step": 0, **row}, {"step": 5}])["dfr"]
    assert summary["final_test_worst_group_acc"] == row["dfr_test_worst_group_acc"]


def test_dfr_hooks_the_linear_that_runs_last_not_the_one_defined_last():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x))

    model = HeadFirst()
    ev = Evaluation(model, Split(torch.zeros(2, 3), torch.zeros(2).long()),
                    Split(torch.zeros(2, 3), torch.zeros(2).long()))
    assert last_linear(model, torch.zeros(2, 3), ev.predict) is model.head
    with pytest.raises(UserError, match="nn.Linear"):
        last_linear(nn.Sequential(nn.Flatten()), torch.zeros(2, 3), ev.predict)


# --- image datasets from tiny files in their real layouts ---------------------------------------


def _write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, quality=95)


def _waterbirds(root: Path) -> list[dict]:
    folder = root / "waterbird_complete95_forest2water2"
    rows, i = [], 0
    # split 0/1/2 x (y, place); val gets unequal groups (3, 1, 2, 2) to check the balancing.
    plan = {0: [(0, 0)] * 3 + [(0, 1), (1, 0)] + [(1, 1)] * 3,
            1: [(0, 0)] * 3 + [(0, 1)] + [(1, 0)] * 2 + [(1, 1)] * 2,
            2: [(0, 0), (0, 1), (1, 0), (1, 1)]}
    for split, pairs in plan.items():
        for y, place in pairs:
            i += 1
            name = f"{i:03d}.Some_Bird/Some_Bird_{i:04d}.jpg"
            # The image's colour encodes its row: red = 20 * id, green = 100 * y + 50 * place.
            _write_image(folder / name, (20 * i, 100 * y + 50 * place, 0), (30 + i, 20 + 2 * i))
            rows.append({"img_id": i, "img_filename": name, "y": y, "split": split, "place": place})
    lines = ["img_id,img_filename,y,split,place"]
    lines += [f"{r['img_id']},{r['img_filename']},{r['y']},{r['split']},{r['place']}" for r in rows]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


def test_waterbirds_reads_metadata_and_images_into_groups(tmp_path):
    _waterbirds(tmp_path)
    b = DATASETS.build("waterbirds", root=str(tmp_path), image_size=16)
    assert b.train.x.shape == (8, 3, 16, 16) and b.train.x.dtype == torch.uint8
    assert b.meta.extra["groups"] == ["y=0,place=land", "y=0,place=water",
                                      "y=1,place=land", "y=1,place=water"]
    assert counts(b.train) == [3, 1, 1, 3] and counts(b.test) == [1, 1, 1, 1]
    assert counts(b.val) == [1, 1, 1, 1]  # subsampled to the rarest val group
    for split in (b.train, b.val, b.test):
        green = split.x[:, 1].float().mean((1, 2))  # solid colours survive resize and JPEG
        y, place = split.group // 2, split.group % 2
        assert torch.allclose(green, (100 * y + 50 * place).float(), atol=3)
        assert torch.equal(split.y, y)


def test_celeba_reads_attributes_and_partition(tmp_path):
    folder = tmp_path / "celeba"
    names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
    # (blond, male, partition) per image.
    plan = [(1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0), (1, 1, 0),
            (1, 0, 1), (0, 1, 1), (1, 1, 1), (0, 0, 1), (0, 0, 1), (0, 1, 2), (1, 0, 2)]
    lines, parts = [str(len(plan)), " ".join(names)], []
    for i, (blond, male, part) in enumerate(plan, 1):
        name = f"{i:06d}.jpg"
        values = [-1, 2 * blond - 1, 2 * male - 1, 1]
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        parts.append(f"{name} {part}")
        _write_image(folder / "img_align_celeba" / name, (0, 120 * blond, 0), (18, 22))
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    b = DATASETS.build("celeba", root=str(tmp_path), image_size=8)
    assert b.train.x.shape == (5, 3, 8, 8) and len(b.test) == 2
    assert b.train.y.tolist() == [1, 1, 0, 0, 1] and (b.train.group % 2).tolist() == [0, 0, 1, 0, 1]
    assert counts(b.val) == [1, 1, 1, 1]
    assert b.meta.extra["groups"][3] == "y=1,Male=1"
    assert torch.allclose(b.train.x[:, 1].float().mean((1, 2)), 120.0 * b.train.y, atol=3)
    with pytest.raises(UserError, match="Blond_hair"):
        DATASETS.build("celeba", root=str(tmp_path), target="Blond_hair")


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        # Each digit's stroke: a bright square whose size encodes the label.
        images = rng.integers(0, 30, size=(n, 28, 28)).astype(np.uint8)
        for i, d in enumerate(labels):
            images[i, 4:6 + d, 4:6 + d] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)


def test_colored_mnist_paints_the_mnist_files(tmp_path):
    _write_mnist(tmp_path)
    b = DATASETS.build("colored_mnist", root=str(tmp_path), rho=0.8, val_fraction=0.2)
    assert b.train.x.shape == (48, 3, 28, 28) and b.train.x.dtype == torch.uint8
    assert len(b.test) == 20 and len(set(counts(b.val))) == 1
    green = (b.train.x[:, 1].flatten(1).sum(1) > 0).long()
    assert torch.equal(b.train.group, b.train.y * 2 + green)
    assert int(b.train.x[green == 1, 0].max()) == 0 and int(b.train.x[:, :, 4, 4].max()) == 255
    assert agreement(b.train) == pytest.approx(0.8, abs=0.03)
    assert agreement(b.test) == 0.5


def test_mnist_cifar_dominoes_stack_real_files(tmp_path):
    _write_mnist(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    cifar_label = {}
    for name, n in [(f"data_batch_{i}", 10) for i in range(1, 6)] + [("test_batch", 10)]:
        labels = [1, 9] * (n // 2)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        cifar_label.update({row.tobytes(): label for row, label in zip(data, labels)})
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    b = DATASETS.build("dominoes", source="mnist_cifar", root=str(tmp_path), rho=1.0,
                       val_fraction=0.2)
    assert b.train.x.shape == (40, 3, 64, 32) and b.train.x.dtype == torch.uint8
    assert len(b.test) == 10 and len(b.val) >= 4
    assert max(counts(b.val)) - min(counts(b.val)) <= 1
    assert b.meta.class_names is None or len(b.meta.class_names) == 2
    for split in (b.train, b.val, b.test):
        top, bottom = split.x[:, :, :32], split.x[:, :, 32:]
        assert torch.equal(top[:, 0], top[:, 2])  # the MNIST digit, grey in all three channels
        digit = top[:, 0, 2:30, 2:30]  # padded by 2 px; a 1 is drawn as a 3x3 square
        assert torch.equal((digit[:, 6, 6] == 255).long(), attr_of(split))
        labels = [cifar_label[img.numpy().tobytes()] for img in bottom]
        assert split.y.tolist() == [int(label == 9) for label in labels]
    assert torch.equal(attr_of(b.train), b.train.y)


def test_missing_files_are_one_line_errors_naming_the_expected_path(tmp_path):
    with pytest.raises(UserError, match="waterbird_complete95_forest2water2/metadata.csv"):
        DATASETS.build("waterbirds", root=str(tmp_path))
    with pytest.raises(UserError, match="celeba/list_attr_celeba.txt"):
        DATASETS.build("celeba", root=str(tmp_path))
    with pytest.raises(UserError, match="MNIST"):
        DATASETS.build("colored_mnist", root=str(tmp_path))
    rows = _waterbirds(tmp_path)
    missing = tmp_path / "waterbird_complete95_forest2water2" / rows[-1]["img_filename"]
    missing.unlink()
    with pytest.raises(UserError, match=str(missing)):
        DATASETS.build("waterbirds", root=str(tmp_path), image_size=8)
