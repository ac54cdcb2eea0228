"""The scTCM model and its losses: Eqs. (1)-(13) of Mrabah et al. (IJCAI 2023), in their order.

Config (every hyperparameter), then: the GCN encoder f_E (Eq. 1); the structure head and its
loss L_A (Eq. 2); the feature head f_D^(2) and the ZINB loss L_X of raw counts (Eq. 3); L_SS
(Eq. 4); Student-t soft assignments, targets, reliable sets and the KL losses of the clusters
(Eqs. 5-7) and overclusters (Eqs. 8-10); convex combinations of reliable codes, the
discriminators and the generator loss (Eqs. 11-13). How they are trained (Sec. 3.2) is in
training.py; the ranges of Config's fields are checked in settings.py.

References
- Mrabah, Amar, Bouguessa, Diallo. Toward convex manifolds: a geometric perspective for deep
  graph clustering of single-cell RNA-seq data. IJCAI 2023.
- Kipf & Welling. Semi-supervised classification with GCNs (ICLR 2017); Variational graph
  auto-encoders (NeurIPS workshop 2016).
- Eraslan et al. Single-cell RNA-seq denoising using a deep count autoencoder (Nat. Commun.
  2019): the ZINB feature head.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from clustering import symmetric_normalize
from settings import COUNT, POSITIVE, SHARE, WEIGHT, Each, Interval, OneOf, OrAuto, setting
from zinb import zinb_nll


# ---------------------------------------------------------------- the settings

@dataclass
class Config:
    """Every hyperparameter of a run; one set of defaults for all datasets. Each field: its
    default, the help of its flag, the values it accepts (settings.check refuses the rest) and
    the group of its flag in -h ("model" unless named)."""
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
    init: str = setting("consistent", "phi^c, the start of phase 2 (TOUR.md: Where we differ)",
                        OneOf(("consistent", "merge", "consensus", "medoid", "spectral",
                               "kmeans")))
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
    start_targets: int = setting(0, "phase-2 epochs whose targets q are the start itself, one-hot "
                                 "at each cell's start cluster (0: Eq. 6 from the first epoch)",
                                 Interval(0))
    schedule: str = setting("paper", "phase 2's steps: c, o and g in turn, one an epoch (paper), "
                            "or as the authors' code takes them: c and o on alternate epochs, g "
                            "on 5 epochs of every 20 (authors)", OneOf(("paper", "authors")))
    rewire: bool = setting(False, "not in the paper, the authors' code: at each target update "
                           "every reliable cell gains an edge of A to the reliable cell nearest "
                           "its cluster's centre")
    repair: bool = setting(False, "not in the paper: at each target update, one split-merge "
                           "move when two neighbouring clusters are one hump along the line "
                           "between their centres and another cluster two humps along its first "
                           "axis (K kept)")
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
        """x: (n, g) scaled log expression, a tensor or for many cells a SparseInput;
        a_norm: sparse (n, n) -> Z (n, d)."""
        if isinstance(x, SparseInput):
            xw = x.linear(self.w1, self.dropout if self.training else 0.0)
        else:
            xw = self.w1(F.dropout(x, self.dropout, self.training))
        h = torch.relu(Propagate.apply(a_norm, xw))
        return Propagate.apply(a_norm, self.w2(h))


TRANSPOSE_BLOCK = 1024  # cells per block of SparsePattern's stored transpose


class SparsePattern:
    """The non-zeros of an (n, g) CSR matrix on the device, for the many-cells path (counts and
    the encoder input share them): products with dense matrices of the matrix and of its
    transpose, its dense rows and its weighted column sums. A matrix is this pattern and a values
    tensor.

    The transpose is stored as one CSR per block of TRANSPOSE_BLOCK cells, S^T G = sum_b S_b^T
    G_b: a single (g, n) CSR reads all n rows of G once per gene, and at 100,000 cells that
    product took ten times the forward one (torch's own sparse backward also forms the
    transpose at every call); a block's rows of G stay in the cache."""

    def __init__(self, csr, device):
        n, nnz = csr.shape[0], csr.nnz
        index, np_index = (torch.int32, np.int32) if nnz < 2 ** 31 else (torch.long, np.int64)
        to = lambda array: torch.as_tensor(array, device=device).to(index)
        self.shape = csr.shape
        self.crow, self.col = to(csr.indptr), to(csr.indices)
        self.blocks, order = [], []  # (cells, entries, crow, col) of each block's transpose
        for start in range(0, n, TRANSPOSE_BLOCK):
            stop = min(start + TRANSPOSE_BLOCK, n)
            first, last = csr.indptr[start], csr.indptr[stop]
            block = sp.csr_matrix((np.arange(first, last, dtype=np_index),
                                   csr.indices[first:last], csr.indptr[start:stop + 1] - first),
                                  shape=(stop - start, csr.shape[1])).T.tocsr()
            self.blocks.append((slice(start, stop), slice(first, last),
                                to(block.indptr), to(block.indices)))
            order.append(block.data)
        self.order_t = to(np.concatenate(order))  # values -> the blocks' transposed order

    def matrix(self, values):
        with warnings.catch_warnings():  # see normalized_adjacency
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                           check_invariants=False)  # a scipy CSR's arrays

    def transposed_product(self, values, g):
        """S^T G for S = matrix(values) and a dense G (n, d) -> (g, d), a block at a time."""
        values_t = values.index_select(0, self.order_t)
        out = g.new_zeros(self.shape[1], g.shape[1])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            for cells, entries, crow, col in self.blocks:
                block = torch.sparse_csr_tensor(crow, col, values_t[entries],
                                                (self.shape[1], cells.stop - cells.start),
                                                check_invariants=False)
                out += block @ g[cells]
        return out

    def rows(self, values, cells=None):
        """The rows `cells` of the matrix (all of them: None) as a dense tensor."""
        if cells is None:
            return self.matrix(values).to_dense()
        start, end = self.crow[cells].long(), self.crow[cells + 1].long()
        lengths = end - start
        which = torch.repeat_interleave(torch.arange(len(cells), device=values.device), lengths)
        offset = torch.arange(int(lengths.sum()), device=values.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths)
        entries = torch.repeat_interleave(start, lengths) + offset
        dense = values.new_zeros(len(cells), self.shape[1])
        dense[which, self.col.index_select(0, entries).long()] = values.index_select(0, entries)
        return dense

    def column_sums(self, values, row_weights):
        """sum_i w_i M_ij of the matrix M for row weights w (n,) -> (g,)."""
        row = torch.repeat_interleave(torch.diff(self.crow.long()))  # each value's row
        weighted = values * row_weights.index_select(0, row)
        return weighted.new_zeros(self.shape[1]).index_add_(0, self.col.long(), weighted)


