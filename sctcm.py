"""scTCM: deep graph clustering of scRNA-seq data toward convex manifolds.

The whole method of Mrabah et al. (IJCAI 2023), Eqs. (1)-(13) and Sec. 3.2, in one file:
a GCN encoder (Eq. 1), a two-head decoder (structure, Eq. 2; ZINB features, Eq. 3),
self-supervised pretraining (Eq. 4), then a clustering phase that alternates a clustering
loss (Eqs. 5-7), an overclustering loss (Eqs. 8-10) and an adversarial loss on decoded
convex combinations of latent codes (Eqs. 11-13), stopped when the mean intrinsic
dimension of the clusters reaches their linear intrinsic dimension (Fig. 2).

    python sctcm.py --demo
    python sctcm.py data.h5 --clusters 9 --out results --plot
    result = sctcm.cluster(counts, 9)   # in Python: raw counts, cells x genes

References
- Mrabah, Amar, Bouguessa, Diallo. Toward convex manifolds: a geometric perspective for deep
  graph clustering of single-cell RNA-seq data. IJCAI 2023.
- Kipf & Welling. Semi-supervised classification with GCNs (ICLR 2017); Variational graph
  auto-encoders (NeurIPS workshop 2016).
- Ng, Jordan, Weiss. On spectral clustering (NeurIPS 2001); Arthur & Vassilvitskii.
  k-means++ (SODA 2007); Hubert & Arabie 1985 (ARI); Strehl & Ghosh 2002 (NMI).
"""
import argparse
import csv
import dataclasses
import inspect
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.sparse.linalg import eigsh
from torch import nn

import datasets
import geometry
from zinb import zinb_nll


@dataclass
class Config:
    """Every hyperparameter of a run; one set of defaults for all datasets."""
    n_top_genes: int = 1500        # highly variable genes kept by preprocessing (>= 1)
    n_neighbors: int = 15          # k of the kNN cell graph A (>= 1)
    n_pcs: int = 50                # principal components the kNN graph is built on (>= 1)
    hidden: int = 128              # width of the hidden GCN layer, Eq. (1) (>= 1)
    latent: int = 15               # d, dimension of the latent codes Z (>= 1)
    decoder: tuple = (128, 256)    # widths of the feature head f_D^(2), Eq. (3) (each >= 1)
    disc_hidden: int = 64          # width of each discriminator's hidden layer, Eq. (12) (>= 1)
    dropout: float = 0.2           # dropout on the encoder input, in [0, 1)
    w_x: float = 1.0               # weight of L_X in L_SS, Eq. (4) (>= 0)
    w_a: float = 0.3               # weight of L_A in L_SS, Eq. (4) (>= 0)
    pretrain_epochs: int = 100     # T1, epochs of phase 1 (>= 1)
    lr_pretrain: float = 1e-3      # Adam learning rate of phase 1 (> 0)
    lr_cluster: float = 5e-4       # Adam learning rate of the (over)clustering steps (> 0)
    lr_adv: float = 1e-4           # Adam learning rate of the generator and discriminators (> 0)
    gamma_c: float = 1.5           # weight of L_c in step 1 of phase 2, Sec. 3.2 (>= 0)
    gamma_o: float = 0.5           # weight of L_o in step 2 of phase 2, Sec. 3.2 (>= 0)
    gamma_g: float = 1.0           # weight of L_g in step 3 of phase 2, Sec. 3.2 (>= 0)
    n_over: int = 30               # n_o, number of overclusters, Eqs. (8)-(10) (>= 2)
    init: str = "merge"            # phi^c start: "merge" (default), "spectral" (paper), "kmeans"
    resolution: float = 0.5        # modularity resolution of init="merge" (> 0)
    beta_c: str = "auto"           # Eq. (6) margin threshold, in [0, 1), or "auto" (reliable_frac)
    beta_o: str = "auto"           # Eq. (9) margin threshold, in [0, 1), or "auto"
    reliable_frac: float = 0.15    # "auto": share of cells reliable when phase 2 starts, in (0, 1]
    update_every: int = 10         # epochs between recomputations of the targets q (>= 1)
    m_cvx: int = 3                 # m, cells per convex combination, Eq. (11) (>= 2)
    n_cvx: int = 64                # convex combinations per cluster and step, Eq. (11) (>= 1)
    min_epochs: int = 30           # phase 2 runs at least this long before the ID = LID stop (>= 0)
    max_epochs: int = 100          # phase 2 stops here if ID never reaches LID (>= 1)
    eval_every: int = 10           # epochs between ID/LID evaluations and log lines (>= 1)
    block: int = 1024              # rows of the n x n logits of Eq. (2) alive at a time (>= 1)
    losses: str = "auto"           # "exact", "sampled" or "auto" (sampled above batch_size cells)
    batch_size: int = 2048         # cells per epoch in Eqs. (3), (7), (10), sampled losses (>= 1)
    adversarial: bool = True       # Eqs. (11)-(13); False is the "no adversarial" ablation
    overclustering: bool = True    # Eqs. (8)-(10); False is the "no overclustering" ablation
    seed: int = 0                  # seeds numpy and torch once, at the start of fit, in [0, 2^32)
    device: str = "cpu"            # torch device: "cpu", "cuda" or "cuda:N"


@dataclass
class Result:
    """What fit returns: final labels (argmax of Eq. 5), codes Z, one history row per log."""
    labels: np.ndarray
    embedding: np.ndarray
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the graph auto-encoder

def _normalize(a):
    """D^-1/2 A D^-1/2 with D = diag(A 1), as a float64 scipy sparse matrix."""
    a = sp.csr_matrix(a, dtype=np.float64)
    d = sp.diags(np.asarray(a.sum(axis=1)).ravel() ** -0.5)
    return d @ a @ d


def normalized_adjacency(a):
    """D^-1/2 (A + I) D^-1/2 of Eq. (1), D = diag((A + I) 1), as a sparse CSR torch tensor.

    a: (n, n) scipy sparse 0/1 adjacency without self loops."""
    csr = _normalize(a + sp.identity(a.shape[0], format="csr")).tocsr()
    csr.sort_indices()
    with warnings.catch_warnings():  # torch calls its CSR support "beta"; the product is tested
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(torch.as_tensor(csr.indptr, dtype=torch.long),
                                       torch.as_tensor(csr.indices, dtype=torch.long),
                                       torch.as_tensor(csr.data, dtype=torch.float32), csr.shape,
                                       check_invariants=True)


class _Propagate(torch.autograd.Function):
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
        h = torch.relu(_Propagate.apply(a_norm, self.w1(x)))
        return _Propagate.apply(a_norm, self.w2(h))


