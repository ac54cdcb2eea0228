"""Tests of zinb.py: the ZINB likelihood of Eq. (3) against scipy.stats, its gradient against
autograd.

Run: python -m pytest -q (README, "Tests").
"""

import numpy as np
import pytest
import torch
from scipy import stats

import zinb
from zinb import zinb_nll

COUNTS = [0, 1, 2, 3, 7, 10, 100, 1000, 10_000]


MEANS = [1e-5, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6]


THETAS = [1e-4, 1e-2, 1.0, 100.0, 1e4]


PIS = [0.0, 0.1, 0.5, 0.999]


def _grid(dtype):
    """Every combination of COUNTS x MEANS x THETAS x PIS as four flat tensors."""
    mesh = np.meshgrid(COUNTS, MEANS, THETAS, PIS, indexing="ij")
    return [torch.tensor(a.ravel(), dtype=dtype) for a in mesh]


def _scipy_zinb_logpmf(x, mu, theta, pi):
    """log ZINB from scipy's NB pmf (n = theta, p = theta / (theta + mu)) and the mixture."""
    log_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    with np.errstate(divide="ignore"):
        log_pi = np.log(pi)
    return np.where(x == 0, np.logaddexp(log_pi, np.log1p(-pi) + log_nb), np.log1p(-pi) + log_nb)


def test_zinb_matches_scipy_over_the_parameter_grid():
    x, mu, theta, pi = _grid(torch.float64)
    ours = -zinb_nll(x, mu, theta, pi, reduction="none").numpy()
    reference = _scipy_zinb_logpmf(*(a.numpy() for a in (x, mu, theta, pi)))
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=0)


def test_zinb_pi_zero_is_the_negative_binomial():
    x, mu, theta = (torch.tensor(a, dtype=torch.float64) for a in ([0, 4, 30], [2.0, 3.0, 25.0],
                                                                      [0.5, 10.0, 2.0]))
    ours = -zinb_nll(x, mu, theta, torch.zeros(3, dtype=torch.float64), reduction="none")
    p = (theta / (theta + mu)).numpy()
    np.testing.assert_allclose(ours.numpy(), stats.nbinom.logpmf(x.numpy(), theta.numpy(), p),
                               rtol=1e-12)


@pytest.mark.parametrize("mu, theta, pi", [(0.5, 0.1, 0.3), (5.0, 2.0, 0.0), (50.0, 0.5, 0.9),
                                           (1e3, 100.0, 0.2), (1e-3, 1e-4, 0.5)])
def test_zinb_sums_to_one_over_the_support(mu, theta, pi):
    counts = torch.arange(0, 20_001, dtype=torch.float64)
    log_p = -zinb_nll(counts, torch.tensor(mu, dtype=torch.float64), theta, pi, reduction="none")
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-10


def test_zinb_float32_extremes_are_finite_with_finite_gradients():
    x, mu, theta, pi = _grid(torch.float32)
    params = [a.clone().requires_grad_() for a in (mu, theta, pi)]
    nll = zinb_nll(x, *params, reduction="none")
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    # float32 keeps the value to a few spacings of lgamma(x + theta) ~ 1e5 (0.008 each), where
    # x or theta is 1e4 and the lgamma terms cancel
    reference = zinb_nll(*(a.double() for a in (x, mu, theta, pi)), reduction="none")
    np.testing.assert_allclose(nll.detach().numpy(), reference.numpy(), rtol=1e-3, atol=0.05)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zinb_gradcheck_float64(reduction):
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[0, 0, 1, 5], [3, 0, 0, 40], [0, 2, 9, 0]], dtype=torch.float64)
    mu = torch.exp(torch.randn(3, 4, generator=gen, dtype=torch.float64)) * 3
    theta = torch.exp(torch.randn(1, 4, generator=gen, dtype=torch.float64))   # per gene
    pi = torch.sigmoid(torch.randn(3, 1, generator=gen, dtype=torch.float64))  # per cell
    inputs = [a.requires_grad_() for a in (mu, theta, pi)]
    assert torch.autograd.gradcheck(lambda m, t, p: zinb_nll(x, m, t, p, reduction=reduction),
                                    inputs)


def test_zinb_gradient_matches_autograd_over_the_parameter_grid():
    # the hand-written gradient against autograd through the plain formula (pi > 0: the plain
    # formula's log(pi) has no usable gradient at pi = 0)
    grid = _grid(torch.float64)
    x, mu, theta, pi = (a[grid[3] > 0] for a in grid)
    ours = [a.clone().requires_grad_() for a in (mu, theta, pi)]
    zinb_nll(x, *ours, reduction="sum").backward()
    plain = [a.clone().requires_grad_() for a in (mu, theta, pi)]
    m, t, p = plain
    log_r = -t * torch.log1p(m / t)
    log_nb = (torch.lgamma(x + t) - torch.lgamma(t) - torch.lgamma(x + 1) + log_r
              + x * (torch.log(m) - torch.log(t + m)))
    log_p = torch.where(x == 0, torch.logaddexp(torch.log(p), torch.log1p(-p) + log_r),
                        torch.log1p(-p) + log_nb)
    (-log_p.sum()).backward()
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-6, atol=1e-10)


