"""scTCM: deep graph clustering of scRNA-seq data toward convex manifolds.

The method of Mrabah et al. (IJCAI 2023), Eqs. (1)-(13) and Sec. 3.2, in the paper's order:
a GCN encoder (Eq. 1), a two-head decoder (structure, Eq. 2; ZINB features, Eq. 3),
self-supervised pretraining (Eq. 4), then a clustering phase that alternates a clustering
loss (Eqs. 5-7), an overclustering loss (Eqs. 8-10) and an adversarial loss on decoded
convex combinations of latent codes (Eqs. 11-13), stopped when the mean intrinsic
dimension of the clusters reaches their linear intrinsic dimension (Fig. 2). The standard
algorithms it starts from and is judged by (k-means, spectral clustering, the merge start,
the scores) are in clustering.py, the pictures in plots.py, preprocessing in datasets.py,
reading files and writing the output folder in formats.py.

    python sctcm.py --demo
    python sctcm.py data.h5 --clusters 9 --out results --plot
    result = sctcm.cluster(counts, 9)   # in Python: raw counts, cells x genes

References
- Mrabah, Amar, Bouguessa, Diallo. Toward convex manifolds: a geometric perspective for deep
  graph clustering of single-cell RNA-seq data. IJCAI 2023.
- Kipf & Welling. Semi-supervised classification with GCNs (ICLR 2017); Variational graph
  auto-encoders (NeurIPS workshop 2016).
"""
import argparse
import copy
import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import formats
import geometry
import plots
from clustering import (agreement_groups, ari, centroid_ari, check_partition, cluster_evidence,
                        kept, kmeans, kmeans_restarts, lowest_inertia, merge_overclusters,
                        modularity, most_central, nearest_mean, pairwise_ari, scores,
                        spectral_clustering, stability, symmetric_normalize)
from zinb import zinb_nll


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Interval:
    """The numbers from low to high; `ends` says which ends belong ("[)": low does, high not)."""
    low: float
    high: float = math.inf
    ends: str = "[)"

    def __contains__(self, value):
        if isinstance(value, str) or not np.isfinite(value):
            return False
        above = value >= self.low if self.ends[0] == "[" else value > self.low
        return above and (value < self.high if self.ends[1] == ")" else value <= self.high)

    def __str__(self):
        low, high = (f"{int(v)}" if float(v).is_integer() else f"{v}"
                     for v in (self.low, self.high))
        if self.high == math.inf:
            return f"{'>=' if self.ends[0] == '[' else '>'} {low}"
        return f"in {self.ends[0]}{low}, {high}{self.ends[1]}"


@dataclass(frozen=True)
class OneOf:
    """One of a few words; N in a word stands for any whole number ("cuda:N")."""
    words: tuple

    def __contains__(self, value):
        return any(re.fullmatch(word.replace("N", r"\d+"), str(value)) for word in self.words)

    def __str__(self):
        return "one of " + ", ".join(f'"{word}"' for word in self.words)


@dataclass(frozen=True)
class Each:
    """A tuple of numbers, each in `numbers`."""
    numbers: Interval

    def __contains__(self, values):
        return all(value in self.numbers for value in values)

    def __str__(self):
        return f"each {self.numbers}"


@dataclass(frozen=True)
class OrAuto:
    """The word "auto" or a number in `numbers`."""
    numbers: Interval

    def __contains__(self, value):
        return value == "auto" or value in self.numbers

    def __str__(self):
        return f'{self.numbers} or "auto"'


def setting(default, help, accepts=None, group="model"):
    """A Config field: its default, the help of its flag, the values check_config accepts (None:
    a switch) and its group in -h ("data", "model" or "run")."""
    return field(default=default, metadata={"help": help, "accepts": accepts, "group": group})


POSITIVE, COUNT, WEIGHT, SHARE = Interval(0, ends="()"), Interval(1), Interval(0), Interval(0, 1)


@dataclass
class Config:
    """Every hyperparameter of a run; one set of defaults for all datasets. Each field states its
    default, the help of its flag and the values it accepts, which check_config enforces."""
    n_top_genes: int = setting(1500, "highly variable genes kept by preprocessing", COUNT, "data")
    n_neighbors: int = setting(15, "k of the kNN cell graph A", COUNT, "data")
    n_pcs: int = setting(50, "principal components the kNN graph is built on", COUNT, "data")
    hidden: int = setting(128, "width of the hidden GCN layer, Eq. (1)", COUNT)
    latent: int = setting(15, "d, dimension of the latent codes Z", COUNT)
    decoder: tuple = setting((128, 256), "widths of the feature head f_D^(2), Eq. (3)",
                             Each(COUNT))
    disc_hidden: int = setting(64, "width of each discriminator's hidden layer, Eq. (12)", COUNT)
    dropout: float = setting(0.2, "dropout on the encoder input", SHARE)
    w_x: float = setting(1.0, "weight of L_X in L_SS, Eq. (4)", WEIGHT)
    w_a: float = setting(0.3, "weight of L_A in L_SS, Eq. (4)", WEIGHT)
    pretrain_epochs: int = setting(100, "T1, epochs of phase 1", COUNT)
    lr_pretrain: float = setting(1e-3, "Adam learning rate of phase 1", POSITIVE)
    lr_cluster: float = setting(5e-4, "Adam learning rate of the (over)clustering steps",
                                POSITIVE)
    lr_adv: float = setting(1e-4, "Adam learning rate of the generator and discriminators",
                            POSITIVE)
    gamma_c: float = setting(1.5, "weight of L_c in step 1 of phase 2, Sec. 3.2", WEIGHT)
    gamma_o: float = setting(0.5, "weight of L_o in step 2 of phase 2, Sec. 3.2", WEIGHT)
    gamma_g: float = setting(1.0, "weight of L_g in step 3 of phase 2, Sec. 3.2", WEIGHT)
    n_over: int = setting(30, "n_o, number of overclusters, Eqs. (8)-(10)", Interval(2))
    init: str = setting("consistent", "phi^c, the start of phase 2 (README: Where we differ)",
                        OneOf(("consistent", "merge", "consensus", "spectral", "kmeans")))
    resolution: float = setting(0.5, "modularity resolution of the merges on A", POSITIVE)
    beta_c: str = setting("auto", "Eq. (6) margin threshold", OrAuto(SHARE))
    beta_o: str = setting("auto", "Eq. (9) margin threshold", OrAuto(SHARE))
    reliable_frac: float = setting(0.15, '"auto": share of cells reliable when phase 2 starts',
                                   Interval(0, 1, "(]"))
    reliable_rule: str = setting("per-cluster", '"auto" thresholds: one per (over)cluster so '
                                 'that each starts with reliable_frac of its cells reliable, or '
                                 'one quantile of every cell\'s margin (global)',
                                 OneOf(("per-cluster", "global")))
    update_every: int = setting(10, "epochs between recomputations of the targets q", COUNT)
    m_cvx: int = setting(3, "m, cells per convex combination, Eq. (11)", Interval(2))
    n_cvx: int = setting(64, "convex combinations per cluster and step, Eq. (11)", COUNT)
    min_epochs: int = setting(30, "phase 2 runs at least this long before the ID = LID stop",
                              Interval(0))
    max_epochs: int = setting(100, "phase 2 stops here if ID never reaches LID", COUNT)
    eval_every: int = setting(10, "epochs between ID/LID evaluations and log lines", COUNT,
                              "run")
    block: int = setting(1024, "rows of the n x n logits of Eq. (2) alive at a time", COUNT,
                         "run")
    losses: str = setting("auto", "exact or sampled losses (auto: sampled above batch_size "
                          "cells)", OneOf(("exact", "sampled", "auto")), "run")
    batch_size: int = setting(2048, "cells per epoch in Eqs. (3), (7), (10), sampled losses",
                              COUNT, "run")
    adversarial: bool = setting(True, "Eqs. (11)-(13); off is the \"no adversarial\" ablation")
    adversary: str = setting("genes", "what the discriminators of Eq. (12) read: decoded gene "
                             "profiles (Eq. 11) or the latent codes (the text's f_adv: R^d -> "
                             "[0, 1])", OneOf(("genes", "latent")))
    overclustering: bool = setting(True, "Eqs. (8)-(10); off is the \"no overclustering\" "
                                   "ablation")
    seed: int = setting(0, "seeds numpy and torch once, at the start of fit",
                        Interval(0, 2 ** 32), "run")
    device: str = setting("cpu", "torch device", OneOf(("cpu", "cuda", "cuda:N")), "run")


def config_help():
    """Config field -> the help of its flag, ending with the values it accepts."""
    return {f.name: f.metadata["help"] + (f" ({f.metadata['accepts']})"
                                          if f.metadata["accepts"] is not None else "")
            for f in dataclasses.fields(Config)}


def check_config(config):
    """Raise a one-line ValueError for a setting outside the values its field accepts (a beta_c
    of 1.5 would leave phase 2 idle) or a CUDA device this machine does not have."""
    for f in dataclasses.fields(Config):
        value, accepts = getattr(config, f.name), f.metadata["accepts"]
        if accepts is not None and value not in accepts:
            raise ValueError(f"--{f.name.replace('_', '-')} must be {accepts}, got {value}")
    gpus = torch.cuda.device_count()
    if config.device != "cpu" and int(config.device[5:] or 0) >= gpus:
        where = f"this machine has {gpus} CUDA devices" if gpus else "CUDA is not available here"
        raise ValueError(f"--device {config.device}: {where}")