class FeatureHead(nn.Module):
    """f_D^(2) of Eq. (3): an MLP from z to the ZINB parameters of every gene.

    Returns pi (dropout probability), rate (the mean before the size factor: mu = s_i * rate)
    and theta (inverse dispersion, the paper's sigma^2 head). The clamps are DCA's ranges."""

    def __init__(self, latent, widths, n_genes):
        super().__init__()
        sizes = (latent, *widths)
        self.mlp = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:])
                                   for m in (nn.Linear(a, b), nn.ReLU())])
        self.pi, self.mu, self.theta = (nn.Linear(sizes[-1], n_genes) for _ in range(3))

    def forward(self, z):
        h = self.mlp(z)
        rate = torch.exp(self.mu(h).clamp(max=np.log(1e6)))
        theta = F.softplus(self.theta(h)).clamp(1e-4, 1e4)
        return torch.sigmoid(self.pi(h)), rate, theta


class Discriminators(nn.Module):
    """f_adv^(k), k = 1..K of Eq. (12): one MLP per cluster, gene space -> logit.

    The K networks have separate weights; they are stored as stacked tensors so that all of them
    run in one batched matmul. The input is log1p(rate), the decoded expression without the
    size factor (so that library size cannot tell a cell from a convex combination),
    standardised per gene by `standardise`."""

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


# ---------------------------------------------------------------- clustering losses

def soft_assign(z, centers):
    """Student-t soft assignments p_ij, Eq. (5) (and Eq. (8) with overcluster centres).

    z: (n, d) latent codes z_i; centers: (K, d) centres phi_j -> (n, K), rows sum to 1."""
    kernel = 1.0 / (1.0 + torch.cdist(z, centers) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def target_distribution(p, beta):
    """Target assignments q and reliable set Omega, Eqs. (6) and (9).

    A cell is reliable when its top-1 minus top-2 assignment reaches beta; its target is then
    the one-hot of its argmax, otherwise q_i = p_i. p: (n, K) -> q (n, K), reliable (n,) bool."""
    top2 = p.topk(2, dim=1).values
    reliable = top2[:, 0] - top2[:, 1] >= beta
    onehot = F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
    return torch.where(reliable[:, None], onehot, p), reliable


def kl_divergence(q, p, reduction="mean"):
    """KL(q || p) = sum_i sum_j q_ij log(q_ij / p_ij), Eqs. (7) and (10), with 0 log 0 = 0.

    The argument order is the paper's (target first); the authors' code computes KL(p || q).
    reduction="sum" is Eq. (7) as written; "mean" divides by n so that gamma_c weighs it
    against the per-entry mean L_SS."""
    kl = (torch.xlogy(q, q) - q * torch.log(p)).sum()
    return kl if reduction == "sum" else kl / p.shape[0]


def auto_threshold(p, reliable_frac):
    """beta such that the `reliable_frac` most confident cells of p are reliable (Eqs. 6, 9).

    Scale-free replacement for a fixed threshold: with the Eq. (2) loss the latent codes are
    small, Student-t margins stay far below the authors' 0.75-0.92, and a fixed threshold leaves
    the reliable set empty. Computed once when phase 2 starts, then held fixed."""
    top2 = p.topk(2, dim=1).values
    return torch.quantile(top2[:, 0] - top2[:, 1], 1 - reliable_frac).item()


def convex_combinations(z, members, m, n_cvx, rng):
    """Latent convex combinations of Eq. (11): sum_i theta_i f_E(x_i), theta ~ Dirichlet(1).

    members: one index array per cluster (reliable cells of that cluster); clusters with fewer
    than m members are skipped. Returns (z_cvx (k', n_cvx, d), clusters (k',) long) or None."""
    active = [k for k, idx in enumerate(members) if len(idx) >= m]
    if not active:
        return None
    picks = np.stack([[rng.choice(members[k], m, replace=False) for _ in range(n_cvx)]
                      for k in active])
    theta = torch.as_tensor(rng.dirichlet(np.ones(m), size=(len(active), n_cvx)),
                            dtype=z.dtype, device=z.device)
    rows = z.index_select(0, torch.as_tensor(picks.ravel(), device=z.device))  # see structure_loss
    z_cvx = (theta[..., None] * rows.view(*picks.shape, -1)).sum(2)
    return z_cvx, torch.as_tensor(active, device=z.device)


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


# ---------------------------------------------------------------- clustering helpers

def kmeans(x, k, seed=0, n_init=10, max_iter=300, tol=1e-6):
    """k-means: greedy k-means++ seeding, Lloyd iterations, n_init restarts, lowest inertia kept.

    x: (n, d) array -> labels (n,), centers (k, d)."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best = (np.inf, None, None)
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, rng)
        for _ in range(max_iter):
            dist = datasets.squared_distances(x, centers)
            labels = dist.argmin(1)
            new = _cluster_means(x, labels, centers)
            shift = np.sum((new - centers) ** 2)
            centers = new
            if shift <= tol * np.mean(np.var(x, 0)):
                break
        dist = datasets.squared_distances(x, centers)
        labels, inertia = dist.argmin(1), dist.min(1).sum()
        if inertia < best[0]:
            best = (inertia, labels, centers)
    return best[1], best[2]


def _cluster_means(x, labels, centers):
    """Mean of the points of each cluster; an empty cluster keeps its old centre."""
    k = len(centers)
    member = sp.csr_matrix((np.ones(len(x)), (labels, np.arange(len(x)))), shape=(k, len(x)))
    sizes = np.bincount(labels, minlength=k)[:, None]
    return np.where(sizes > 0, member @ x / np.maximum(sizes, 1), centers)


def _kmeans_pp(x, k, rng):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, as scikit-learn seeds): each next
    centre is the best, by the inertia it leaves, of 2 + ln k candidates drawn with probability
    proportional to D(x)^2. Plain k-means++ (one candidate) lands in poor minima more often."""
    centers = [x[rng.integers(len(x))]]
    closest = datasets.squared_distances(x, centers[0][None])[:, 0]
    n_trials = 2 + int(np.log(k))
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            candidates = rng.choice(len(x), n_trials, p=closest / total)
        else:
            candidates = rng.integers(len(x), size=n_trials)
        after = np.minimum(closest, datasets.squared_distances(x, x[candidates]).T)  # (n_trials, n)
        best = after.sum(1).argmin()
        centers.append(x[candidates[best]])
        closest = after[best]
    return np.array(centers)


def spectral_clustering(a, k, seed=0):
    """Spectral clustering of the cell graph A (Ng, Jordan & Weiss 2001), used for phi^c.

    Top-k eigenvectors of D^-1/2 A D^-1/2, rows scaled to unit length, then kmeans. The paper
    clusters A itself: no self loops here, unlike the GCN of Eq. (1).
    a: (n, n) scipy sparse adjacency without isolated cells -> labels (n,)."""
    v0 = np.random.default_rng(seed).random(a.shape[0])
    _, vectors = eigsh(_normalize(a), k=k, which="LA", v0=v0)
    rows = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return kmeans(rows, k, seed=seed)[0]


def _group_edges(a, labels):
    """(C, C) edge ends between the groups of a partition of the graph A (any C label values)."""
    labels = np.unique(labels, return_inverse=True)[1]
    member = sp.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)))
    return (member.T @ sp.csr_matrix(a) @ member).toarray()