def test_zinb_gradient_at_pi_zero_is_the_one_sided_derivative():
    # d/dpi log(pi + (1 - pi) r) at pi = 0 is (1 - r) / r; compare with a forward difference
    x, mu, theta = (torch.tensor([v], dtype=torch.float64) for v in (0.0, 2.0, 1.5))
    pi = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zinb_nll(x, mu, theta, pi, reduction="sum").backward()
    h = 1e-7
    forward_difference = (zinb_nll(x, mu, theta, pi.detach() + h, reduction="sum")
                          - zinb_nll(x, mu, theta, pi.detach(), reduction="sum")) / h
    np.testing.assert_allclose(pi.grad.item(), forward_difference.item(), rtol=1e-5)
    r = (theta / (theta + mu)) ** theta
    np.testing.assert_allclose(-pi.grad.item(), ((1 - r) / r).item(), rtol=1e-10)


def test_zinb_reductions_are_consistent():
    gen = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((6, 5), 2.0), generator=gen)
    mu, theta, pi = torch.rand(6, 5, generator=gen) * 4 + 0.1, torch.ones(5) * 2.0, 0.2
    per_entry = zinb_nll(x, mu, theta, pi, reduction="none")
    assert per_entry.shape == (6, 5)
    torch.testing.assert_close(zinb_nll(x, mu, theta, pi, reduction="sum"), per_entry.sum())
    torch.testing.assert_close(zinb_nll(x, mu, theta, pi), per_entry.mean())
    with torch.no_grad():
        torch.testing.assert_close(zinb_nll(x, mu.requires_grad_(), theta, pi), per_entry.mean())
    with pytest.raises(ValueError):
        zinb_nll(x, mu, theta, pi, reduction="max")


def test_zinb_precomputed_lgamma_and_blocks_give_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.poisson(torch.rand(7, 9, generator=gen) * 5, generator=gen)
    params = (torch.rand(7, 9, generator=gen) * 5 + 0.1, torch.rand(9, generator=gen) + 0.5,
              torch.rand(7, 1, generator=gen) * 0.5)

    def value_and_grads(**kwargs):
        leaves = [a.clone().requires_grad_() for a in params]
        loss = zinb_nll(x, *leaves, reduction="sum", **kwargs)
        loss.backward()
        return [loss] + [a.grad for a in leaves]

    default = value_and_grads()
    for a, b in zip(value_and_grads(lgamma_x1=torch.lgamma(x + 1)), default):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(zinb, "_BLOCK", 5)      # many blocks, boundaries inside rows
    for a, b in zip(value_and_grads(), default):
        torch.testing.assert_close(a, b)


def test_zinb_broadcast_gradient_matches_the_expanded_one():
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.full((4, 3), 3.0), generator=gen).double()
    mu = torch.rand(4, 3, generator=gen, dtype=torch.float64) * 5 + 0.1
    theta_gene = torch.rand(1, 3, generator=gen, dtype=torch.float64).requires_grad_()
    theta_full = theta_gene.detach().expand(4, 3).clone().requires_grad_()
    zinb_nll(x, mu, theta_gene, 0.1).backward()
    zinb_nll(x, mu, theta_full, 0.1).backward()
    assert theta_gene.grad.shape == (1, 3)
    torch.testing.assert_close(theta_gene.grad, theta_full.grad.sum(0, keepdim=True))


def test_zinb_mean_floored_at_eps_stays_finite():
    mu = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)     # an exp head that underflowed
    theta = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)  # a softplus head that underflowed
    nll = zinb_nll(torch.tensor([0.0, 3.0, 2.0]), mu, theta, 0.1, reduction="none")
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(theta.grad).all()
    assert mu.grad[:2].eq(0).all() and theta.grad[2] == 0      # the floor is flat


def test_zinb_float32_at_deep_counts_matches_scipy_and_the_closed_form_gradient():
    """Counts of 1e4 to 1e9 per entry (deep sequencing, UMI counts x 50,000) in float32: the
    value against scipy's float64 NB, d/dlog(mu) against its closed form theta (mu - x) /
    (theta + mu) in float64. Both are O(1)-O(20) while the lgamma terms are ~ x log x ~ 2e9."""
    rng = np.random.default_rng(0)
    mu, theta = (a.ravel() for a in np.meshgrid([1e4, 1e6, 1e8], [0.5, 4.0, 50.0]))
    mu, theta = np.repeat(mu, 50), np.repeat(theta, 50)
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32).astype(np.float64)
    log_mu = torch.tensor(np.log(mu), dtype=torch.float32, requires_grad=True)
    nll = zinb_nll(torch.tensor(x, dtype=torch.float32), log_mu.exp(),
                   torch.tensor(theta, dtype=torch.float32), 0.0, reduction="none")
    nll.sum().backward()
    mu32 = log_mu.detach().exp().double().numpy()       # the mean float32 actually holds
    reference = -stats.nbinom.logpmf(x, theta, theta / (theta + mu32))
    np.testing.assert_allclose(nll.detach().numpy(), reference, rtol=0, atol=0.02)
    np.testing.assert_allclose(log_mu.grad.numpy(), theta * (mu32 - x) / (theta + mu32),
                               rtol=0, atol=1e-3)