@dataclass
class Result:
    """What fit returns: final labels (argmax of Eq. 5), codes Z, one history row per log, and
    the evidence a user without labels can judge the partition by."""
    labels: np.ndarray
    embedding: np.ndarray
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # scores, start, clusters, warnings, ...
    pretrained: np.ndarray | None = None  # the codes Z at the end of phase 1
    start: np.ndarray | None = None       # the partition whose mean codes started phi^c
    centres: np.ndarray | None = None     # phi^c at the end, (K, d): Eq. (5) from embedding
    confidence: np.ndarray | None = None  # p of Eq. (5) for each cell's cluster
    margin: np.ndarray | None = None      # top-1 minus top-2 of p, what Eq. (6) thresholds
    reliable: np.ndarray | None = None    # margin >= beta_c at the end: the final Omega_c
    reliable_start: np.ndarray | None = None  # Omega_c of the first targets (the start's codes)
    stability: np.ndarray | None = None   # with several seeds: share of runs that agree
    baseline: np.ndarray | None = None    # k-means on the principal components (fit_seeds)
    every_k: dict | None = None           # K -> labels of a phase 2 at every K (fit_ks)


# ---------------------------------------------------------------- Eq. (1): the GCN encoder

def normalized_adjacency(a):
    """D^-1/2 (A + I) D^-1/2 of Eq. (1), D = diag((A + I) 1), as a sparse CSR torch tensor.

    a: (n, n) scipy sparse 0/1 adjacency without self loops."""
    csr = symmetric_normalize(a + sp.identity(a.shape[0], format="csr")).tocsr()
    csr.sort_indices()
    with warnings.catch_warnings():  # torch calls its CSR support "beta"; the product is tested
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(torch.as_tensor(csr.indptr, dtype=torch.long),
                                       torch.as_tensor(csr.indices, dtype=torch.long),
                                       torch.as_tensor(csr.data, dtype=torch.float32), csr.shape,
                                       check_invariants=True)


class Propagate(torch.autograd.Function):
    """A_n H for the symmetric normalised adjacency A_n of Eq. (1); the gradient A_n^T G is
    A_n G, so both directions are one CSR product (torch's own sparse backward forms the
    transpose, about twice the time of the product itself)."""

    @staticmethod
    def forward(ctx, a_norm, h):
        ctx.a_norm = a_norm
        return a_norm @ h

    @staticmethod
    def backward(ctx, grad_output):
        return None, ctx.a_norm @ grad_output


class Encoder(nn.Module):
    """f_E: two GCN layers of Eq. (1), ReLU on the hidden one, linear output (as in the GAE)."""

    def __init__(self, n_genes, hidden, latent, dropout):
        super().__init__()
        self.w1, self.w2 = nn.Linear(n_genes, hidden), nn.Linear(hidden, latent)
        self.dropout = dropout

    def forward(self, x, a_norm):
        """x: (n, g) scaled log expression; a_norm: sparse (n, n) -> Z (n, d)."""
        x = F.dropout(x, self.dropout, self.training)
        h = torch.relu(Propagate.apply(a_norm, self.w1(x)))
        return Propagate.apply(a_norm, self.w2(h))


# ---------------------------------------------------------------- Eq. (2): the structure head

class _AllPairsSoftplus(torch.autograd.Function):
    """sum_ij softplus(z_i . z_j) and its exact gradient, one block of rows at a time.

    The gradient is 2 sigmoid(Z Z^T) Z (the logits matrix is symmetric); it is computed in the
    forward pass, so no block of the n x n matrix outlives its loop iteration."""

    @staticmethod
    def forward(ctx, z, block):
        total, grad = z.new_zeros(()), torch.empty_like(z)
        for start in range(0, z.shape[0], block):
            logits = z[start:start + block] @ z.T
            total += F.softplus(logits).sum()
            grad[start:start + block] = 2 * torch.sigmoid(logits) @ z
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


def structure_loss(z, edges, block=1024, pairs=None):
    """L_A, Eq. (2): weighted binary cross-entropy between A and sigmoid(Z Z^T), from logits.

    Positives are weighted as in the GAE reference: pos_weight = (n^2 - |E|) / |E| and the mean
    over all n^2 pairs times norm = n^2 / (2 (n^2 - |E|)). Written as
    sum_ij softplus(l_ij) + sum_(i,j) in E [pos_weight softplus(-l_ij) - softplus(l_ij)]
    (the BCE of a pair is softplus(l) for a = 0 and softplus(-l) for a = 1), exact over all
    pairs. With `pairs`, M cell pairs (i, j) drawn uniformly from all n^2 (negative sampling,
    as in LINE or GraphSAGE), the first sum is estimated by n^2 / M sum_m softplus(l_(i_m j_m)):
    the edge terms stay exact, the estimate is unbiased and costs O(|E| + M), not O(n^2).
    z: (n, d); edges: (2, |E|) long tensor listing both directions of every edge of A;
    pairs: optional (2, M) long tensor of uniformly drawn cells."""
    n, n_edges = z.shape[0], edges.shape[1]
    pos_weight = (n * n - n_edges) / n_edges
    norm = n * n / (2 * (n * n - n_edges))
    logits = _pair_logits(z, edges)
    edge_terms = pos_weight * F.softplus(-logits) - F.softplus(logits)
    if pairs is None:
        all_pairs = _AllPairsSoftplus.apply(z, block)
    else:
        all_pairs = F.softplus(_pair_logits(z, pairs)).sum() * (n * n / pairs.shape[1])
    return norm * (all_pairs + edge_terms.sum()) / (n * n)


def _pair_logits(z, pairs):
    """z_i . z_j for each column (i, j) of pairs, (2, M) -> (M,)."""
    # index_select, not z[pairs[0]]: its backward (index_add) sums repeated rows in a fixed order,
    # while advanced indexing's backward accumulates in thread order and varies between runs.
    return (z.index_select(0, pairs[0]) * z.index_select(0, pairs[1])).sum(1)


# ---------------------------------------------------------------- Eqs. (3)-(4): features, L_SS

class FeatureHead(nn.Module):
    """f_D^(2) of Eq. (3): an MLP from z to the ZINB parameters of every gene.

    Returns pi (dropout probability), rate (the mean before the size factor: mu = s_i * rate)
    and theta (inverse dispersion, the paper's sigma^2 head), in DCA's ranges. log_mean: (g,)
    the function log_mean's; log(rate) = W_mu h + b is a GLM on h whose intercept b starts at
    it, the rate without z, so the codes carry only deviations from it at any sequencing depth
    (from rate 1, 100 Adam steps cannot move b to log(depth / g): the codes grew instead). DCA's
    ceiling of 1e6 on the rate becomes 1e6 times the gene's mean."""

    def __init__(self, latent, widths, n_genes, log_mean=None):
        super().__init__()
        sizes = (latent, *widths)
        self.mlp = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:])
                                   for m in (nn.Linear(a, b), nn.ReLU())])
        self.pi, self.mu, self.theta = (nn.Linear(sizes[-1], n_genes) for _ in range(3))
        log_cap = torch.full((n_genes,), np.log(1e6))
        if log_mean is not None:
            with torch.no_grad():
                self.mu.bias.copy_(log_mean)
            log_cap += log_mean.cpu()
        self.register_buffer("log_cap", log_cap)

    def forward(self, z):
        h = self.mlp(z)
        rate = torch.exp(torch.minimum(self.mu(h), self.log_cap))
        theta = F.softplus(self.theta(h)).clamp(1e-4, 1e4)
        return torch.sigmoid(self.pi(h)), rate, theta


class Model(nn.Module):
    """The generator f_D^(2) o f_E, the paper's parameters W (Eq. 2's structure head has none)."""

    def __init__(self, n_genes, config, log_mean=None):
        super().__init__()
        self.encoder = Encoder(n_genes, config.hidden, config.latent, config.dropout)
        self.features = FeatureHead(config.latent, config.decoder, n_genes, log_mean)


@dataclass
class Batch:
    """The cells and cell pairs one epoch's losses are computed on: every cell and all n^2 pairs
    (None, the exact path), or a random batch of cells (Eqs. 3, 7, 10) and uniform cell pairs
    (Eq. 2) on the sampled path (see Sampler)."""
    cells: torch.Tensor | None = None   # (batch_size,) cell indices, or None: every cell
    pairs: torch.Tensor | None = None   # (2, M) cells drawn uniformly, or None: all n^2 pairs

    def rows(self, t):
        """The rows of t (n, ...) that belong to the batch: t itself on the exact path."""
        return t if self.cells is None else t.index_select(0, self.cells)


@dataclass
class Pass:
    """One forward pass: codes z of every cell (the GCN of Eq. 1 is exact), the decoded rate of
    the batch's cells, L_X (Eq. 3) and L_A (Eq. 2) on the batch."""
    z: torch.Tensor
    rate: torch.Tensor
    l_x: torch.Tensor
    l_a: torch.Tensor
    batch: Batch


def self_supervision(model, data, batch, block=1024):
    """The forward pass of L_SS (Eq. 4) on a batch (Batch(): every cell and pair) -> Pass.
    data: the tensors of `tensors`; block: rows of the n x n logits of Eq. (2) at a time."""
    z = model.encoder(data["x"], data["a_norm"])
    rate, l_x = feature_loss(model, data, z, batch)
    return Pass(z, rate, l_x, structure_loss(z, data["edges"], block, batch.pairs), batch)


def feature_loss(model, data, z, batch):
    """The decoded rate of the batch's cells and their L_X (Eq. 3, per entry), mu = s_i rate."""
    pi, rate, theta = model.features(batch.rows(z))
    l_x = zinb_nll(batch.rows(data["counts"]), rate * batch.rows(data["size_factors"]), theta,
                   pi, lgamma_x1=batch.rows(data["lgamma_x1"]))
    return rate, l_x