def modularity(a, labels, resolution=1.0):
    """Q = sum_c [e_cc / 2m - resolution (d_c / 2m)^2] of a partition of the graph A (Newman
    2006): the criterion merge_overclusters climbs, and a diagnostic of any partition.

    e_cc counts the edge ends inside group c, d_c the edge ends of its cells, 2m all of them.
    a: (n, n) scipy sparse adjacency; labels: (n,) group of each cell."""
    e = _group_edges(a, labels)
    two_m = e.sum()
    return (np.trace(e) - resolution * (e.sum(1) ** 2).sum() / two_m) / two_m


def merge_overclusters(a, over, k, resolution=0.5):
    """K clusters from the overclusters of Z, merged on the cell graph A (init="merge").

    Not in the paper, which starts phi^c from spectral clustering of A. Greedy modularity
    agglomeration (Clauset, Newman & Moore 2004) with the overclusters as the starting groups:
    repeatedly merge the two groups whose union raises the modularity Q (see `modularity`)
    most, or lowers it least, until k are left. A resolution below 1 lets large groups merge
    sooner than Q itself would.
    a: (n, n) scipy sparse adjacency; over: (n,) overcluster of each cell -> labels (n,) in 0..k-1."""
    over = np.unique(over, return_inverse=True)[1]
    if over.max() + 1 < k:
        raise ValueError(f"cannot merge {over.max() + 1} overclusters into {k} clusters")
    w = _group_edges(a, over)  # the graph of the overclusters
    two_m = w.sum()
    group = np.arange(len(w))  # the group of each overcluster, always numbered 0..C-1
    for _ in range(len(w) - k):
        e = _group_edges(w, group)
        d = e.sum(1)
        gain = e / two_m - resolution * np.outer(d, d) / two_m ** 2  # half the change in Q
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(gain.argmax(), gain.shape)
        group = np.unique(np.where(group == j, i, group), return_inverse=True)[1]
    return group[over]


# ---------------------------------------------------------------- metrics

def _contingency(y, pred):
    """Counts n_ij of cells with true class i and predicted cluster j. A cell whose label is
    missing (negative; datasets.load writes -1) is left out, here and so in every metric."""
    y, pred = np.asarray(y), np.asarray(pred)
    _, yi = np.unique(y[y >= 0], return_inverse=True)
    _, pj = np.unique(pred[y >= 0], return_inverse=True)
    table = np.zeros((yi.max() + 1, pj.max() + 1), dtype=np.int64)
    np.add.at(table, (yi, pj), 1)
    return table


def cluster_acc(y, pred):
    """Clustering accuracy: the best one-to-one map of clusters to classes (Hungarian)."""
    table = _contingency(y, pred)
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / table.sum()


def nmi(y, pred):
    """Normalised mutual information, arithmetic normalisation: 2 I(Y; C) / (H(Y) + H(C))."""
    table = _contingency(y, pred)
    table = table / table.sum()
    py, pc = table.sum(1), table.sum(0)
    nz = table > 0
    mi = np.sum(table[nz] * np.log(table[nz] / np.outer(py, pc)[nz]))
    h = -np.sum(py * np.log(py)) - np.sum(pc * np.log(pc))
    return 1.0 if h == 0 else float(2 * mi / h)


def ari(y, pred):
    """Adjusted Rand index (Hubert & Arabie 1985) from the contingency table."""
    table = _contingency(y, pred)
    pairs = lambda c: (c * (c - 1) / 2).sum()
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(table.sum(keepdims=True))
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def scores(y, pred):
    """ACC, NMI, ARI of the cells with a label (y >= 0) as a dict, or {} when labels are unknown."""
    if y is None:
        return {}
    return {"acc": cluster_acc(y, pred), "nmi": nmi(y, pred), "ari": ari(y, pred)}


def centroid_ari(y, z):
    """ARI of giving each cell the type whose mean code is nearest to its own (a diagnostic).

    It reads the labels to place the centres, so it is not a clustering result: it says how
    well the codes z (n, d) separate the labelled types once their centres are known, i.e. the
    ARI a centre-based partition of Z such as the argmax of Eq. (5) could reach from the right
    start. Compare it with the ARI that k-means on Z or phase 2 actually reaches. Cells whose
    label is missing (-1) are left out."""
    keep = np.asarray(y) >= 0
    y, z = np.asarray(y)[keep], np.asarray(z, dtype=np.float64)[keep]
    types = np.unique(y)
    centres = np.stack([z[y == t].mean(0) for t in types])
    return ari(y, types[datasets.squared_distances(z, centres).argmin(1)])


# ---------------------------------------------------------------- training

class _Model(nn.Module):
    """The generator f_D^(2) o f_E plus the structure head; the parameters W of the paper."""

    def __init__(self, n_genes, config):
        super().__init__()
        self.encoder = Encoder(n_genes, config.hidden, config.latent, config.dropout)
        self.features = FeatureHead(config.latent, config.decoder, n_genes)


def _initial_partition(prepared, adjacency, n_clusters, config, over):
    """The cells' partition whose mean codes become phi^c: spectral clustering of A, as the
    paper says (init="spectral"); or, not in the paper (see the README for how they compare),
    kmeans on the top n_pcs principal components of the encoder input (init="kmeans") or the
    overclusters over of Z merged on A (init="merge")."""
    if config.init == "spectral":
        return spectral_clustering(adjacency, n_clusters, seed=config.seed)
    if config.init == "merge":
        return merge_overclusters(adjacency, over, n_clusters, config.resolution)
    return kmeans(datasets.pca(prepared.x, config.n_pcs), n_clusters, seed=config.seed)[0]


def _check_start(start, n, n_clusters):
    """fit's start as an int array, or ValueError unless it puts every cell in one of the
    clusters 0..K-1 and leaves none of them empty (phi^c is the mean code of each)."""
    start = np.asarray(start)
    if start.shape != (n,) or not np.array_equal(np.unique(start), np.arange(n_clusters)):
        raise ValueError(f"start must give each of the {n} cells a cluster in 0..{n_clusters - 1}"
                         ", with no cluster empty")
    return start


