"""Influence functions (Koh & Liang 2017): known answers on models whose Hessian is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dgrun.analysis.gradients import OUTPUTS
from dgrun.analysis.influence import TrainingLoss, influence_scores
from dgrun.errors import UserError



@pytest.fixture
def float64():
    """Models and data in float64 (per-example gradients are taken in float32, so closed
    forms hold to float32 rounding)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def least_squares(n: int = 60, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():  # fitted exactly: the least-squares solution
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model, x, y


@pytest.mark.parametrize("solver, options, tol", [
    ("cg", {"iterations": 50, "tol": 1e-12}, 1e-5),
    ("cg", {"iterations": 50, "tol": 1e-12, "hessian": "gauss_newton"}, 1e-5),
    ("lissa", {"depth": 3000, "lissa_batch_size": None}, 1e-4),
])
def test_least_squares_influence_is_the_closed_form(float64, solver, options, tol):
    model, x, y = least_squares()
    x_test, y_test = x[:7] + 0.1, y[:7]
    names = ["weight"]
    scores, solved = influence_scores(model, x, y, x_test, y_test,
                                      output=OUTPUTS.get("regression"), names=names,
                                      solver=solver, damping=0.0, **options)
    w = model.weight.detach().reshape(-1)
    r_train, r_test = x @ w - y, x_test @ w - y_test
    h = x.T @ x / len(x)  # the Hessian of the mean of (x.w - y)^2 / 2
    closed = (x_test * r_test[:, None]) @ torch.linalg.solve(h, (x * r_train[:, None]).T)
    assert torch.allclose(scores, closed, atol=tol * closed.abs().max(), rtol=0)
    assert solved.relative_residual < 1e-4


def test_damping_is_added_to_the_hessian(float64):
    model, x, y = least_squares()
    scores, _ = influence_scores(model, x, y, x[:3], y[:3], output=OUTPUTS.get("regression"),
                                 names=["weight"], damping=0.5, tol=1e-12)
    w = model.weight.detach().reshape(-1)
    r = x @ w - y
    h = x.T @ x / len(x) + 0.5 * torch.eye(x.shape[1])
    closed = (x[:3] * r[:3, None]) @ torch.linalg.solve(h, (x * r[:, None]).T)
    assert torch.allclose(scores, closed, atol=1e-5 * closed.abs().max())


def test_hessian_vector_products_match_the_explicit_hessian(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    x, y = torch.randn(20, 4), torch.randint(3, (20,))
    names = [n for n, _ in model.named_parameters()]
    loss = TrainingLoss(model, names, x, y, output=OUTPUTS.get("margin"), batch_size=7)
    params = dict(model.named_parameters())

    def mean_loss(theta):
        chunks = dict(zip(names, (c.view(params[n].shape) for n, c in
                                  zip(names, theta.split([params[n].numel() for n in names])))))
        logits = torch.func.functional_call(model, chunks, (x,))
        return nn.functional.cross_entropy(logits, y)

    hessian = torch.autograd.functional.hessian(mean_loss, loss.theta)
    v = torch.randn(3, len(loss.theta))
    assert torch.allclose(loss.hvp(v), v @ hessian, atol=1e-10)
    # Gauss-Newton: mean_i L''(f_i) grad f_i grad f_i^T, from explicit Jacobians.
    gn = TrainingLoss(model, names, x, y, output=OUTPUTS.get("margin"), hessian="gauss_newton")
    margin = OUTPUTS.get("margin").value

    def margins(theta):
        chunks = dict(zip(names, (c.view(params[n].shape) for n, c in
                                  zip(names, theta.split([params[n].numel() for n in names])))))
        return margin(torch.func.functional_call(model, chunks, (x,)), y)

    jac = torch.autograd.functional.jacobian(margins, loss.theta)  # (rows, P)
    p = torch.sigmoid(margins(loss.theta))
    explicit = jac.T @ (jac * (p * (1 - p))[:, None]) / len(x)
    assert torch.allclose(gn.hvp(v), v @ explicit, atol=1e-10)
    assert torch.linalg.eigvalsh(explicit).min() > -1e-12 > torch.linalg.eigvalsh(hessian).min()


def fit_logistic(x, y, weights, reg: float) -> torch.Tensor:
    """The exact optimum of sum_i weights_i * log(1 + e^{-y_i x_i.w}) / n + reg |w|^2 / 2,
    by Newton's method (convex, so a few steps reach machine precision)."""
    w = torch.zeros(x.shape[1])
    n = len(x)
    for _ in range(50):
        m = y * (x @ w)
        p = torch.sigmoid(-m)
        g = -(x * (weights * p * y)[:, None]).sum(0) / n + reg * w
        s = torch.sigmoid(m) * p
        h = (x * (weights * s)[:, None]).T @ x / n + reg * torch.eye(x.shape[1])
        w = w - torch.linalg.solve(h, g)
        if g.norm() < 1e-13:
            break
    return w


def test_logistic_regression_influence_matches_leave_one_out_retraining(float64):
    """Koh & Liang's Fig. 2: the predicted change of a test loss when a training row is
    removed (score / n) against the change measured by retraining without it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, (1, 7))
    x = torch.tensor(digits.data[keep] / 16.0)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # a bias column
    y = torch.tensor(np.where(digits.target[keep] == 1, 0, 1))
    x_train, y_train, x_test, y_test = x[:200], y[:200], x[200:], y[200:]
    reg, n = 0.01, 200
    signs = 2.0 * y_train - 1
    w = fit_logistic(x_train, signs, torch.ones(n), reg)
    # As a classifier with logits (0, x.w): its margin for class 1 is x.w, for class 0 -x.w,
    # so its cross-entropy is the logistic loss above; only the w row trains.
    head = nn.Linear(x.shape[1], 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(w[None])

    class TwoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, inp):
            z = self.head(inp)
            return torch.cat([torch.zeros_like(z), z], dim=1)

    scores, _ = influence_scores(TwoLogits(), x_train, y_train, x_test, y_test,
                                 output=OUTPUTS.get("margin"), names=["head.weight"],
                                 damping=reg, tol=1e-12, iterations=500)
    test_rows = torch.arange(0, len(x_test), 9)
    removed = torch.arange(0, n, 4)

    def test_losses(weights):
        signs = 2.0 * y_test[test_rows] - 1
        return nn.functional.softplus(-signs * (x_test[test_rows] @ weights))

    base = test_losses(w)
    actual, predicted = [], []
    for i in removed:
        weights = torch.ones(n)
        weights[i] = 0.0
        # The objective keeps dividing by n: removing a row is down-weighting it by 1/n.
        w_i = fit_logistic(x_train, signs, weights, reg)
        actual.append(test_losses(w_i) - base)
        predicted.append(scores[test_rows, i] / n)
    actual, predicted = torch.stack(actual).reshape(-1), torch.stack(predicted).reshape(-1)
    r = np.corrcoef(actual.numpy(), predicted.numpy())[0, 1]
    print(f"leave-one-out correlation r={r:.4f}, {len(actual)} pairs")
    assert r > 0.99, r
    # Not a correlation by accident: the predicted changes are the size of the real ones.
    assert 0.8 < float(predicted.abs().sum() / actual.abs().sum()) < 1.25


def test_bad_options_are_one_line(float64):
    model, x, y = least_squares()
    with pytest.raises(UserError, match="unknown inverse-HVP solver 'newton'"):
        influence_scores(model, x, y, x[:2], y[:2], output=OUTPUTS.get("regression"),
                         names=["weight"], solver="newton")
    with pytest.raises(UserError, match="damping=-1"):
        influence_scores(model, x, y, x[:2], y[:2], output=OUTPUTS.get("regression"),
                         names=["weight"], damping=-1.0)


def test_ekfac_approximates_the_exact_gauss_newton_influence():
    """kronfluence's EK-FAC on a one-layer softmax classifier against the exact solve with
    the (margin) Gauss-Newton Hessian: the same ranking up to the Fisher's approximation."""
    from dgrun.analysis.ekfac import ekfac_scores

    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = (x @ torch.randn(6, 3) + 0.5 * torch.randn(200, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(6, 3))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.005 * sum(
            (p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    ekfac = ekfac_scores(model, x, y, x[:10], y[:10], damping=0.01)
    exact, _ = influence_scores(model, x, y, x[:10], y[:10], output=OUTPUTS.get("margin"),
                                names=["0.weight", "0.bias"], damping=0.01,
                                hessian="gauss_newton")
    assert ekfac.shape == exact.shape == (10, 200)
    assert np.corrcoef(ekfac.numpy().ravel(), exact.numpy().ravel())[0, 1] > 0.85