# ---------------------------------------------------------------- Eqs. (5)-(10): (over)clustering

def soft_assign(z, centers):
    """Student-t soft assignments p_ij, Eq. (5) (and Eq. (8) with overcluster centres).

    z: (n, d) latent codes z_i; centers: (K, d) centres phi_j -> (n, K), rows sum to 1."""
    kernel = 1.0 / (1.0 + torch.cdist(z, centers) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def target_distribution(p, beta):
    """Target assignments q and reliable set Omega, Eqs. (6) and (9).

    A cell is reliable when its top-1 minus top-2 assignment reaches beta (a number, or one per
    cluster: a (K,) tensor read at the cell's argmax); its target is then the one-hot of its
    argmax, otherwise q_i = p_i. p: (n, K) -> q (n, K), reliable (n,) bool."""
    top2, argmax = p.topk(2, dim=1).values, p.argmax(1)
    threshold = beta[argmax] if torch.is_tensor(beta) else beta
    reliable = top2[:, 0] - top2[:, 1] >= threshold
    onehot = F.one_hot(argmax, p.shape[1]).to(p.dtype)
    return torch.where(reliable[:, None], onehot, p), reliable


def auto_threshold(p, reliable_frac, per_cluster=False):
    """beta such that the `reliable_frac` most confident cells of p are reliable (Eqs. 6, 9):
    one number, or with per_cluster one per cluster (K,), each the quantile of the margins of
    the cells whose argmax is that cluster (a cluster without cells takes the global one).

    Scale-free replacement for a fixed threshold: with the Eq. (2) loss the latent codes are
    small, Student-t margins stay far below the authors' 0.75-0.92, and a fixed threshold leaves
    the reliable set empty. One global quantile gathers the reliable cells in the clusters that
    are easiest to tell apart; per cluster, every cluster starts with reliable cells, as Eqs.
    (6) and (12) presume. Computed once when phase 2 starts, then held fixed."""
    top2 = p.topk(2, dim=1).values
    margins = top2[:, 0] - top2[:, 1]
    overall = torch.quantile(margins, 1 - reliable_frac).item()
    if not per_cluster:
        return overall
    argmax = p.argmax(1)
    return torch.tensor([torch.quantile(margins[argmax == k], 1 - reliable_frac).item()
                         if (argmax == k).any() else overall for k in range(p.shape[1])],
                        device=p.device)


def kl_divergence(q, p, reduction="mean"):
    """KL(q || p) = sum_i sum_j q_ij log(q_ij / p_ij), Eqs. (7) and (10), with 0 log 0 = 0.

    The argument order is the paper's (target first); the authors' code computes KL(p || q).
    reduction="sum" is Eq. (7) as written; "mean" divides by n so that gamma_c weighs it
    against the per-entry mean L_SS."""
    kl = (torch.xlogy(q, q) - q * torch.log(p)).sum()
    return kl if reduction == "sum" else kl / p.shape[0]


# ---------------------------------------------------------------- Eqs. (11)-(13): adversarial

def draw_combinations(members, m, n_cvx, rng):
    """Which codes each convex combination of Eq. (11) mixes, and with what weights: for every
    cluster with at least m members, n_cvx draws of m distinct members and theta ~ Dirichlet(1),
    uniform on the simplex. members: one index array per cluster (its reliable cells).
    -> (active (k',) the clusters drawn from, picks (k', n_cvx, m), theta (k', n_cvx, m)),
    or None when no cluster has m members."""
    active = [k for k, idx in enumerate(members) if len(idx) >= m]
    if not active:
        return None
    picks = np.stack([[rng.choice(members[k], m, replace=False) for _ in range(n_cvx)]
                      for k in active])
    return np.array(active), picks, rng.dirichlet(np.ones(m), size=(len(active), n_cvx))


def convex_combinations(z, picks, theta):
    """The latent points of Eq. (11), sum_i theta_i f_E(x_i), one per row of picks.

    z: (n, d) codes; picks, theta: (k', n_cvx, m) cells and weights (draw_combinations)
    -> (k', n_cvx, d)."""
    theta = torch.as_tensor(theta, dtype=z.dtype, device=z.device)
    rows = z.index_select(0, torch.as_tensor(picks.ravel(), device=z.device))  # see structure_loss
    return (theta[..., None] * rows.view(*picks.shape, -1)).sum(2)


class Discriminators(nn.Module):
    """f_adv^(k), k = 1..K of Eq. (12): one MLP per cluster, gene space -> logit. The K networks
    have separate weights, stacked so that all of them run in one batched matmul. The input is
    log1p(rate), the decoded expression without the size factor (so that library size cannot
    tell a cell from a convex combination), standardised per gene by `standardise`."""

    def __init__(self, n_clusters, n_genes, hidden):
        super().__init__()
        def uniform(*shape, fan_in):
            return nn.Parameter(torch.empty(*shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))
        self.w1 = uniform(n_clusters, n_genes, hidden, fan_in=n_genes)
        self.b1 = uniform(n_clusters, 1, hidden, fan_in=n_genes)
        self.w2 = uniform(n_clusters, hidden, 1, fan_in=hidden)
        self.b2 = uniform(n_clusters, 1, 1, fan_in=hidden)

    def forward(self, x, which):
        """x: (k', N, g) samples for the discriminators `which` (k',) -> logits (k', N)."""
        h = torch.relu(torch.bmm(x, self.w1[which]) + self.b1[which])
        return (torch.bmm(h, self.w2[which]) + self.b2[which]).squeeze(-1)


def standardise(real, fake, eps=1e-2):
    """Discriminator inputs scaled per gene by the mean and sd of each discriminator's real batch.

    Uncentred log1p expression (most genes near 0, a few near 5) leaves the MLPs of Eq. (12)
    badly conditioned: they stay at chance for hundreds of Adam steps even when the two sets
    differ in every gene. The statistics are constants (no gradient flows into them), so the
    generator cannot move the real batch to fool the discriminator; eps floors the sd of genes
    that hardly vary. real, fake: (k', N, g) -> the same shapes."""
    mean = real.detach().mean(1, keepdim=True)
    sd = real.detach().std(1, keepdim=True) + eps
    return (real - mean) / sd, (fake - mean) / sd


def discriminator_loss(real_logits, fake_logits, reduction="sum"):
    """L_d = sum_k L_d^(k), Eq. (12): real = reconstructions, fake = decoded convex combinations.

    Eq. (12) as printed, E[log(1 - D(x_hat))] + E[log D(x_cvx)], is the value function; taken
    literally its minimum is -infinity. We minimise the cross-entropy with the same labels,
    -E[log D(x_hat)] - E[log(1 - D(x_cvx))], through logits: log D = -softplus(-l),
    log(1 - D) = -softplus(l). Logits: (k', N), one row per discriminator; reduction="none"
    returns L_d^(k) per discriminator (2 log 2 each at chance)."""
    per = F.softplus(-real_logits).mean(1) + F.softplus(fake_logits).mean(1)
    return per if reduction == "none" else per.sum()


def generator_loss(fake_logits):
    """L_g = sum_k E[log(1 - D_k(x_cvx))], Eq. (13), minimised by encoder and feature head."""
    return (-F.softplus(fake_logits)).mean(1).sum()


@dataclass
class Samples:
    """What the discriminators of one phase-2 step compare (Eqs. 11-12), for each cluster k of
    `active`: n_cvx decoded convex combinations (fake) of the codes of cvx_picks[k] with weights
    theta[k], and n_cvx reconstructions (real) of the reliable cells real_picks[k], both
    standardised by the real batch (standardise)."""
    active: torch.Tensor    # (k',) the clusters with at least m reliable cells
    cvx_picks: np.ndarray   # (k', n_cvx, m) the cells of each convex combination
    theta: np.ndarray       # (k', n_cvx, m) their weights, Dirichlet(1)
    real_picks: np.ndarray  # (k', n_cvx) the cells whose reconstructions are the real samples
    real: torch.Tensor      # (k', n_cvx, g)
    fake: torch.Tensor      # (k', n_cvx, g)


class Adversary:
    """Eqs. (11)-(13) in a run: the K discriminators, their Adam optimiser and what they compare,
    reconstructions of reliable cells (real) and decoded convex combinations of their codes
    (fake), n_cvx of each per cluster with at least m reliable cells."""

    def __init__(self, model, n_clusters, n_genes, config, rng):
        self.model, self.config, self.rng = model, config, rng
        width = config.latent if config.adversary == "latent" else n_genes
        self.disc = Discriminators(n_clusters, width, config.disc_hidden).to(config.device)
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=config.lr_adv)

    def inputs(self, out, members):
        """The Samples of one step, or None when no cluster has m reliable cells.
        out: the epoch's Pass; members: the reliable cells of each cluster (C_k intersected
        with Omega_c)."""
        config, features, device = self.config, self.model.features, out.z.device
        drawn = draw_combinations(members, config.m_cvx, config.n_cvx, self.rng)
        if drawn is None:
            return None
        active, cvx_picks, theta = drawn
        fake = convex_combinations(out.z, cvx_picks, theta)
        real_picks = np.stack([self.rng.choice(members[k], config.n_cvx) for k in active])
        real = out.z[torch.as_tensor(real_picks, device=device)]
        if config.adversary == "genes":  # both decoded by the feature head as it is now
            fake, real = torch.log1p(features(fake)[1]), torch.log1p(features(real)[1])
        return Samples(torch.as_tensor(active, device=device), cvx_picks, theta, real_picks,
                       *standardise(real, fake))

    def generator_loss(self, samples):
        """L_g of Eq. (13) on the fake samples of a step."""
        return generator_loss(self.disc(samples.fake, samples.active))

    def step(self, samples):
        """One update of the K discriminators (Eq. 12) on samples built without gradient (so it
        cannot reach the encoder or feature head) -> L_d^(k) of each discriminator of
        samples.active, (k',), as they were before the update."""
        real = self.disc(samples.real, samples.active)
        per = discriminator_loss(real, self.disc(samples.fake, samples.active), reduction="none")
        optimise(self.optimizer, per.sum())
        return per.detach()


