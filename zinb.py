"""ZINB negative log-likelihood of raw counts, the feature loss L_X of scTCM (Eq. 3).

The zero-inflated negative binomial with zero-inflation probability pi, mean mu and inverse
dispersion theta (variance mu + mu^2 / theta):

    r = (theta / (theta + mu))^theta                      (the NB probability of a zero)
    P(x = 0)     = pi + (1 - pi) r
    P(x = c > 0) = (1 - pi) Gamma(c + theta) / (Gamma(theta) Gamma(c + 1))
                   r (mu / (theta + mu))^c

Everything is computed in log space with two identities that stay accurate whether
mu << theta or mu >> theta:

    log r                     = -theta log1p(mu / theta)
    log(mu / (theta + mu))    = log(mu / theta) - log1p(mu / theta)

How it is computed: the loss and its gradient (written out in _nll) are evaluated
together, block by block, in a custom autograd Function. Plain autograd would keep a dozen
full-size intermediates and run lgamma and digamma on every entry; here the x = 0 formulas run
on all entries and lgamma/digamma only on the nonzero counts, for about a third of the CPU
time on single-cell-like data. The hand-written gradient also never forms 0 * inf at pi = 0
or pi = 1. The tests check the value against scipy.stats.nbinom and the gradient against
finite differences (torch.autograd.gradcheck).

References
- Mrabah, Amar, Bouguessa, Diallo. Toward convex manifolds: a geometric perspective for deep
  graph clustering of single-cell RNA-seq data. IJCAI 2023 (Eq. 3).
- Eraslan, Simon, Mircea, Mueller, Theis. Single-cell RNA-seq denoising using a deep count
  autoencoder. Nat. Commun. 10, 390 (2019) (DCA: the ZINB head and its parametrisation).
"""
import functools
import math

import numpy as np
import torch

# Counts above this take the lgamma terms of the pmf in float64 (_lgamma_terms).
_FLOAT64_ABOVE = 2 ** 14

# Entries per block: few blocks keep the per-operation overhead small (each parallel torch
# operation synchronises the threads, which is slow when other processes compete for the
# cores), while the block's temporaries are reused instead of allocated at full size.
_BLOCK = 1 << 22


