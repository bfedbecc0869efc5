"""The sharpness probe against closed forms, an explicitly computed Hessian, and PyHessian."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgrun.data.bundle import Meta, Split
from dgrun.errors import UserError
from dgrun.probes import Evaluation, build
from dgrun.probes.sharpness import (hessian_vector_product, hutchinson_trace, loss_closure,
                                    top_eigenvalue)

META = Meta("toy", "vector", (6,), 3)


def test_a_quadratic_loss_has_its_matrix_as_hessian():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    eigenvalues = torch.tensor([9.0, 4.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.0], dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    params = {"w": torch.randn(8, dtype=torch.float64)}
    hvp = hessian_vector_product(lambda ps: 0.5 * ps["w"] @ a @ ps["w"], params)
    value, used = top_eigenvalue(hvp, params, iterations=200, tol=1e-10,
                                 generator=torch.Generator().manual_seed(0))
    assert value == pytest.approx(9.0, rel=1e-6) and used < 200
    trace = hutchinson_trace(hvp, params, 400, torch.Generator().manual_seed(0))
    assert trace == pytest.approx(float(eigenvalues.sum()), rel=0.1)


def linear_data(n=200, d=6, classes=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
    return x, torch.randint(0, classes, (n,), generator=g)


def test_linear_least_squares_sharpness_is_twice_the_top_eigenvalue_of_xtx_over_n():
    # dgrun's mse is sum_c (Wx - onehot)_c^2 averaged over rows: H = 2 X^T X / n (x) I_classes.
    x, y = linear_data()
    model = nn.Linear(6, 3, bias=False)
    probe, = build({"sharpness": {"sample": 200, "iterations": 100, "tol": 1e-7}}, meta=META,
                   seed=0, loss="mse")
    row = probe.measure(Evaluation(model, Split(x, y), Split(x, y)))
    expected = 2 * float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    assert row["sharpness"] == pytest.approx(expected, rel=1e-4)
    assert probe.summarize([row])["sharpness"]["hvps_per_measurement"] <= 100


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def explicit_top_eigenvalue(model, x, y):
    loss_of, params = loss_closure(model, x, y, F.cross_entropy)
    names = list(params)
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    def of_flat(v):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return loss_of(parts)

    h = torch.autograd.functional.hessian(of_flat, flat.clone())
    eig = torch.linalg.eigvalsh(h.double())
    return eig, float(eig[eig.abs().argmax()])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_small_network_matches_its_explicit_hessian_and_pyhessian():
    x, y = linear_data(n=64)
    model = small_net()
    eig, expected = explicit_top_eigenvalue(model, x, y)
    probe, = build({"sharpness": {"sample": 64, "iterations": 200, "tol": 1e-6,
                                  "trace_samples": 500}}, meta=META, seed=0)
    row = probe.measure(Evaluation(model, Split(x, y), Split(x, y)))
    assert row["sharpness"] == pytest.approx(expected, rel=1e-3)
    assert row["hessian_trace"] == pytest.approx(float(eig.sum()), rel=0.15)
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(0)
    theirs = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    top = theirs.eigenvalues(maxIter=200, tol=1e-6)[0][0]
    assert row["sharpness"] == pytest.approx(top, rel=1e-3)


def test_every_nth_evaluation_and_resume_state():
    x, y = linear_data(n=32)
    probe, = build({"sharpness": {"every": 3, "sample": 16}}, meta=META, seed=0)
    ev = Evaluation(small_net(), Split(x, y), Split(x, y))
    measured = [bool(probe.measure(ev)) for _ in range(7)]
    assert measured == [True, False, False, True, False, False, True]
    again, = build({"sharpness": {"every": 3, "sample": 16}}, meta=META, seed=0)
    again.load_state_dict(probe.state_dict())
    assert bool(again.measure(ev)) is False  # the 8th evaluation, as uninterrupted


def test_bad_options_are_one_line():
    with pytest.raises(UserError, match="probes.sharpness.every"):
        build({"sharpness": {"every": 0}}, meta=META, seed=0)