def discriminator_fields(per, active, n_clusters):
    """A history row's fields of the discriminators: "L_d" (their sum), "L_d_chance" (its value at
    chance, 2 log 2 each), "L_d<k>" per discriminator k with inputs, and "idle": the clusters
    (space-separated) with fewer than m reliable cells, so no discriminator update.
    per: (k',) L_d^(k) of the clusters `active`, or None when none had inputs."""
    active = [] if per is None else active.tolist()
    idle = {"idle": " ".join(str(k) for k in range(n_clusters) if k not in active)}
    if per is None:
        return idle
    return {"L_d": per.sum().item(), "L_d_chance": 2 * np.log(2) * len(per),
            **{f"L_d{k}": v for k, v in zip(active, per.tolist())}, **idle}


# ---------------------------------------------------------------- training helpers

def tensors(prepared, adjacency, device):
    """What every epoch reads, as tensors on the device: encoder input x, counts, lgamma(counts
    + 1) (computed once), size factors, A_n of Eq. (1) and the edges of A (both directions)."""
    coo = sp.coo_matrix(adjacency)
    counts = torch.as_tensor(prepared.counts, dtype=torch.float32, device=device)
    return {
        "x": torch.as_tensor(prepared.x, dtype=torch.float32, device=device),
        "counts": counts,
        "lgamma_x1": torch.lgamma(counts + 1),
        "size_factors": torch.as_tensor(prepared.size_factors, dtype=torch.float32,
                                        device=device)[:, None],
        "a_norm": normalized_adjacency(adjacency).to(device),
        "edges": torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long, device=device),
    }


def log_mean(data):
    """log(mean_i x_ig / s_i), (g,): the log rate of each gene without z, the intercept of the
    mean head (FeatureHead). Floored at the mean of one count in 1e6 cells, so that a gene
    without counts gets a finite intercept."""
    counts, inverse_s = data["counts"], 1 / data["size_factors"][:, 0]
    return torch.log((inverse_s @ counts / len(counts)).clamp_min(1e-6))  # no (n, g) temporary