class _SparseProduct(torch.autograd.Function):
    """S W for S = pattern.matrix(values) and a dense W requiring a gradient; the gradient
    S^T G from the stored transpose (SparsePattern.transposed_product)."""

    @staticmethod
    def forward(ctx, pattern, values, w):
        ctx.pattern, ctx.values = pattern, values
        return pattern.matrix(values) @ w

    @staticmethod
    def backward(ctx, grad_output):
        return None, None, ctx.pattern.transposed_product(ctx.values, grad_output)


@dataclass
class SparseInput:
    """The encoder input of many cells as datasets.ScaledCounts holds it, X = S - 1 v^T, on the
    device: S's values on a SparsePattern, and v."""
    pattern: SparsePattern
    values: torch.Tensor  # (nnz,) S on the pattern
    v: torch.Tensor       # (g,)

    @property
    def shape(self):
        return self.pattern.shape

    def __len__(self):
        return self.shape[0]

    def linear(self, layer, dropout=0.0):
        """layer(X), the first GCN layer's X W^T + b, as S W^T - 1 (v W^T) + b: no n x g array.
        dropout > 0 falls on the stored entries of S alone (each kept with probability 1 - p and
        scaled by 1 / (1 - p)), not on the constant part -1 v^T: the same expectation as
        dropout on X, fewer dropped entries (README, Many cells)."""
        values = F.dropout(self.values, dropout, training=dropout > 0)
        return (_SparseProduct.apply(self.pattern, values, layer.weight.T)
                - self.v @ layer.weight.T + layer.bias)


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


class _PairSum(torch.autograd.Function):
    """sum_m f(z_i . z_j) over the pairs (i, j) = pairs[:, m] and its gradient, f'(l) z_j added
    into row i and f'(l) z_i into row j, a block of pairs at a time: no (M, d) array of a large
    sample of pairs is made (at a million cells, the edges and pairs of Eq. 2 are 4e7 of them).
    df: the derivative of f."""

    @staticmethod
    def forward(ctx, z, pairs, f, df, block):
        total, grad = z.new_zeros(()), torch.zeros_like(z)
        for start in range(0, pairs.shape[1], block):
            i, j = pairs[0, start:start + block], pairs[1, start:start + block]
            z_i, z_j = z.index_select(0, i), z.index_select(0, j)
            logits = (z_i * z_j).sum(1)
            total += f(logits).sum()
            slope = df(logits)[:, None]
            grad.index_add_(0, i, slope * z_j).index_add_(0, j, slope * z_i)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None