def _tensors(prepared, adjacency, device):
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


def _sampled(config, n):
    """Whether a run of n cells estimates its losses from samples (Config.losses)."""
    return config.losses == "sampled" or (config.losses == "auto" and n > config.batch_size)


def _sampler(n, n_edges, config, device):
    """The draws of one epoch -> (cells, pairs). Sampled path: batch_size cells without
    replacement (the cells of Eqs. 3, 7, 10) and, for every cell i, |E| / n partners j drawn
    uniformly (the pairs of Eq. 2: as many as edges, each cell equally often a first end, which
    keeps the estimate unbiased and lowers its variance). Exact path: (None, None), every cell
    and every pair."""
    if not _sampled(config, n):
        return lambda: (None, None)
    generator = torch.Generator(device).manual_seed(config.seed)
    first = torch.arange(n, device=device).repeat_interleave(max(1, n_edges // n))
    return lambda: (torch.randperm(n, generator=generator, device=device)[:config.batch_size],
                    torch.stack([first, torch.randint(n, first.shape, generator=generator,
                                                      device=device)]))


def _rows(t, cells):
    """The rows `cells` of t, or t itself when cells is None (every cell)."""
    return t if cells is None else t.index_select(0, cells)


def _self_supervision(model, data, config, cells=None, pairs=None):
    """One forward pass: Z of every cell (the GCN of Eq. 1 is exact), the decoded rate of
    `cells`, L_X (Eq. 3, mean over those cells) and L_A (Eq. 2, exact or from `pairs`)."""
    z = model.encoder(data["x"], data["a_norm"])
    rate, l_x = _feature_loss(model, data, z, cells)
    l_a = structure_loss(z, data["edges"], config.block, pairs)
    return z, rate, l_x, l_a


def _feature_loss(model, data, z, cells):
    """The decoded rate of `cells` (all when None) and their L_X (Eq. 3, mean per entry)."""
    pi, rate, theta = model.features(_rows(z, cells))
    l_x = zinb_nll(_rows(data["counts"], cells), rate * _rows(data["size_factors"], cells), theta,
                   pi, lgamma_x1=_rows(data["lgamma_x1"], cells))
    return rate, l_x


def _step(optimizer, loss):
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _codes(model, data):
    """Z without dropout, for targets, geometry and the final labels."""
    model.eval()
    z = model.encoder(data["x"], data["a_norm"])
    model.train()
    return _check_finite(z)


def _check_finite(z):
    """z, or a one-line FloatingPointError (the command line exits 2) when training diverged.
    Every use of the codes (targets, logs, labels) goes through _codes, so one check suffices:
    a non-finite loss makes the parameters, and with them the codes, non-finite."""
    if not torch.isfinite(z).all():
        raise FloatingPointError("training diverged (the latent codes became infinite or NaN); "
                                 "lower the learning rates")
    return z


def _threshold(value, p, reliable_frac):
    """A numeric beta as given, or the scale-free "auto" rule of auto_threshold."""
    return auto_threshold(p, reliable_frac) if value == "auto" else float(value)


def _members(p, reliable, n_clusters):
    """C_k intersected with Omega_c: reliable cells by their argmax cluster, one array each."""
    pred, keep = p.argmax(1).cpu().numpy(), reliable.cpu().numpy()
    return [np.flatnonzero(keep & (pred == k)) for k in range(n_clusters)]


def _adversarial(model, z, rate, members, config, rng):
    """Discriminator inputs: reconstructions of reliable cells (real) and decoded convex
    combinations (fake), n_cvx of each per cluster, standardised; None when no cluster has m
    reliable cells. rate: the decoded rate of every cell (exact path), or None to decode the
    chosen cells here (sampled path, where the epoch decoded a batch only)."""
    batch = convex_combinations(z, members, config.m_cvx, config.n_cvx, rng)
    if batch is None:
        return None
    z_cvx, active = batch
    fake = torch.log1p(model.features(z_cvx)[1])
    real_idx = np.stack([rng.choice(members[k], config.n_cvx) for k in active.tolist()])
    rows = torch.as_tensor(real_idx, device=z.device)
    real = torch.log1p(rate[rows] if rate is not None else model.features(z[rows])[1])
    return *standardise(real, fake), active


def _generator_step(opt_g, model, disc, z, rate, l_ss, members, config, rng):
    """Step 3 of phase 2: L_SS + gamma_g L_g (Eq. 13) for the encoder and feature head only."""
    batch = _adversarial(model, z, rate, members, config, rng)
    l_g = generator_loss(disc(batch[1], batch[2])) if batch else z.new_zeros(())
    _step(opt_g, l_ss + config.gamma_g * l_g)
    return l_g.item()


def _discriminator_step(opt_d, model, disc, z, rate, members, config, rng):
    """One update of the K discriminators (Eq. 12), made after every phase-2 step. Their inputs
    are built without gradient, so the step cannot reach the encoder or feature head.
    Returns {"L_d": sum, "L_d<k>": L_d^(k) of each discriminator k that had inputs}, or {}."""
    with torch.no_grad():
        batch = _adversarial(model, z, rate, members, config, rng)
    if batch is None:
        return {}
    real, fake, active = batch
    per = discriminator_loss(disc(real, active), disc(fake, active), reduction="none")
    _step(opt_d, per.sum())
    return {"L_d": per.sum().item(),
            **{f"L_d{k}": v for k, v in zip(active.tolist(), per.tolist())}}


def _geometry(z, labels):
    """Mean per-cluster ID and LID (geometry.cluster_geometry) of codes z under labels."""
    return geometry.cluster_geometry(z.cpu().numpy(), labels)


def _log(row, log):
    """One aligned progress line from a history row."""
    parts = [f"phase {row['phase']}", f"epoch {row['epoch']:4d}/{row['of']}"]
    for key in ("L_X", "L_A", "L_c", "L_o", "L_g", "L_d"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    if "L_d" in row:
        parts[-1] += f" (chance {_chance(row):.4f})"
    if "reliable_c" in row:
        parts.append(f"reliable {row['reliable_c']}/{row['n']}")
    for key in ("ID", "LID"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}")
    names = {"kmeans_ari": "ARI(kmeans Z)", "acc": "ACC", "nmi": "NMI", "ari": "ARI",
             "centroid_ari": "ARI(true centres Z)"}
    for key, name in names.items():
        if key in row:
            parts.append(f"{name} {row[key]:.3f}")
    log(" | ".join(parts))


def _chance(row):
    """L_d of a history row's discriminators all at chance, D = 1/2: 2 log 2 each (Eq. 12)."""
    return 2 * np.log(2) * sum(re.fullmatch(r"L_d\d+", key) is not None for key in row)


def fit(prepared, adjacency, n_clusters, config=None, log=print, start=None):
    """Train scTCM on a preprocessed dataset: phase 1 (Eq. 4), centres, phase 2 (Sec. 3.2).

    prepared: datasets.Prepared (x = encoder input, counts + size_factors = ZINB target,
    labels used for scoring only); adjacency: (n, n) scipy sparse A; n_clusters: K.
    start: optional (n,) partition into clusters 0..K-1 whose mean codes become phi^c instead
    of config.init's (e.g. the true labels, to see what phase 2 does from the right start).
    Phase 2 alternates the paper's three steps, one step per epoch in turn:
    L_SS + gamma_c L_c, L_SS + gamma_o L_o, L_SS + gamma_g L_g (an ablation drops its step),
    each followed by a discriminator update (Eq. 12). It stops when mean ID >= mean LID
    (after min_epochs) or at max_epochs.
    An epoch is one optimiser step. Exact path: every cell in Eqs. (3), (7), (10) and all n^2
    pairs in Eq. (2). Sampled path (config.losses, by default above batch_size cells): a random
    batch of batch_size cells and |E| uniform pairs (_sampler), unbiased estimates of the same
    losses at a cost linear in n; the number of steps does not grow with n, so the passes over
    the data fall as batch_size / n (the shape of scvi-tools' rule). Both paths encode every
    cell exactly (Eq. 1) and compute targets, reliable sets and ID/LID on all of them."""
    config = config or Config()
    _check_config(config)
    if start is not None:
        start = _check_start(start, adjacency.shape[0], n_clusters)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    y = prepared.labels
    data = _tensors(prepared, adjacency, device)
    n, n_genes = prepared.x.shape
    sample = _sampler(n, data["edges"].shape[1], config, device)
    model = _Model(n_genes, config).to(device)
    history = []

    def record(row, z):
        row.update(n=n)
        if y is not None:
            row["centroid_ari"] = centroid_ari(y, z.cpu().numpy())
        history.append(row)
        _log(row, log)

    # --- phase 1: self-supervision (L_SS, Eq. 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_pretrain)
    for epoch in range(1, config.pretrain_epochs + 1):
        _, _, l_x, l_a = _self_supervision(model, data, config, *sample())
        _step(optimizer, config.w_x * l_x + config.w_a * l_a)
        if epoch % config.eval_every == 0 or epoch == config.pretrain_epochs:
            z = _codes(model, data)
            km = kmeans(z.cpu().numpy(), n_clusters, seed=config.seed, n_init=3)[0]
            row = {"phase": 1, "epoch": epoch, "of": config.pretrain_epochs,
                   "L_X": l_x.item(), "L_A": l_a.item()}
            row["ID"], row["LID"] = _geometry(z, km)
            if y is not None:
                row["kmeans_ari"] = ari(y, km)
            record(row, z)

    # --- initial centres: phi^o = k-means on Z, phi^c = mean codes of a partition of the cells
    z = _codes(model, data)
    over, centres = kmeans(z.cpu().numpy(), config.n_over, seed=config.seed)
    if start is None:
        start = _initial_partition(prepared, adjacency, n_clusters, config, over)
    phi_c = nn.Parameter(torch.stack([z[start == k].mean(0) for k in range(n_clusters)]))
    phi_o = nn.Parameter(torch.as_tensor(centres, dtype=torch.float32, device=device))
    disc = Discriminators(n_clusters, n_genes, config.disc_hidden).to(device)
    ae = list(model.parameters())
    opt_c = torch.optim.Adam(ae + [phi_c], lr=config.lr_cluster)
    opt_o = torch.optim.Adam(ae + [phi_o], lr=config.lr_cluster)
    opt_g = torch.optim.Adam(ae, lr=config.lr_adv)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr_adv)
    with torch.no_grad():
        beta_c = _threshold(config.beta_c, soft_assign(z, phi_c), config.reliable_frac)
        beta_o = _threshold(config.beta_o, soft_assign(z, phi_o), config.reliable_frac)
    log(f"phase 2 | beta_c {beta_c:.4f} | beta_o {beta_o:.4f}")

    # --- phase 2: alternating steps (Sec. 3.2), one step per epoch in turn
    steps = ["c"] + ["o"] * config.overclustering + ["g"] * config.adversarial
    losses, l_d = {}, {}
    for epoch in range(1, config.max_epochs + 1):
        if (epoch - 1) % config.update_every == 0:
            # q is a target: recomputed here, held fixed in between, Eqs. (6) and (9)
            with torch.no_grad():
                z = _codes(model, data)
                p_c = soft_assign(z, phi_c)
                q_c, reliable_c = target_distribution(p_c, beta_c)
                q_o, reliable_o = target_distribution(soft_assign(z, phi_o), beta_o)
                members = _members(p_c, reliable_c, n_clusters)
        cells, pairs = sample()
        z, rate, l_x, l_a = _self_supervision(model, data, config, cells, pairs)
        rate = rate if cells is None else None  # _adversarial needs the rate of every cell
        l_ss = config.w_x * l_x + config.w_a * l_a
        losses.update(L_X=l_x.item(), L_A=l_a.item())
        step = steps[(epoch - 1) % len(steps)]
        if step == "c":
            l_c = kl_divergence(_rows(q_c, cells), soft_assign(_rows(z, cells), phi_c))
            _step(opt_c, l_ss + config.gamma_c * l_c)
            losses["L_c"] = l_c.item()
        elif step == "o":
            l_o = kl_divergence(_rows(q_o, cells), soft_assign(_rows(z, cells), phi_o))
            _step(opt_o, l_ss + config.gamma_o * l_o)
            losses["L_o"] = l_o.item()
        else:
            losses["L_g"] = _generator_step(opt_g, model, disc, z, rate, l_ss, members,
                                            config, rng)
        if config.adversarial:
            l_d = _discriminator_step(opt_d, model, disc, z, rate, members, config, rng)

        if epoch % config.eval_every == 0 or epoch == config.max_epochs:
            z = _codes(model, data)
            pred = soft_assign(z, phi_c).argmax(1).cpu().numpy()
            row = {"phase": 2, "epoch": epoch, "of": config.max_epochs, **losses, **l_d,
                   "reliable_c": int(reliable_c.sum()), "reliable_o": int(reliable_o.sum())}
            row["ID"], row["LID"] = _geometry(z, pred)
            row.update(scores(y, pred))
            record(row, z)
            if epoch >= config.min_epochs and row["ID"] >= row["LID"]:
                log(f"phase 2 | stop at epoch {epoch}: mean ID {row['ID']:.2f} >= "
                    f"mean LID {row['LID']:.2f}")
                break

    # --- final labels: argmax of Eq. (5)
    z = _codes(model, data)
    labels = soft_assign(z, phi_c).argmax(1).cpu().numpy()
    return Result(labels=labels, embedding=z.cpu().numpy(), history=history,
                  metrics={**scores(y, labels), "phase2_epochs": epoch})


# ---------------------------------------------------------------- one call: counts in, labels out

def cluster(counts, n_clusters, labels=None, log=print, **config):
    """Cluster raw counts in one call: preprocess, kNN graph A and fit, as the command line runs
    them (the same seed gives the command line's labels on the same counts).

    counts: (n, g) raw counts, cells x genes, a numpy array or scipy sparse matrix; n_clusters: K;
    labels: optional (n,) labels of the rows, for scoring only (missing: -1, NaN, "", "NA").
    An AnnData object in memory (as --layer reads a file): cluster(adata.layers["counts"], K,
    labels=adata.obs["cell_type"]) when X is normalised, or adata.raw.X (raw.var_names its genes);
    adata.X only when it holds raw counts.
    config: Config fields as keywords (seed=1, max_epochs=50, ...); log: where the progress lines
    go (log=lambda line: None silences them).
    -> Result whose labels (n,) and embedding (n, d) line up with the rows of counts: -1 and a row
    of NaN for a cell that preprocessing dropped (no counts). Bad input raises a one-line
    ValueError with the command line's message; a run that diverges raises FloatingPointError."""
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}: not a field of sctcm.Config")
    config = Config(**config)
    _check_settings(n_clusters, config)
    dataset = _counts_dataset(counts, labels)
    prepared, adjacency = _prepare(dataset, n_clusters, config)
    _describe(prepared, adjacency, n_clusters, log)
    result = fit(prepared, adjacency, n_clusters, config, log=log)
    n = dataset.counts.shape[0]
    rows = np.full(n, -1, dtype=result.labels.dtype)
    rows[prepared.cells] = result.labels
    embedding = np.full((n, result.embedding.shape[1]), np.nan, dtype=result.embedding.dtype)
    embedding[prepared.cells] = result.embedding
    return dataclasses.replace(result, labels=rows, embedding=embedding)


def _counts_dataset(counts, labels):
    """cluster()'s input as a datasets.Dataset named "counts", its labels encoded as load()
    encodes a file's (the counts themselves are checked by datasets.preprocess)."""
    x = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"counts: expected a numeric matrix, cells x genes, got {x.dtype} "
                         f"of shape {x.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"counts: {len(labels)} labels for {x.shape[0]} cells x "
                             f"{x.shape[1]} genes")
        if labels.dtype.kind == "O":  # a pandas column: strings, NaN where a label is missing
            labels = labels.astype(str)
    codes, names = datasets._encode_labels(labels, None)
    return datasets.Dataset(counts=x, labels=codes, label_names=names, name="counts")