class Sampler:
    """The Batch of each epoch (Config.losses: "sampled", or "auto" above batch_size cells).
    Sampled path: batch_size cells without replacement (the cells of Eqs. 3, 7, 10) and, for
    every cell i, |E| / n partners j drawn uniformly (the pairs of Eq. 2: as many as edges, each
    cell equally often a first end, which keeps the estimate unbiased and lowers its variance).
    Exact path: Batch(), every cell and every pair."""

    def __init__(self, n, n_edges, config, device):
        self.n, self.size = n, config.batch_size
        self.sampled = config.losses == "sampled" or (config.losses == "auto" and n > self.size)
        if self.sampled:
            self.generator = torch.Generator(device).manual_seed(config.seed)
            self.first = torch.arange(n, device=device).repeat_interleave(max(1, n_edges // n))

    def __call__(self):
        if not self.sampled:
            return Batch()
        g, first = self.generator, self.first
        cells = torch.randperm(self.n, generator=g, device=first.device)[:self.size]
        partners = torch.randint(self.n, first.shape, generator=g, device=first.device)
        return Batch(cells, torch.stack([first, partners]))


def setup(prepared, adjacency, config):
    """What fit and reproduce.benchmark start from: torch seeded, tensors, Sampler, a new Model."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    data = tensors(prepared, adjacency, device)
    sampler = Sampler(len(prepared.x), data["edges"].shape[1], config, device)
    return data, sampler, Model(prepared.x.shape[1], config, log_mean(data)).to(device)


def optimise(optimizer, loss):
    """One step of an optimiser on a loss."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def codes(model, data):
    """Z without dropout, for targets, geometry and the final labels."""
    model.eval()
    z = model.encoder(data["x"], data["a_norm"])
    model.train()
    return _check_finite(z)


def _check_finite(z):
    """z, or a one-line FloatingPointError (the command line exits 2) when training diverged.
    Every use of the codes goes through codes(), and a non-finite loss makes them non-finite."""
    if not torch.isfinite(z).all():
        raise FloatingPointError("training diverged (the latent codes became infinite or NaN); "
                                 "lower the learning rates")
    return z


def _threshold(value, p, config):
    """A numeric beta as given, or the scale-free "auto" rule of auto_threshold."""
    if value != "auto":
        return float(value)
    return auto_threshold(p, config.reliable_frac, config.reliable_rule == "per-cluster")


def initial_partition(prepared, adjacency, n_clusters, config, restarts, z):
    """The partition whose mean codes become phi^c: the paper's spectral clustering of A
    (init="spectral"), or, not in the paper (README), each restart's K_o overclusters of Z
    (restarts: clustering.kmeans_restarts on z) merged on A and the merge its mean codes keep
    best (init="consistent", kept), or the groups all merges agree on merged again
    (init="consensus"), or the lowest-inertia restart merged (init="merge"); k-means on n_pcs
    principal components of x (init="kmeans")."""
    if config.init == "spectral":
        return spectral_clustering(adjacency, n_clusters, seed=config.seed)
    if config.init == "kmeans":
        return kmeans(datasets.pca(prepared.x, config.n_pcs), n_clusters, seed=config.seed)[0]
    if config.init == "merge":
        return merge_overclusters(adjacency, lowest_inertia(restarts)[1], n_clusters,
                                  config.resolution)
    merged = [merge_overclusters(adjacency, over, n_clusters, config.resolution)
              for _, over, _ in restarts]
    if config.init == "consistent":
        return max(merged, key=lambda partition: kept(z, partition))
    return merge_overclusters(adjacency, agreement_groups(merged), n_clusters, config.resolution)


@dataclass
class Phase2:
    """Phase 2's state: what fit updates at each of its events and shows its `watch` hook after
    each, so that tests and a class can look inside a run. The events: "start" (phi^c, phi^o and
    the thresholds set), "targets" (q and Omega recomputed, Eqs. 6 and 9), "c", "o", "g" (one
    optimiser step on L_SS + gamma L_c, L_o or L_g done: each parameter's .grad holds that
    loss's gradient) and "d" (the discriminators' update of Eq. 12 done)."""
    model: Model
    adversary: Adversary
    pretrained: np.ndarray  # Z at the end of phase 1
    start: np.ndarray       # the partition whose mean codes became phi^c
    phi: dict               # "c": phi^c (K, d), "o": phi^o (n_o, d), trainable
    beta: dict              # "c": beta_c, "o": beta_o, the thresholds of Eqs. (6) and (9)
    epoch: int = 0
    q: dict = field(default_factory=dict)         # "c", "o": the targets of every cell
    reliable: dict = field(default_factory=dict)  # "c", "o": Omega_c, Omega_o, (n,) bool
    members: list = field(default_factory=list)   # C_k intersected with Omega_c, for each k
    batch: Batch | None = None       # the cells and pairs of the epoch's step
    out: Pass | None = None          # the epoch's forward pass
    loss: torch.Tensor | None = None  # the step's own term (L_c, L_o, L_g or L_d), before it
    samples: Samples | None = None    # the discriminators' inputs of a "g" or "d" step


@torch.no_grad()
def update_targets(state, z):
    """Eqs. (5)-(6) and (8)-(9) on the codes z of every cell: the targets q and reliable sets
    Omega of the clusters and of the overclusters, and C_k intersected with Omega_c."""
    for key in ("c", "o"):
        p = soft_assign(z, state.phi[key])
        state.q[key], state.reliable[key] = target_distribution(p, state.beta[key])
        if key == "c":
            keep, pred = state.reliable["c"].cpu().numpy(), p.argmax(1).cpu().numpy()
            state.members = [np.flatnonzero(keep & (pred == k)) for k in range(p.shape[1])]


def clustering_loss(state, key):
    """L_c (Eq. 7, key "c") or L_o (Eq. 10, key "o") on the step's batch: KL(q || p) between the
    targets and the soft assignments of the same cells."""
    batch, z = state.batch, state.out.z
    return kl_divergence(batch.rows(state.q[key]), soft_assign(batch.rows(z), state.phi[key]))


def self_supervised_loss(out, config):
    """L_SS of Eq. (4), weighted: w_x L_X + w_a L_A."""
    return config.w_x * out.l_x + config.w_a * out.l_a


def id_reaches_lid(row, epoch, config):
    """Phase 2's stop (Sec. 3.2, Fig. 2): the clusters' mean intrinsic dimension has reached
    their mean linear intrinsic dimension, once phase 2 has run min_epochs."""
    return epoch >= config.min_epochs and row["ID"] >= row["LID"]


LOG_KEYS = {  # history key -> its part of a log line, in the line's order
    "start": "start ({start}, its mean codes keep {kept:.1%} of it)",
    "beta_c": "beta_c {beta_c:.4f}",
    "beta_c_range": "(per cluster {beta_c_range})",
    "beta_o": "beta_o {beta_o:.4f}",
    "beta_o_range": "(per overcluster {beta_o_range})",
    "L_X": "L_X {L_X:.4f}",
    "L_A": "L_A {L_A:.4f}",
    "L_c": "L_c {L_c:.4f}",
    "L_o": "L_o {L_o:.4f}",
    "L_g": "L_g {L_g:.4f}",
    "L_d": "L_d {L_d:.4f} (chance {L_d_chance:.4f})",
    "idle": "fewer than m reliable cells in cluster {idle} (too small a cluster, or its cells "
            "fell below beta since phase 2 began): no pull, no L_d",
    "reliable_c": "reliable {reliable_c}/{n}",
    "reliable_k": "by cluster {reliable_k}",
    "ID": "ID {ID:.2f}",
    "LID": "LID {LID:.2f}",
    "kmeans_ari": "ARI(kmeans Z) {kmeans_ari:.3f}",
    "acc": "ACC {acc:.3f}",
    "nmi": "NMI {nmi:.3f}",
    "ari": "ARI {ari:.3f}",
    "centroid_ari": "ARI(true centres Z) {centroid_ari:.3f}",
}


def _beta_fields(key, beta):
    """A history row's threshold fields: beta_<key> (the number; per cluster, their mean) and,
    per cluster, beta_<key>_range (the lowest and highest)."""
    if not torch.is_tensor(beta):
        return {f"beta_{key}": beta}
    return {f"beta_{key}": beta.mean().item(),
            f"beta_{key}_range": f"{beta.min().item():.4f}-{beta.max().item():.4f}"}


class Report:
    """A run's history rows and progress lines, with the diagnostics every row carries: the mean
    per-cluster ID and LID of the codes under a partition (Fig. 2) and, with labels, the scores
    of that partition and ARI(true centres Z) (clustering.centroid_ari). The last value of each
    loss in phase 2 is kept between log lines (losses), with the discriminators' fields of the
    last step (adversary)."""

    def __init__(self, labels, n_clusters, config, log, rows=()):
        self.labels, self.k, self.config, self.log = labels, n_clusters, config, log
        self.rows, self.losses, self.adversary = list(rows), {}, {}

    def phase1(self, epoch, out, z):
        """A phase-1 row: the losses of the epoch's pass out, and k-means on the codes z as the
        partition (ARI(kmeans Z)), since phase 1 has no clusters of its own."""
        partition = kmeans(z.cpu().numpy(), self.k, seed=self.config.seed, n_init=3)[0]
        scored = {} if self.labels is None else {"kmeans_ari": ari(self.labels, partition)}
        head = {"phase": 1, "epoch": epoch, "of": self.config.pretrain_epochs,
                "L_X": out.l_x.item(), "L_A": out.l_a.item()}
        return self._add(head, z, partition, scored)

    def start(self, origin, beta, z, start):
        """Phase 2's epoch 0: the start partition, the share its mean codes keep, beta."""
        head = {"phase": 2, "epoch": 0, "of": self.config.max_epochs, "start": origin}
        for key in ("c", "o"):
            head.update(_beta_fields(key, beta[key]))
        scored = {**scores(self.labels, start), "kept": kept(z.cpu().numpy(), start)}
        return self._add(head, z, start, scored, kmeans_too=True)

    def phase2(self, state, z, pred):
        """A phase-2 row: the losses, the discriminators, the reliable sets, the argmax of
        Eq. (5) as the partition."""
        head = {"phase": 2, "epoch": state.epoch, "of": self.config.max_epochs, **self.losses,
                **self.adversary, "reliable_c": int(state.reliable["c"].sum()),
                "reliable_k": " ".join(str(len(cells)) for cells in state.members),
                "reliable_o": int(state.reliable["o"].sum())}
        return self._add(head, z, pred, scores(self.labels, pred), kmeans_too=True)

    def _add(self, row, z, partition, scored, kmeans_too=False):
        """Add a row: ID and LID under partition and, with kmeans_too (phase 2), also under
        k-means of z, phase 1's partition, so that Fig. 2 can show both rules across the
        boundary (ID_kmeans, LID_kmeans)."""
        z = z.cpu().numpy()
        row["ID"], row["LID"] = geometry.cluster_geometry(z, partition)
        if kmeans_too:
            same_rule = kmeans(z, self.k, seed=self.config.seed, n_init=3)[0]
            row["ID_kmeans"], row["LID_kmeans"] = geometry.cluster_geometry(z, same_rule)
            if self.labels is not None:
                scored = {**scored, "kmeans_ari": ari(self.labels, same_rule)}
        row.update(scored, n=len(z))
        if self.labels is not None:
            row["centroid_ari"] = centroid_ari(self.labels, z)
        self.rows.append(row)
        parts = [f"phase {row['phase']}", f"epoch {row['epoch']:4d}/{row['of']}"]
        self.log(" | ".join(parts + [text.format(**row) for key, text in LOG_KEYS.items()
                                     if row.get(key, "") != ""]))
        return row


def run_warnings(history):
    """One line for each sign in fit's history rows that a run's labels mean little: L_A ended
    phase 1 above log 2, its value at Z = 0 (the codes blew up: Eq. 5's margins mean little), or
    the last targets had no reliable cell (q = p, L_c = 0: phase 2 did not cluster)."""
    lines = []
    phase1 = [row for row in history if row["phase"] == 1]
    phase2 = [row for row in history if row["phase"] == 2]
    if phase1 and phase1[-1]["L_A"] > np.log(2):
        lines.append(f"L_A ended phase 1 at {phase1[-1]['L_A']:.3f}, above log 2 = 0.693 (the "
                     "value of Z = 0): the codes blew up and their clusters may mean little")
    if phase2 and phase2[-1]["reliable_c"] == 0:
        lines.append("no cell was reliable (Eq. 6) at the last target update: q = p, L_c = 0 "
                     "and L_g has no inputs, so phase 2 did not sharpen the clusters")
    return lines


# ---------------------------------------------------------------- Sec. 3.2: the two phases

@dataclass
class Pretrained:
    """What phase 1 leaves for phase 2. Eq. (4) does not know K, so one phase 1 can serve every
    K (choose_k): each phase 2 resumes from a copy of the model with the random generators as
    phase 1 left them, and so gives what a run at that K alone gives."""
    model: Model
    data: dict          # the tensors of `tensors`
    sampler: Sampler
    rows: list          # phase 1's history rows
    random_state: dict  # torch's generator (and the device's, and the sampler's) after phase 1

    def resume(self):
        """A copy of the model after phase 1, with every generator put back as it was then."""
        torch.set_rng_state(self.random_state["torch"])
        if "cuda" in self.random_state:
            torch.cuda.set_rng_state(self.random_state["cuda"], self.model_device)
        if "sampler" in self.random_state:
            self.sampler.generator.set_state(self.random_state["sampler"])
        return copy.deepcopy(self.model)

    @property
    def model_device(self):
        return next(self.model.parameters()).device


def pretrain(prepared, adjacency, config, n_clusters, log=print):
    """Phase 1 (Sec. 3.2): pretrain_epochs steps on L_SS (Eq. 4) -> Pretrained. n_clusters only
    sizes the k-means of Z that the log rows measure ID/LID and ARI(kmeans Z) on."""
    data, sampler, model = setup(prepared, adjacency, config)
    report = Report(prepared.labels, n_clusters, config, log)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_pretrain)
    for epoch in range(1, config.pretrain_epochs + 1):
        out = self_supervision(model, data, sampler(), config.block)
        optimise(optimizer, self_supervised_loss(out, config))
        if epoch % config.eval_every == 0 or epoch == config.pretrain_epochs:
            report.phase1(epoch, out, codes(model, data))
    state = {"torch": torch.get_rng_state()}
    if data["x"].is_cuda:
        state["cuda"] = torch.cuda.get_rng_state(data["x"].device)
    if sampler.sampled:
        state["sampler"] = sampler.generator.get_state()
    return Pretrained(model, data, sampler, report.rows, state)


def fit(prepared, adjacency, n_clusters, config=None, log=print, start=None, watch=None,
        pretrained=None):
    """Train scTCM on a preprocessed dataset: phase 1 (Eq. 4), centres, phase 2 (Sec. 3.2).

    prepared: datasets.Prepared (x = encoder input, counts + size_factors = ZINB target,
    labels used for scoring only); adjacency: (n, n) scipy sparse A; n_clusters: K.
    start: optional (n,) partition into clusters 0..K-1 whose mean codes become phi^c instead
    of config.init's (e.g. the true labels, to see what phase 2 does from the right start).
    Phase 2 alternates the paper's three steps, one step per epoch in turn:
    L_SS + gamma_c L_c, L_SS + gamma_o L_o, L_SS + gamma_g L_g (an ablation drops its step),
    each followed by a discriminator update (Eq. 12). It stops when mean ID >= mean LID
    (after min_epochs) or at max_epochs.
    An epoch is one optimiser step on one Batch (Sampler: every cell and pair, or above
    batch_size cells unbiased estimates from a batch and sampled pairs; the steps do not grow
    with n). Codes, targets, reliable sets and ID/LID are always of every cell.
    watch: optional watch(event, Phase2), called after each event of phase 2 (see Phase2); it
    must not change what it is shown. pretrained: phase 1 already run with this config
    (pretrain), resumed from a copy (the run is then the one phase 1 and K would give).
    Result.history: a row per log line (phase 2's epoch 0: the start). Result.metrics: the
    scores (labels known), the start's, phase2_epochs, warnings (run_warnings' lines, logged)."""
    config = config or Config()
    check_config(config)
    origin = config.init if start is None else "given"
    if start is not None:
        start = check_partition(start, adjacency.shape[0], n_clusters)
    watch = watch or (lambda event, state: None)
    rng = np.random.default_rng(config.seed)

    # --- phase 1: self-supervision (L_SS, Eq. 4)
    if pretrained is None:
        pretrained = pretrain(prepared, adjacency, config, n_clusters, log)
        model = pretrained.model
    else:
        model = pretrained.resume()
    data, sampler = pretrained.data, pretrained.sampler
    report = Report(prepared.labels, n_clusters, config, log, pretrained.rows)

    # --- initial centres: phi^o = k-means on Z, phi^c = mean codes of a partition of the cells
    z = codes(model, data)
    z_phase1 = z.cpu().numpy()
    restarts = kmeans_restarts(z_phase1, config.n_over, seed=config.seed)
    if start is None:
        start = initial_partition(prepared, adjacency, n_clusters, config, restarts, z_phase1)
    phi = {"c": nn.Parameter(torch.stack([z[start == k].mean(0) for k in range(n_clusters)])),
           "o": nn.Parameter(torch.as_tensor(lowest_inertia(restarts)[2], dtype=torch.float32,
                                             device=z.device))}
    adversary = Adversary(model, n_clusters, prepared.x.shape[1], config, rng)
    generator = list(model.parameters())  # f_E and f_D^(2): the encoder and the feature head
    optimizers = {"c": torch.optim.Adam(generator + [phi["c"]], lr=config.lr_cluster),
                  "o": torch.optim.Adam(generator + [phi["o"]], lr=config.lr_cluster),
                  "g": torch.optim.Adam(generator, lr=config.lr_adv)}
    gamma = {"c": config.gamma_c, "o": config.gamma_o, "g": config.gamma_g}
    with torch.no_grad():
        beta = {key: _threshold(getattr(config, f"beta_{key}"), soft_assign(z, phi[key]),
                                config) for key in ("c", "o")}
    start_row = report.start(origin, beta, z, start)
    state = Phase2(model, adversary, z_phase1, start, phi, beta)
    watch("start", state)

    # --- phase 2: alternating steps (Sec. 3.2), one step per epoch in turn
    steps = ["c"] + ["o"] * config.overclustering + ["g"] * config.adversarial
    for epoch in range(1, config.max_epochs + 1):
        state.epoch = epoch
        if (epoch - 1) % config.update_every == 0:
            # q is a target: recomputed here, held fixed in between, Eqs. (6) and (9)
            update_targets(state, codes(model, data))
            if epoch == 1:
                reliable_start = state.reliable["c"].cpu().numpy()
            watch("targets", state)
        state.batch = sampler()
        state.out = out = self_supervision(model, data, state.batch, config.block)
        step = steps[(epoch - 1) % len(steps)]
        if step == "g":  # Eq. (13), for the encoder and feature head only
            state.samples = adversary.inputs(out, state.members)
            state.loss = (adversary.generator_loss(state.samples) if state.samples
                          else out.z.new_zeros(()))
        else:  # Eq. (7) or Eq. (10)
            state.samples, state.loss = None, clustering_loss(state, step)
        optimise(optimizers[step], self_supervised_loss(out, config) + gamma[step] * state.loss)
        report.losses.update({"L_X": out.l_x.item(), "L_A": out.l_a.item(),
                              f"L_{step}": state.loss.item()})
        watch(step, state)
        if config.adversarial:  # Eq. (12), on inputs without gradient
            with torch.no_grad():
                state.samples = adversary.inputs(out, state.members)
            per = adversary.step(state.samples) if state.samples else None
            active = state.samples.active if state.samples else None
            report.adversary = discriminator_fields(per, active, n_clusters)
            if per is not None:
                state.loss = per.sum()
                watch("d", state)

        if epoch % config.eval_every == 0 or epoch == config.max_epochs:
            z = codes(model, data)
            row = report.phase2(state, z, soft_assign(z, phi["c"]).argmax(1).cpu().numpy())
            if id_reaches_lid(row, epoch, config):
                log(f"phase 2 | stop at epoch {epoch}: mean ID {row['ID']:.2f} >= "
                    f"mean LID {row['LID']:.2f}")
                break

    # --- final labels: argmax of Eq. (5), and how sure each cell and cluster is of it
    z = codes(model, data)
    with torch.no_grad():
        p = soft_assign(z, phi["c"])
        top2 = p.topk(2, dim=1).values.cpu().numpy()
        reliable = target_distribution(p, beta["c"])[1].cpu().numpy()
    labels, embedding = p.argmax(1).cpu().numpy(), z.cpu().numpy()
    centres = phi["c"].detach().cpu().numpy()
    clusters, crowded = cluster_evidence(embedding, labels, centres, top2[:, 0], reliable,
                                         config.m_cvx)
    thresholds = torch.as_tensor(beta["c"]).cpu().expand(n_clusters).tolist()
    for row, threshold in zip(clusters, thresholds):
        row["beta_c"] = threshold  # what a cell's margin must reach (Eq. 6) to be reliable
    alerts = run_warnings(report.rows) + crowded
    for line in alerts:
        log(f"warning: {line}")
    start_scores = {key: start_row[key] for key in ("acc", "nmi", "ari", "kept")
                    if key in start_row}
    metrics = {**scores(prepared.labels, labels), "start": start_scores, "phase2_epochs": epoch,
               "clusters": clusters, "warnings": alerts}
    return Result(labels=labels, embedding=embedding, history=report.rows, metrics=metrics,
                  pretrained=z_phase1, start=start, centres=centres, confidence=top2[:, 0],
                  margin=top2[:, 0] - top2[:, 1], reliable=reliable,
                  reliable_start=reliable_start)


def k_criteria(z, adjacency, restarts, k, config):
    """Label-free measures of K (README, "Choosing K") on the codes z after phase 1 and the
    k-means restarts of its n_o overclusters -> (start at K, {criterion: value}):
    merge_modularity, the modularity at the merges' resolution of the lowest-inertia restart
    merged down to K (the objective the merge climbs: it peaks where merging further would
    join groups the graph A keeps apart, and where a greedy modularity merge stops by
    itself); agreement, the mean pairwise ARI of the ten restarts' merges (how reproducible a
    partition into K is); kept, the share of cells whose nearest cluster mean is their own in
    the start (how well K centres, what Eq. 5 holds, describe it)."""
    merged = [merge_overclusters(adjacency, over, k, config.resolution)
              for _, over, _ in restarts]
    path = merge_overclusters(adjacency, lowest_inertia(restarts)[1], k, config.resolution)
    start = max(merged, key=lambda partition: kept(z, partition))
    table = pairwise_ari(merged)
    return start, {"merge_modularity": modularity(adjacency, path, config.resolution),
                   "agreement": float(table[~np.eye(len(merged), dtype=bool)].mean()),
                   "kept": kept(z, start)}


def recommend_k(rows):
    """The recommended K of choose_k's rows: where the merge's own objective peaks
    (merge_modularity; the smaller K on a tie)."""
    return max(rows, key=lambda row: (row["merge_modularity"], -row["k"]))["k"]


def choose_k(prepared, adjacency, ks, config, log=print):
    """One phase 1 for every K of ks, then at each K the start (the consistent merge) and the
    label-free criteria of k_criteria, and the recommended K (recommend_k) -> (rows,
    recommended, pretrained): one row per K, with the start's scores when cells are labelled."""
    pretrained = pretrain(prepared, adjacency, config, ks[0], log)
    z = codes(pretrained.model, pretrained.data).cpu().numpy()
    restarts = kmeans_restarts(z, config.n_over, seed=config.seed)
    rows = []
    for k in ks:
        start, criteria = k_criteria(z, adjacency, restarts, k, config)
        rows.append({"k": k, **criteria, **scores(prepared.labels, start)})
        log(f"K {k:3d} | " + " | ".join(f"{key} {value:.4f}" for key, value in rows[-1].items()
                                       if key != "k"))
    recommended = recommend_k(rows)
    edge = " (at the edge of the range: a wider range may peak elsewhere)" if recommended in (
        ks[0], ks[-1]) and len(ks) > 2 else ""
    log(f"recommended K = {recommended}: the merge's modularity peaks there{edge}")
    return rows, recommended, pretrained


def most_agreed(runs, first_seed, log=print):
    """Of the Results of seeds first_seed, first_seed + 1, ..., the one that agrees best with
    the others (clustering.most_central: a real run, not a new partition), with each cell's
    stability (the share of the runs that put it in its cluster) and metrics["seed_agreement"]
    (the runs' pairwise ARI: mean, min, and the seed chosen)."""
    partitions = [run.labels for run in runs]
    index = most_central(partitions)
    chosen = runs[index]
    between = pairwise_ari(partitions)[~np.eye(len(runs), dtype=bool)]
    chosen.stability = stability(partitions, chosen.labels)
    chosen.metrics["seed_agreement"] = {
        "seeds": [first_seed + i for i in range(len(runs))], "chosen": first_seed + index,
        "mean_ari": float(between.mean()), "min_ari": float(between.min())}
    log(f"seeds agree: pairwise ARI mean {between.mean():.3f}, min {between.min():.3f}; kept "
        f"seed {first_seed + index}, the run that agrees best with the others")
    return chosen


def fit_seeds(prepared, adjacency, n_clusters, config, seeds=1, log=print, pretrained=None):
    """fit with `seeds` seeds (config.seed, config.seed + 1, ...) -> the Result of the run that
    agrees best with the others, with its stability and seed_agreement (most_agreed). Every
    result also carries the baseline: k-means on the n_pcs principal components of the same
    preprocessed matrix (Result.baseline; metrics["baseline"]: its ARI to scTCM's partition
    and, with labels, its scores). pretrained: phase 1 of the first seed, already run."""
    if seeds > 1:
        log(f"{seeds} runs (seeds {config.seed}-{config.seed + seeds - 1}): about {seeds} times "
            "the time of one")
    runs = []
    for i in range(seeds):
        if seeds > 1:
            log(f"seed {config.seed + i} ({i + 1} of {seeds})")
        runs.append(fit(prepared, adjacency, n_clusters,
                        dataclasses.replace(config, seed=config.seed + i), log=log,
                        pretrained=pretrained if i == 0 else None))
    chosen = most_agreed(runs, config.seed, log) if seeds > 1 else runs[0]
    chosen.baseline = kmeans(datasets.pca(prepared.x, config.n_pcs), n_clusters,
                             seed=config.seed)[0]
    agreement = ari(chosen.baseline, chosen.labels)
    chosen.metrics["baseline"] = {"ari_to_sctcm": agreement,
                                  **scores(prepared.labels, chosen.baseline)}
    scored = "".join(f" | {key.upper()} {value:.3f}" for key, value in
                     scores(prepared.labels, chosen.baseline).items())
    log(f"baseline: k-means on {config.n_pcs} principal components, ARI to scTCM's partition "
        f"{agreement:.3f}{scored}")
    return chosen


def fit_ks(prepared, adjacency, ks, config, seeds=1, every_k=False, log=print):
    """fit_seeds at the one K of ks, or for several: choose_k's one phase 1, its criteria and
    recommended K, then fit_seeds at that K from the same phase 1 (metrics: k_selection, one
    row per K, and recommended_k), and with every_k the labels of a phase 2 at each K from that
    phase 1 too (Result.every_k)."""
    if len(ks) == 1:
        return fit_seeds(prepared, adjacency, ks[0], config, seeds, log)
    log(f"choosing K among {ks[0]}-{ks[-1]}: one phase 1, then the start at each of {len(ks)} "
        f"K (a few seconds each), then phase 2 at the recommended K"
        + (" and at every K" if every_k else ""))
    rows, k, pretrained = choose_k(prepared, adjacency, ks, config, log)
    result = fit_seeds(prepared, adjacency, k, config, seeds, log, pretrained)
    result.metrics.update(k_selection=rows, recommended_k=k)
    if every_k:
        result.every_k = {other: fit(prepared, adjacency, other, config, log=log,
                                     pretrained=pretrained).labels for other in ks}
    return result


# ---------------------------------------------------------------- one call: counts in, labels out

def cluster(counts, n_clusters, labels=None, log=print, seeds=1, every_k=False, **config):
    """Cluster raw counts in one call: preprocess, kNN graph A and fit, as the command line runs
    them (the same seed gives the command line's labels on the same counts).

    counts: (n, g) raw counts, cells x genes, numpy or scipy sparse (AnnData: adata.layers["counts"]
    or adata.raw.X where X is normalised); n_clusters: K, or several (range(5, 16), [6, 8, 10]):
    one phase 1, the recommended K and phase 2 there (fit_ks; every_k: at each K too); labels:
    optional (n,), for scoring only (missing: -1, NaN, "", "NA"); seeds: runs with seeds seed,
    seed + 1, ... (fit_seeds: the run that agrees best with the others, and each cell's
    stability); config: Config fields as keywords (seed=1, ...); log: where the progress lines
    go (log=lambda line: None silences them). -> Result whose per-cell arrays (labels,
    embedding, pretrained, start, confidence, margin, reliable, stability, baseline, every_k)
    line up with the rows of counts: -1 (labels, start, baseline), NaN or False for a cell
    preprocessing dropped (it had no counts).
    Bad input raises the command line's one-line ValueError; a divergent run FloatingPointError."""
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}: not a field of sctcm.Config")
    config = Config(**config)
    ks = [n_clusters] if np.ndim(n_clusters) == 0 else list(n_clusters)
    _check_settings(ks, config)
    _check_seeds(seeds)
    dataset = datasets.from_counts(counts, labels)
    prepared, adjacency = prepare(dataset, ks, config)
    datasets.describe(prepared, adjacency, ks[0] if len(ks) == 1 else f"{ks[0]}-{ks[-1]}", log)
    result = fit_ks(prepared, adjacency, ks, config, seeds, every_k, log)
    return aligned_result(result, prepared.cells, dataset.counts.shape[0])