PAIR_BLOCK = 1 << 20  # structure_loss takes edges and pairs a block at a time above this many


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
    pairs: optional (2, M) long tensor of uniformly drawn cells. Above PAIR_BLOCK edges or pairs
    the sums are taken a block at a time (_PairSum: the same sums, added in another order; the
    edge sum as twice the sum over i < j, A being symmetric)."""
    n, n_edges = z.shape[0], edges.shape[1]
    pos_weight = (n * n - n_edges) / n_edges
    norm = n * n / (2 * (n * n - n_edges))
    if pairs is not None and max(n_edges, pairs.shape[1]) > PAIR_BLOCK:
        once = edges[:, edges[0] < edges[1]]  # l_ij = l_ji: each edge once, its sum twice
        edge_sum = 2 * _PairSum.apply(
            z, once, lambda l: pos_weight * F.softplus(-l) - F.softplus(l),
            lambda l: -pos_weight * torch.sigmoid(-l) - torch.sigmoid(l), PAIR_BLOCK)
        pair_sum = _PairSum.apply(z, pairs, F.softplus, torch.sigmoid, PAIR_BLOCK)
        return norm * (pair_sum * (n * n / pairs.shape[1]) + edge_sum) / (n * n)
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


def log_mean(data):
    """log(mean_i x_ig / s_i), (g,): the log rate of each gene without z, the intercept of the
    mean head (FeatureHead). Floored at the mean of one count in 1e6 cells, so that a gene
    without counts gets a finite intercept. Counts dense or SparseCounts."""
    counts, inverse_s = data["counts"], 1 / data["size_factors"][:, 0]
    if isinstance(counts, SparseCounts):
        total = counts.pattern.column_sums(counts.values, inverse_s)
    else:
        total = inverse_s @ counts  # no (n, g) temporary
    return torch.log((total / len(counts)).clamp_min(1e-6))


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
        """The rows of t (n, ...) that belong to the batch: t itself on the exact path; of
        SparseCounts, those rows dense."""
        if isinstance(t, SparseCounts):
            return t.pattern.rows(t.values, self.cells)
        return t if self.cells is None else t.index_select(0, self.cells)


@dataclass
class SparseCounts:
    """The raw counts of many cells on the device, sparse: a SparsePattern and its values;
    Batch.rows makes a batch's rows dense."""
    pattern: SparsePattern
    values: torch.Tensor

    def __len__(self):
        return self.pattern.shape[0]


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
    lgamma_x1 = batch.rows(data["lgamma_x1"]) if "lgamma_x1" in data else None  # sparse: per batch
    l_x = zinb_nll(batch.rows(data["counts"]), rate * batch.rows(data["size_factors"]), theta,
                   pi, lgamma_x1=lgamma_x1)
    return rate, l_x


def self_supervised_loss(out, config):
    """L_SS of Eq. (4), weighted: w_x L_X + w_a L_A."""
    return config.w_x * out.l_x + config.w_a * out.l_a


# ---------------------------------------------------------------- Eqs. (5)-(10): (over)clustering

def soft_assign(z, centers):
    """Student-t soft assignments p_ij, Eq. (5) (and Eq. (8) with overcluster centres).

    z: (n, d) latent codes z_i; centers: (K, d) centres phi_j -> (n, K), rows sum to 1."""
    kernel = 1.0 / (1.0 + torch.cdist(z, centers) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def margins(p):
    """top-1 minus top-2 of each row of p (n, K) -> (n,): what Eqs. (6) and (9) threshold."""
    top2 = p.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def target_distribution(p, beta):
    """Target assignments q and reliable set Omega, Eqs. (6) and (9).

    A cell is reliable when its top-1 minus top-2 assignment reaches beta (a number, or one per
    cluster: a (K,) tensor read at the cell's argmax); its target is then the one-hot of its
    argmax, otherwise q_i = p_i. p: (n, K) -> q (n, K), reliable (n,) bool."""
    argmax = p.argmax(1)
    threshold = beta[argmax] if torch.is_tensor(beta) else beta
    reliable = margins(p) >= threshold
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
    margin = margins(p)
    overall = torch.quantile(margin, 1 - reliable_frac).item()
    if not per_cluster:
        return overall
    argmax = p.argmax(1)
    return torch.tensor([torch.quantile(margin[argmax == k], 1 - reliable_frac).item()
                         if (argmax == k).any() else overall for k in range(p.shape[1])],
                        device=p.device)


def kl_divergence(q, p, reduction="mean"):
    """KL(q || p) = sum_i sum_j q_ij log(q_ij / p_ij), Eqs. (7) and (10), with 0 log 0 = 0.

    The argument order is the paper's (target first); the authors' code computes KL(p || q).
    reduction="sum" is Eq. (7) as written; "mean" divides by n so that gamma_c weighs it
    against the per-entry mean L_SS."""
    kl = (torch.xlogy(q, q) - q * torch.log(p)).sum()
    return kl if reduction == "sum" else kl / p.shape[0]


def clustering_loss(q, z, centres, batch):
    """L_c (Eq. 7, centres phi^c) or L_o (Eq. 10, centres phi^o) on the cells of a Batch:
    KL(q || p) between their targets and their soft assignments (Eq. 5 or 8).
    q: (n, K) the targets of every cell; z: (n, d) the codes of every cell; centres: (K, d)."""
    return kl_divergence(batch.rows(q), soft_assign(batch.rows(z), centres))


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


def optimise(optimizer, loss):
    """One step of an optimiser on a loss."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


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