def _check_settings(k, config):
    """The checks of K and the settings that need no data, before any work (main and cluster)."""
    _check_config(config)
    if k is not None and not isinstance(k, (int, np.integer)):
        raise ValueError(f"--clusters must be a whole number, got {k!r}")
    if k is not None and k < 2:
        raise ValueError(f"--clusters must be at least 2, got {k}")


def _prepare(dataset, k, config):
    """Preprocess, check K and n_o against the cells that remain, build the kNN graph A
    (main and cluster) -> (prepared, adjacency)."""
    prepared = datasets.preprocess(dataset, n_top_genes=config.n_top_genes)
    if max(k, config.n_over) > prepared.x.shape[0]:
        raise ValueError(f"--clusters {k} or --n-over {config.n_over} is more than the "
                         f"{prepared.x.shape[0]} cells")
    if config.init == "merge" and k > config.n_over:
        raise ValueError(f"--init merge merges the {config.n_over} overclusters: --clusters {k} "
                         "needs --n-over at least as large")
    adjacency = datasets.knn_graph(prepared.x, k=config.n_neighbors, n_pcs=config.n_pcs)
    return prepared, adjacency


def _describe(prepared, adjacency, k, log):
    """The lines a run starts with: what preprocessing kept, the graph, the cells scored."""
    n, g = prepared.x.shape
    for note in prepared.notes:
        log(note)
    log(f"{prepared.name}: {n} cells x {g} genes, K = {k}, graph {adjacency.nnz // 2} edges")
    if prepared.labels is not None and np.any(prepared.labels < 0):
        labelled = np.count_nonzero(prepared.labels >= 0)
        log(f"scored {labelled} of {n} cells with labels; the other {n - labelled} have none and "
            "are clustered, not scored")