PER_CELL = ("labels", "embedding", "pretrained", "start", "confidence", "margin", "reliable",
            "reliable_start", "stability", "baseline")  # the Result fields with a row per cell


def aligned_result(result, cells, n):
    """result with its per-cell arrays (PER_CELL), of the cells kept (rows `cells` of the
    input), as n rows of the input (aligned)."""
    fields = {name: aligned(getattr(result, name), cells, n) for name in PER_CELL
              if getattr(result, name) is not None}
    if result.every_k is not None:
        fields["every_k"] = {k: aligned(labels, cells, n) for k, labels in result.every_k.items()}
    return dataclasses.replace(result, **fields)


def aligned(values, cells, n):
    """values of the cells kept (rows `cells` of the input) as n rows of the input: a cell
    preprocessing dropped gets -1 (whole numbers), NaN (real numbers) or False."""
    values = np.asarray(values)
    fill = {"i": -1, "b": False}.get(values.dtype.kind, np.nan)
    rows = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    rows[cells] = values
    return rows


def _check_seeds(seeds):
    """--seeds / seeds= must be a whole number of runs, at least 1."""
    if not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ValueError(f"--seeds must be a whole number of runs, at least 1, got {seeds!r}")


def _check_settings(ks, config):
    """The checks of K (a list: one K, or several to choose from) and the settings that need no
    data, before any work (main and cluster)."""
    check_config(config)
    if ks is None:
        return
    if not ks:
        raise ValueError("--clusters names no K (a range such as 5-3 is empty)")
    for k in ks:
        if not isinstance(k, (int, np.integer)):
            raise ValueError(f"--clusters must be a whole number, got {k!r}")
        if k < 2:
            raise ValueError(f"--clusters must be at least 2, got {k}")