def zinb_nll(x, mu, theta, pi, eps=1e-8, reduction="mean", lgamma_x1=None):
    """Negative log-likelihood of counts x under ZINB(pi, mu, theta), Eq. (3) of the paper.

    The paper's symbols for cell i: pi_i (dropout probability) is `pi`, mu_i (mean) is `mu`,
    sigma^2_i is the dispersion head, here `theta` (inverse dispersion, as in DCA). The size
    factor s_i multiplies the decoded mean before the call: mu = s_i * exp(W_mu h).

    x: raw counts (non-negative, integer valued); mu > 0, theta > 0, 0 <= pi <= 1 (pi < 1
    where x > 0). All are tensors that broadcast to one shape (n cells, g genes) or anything
    else; x is cast to the floating dtype of mu. pi = 0 exactly is fine: the value is the
    plain NB one and the gradient is finite.
    eps: floor applied to mu and theta (with zero gradient below it). It only matters when a
    head underflows to 0 (exp or softplus in float32), where mu / theta or its log would be
    infinite and the loss inf or nan; the supported range (mu >= 1e-5, theta >= 1e-4) is far
    above it.
    reduction: "none" (one value per entry, the broadcast shape), "sum" or "mean".
    lgamma_x1: optional precomputed lgamma(x + 1), broadcastable like x; it depends on the
    counts only, so a training loop can compute it once.

    The gradient with respect to pi, (1 - r) / P(x = 0) at a zero, is capped at the largest
    finite float: it is e^46000 at pi = 0, mu = 1e6, theta = 1e4."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', not {reduction!r}")
    mu = torch.as_tensor(mu)
    if not mu.is_floating_point():
        mu = mu.to(torch.get_default_dtype())
    x, theta, pi = (torch.as_tensor(a, dtype=mu.dtype, device=mu.device) for a in (x, theta, pi))
    if lgamma_x1 is not None:
        lgamma_x1 = torch.as_tensor(lgamma_x1, dtype=mu.dtype, device=mu.device)
    shape = torch.broadcast_shapes(x.shape, mu.shape, theta.shape, pi.shape)
    want_grad = torch.is_grad_enabled() and any(a.requires_grad for a in (mu, theta, pi))
    nll = _ZINBNLL.apply(x, mu, theta, pi, lgamma_x1, eps, shape, reduction == "none", want_grad)
    if reduction == "mean":
        return nll / math.prod(shape)
    return nll


class _ZINBNLL(torch.autograd.Function):
    """-log P(x), summed or per entry, computed block by block. The gradient is computed in the
    same pass, where it shares every intermediate, and kept for backward."""

    @staticmethod
    def forward(ctx, x, mu, theta, pi, lgamma_x1, eps, shape, per_entry, want_grad):
        flat = _flatten(x, mu, theta, pi, lgamma_x1, shape=shape)
        n = flat[0].numel()
        new = functools.partial(torch.empty, n, dtype=mu.dtype, device=mu.device)
        out = new() if per_entry else None
        grads = [new(), new(), new()] if want_grad else []
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        for lo, hi, pos in _blocks(flat[0]):
            x_b, mu_b, theta_b, pi_b, lg_b = (a if a is None else a[lo:hi] for a in flat)
            nll, derivs = _nll(x_b, mu_b.clamp_min(eps), theta_b.clamp_min(eps), pi_b, lg_b,
                               pos=pos, grad=want_grad)
            if per_entry:
                out[lo:hi] = nll
            else:
                total += nll.sum(dtype=torch.float64)
            for g, d in zip(grads, derivs):
                g[lo:hi] = d
        for g, a in zip(grads, flat[1:3]):
            if a.min() < eps:       # the floor at eps is flat: no gradient below it
                g.masked_fill_(a < eps, 0)
        ctx.grads, ctx.shapes = grads, (shape, mu.shape, theta.shape, pi.shape)
        return out.view(shape) if per_entry else total.to(mu.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        shape, *input_shapes = ctx.shapes
        d_mu, d_theta, d_pi = ((g.view(shape) * grad_out).sum_to_size(s) if need else None
                               for g, s, need in zip(ctx.grads, input_shapes,
                                                     ctx.needs_input_grad[1:4]))
        return None, d_mu, d_theta, d_pi, None, None, None, None, None


def _flatten(*arrays, shape):
    """Each array (None allowed) broadcast to `shape` and viewed as 1-d (copied only when a
    broadcast dimension makes a view impossible)."""
    return [a if a is None else a.expand(shape).reshape(-1) for a in arrays]


def _blocks(x):
    """(lo, hi, positions of the nonzero counts within x[lo:hi]) for consecutive blocks of the
    1-d counts x. numpy finds nonzeros several times faster than torch on the CPU."""
    if x.device.type == "cpu":
        nonzero = torch.from_numpy(np.flatnonzero((x != 0).numpy()))
    else:
        nonzero = torch.nonzero(x).squeeze(1)
    edges = list(range(0, x.numel(), _BLOCK)) + [x.numel()]
    cuts = torch.searchsorted(nonzero, torch.tensor(edges, device=x.device)).tolist()
    return [(lo, hi, nonzero[a:b] - lo)
            for lo, hi, a, b in zip(edges, edges[1:], cuts, cuts[1:])]


def _nll(x, mu, theta, pi, lgamma_x1=None, *, pos, grad):
    """-log P(x) under ZINB(pi, mu, theta) for 1-d blocks and, if `grad`, its partial
    derivatives in (mu, theta, pi); pos: the positions of the nonzero counts.

    x = 0:  -log P = -log(pi + (1 - pi) r), a log-sum-exp, exact at pi = 0 where log pi = -inf.
            With w = (1 - pi) r / P(0), the posterior probability that the zero is an NB zero,
            d/dmu = w theta/(theta + mu),   d/dtheta = w (log1p(mu/theta) - mu/(theta + mu)),
            d/dpi = -(1 - r) / P(0), capped at the largest finite float.
    x > 0:  -log P = -log(1 - pi) - log r - lgamma(x + theta) + lgamma(theta) + lgamma(x + 1)
                     + x log1p(theta/mu),
            d/dmu = (theta + x)/(theta + mu) - x/mu = (mu - x)/mu theta/(theta + mu),
            d/dpi = 1/(1 - pi),
            d/dtheta = digamma(theta) - digamma(x + theta) + log1p(mu/theta)
                       + (x - mu)/(theta + mu).
    The x = 0 formulas are evaluated on the whole block, then the entries with x > 0 (the
    minority in single-cell data, and the only ones that need lgamma and digamma) are
    overwritten. In-place operations keep the number of block-size temporaries small.
    The x > 0 terms are written without cancellation between terms of size x (x log1p(theta/mu),
    not x (log(mu/theta) - log1p(mu/theta)); (mu - x)/mu, not a difference of two ratios near
    1): in float32 those differences lose about 1e-7 x per entry, which at x = 1e8 put the
    value off by hundreds and d/dlog(mu) by tens, where the true values are about 20 and 2."""
    q = mu / theta
    log1p_q = torch.log1p(q)                              # log((theta + mu) / theta)
    log_r = torch.mul(theta, log1p_q).neg_()              # log P_NB(0)
    log_pi = torch.log(pi)
    log_nb_zero = torch.log1p(-pi).add_(log_r)            # log((1 - pi) r)
    nll = torch.logaddexp(log_pi, log_nb_zero).neg_()
    c, m, th, p, lq_c, lr_c = (
        a.index_select(0, pos) for a in (x, mu, theta, pi, log1p_q, log_r))
    lg_c1 = torch.lgamma(c + 1) if lgamma_x1 is None else lgamma_x1.index_select(0, pos)
    nll_c = (_lgamma_terms(c, th, lg_c1) - torch.log1p(-p) - lr_c
             + c * torch.log1p(th / m))
    if not grad:
        return nll.index_copy_(0, pos, nll_c), ()
    w = torch.sigmoid(log_nb_zero.sub_(log_pi))           # (1 - pi) r / P(0)
    theta_frac = (1 + q).reciprocal_()                    # theta / (theta + mu)
    d_mu = w * theta_frac
    mu_frac = q.mul_(theta_frac)                          # mu / (theta + mu)
    d_theta = (log1p_q - mu_frac).mul_(w)
    inv_p0 = torch.exp(nll).clamp_max_(torch.finfo(mu.dtype).max)   # 1 / P(0), capped
    d_pi = torch.expm1(log_r).mul_(inv_p0)
    th_m = th + m
    d_mu.index_copy_(0, pos, (m - c).div_(m).mul_(th / th_m))
    d_theta.index_copy_(0, pos, torch.digamma(th) - torch.digamma(c + th) + lq_c
                        + (c - m) / th_m)
    d_pi.index_copy_(0, pos, 1 / (1 - p))
    return nll.index_copy_(0, pos, nll_c), (d_mu, d_theta, d_pi)


def _lgamma_terms(c, theta, lgamma_c1):
    """lgamma(c + 1) - lgamma(c + theta) + lgamma(theta), the NB coefficient of counts c > 0.
    The first two terms are about c log c and cancel: float32 keeps their difference to about
    1e-7 c log c (0.01 at c = 1e4, hundreds at c = 1e8), so counts above _FLOAT64_ABOVE (none
    in UMI data) take the three terms in float64."""
    out = lgamma_c1 - torch.lgamma(c + theta) + torch.lgamma(theta)
    if out.dtype == torch.float64 or not (c > _FLOAT64_ABOVE).any():
        return out
    big = torch.nonzero(c > _FLOAT64_ABOVE).squeeze(1)
    c, theta = c[big].double(), theta[big].double()
    exact = torch.lgamma(c + 1) - torch.lgamma(c + theta) + torch.lgamma(theta)
    return out.index_copy_(0, big, exact.to(out.dtype))