# ---------------------------------------------------------------- pictures (--plot, reproduce.py)

def _plots(folder, prepared, result):
    """--plot: fig2.png, embedding.png and losses.png into folder -> their names; none, and one
    line saying so, where matplotlib (optional, not in requirements.txt) is not installed."""
    try:
        plot_fig2(folder / "fig2.png", {prepared.name: result.history})
        _plot_embedding(folder / "embedding.png", result, prepared.labels, prepared.label_names)
        _plot_losses(folder / "losses.png", result.history)
    except ImportError:
        print("--plot: matplotlib is not installed; pictures skipped")
        return []
    return ["fig2.png", "embedding.png", "losses.png"]


def _figure(width, height):
    """An empty matplotlib Figure on the Agg canvas: PNG files, no display, no pyplot state.
    Raises ImportError where matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _through_phases(ax, rows):
    """The x of each history row (fit's, or history.csv's strings): its epoch counted through
    both phases, phase-2 epoch e at T1 + e; marks T1, the end of phase 1, on ax."""
    t1 = next(int(r["of"]) for r in rows if int(r["phase"]) == 1)
    ax.axvline(t1, color="grey", ls="--", lw=1, label="end of phase 1")
    return [int(r["epoch"]) + t1 * (int(r["phase"]) == 2) for r in rows]


def plot_fig2(path, panels):
    """The paper's Fig. 2 as a PNG: mean per-cluster ID (TwoNN) and LID (PCA) at every logged
    epoch of both phases. panels: {title: history rows}, one panel each, side by side."""
    fig = _figure(1 + 5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items()):
        x = _through_phases(ax, rows)
        for key, name in (("ID", "ID (TwoNN)"), ("LID", "LID (PCA, 99% variance)")):
            ax.plot(x, [float(r[key]) for r in rows], marker="o", ms=3, label=name)
        ax.set(title=title, xlabel="epoch (phase 1, then phase 2)")
    axes[0].set_ylabel("mean per-cluster dimension")
    axes[0].legend()
    fig.savefig(path, dpi=150)


def _plot_embedding(path, result, labels, label_names):
    """Codes Z on their first two principal components, coloured by cluster, and beside it by
    the file's labels when it has them (cells without a label in grey)."""
    from matplotlib import colormaps
    pcs = datasets.pca(result.embedding.astype(np.float64), 2)
    k = result.labels.max() + 1
    panels = [("scTCM clusters", result.labels, [f"cluster {j}" for j in range(k)])]
    if labels is not None:
        panels.append(("labels of the file", labels, label_names))
    fig = _figure(7 * len(panels), 4.5)
    for ax, (title, groups, names) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        if np.any(groups < 0):
            ax.scatter(*pcs[groups < 0].T, s=4, color="lightgrey", label="no label")
        for j, name in enumerate(names):
            ax.scatter(*pcs[groups == j].T, s=4, color=colormaps["tab20"](j % 20), label=name)
        ax.set(title=title, xlabel="PC 1 of Z", ylabel="PC 2 of Z")
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3,
                  ncols=1 + len(names) // 15)
    fig.savefig(path, dpi=150)