def prepare(dataset, ks, config):
    """Preprocess, check K (the largest of ks) and n_o against the cells that remain, build the
    kNN graph A (main and cluster) -> (prepared, adjacency)."""
    k = int(np.max(ks))
    prepared = datasets.preprocess(dataset, n_top_genes=config.n_top_genes)
    if max(k, config.n_over) > prepared.x.shape[0]:
        raise ValueError(f"--clusters {k} or --n-over {config.n_over} is more than the "
                         f"{prepared.x.shape[0]} cells")
    if config.init in ("consistent", "merge", "consensus") and k > config.n_over:
        raise ValueError(f"--init {config.init} merges the {config.n_over} overclusters: "
                         f"--clusters {k} needs --n-over at least as large")
    adjacency = datasets.knn_graph(prepared.x, k=config.n_neighbors, n_pcs=config.n_pcs)
    return prepared, adjacency


# ---------------------------------------------------------------- command line

def _clusters(text):
    """--clusters: K, a range 5-15 (both ends in) or a list 6,8,10 -> the K in increasing order."""
    try:
        if "-" in text.strip("-"):
            low, high = text.split("-", 1)
            return list(range(int(low), int(high) + 1))
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"give K (a whole number), a range such as 5-15 or a "
                                         f"list such as 6,8,10, not {text!r}") from None