LOSSES = {"L_X": "$L_X$, ZINB (Eq. 3)", "L_A": "$L_A$, structure (Eq. 2)",
          "L_c": "$L_c$, clusters (Eq. 7)", "L_o": "$L_o$, overclusters (Eq. 10)",
          "L_g": "$L_g$, generator (Eq. 13)", "L_d": "$L_d$, discriminators (Eq. 12)"}


def _plot_losses(path, history):
    """Each loss of the history at every logged epoch, one panel per loss, L_d with its chance
    level (2 log 2 per discriminator)."""
    keys = [key for key in LOSSES if any(key in row for row in history)]
    n_rows = -(-len(keys) // 3)
    fig = _figure(12, 1 + 3 * n_rows)
    fig.suptitle("losses at each logged epoch (dashed: end of phase 1)")
    fig.supxlabel("epoch (phase 1, then phase 2)")
    axes = fig.subplots(n_rows, 3, sharex=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        x = np.array(_through_phases(ax, history))
        has = np.array([key in row for row in history])
        ax.plot(x[has], [row[key] for row in history if key in row], marker="o", ms=3)
        if key == "L_d":
            chance = [_chance(row) for row in history if key in row]
            ax.plot(x[has], chance, color="black", lw=1, ls=":", label="chance")
            ax.legend()
        ax.set_title(LOSSES[key])
        ax.tick_params(labelbottom=True)  # sharex hides them above a panel that may be hidden
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=150)


# ---------------------------------------------------------------- command line

def _field_help():
    """Config field -> its one-line comment, the help text of its command-line flag."""
    return dict(re.findall(r"^    (\w+): .*?# (.+)$", inspect.getsource(Config), re.M))


def _beta(text):
    """A threshold flag: "auto" or a number."""
    return text if text == "auto" else float(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Usage errors as one line and exit code 2, like every other bad input."""
        self.exit(2, f"sctcm: error: {message}\n")


def _parser():
    parser = _Parser(description="scTCM deep graph clustering of a scRNA-seq count matrix.")
    parser.add_argument("path", nargs="?", help="count matrix: .h5 (X/Y, exprs, Cell Ranger), .h5ad, "
                        ".loom, 10x folder, CSV/TSV")
    parser.add_argument("--clusters", type=int, help="K, the number of clusters, >= 2 (required "
                        "for a file; labels in the file are used for scoring only)")
    parser.add_argument("--demo", action="store_true", help="run on datasets.synthetic()")
    parser.add_argument("--out", default="sctcm_output", help="output folder (must not exist "
                        "or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder once the run has finished")
    parser.add_argument("--label-key", help="obs column (.h5ad), col_attrs column (.loom) or dataset "
                        "(X/Y .h5) holding the labels; with --labels, the column of that file")
    parser.add_argument("--labels", help="a CSV/TSV[.gz] of (cell name, label), with or without a "
                        "header, for scoring only: replaces the file's labels, matched by cell name")
    parser.add_argument("--layer", help="where an .h5ad or .loom file keeps its raw counts: a key of "
                        "its layers, or raw (.h5ad raw/X); default X (loom: matrix), else "
                        "layers/counts")
    parser.add_argument("--transpose", action=argparse.BooleanOptionalAction, help="a CSV/TSV "
                        "table or X/Y or exprs matrix lies genes x cells (--no-transpose: cells x "
                        "genes); default: told from labels, names or the counts, and said")
    parser.add_argument("--plot", action="store_true", help="also draw fig2.png, embedding.png "
                        "and losses.png (needs matplotlib, an optional extra)")
    helps = _field_help()
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=helps[f.name])
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=default, help=helps[f.name])
        elif f.name.startswith("beta"):
            parser.add_argument(flag, type=_beta, default=default, help=helps[f.name])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=helps[f.name])
    return parser


def _check_config(config):
    """Raise a one-line ValueError for a setting outside the range its Config comment states
    (a beta_c of 1.5, say, would leave every cell unreliable and phase 2 idle)."""
    ranges = [  # (fields, the range in words, test of a value)
        (("n_top_genes", "n_neighbors", "n_pcs", "hidden", "latent", "disc_hidden",
          "pretrain_epochs", "update_every", "n_cvx", "max_epochs", "eval_every", "block",
          "batch_size"),
         "at least 1", lambda v: v >= 1),
        (("n_over", "m_cvx"), "at least 2", lambda v: v >= 2),
        (("min_epochs",), "at least 0", lambda v: v >= 0),
        (("w_x", "w_a", "gamma_c", "gamma_o", "gamma_g"), "a finite number >= 0",
         lambda v: 0 <= v < np.inf),
        (("lr_pretrain", "lr_cluster", "lr_adv", "resolution"), "a finite number > 0",
         lambda v: 0 < v < np.inf),
        (("dropout",), "in [0, 1)", lambda v: 0 <= v < 1),
        (("reliable_frac",), "in (0, 1]", lambda v: 0 < v <= 1),
        (("beta_c", "beta_o"), 'in [0, 1) or "auto"', lambda v: v == "auto" or 0 <= v < 1),
        (("decoder",), "widths of at least 1", lambda v: all(w >= 1 for w in v)),
        (("init",), "spectral, kmeans or merge", lambda v: v in ("spectral", "kmeans", "merge")),
        (("losses",), "exact, sampled or auto", lambda v: v in ("exact", "sampled", "auto")),
        (("seed",), "in [0, 2^32)", lambda v: 0 <= v < 2**32),
        (("device",), "cpu, cuda or cuda:N", lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v)),
    ]
    for names, words, test in ranges:
        for name in names:
            if not test(getattr(config, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {words}, "
                                 f"got {getattr(config, name)}")
    gpus = torch.cuda.device_count()
    if config.device != "cpu" and int(config.device[5:] or 0) >= gpus:
        where = f"this machine has {gpus} CUDA devices" if gpus else "CUDA is not available here"
        raise ValueError(f"--device {config.device}: {where}")


def _check_out(out, overwrite):
    """Refuse an --out that is not empty (without --overwrite) or cannot be created."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (use --overwrite)")
    base = next(p for p in out.absolute().parents if p.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot create the output folder ({base} is not a writable folder)")


def _inputs(args, config):
    """Check the command line, then load, preprocess and build the graph; every bad input raises
    ValueError (one line)."""
    _check_settings(args.clusters, config)
    if args.demo == bool(args.path):
        raise ValueError("give either a count matrix PATH or --demo")
    for flag, value in (("--label-key", args.label_key), ("--labels", args.labels),
                        ("--layer", args.layer), ("--transpose", args.transpose)):
        if args.demo and value is not None:
            raise ValueError(f"{flag} is about a file's contents; --demo reads no file")
    _check_out(Path(args.out), args.overwrite)
    if args.demo:
        dataset = datasets.synthetic()
        k = args.clusters or len(dataset.label_names)
    else:
        if args.clusters is None:
            raise ValueError("--clusters K is required with a file")
        dataset = datasets.load(args.path, label_key=args.label_key, layer=args.layer,
                                transpose=args.transpose, labels=args.labels)
        k = args.clusters
    prepared, adjacency = _prepare(dataset, k, config)
    return dataset, prepared, adjacency, k


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_outputs(folder, prepared, result, summary):
    """labels.csv, embedding.csv, history.csv, summary.json into folder."""
    cells = prepared.cell_names
    _write_csv(folder / "labels.csv", ["cell", "cluster"], zip(cells, result.labels.tolist()))
    d = result.embedding.shape[1]
    _write_csv(folder / "embedding.csv", ["cell"] + [f"z{j + 1}" for j in range(d)],
               ([c, *row] for c, row in zip(cells, result.embedding.tolist())))
    keys = list(dict.fromkeys(k for row in result.history for k in row))
    _write_csv(folder / "history.csv", keys, ([row.get(k, "") for k in keys]
                                              for row in result.history))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _publish(tmp, out, overwrite):
    """Move the finished temporary folder to --out, so --out never holds half a run."""
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def main(argv=None):
    """The command line: python sctcm.py PATH --clusters K, or python sctcm.py --demo."""
    args = _parser().parse_args(argv)
    start = time.time()
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    config.decoder = tuple(config.decoder)
    try:
        dataset, prepared, adjacency, k = _inputs(args, config)
    except ValueError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    n, g = prepared.x.shape
    _describe(prepared, adjacency, k, print)
    prep_seconds = time.time() - start
    try:
        result = fit(prepared, adjacency, k, config)
    except FloatingPointError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - start
    scored = " | ".join(f"{key.upper()} {v:.4f}" for key, v in result.metrics.items()
                        if key in ("acc", "nmi", "ari"))
    print(f"done in {seconds:.1f} s" + (f" | {scored}" if scored else ""))
    summary = {
        "dataset": dataset.name, "cells": n, "genes": g, "clusters": k,
        "metrics": result.metrics,
        "seconds": {"preprocess_and_graph": prep_seconds, "total": seconds},
        "peak_memory_mb": _peak_memory_mb(),
        "config": dataclasses.asdict(config),
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    _write_outputs(tmp, prepared, result, summary)
    pictures = _plots(tmp, prepared, result) if args.plot else []
    _publish(tmp, out, args.overwrite)
    print(f"wrote {out}/: " + " ".join(["labels.csv", "embedding.csv", "history.csv",
                                        "summary.json", *pictures]))
    return 0


def _benchmark(path, n_clusters, repeats=3, **config):
    """Where an epoch's time goes on the count matrix at path, with the defaults (or config):
    seconds of forward + backward of the encoder (Eq. 1), the feature head with the ZINB loss
    (Eq. 3), the structure loss (Eq. 2) and the clustering loss (Eqs. 5-7) on the cells and pairs
    of one epoch; a phase-1 evaluation (codes, k-means with 3 restarts, ID/LID, scores) divided
    by eval_every; and a whole phase-1 epoch (forward, backward, Adam step)."""
    config = Config(**config)
    torch.manual_seed(config.seed)
    prepared, adjacency = _prepare(datasets.load(path), n_clusters, config)
    data = _tensors(prepared, adjacency, torch.device(config.device))
    n = len(prepared.x)
    sample = _sampler(n, data["edges"].shape[1], config, config.device)
    model = _Model(prepared.x.shape[1], config).to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_pretrain)
    z = _codes(model, data)
    phi = z[torch.randperm(n)[:n_clusters]]
    q, _ = target_distribution(soft_assign(z, phi), 0.1)

    def backward(loss_of_codes):
        loss_of_codes(z.clone().requires_grad_()).backward()

    def clustering(codes):
        cells = sample()[0]
        return kl_divergence(_rows(q, cells), soft_assign(_rows(codes, cells), phi))

    def evaluation():
        codes = _codes(model, data).cpu().numpy()
        km = kmeans(codes, n_clusters, seed=config.seed, n_init=3)[0]
        geometry.cluster_geometry(codes, km)
        if prepared.labels is not None:
            ari(prepared.labels, km)
            centroid_ari(prepared.labels, codes)

    def epoch():
        _, _, l_x, l_a = _self_supervision(model, data, config, *sample())
        _step(optimizer, config.w_x * l_x + config.w_a * l_a)

    parts = {
        "encoder": lambda: model.encoder(data["x"], data["a_norm"]).sum().backward(),
        "ZINB": lambda: backward(lambda c: _feature_loss(model, data, c, sample()[0])[1]),
        "structure": lambda: backward(
            lambda c: structure_loss(c, data["edges"], config.block, sample()[1])),
        "clustering": lambda: backward(clustering),
        "evaluation": evaluation,
        "phase-1 epoch": epoch,
    }
    seconds = {}
    for name, part in parts.items():
        part()
        start = time.perf_counter()
        for _ in range(repeats):
            part()
        seconds[name] = (time.perf_counter() - start) / repeats
    seconds["evaluation"] /= config.eval_every
    losses = "sampled" if _sampled(config, n) else "exact"
    print(f"{n} cells, {losses} losses | "
          + " | ".join(f"{name} {value:.3f} s" for name, value in seconds.items()))
    return seconds


def _peak_memory_mb():
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