def _beta(text):
    """A threshold flag: "auto" or a number."""
    return text if text == "auto" else float(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Usage errors as one line and exit code 2, like every other bad input."""
        self.exit(2, f"sctcm: error: {message}\n")


EXAMPLES = """examples:
  python sctcm.py --demo
  python sctcm.py data.h5 --clusters 9 --out results --plot
  python sctcm.py filtered_feature_bc_matrix.h5 --clusters 12 --labels cell_types.csv"""


def _parser():
    parser = _Parser(description="scTCM deep graph clustering of a scRNA-seq count matrix.",
                     usage="python sctcm.py PATH --clusters K [options], or --demo [options]",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _files(parser.add_argument_group("input and output"))
    groups = {"run": parser.add_argument_group("the run"),
              "data": parser.add_argument_group("preprocessing and the graph A"),
              "model": parser.add_argument_group("the model's hyperparameters, by equation")}
    helps = config_help()
    for f in dataclasses.fields(Config):
        group = groups[f.metadata["group"]]
        group.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                           help=f"{helps[f.name]}; default {f.default}", **_flag_kind(f))
    groups["run"].add_argument("--threads", type=int, help="threads of torch and of numpy's BLAS "
                               "(>= 1); default: theirs, every core (on a busy machine try 1)")
    groups["run"].add_argument("--seeds", type=int, default=1, help="runs, with seeds SEED, SEED "
                               "+ 1, ...: the one that agrees best with the others is written, "
                               "with each cell's stability (>= 1); default 1")
    return parser


def _flag_kind(f):
    """How argparse reads the flag of Config field f: a switch (--x / --no-x), several whole
    numbers, a threshold ("auto" or a number), or one value of the default's type."""
    if isinstance(f.default, bool):
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(f.default, tuple):
        return dict(type=int, nargs="+")
    if isinstance(f.metadata["accepts"], OrAuto):
        return dict(type=_beta)
    return dict(type=type(f.default))


def _files(parser):
    """The flags of what a run reads and writes."""
    parser.add_argument("path", nargs="?", help="count matrix: .h5 (X/Y, exprs, Cell Ranger), "
                        ".h5ad, .loom, 10x folder, CSV/TSV")
    parser.add_argument("--clusters", type=_clusters, help="K, the number of clusters, >= 2 "
                        "(required for a file; labels in the file are used for scoring only); "
                        "or several, 5-15 or 6,8,10: one phase 1, the K the criteria recommend "
                        "(k_selection.csv), phase 2 there")
    parser.add_argument("--every-k", action="store_true", help="with several K: phase 2 at every "
                        "K too, one labels.csv column each (cluster_K)")
    parser.add_argument("--demo", nargs="?", const="easy", choices=list(datasets.DEMOS),
                        help="run on datasets.synthetic(), 1,500 cells of 6 types: easy (the "
                        "default) or hard (noisier: the arcs of each pair touch)")
    parser.add_argument("--out", default="sctcm_output", help="output folder, default "
                        "sctcm_output (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder once the run has finished")
    parser.add_argument("--label-key", help="obs column (.h5ad), col_attrs column (.loom) or "
                        "dataset (X/Y .h5) of the labels; with --labels, the column of that file")
    parser.add_argument("--labels", help="a CSV/TSV[.gz] of (cell name, label), header optional, "
                        "for scoring only: replaces the file's labels, matched by cell name")
    parser.add_argument("--layer", help="where an .h5ad or .loom file keeps its raw counts: a key "
                        "of its layers, or raw (.h5ad raw/X); default X (loom: matrix), else "
                        "layers/counts")
    parser.add_argument("--transpose", action=argparse.BooleanOptionalAction, help="a CSV/TSV "
                        "table or X/Y or exprs matrix lies genes x cells (--no-transpose: cells x "
                        "genes); default: told from labels, names or the counts, and said")
    parser.add_argument("--plot", action="store_true", help="also draw fig2.png, embedding.png "
                        "and losses.png (needs matplotlib, an optional extra)")


def _inputs(args, config):
    """Check the command line, then load, preprocess and build the graph; every bad input raises
    ValueError (one line)."""
    _check_settings(args.clusters, config)
    _check_seeds(args.seeds)
    if bool(args.demo) == bool(args.path):
        raise ValueError("give either a count matrix PATH or --demo")
    for flag, value in (("--label-key", args.label_key), ("--labels", args.labels),
                        ("--layer", args.layer), ("--transpose", args.transpose)):
        if args.demo and value is not None:
            raise ValueError(f"{flag} is about a file's contents; --demo reads no file")
    formats.check_out(Path(args.out), args.overwrite)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot draws with matplotlib, which is not installed (pip install "
                         "matplotlib)")
    if args.every_k and len(args.clusters or ()) < 2:
        raise ValueError("--every-k runs phase 2 at each K of a range: give --clusters 5-15 "
                         "or a list 6,8,10")
    if args.demo:
        dataset = datasets.synthetic(**datasets.DEMOS[args.demo])
        ks = args.clusters or [len(dataset.label_names)]
    else:
        if args.clusters is None:
            raise ValueError("--clusters K is required with a file")
        dataset = formats.load(args.path, label_key=args.label_key, layer=args.layer,
                               transpose=args.transpose, labels=args.labels)
        ks = args.clusters
    prepared, adjacency = prepare(dataset, ks, config)
    return dataset, prepared, adjacency, ks


BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _in_threads(argv, threads):
    """--threads N: numpy's BLAS reads its thread count from the environment only as it loads,
    so the run is made by a child process started with BLAS_THREADS = N (torch reads the first)
    -> its exit code (2 for N < 1); None where this process was started so (torch: N threads)."""
    if threads < 1:
        print(f"sctcm: error: --threads {threads}: give 1 or more", file=sys.stderr)
        return 2
    if any(os.environ.get(name) != str(threads) for name in BLAS_THREADS):
        env = {**os.environ, **dict.fromkeys(BLAS_THREADS, str(threads))}
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv], env=env)
    torch.set_num_threads(threads)


def main(argv=None):
    """The command line: python sctcm.py PATH --clusters K, or python sctcm.py --demo."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.threads is not None and (code := _in_threads(argv, args.threads)) is not None:
        return code
    start = time.time()
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    config.decoder = tuple(config.decoder)
    try:
        dataset, prepared, adjacency, ks = _inputs(args, config)
    except ValueError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    n, g = prepared.x.shape
    datasets.describe(prepared, adjacency, ks[0] if len(ks) == 1 else f"{ks[0]}-{ks[-1]}",
                      print)
    prep_seconds = time.time() - start
    try:
        result = fit_ks(prepared, adjacency, ks, config, args.seeds, args.every_k)
    except FloatingPointError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - start
    scored = " | ".join(f"{key.upper()} {v:.4f}" for key, v in result.metrics.items()
                        if key in ("acc", "nmi", "ari"))
    print(f"done in {seconds:.1f} s" + (f" | {scored}" if scored else ""))
    summary = {
        "dataset": dataset.name, "cells": n, "genes": g,
        "clusters": result.metrics.get("recommended_k", ks[0]),
        "metrics": result.metrics,
        "seconds": {"preprocess_and_graph": prep_seconds, "total": seconds},
        "peak_memory_mb": formats.peak_memory_mb(), "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(config),
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": torch.__version__},
    }
    out = Path(args.out)
    tmp = formats.scratch_folder(out)
    written = write_files(tmp, dataset, prepared, result, summary)
    if args.plot:
        written += plots.draw(tmp, result.history, result.embedding, result.labels,
                              prepared.labels, prepared.label_names, prepared.name,
                              result.pretrained, result.start,
                              convexity_panels(result, config.m_cvx))
    if args.plot and "k_selection" in result.metrics:
        plots.plot_k_selection(tmp / "k_selection.png", result.metrics["k_selection"],
                               result.metrics["recommended_k"])
        written.append("k_selection.png")
    formats.publish(tmp, out, args.overwrite)
    print(f"wrote {out}/: " + " ".join(written))
    return 0


def convexity_panels(result, m, count=300, seed=0):
    """plots.plot_convexity's two panels for a run (Eq. 11 made visible): the cluster with the
    most reliable cells when phase 2 starts, its reliable cells and `count` convex combinations
    of m of them, on the codes after phase 1 (clusters: the start's centres' nearest, as Eq. 5
    assigns them) and at the end."""
    start = nearest_mean(result.pretrained, result.start)
    k = int(np.argmax(np.bincount(start[result.reliable_start], minlength=start.max() + 1)))
    rng, panels = np.random.default_rng(seed), []
    for when, codes, clusters, reliable in (
            ("start of phase 2", result.pretrained, start, result.reliable_start),
            ("end", result.embedding, result.labels, result.reliable)):
        drawn = draw_combinations([np.flatnonzero(reliable & (clusters == k))], m, count, rng)
        combos = (convex_combinations(torch.as_tensor(codes), *drawn[1:])[0].numpy() if drawn
                  else np.empty((0, codes.shape[1])))
        panels.append((f"cluster {k}, {when}", codes, clusters, reliable, k, combos))
    return panels


DROPPED = "dropped by preprocessing: no counts"  # the note of an input cell without a cluster


def write_files(folder, dataset, prepared, result, summary):
    """A run's files into folder -> their names. labels.csv: one row per input cell: its
    cluster, confidence, margin and reliable flag (Result), stability (several seeds), the
    baseline's cluster, the cluster at each K (--every-k) and a note for a cell preprocessing
    dropped (no cluster); embedding.csv (the codes of the cells kept), centres.csv (phi^c:
    Eq. 5 from embedding.csv), clusters.csv (metrics["clusters"]), k_selection.csv (several
    K), history.csv, summary.json, and results.h5ad: the same
    as AnnData (obs: the columns of labels.csv, the cluster and baseline as categories; obsm
    X_sctcm: the codes, NaN for a dropped cell; uns sctcm: the summary)."""
    n = dataset.counts.shape[0]
    names = datasets.names_or_numbered(dataset.cell_names, "cell", n)
    cells = aligned_result(result, prepared.cells, n)
    kept = cells.labels >= 0
    per_cell = {"cluster": cells.labels, "confidence": _rounded(cells.confidence),
                "margin": _rounded(cells.margin), "reliable": cells.reliable}
    if cells.stability is not None:
        per_cell["stability"] = _rounded(cells.stability)
    per_cell["baseline"] = cells.baseline
    for k, labels in (cells.every_k or {}).items():
        per_cell[f"cluster_K{k}"] = labels
    per_cell["note"] = np.where(kept, "", DROPPED)
    shown = {key: [None if not keep else value for keep, value in zip(kept, values.tolist())]
             for key, values in per_cell.items()}
    shown["note"] = per_cell["note"].tolist()
    codes = lambda z: {f"z{j + 1}": z[:, j].tolist() for j in range(z.shape[1])}
    rows = result.metrics["clusters"]
    tables = {"labels.csv": {"cell": names.tolist(), **shown},
              "embedding.csv": {"cell": prepared.cell_names.tolist(), **codes(result.embedding)},
              "centres.csv": {"cluster": list(range(len(result.centres))),
                              **codes(result.centres)},
              "clusters.csv": {key: [row[key] for row in rows] for key in rows[0]}}
    if "k_selection" in result.metrics:
        rows = result.metrics["k_selection"]
        tables["k_selection.csv"] = {key: [row[key] for row in rows] for key in rows[0]}
    formats.write_run(folder, tables, result.history, summary)
    formats.write_h5ad(folder / "results.h5ad", names, per_cell, {"X_sctcm": cells.embedding},
                       {"sctcm": summary},
                       categorical=[key for key in per_cell if key.startswith(("cluster",
                                                                               "baseline"))])
    return [*tables, "history.csv", "summary.json", "results.h5ad"]


def _rounded(values):
    """Probabilities and shares to six significant digits (float64), for the files."""
    return np.array([float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64)])


if __name__ == "__main__":
    sys.exit(main())
