"""The data path of the paper (scTCM Sec. 4): a count matrix (Dataset) preprocessed by hand into
the encoder input and the ZINB target of the same cells and genes (Prepared), the kNN cell graph
A, and the synthetic demo data.

    file -> formats.load() -> Dataset -> preprocess() -> Prepared -> knn_graph(Prepared.x) -> A
    counts in memory -> from_counts() -> Dataset (sctcm.cluster); Prepared and A -> training.fit

Reading files (seven layouts, label files, which way a table lies) and writing a run's output
folder are formats.py's; it builds its Dataset with what this file makes public (encode_labels,
count_problem, names_or_numbered).

References:
  Mrabah, Amar, Bouguessa, Diallo, "Toward Convex Manifolds: A Geometric Perspective for Deep
    Graph Clustering of Single-cell RNA-seq Data" (scTCM), IJCAI 2023: the kNN cell graph A;
    the authors' code uses 1500 HVGs and k=15 on 50 PCs;
  Satija et al., Nat. Biotechnol. 2015 (Seurat highly variable genes by normalised dispersion),
    as in scanpy's highly_variable_genes(flavor="seurat") and scale() (Wolf et al., Genome
    Biol. 2018);
  Eraslan et al., Nat. Commun. 2019 (DCA: size factors and ZINB counts, the target of Eq. 3).
"""
import hashlib
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial import cKDTree

from clustering import squared_distances

MISSING_LABELS = ("", "na", "nan", "n/a", "none")  # label strings that mean "no label", in any case


@dataclass
class Dataset:
    """A labelled (or unlabelled) count matrix, cells x genes, as read from a file
    (formats.load: counts CSR float32) or given in memory (from_counts)."""
    counts: np.ndarray | sp.csr_matrix       # (n, g) raw counts >= 0, whole numbers
    labels: np.ndarray | None = None         # (n,) int64 in 0..K-1, -1: missing; None: no labels
    label_names: np.ndarray | None = None    # (K,) str, the name of each label (missing is not one)
    gene_names: np.ndarray | None = None     # (g,) str
    cell_names: np.ndarray | None = None     # (n,) str
    name: str = ""                           # short name, the file name without its suffixes
    notes: list[str] = field(default_factory=list)  # one-line remarks on how the file was read


@dataclass
class ScaledCounts:
    """The encoder input of many cells, never made dense: the scaled matrix
    X = clip((L - 1 mu^T) diag(1 / sigma), -c, c) of preprocess, with L = log1p(counts / s),
    held as X = S - 1 v^T. Off the counts' non-zeros L is 0, so X_ij = clip(-mu_j / sigma_j) =
    -v_j with v_j = min(mu_j / sigma_j, c); on them S_ij = X_ij + v_j. So S has the counts'
    sparsity, every X_ij is exact, clipping included, and X M = S M - 1 (v^T M) for any M."""
    s: sp.csr_matrix  # (n, g) float32, non-zero where the counts are
    v: np.ndarray     # (g,) float32

    @property
    def shape(self):
        return self.s.shape

    def __len__(self):
        return self.s.shape[0]

    def dense(self, rows=slice(None)):
        """X itself, or the given rows of it, as a dense float32 array."""
        return self.s[rows].toarray() - self.v


@dataclass
class Scaling:
    """What preprocess learned from its cells, so that other cells can be prepared alike
    (prepare_like): the kept genes by name, the median library size that makes the size
    factors, and each kept gene's mean and sd (ddof=1) of log1p(x / s) that scale it (step 5 of
    preprocess; sd inf for a gene constant over the cells), and the clip."""
    genes: np.ndarray         # (g,) str, the kept genes' names
    median_library: float
    mean: np.ndarray          # (g,)
    sd: np.ndarray            # (g,)
    clip: float = 10.0


@dataclass
class Prepared:
    """The output of preprocess(): the encoder input x and the ZINB target (counts with
    size_factors, Eq. 3) of the same cells and genes. Above dense_limit entries (many cells)
    x is a ScaledCounts and counts a CSR matrix: nothing n x g is dense."""
    x: np.ndarray | ScaledCounts  # (n, g) float32: normalised, log1p, HVGs, scaled, clipped
    counts: np.ndarray | sp.csr_matrix  # (n, g) float32: raw counts of the same cells and genes
    size_factors: np.ndarray    # (n,) float32: s_i = library size / median library size
    genes: np.ndarray           # (g,) int64: kept gene indices into Dataset.counts columns
    cells: np.ndarray           # (n,) int64: kept cell indices into Dataset.counts rows
    labels: np.ndarray | None   # (n,) labels of the kept cells (-1: missing), for scoring only
    label_names: np.ndarray | None  # (K,) str
    gene_names: np.ndarray      # (g,) str, names of the kept genes
    cell_names: np.ndarray      # (n,) str, names of the kept cells
    name: str = ""
    notes: list[str] = field(default_factory=list)  # Dataset.notes + one line on what was dropped
    scaling: Scaling | None = None  # what preprocessing learned (prepare_like)
    # (mean (g,), axes (g, m)) of the principal components A is built on (cell_graph)
    components: tuple | None = None


# ---------------------------------------------------------------- a Dataset: counts, labels, names


def from_counts(counts, labels=None, name="counts"):
    """A Dataset from counts in memory (sctcm.cluster's input): counts (n, g) raw counts, cells x
    genes, a numpy array or scipy sparse matrix; labels: optional (n,) labels of the rows
    (missing: -1, NaN, "", "NA"), encoded as formats.load() encodes a file's (encode_labels).
    The counts themselves are checked by preprocess(). Bad input raises a one-line ValueError."""
    x = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a numeric matrix, cells x genes, got {x.dtype} "
                         f"of shape {x.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"{name}: {len(labels)} labels for {x.shape[0]} cells x "
                             f"{x.shape[1]} genes")
        if labels.dtype.kind == "O":  # a pandas column: strings, NaN where a label is missing
            labels = labels.astype(str)
    codes, names = encode_labels(labels, None)
    return Dataset(counts=x, labels=codes, label_names=names, name=name)


def encode_labels(values, names):
    """Labels (numbers or strings) -> (int64 codes 0..K-1 and -1 where missing, K names), or
    (None, None) when no cell has a label. Missing: a negative or non-finite number (-1 is how
    anndata codes NaN), or a label named in MISSING_LABELS. Whole numbers index names if
    given."""
    if values is None:
        return None, None
    values = np.asarray(values).ravel()
    labelled = np.ones(len(values), dtype=bool)
    if values.dtype.kind in "biuf":
        labelled = np.isfinite(values) & (values >= 0)
        if np.all(values[labelled] == np.round(values[labelled])):
            values = np.where(labelled, values, 0).astype(np.int64)
    uniq, codes = np.unique(values[labelled], return_inverse=True)
    label_names = uniq.astype(str)
    if names is not None and uniq.dtype.kind == "i" and uniq.max(initial=-1) < len(names):
        label_names = np.asarray(names, dtype=str)[uniq]
    real = ~np.isin(np.char.lower(np.char.strip(label_names)), MISSING_LABELS)
    if not real.any():
        return None, None
    labels = np.full(len(values), -1, dtype=np.int64)
    labels[labelled] = np.where(real, np.cumsum(real) - 1, -1)[codes.ravel()]
    return labels, label_names[real]


def count_problem(values, what):
    """Why values are not raw counts (numbers, finite, non-negative, whole), in a few words, or
    None; what names them (X, counts, ...). The line a refusal gives after the file's name."""
    problem = dtype_problem(values.dtype, what)
    if problem:
        return problem
    if values.dtype.kind == "f":
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            return f"{bad} non-finite counts (NaN or inf) in {what}"
    bad = np.count_nonzero(values < 0)
    if bad:
        return f"{bad} negative counts in {what}"
    if values.dtype.kind == "f":
        bad = np.count_nonzero(values != np.round(values))
        if bad:
            return (f"{bad} non-integer counts in {what} (raw counts expected, not normalised "
                    "or log data)")
    return None


def dtype_problem(dtype, what):
    """Why counts stored as dtype cannot be raw counts (strings, records, complex numbers), or
    None: count_problem's first question, which a reader asks before it reads the values."""
    if dtype.kind not in "biuf":
        return f"{what} holds non-numeric values ({dtype})"
    return None


def names_or_numbered(names, prefix, size):
    """names as an array; None (a file without cell or gene names) -> numbered(prefix, size)."""
    return np.asarray(names) if names is not None else numbered(prefix, size)


def numbered(prefix, size):
    """prefix0, prefix1, ..., prefix{size - 1}: the names of cells, genes or clusters that have
    none of their own."""
    return np.array([f"{prefix}{i}" for i in range(size)])


# ---------------------------------------------------------------- preprocess


DENSE_LIMIT = 50_000_000  # preprocess keeps x and counts dense up to this many entries (200 MB)


def preprocess(dataset, n_top_genes=1500, dense_limit=DENSE_LIMIT):
    """Filter, normalise, log1p, pick highly variable genes, scale -> Prepared (scanpy's recipe,
    by hand).

    1. drop cells and genes with zero counts (Prepared.notes ends with one line saying how many);
    2. size factors s_i = l_i / median(l), l_i = sum_j X_ij the library size;
    3. normalise each cell to the median library size, X_ij / s_i, and take log1p;
    4. keep the n_top_genes genes of highest Seurat normalised dispersion (all when fewer remain);
    5. scale each kept gene to zero mean and unit variance (ddof=1, as scanpy), clip to [-10, 10].
    Works on CSR counts: only the (n, n_top_genes) selected columns become dense, and only when
    they have at most dense_limit entries; above, x is a ScaledCounts (the same numbers, held
    sparse) and counts stay CSR.
    counts: (n0, g0) -> x, counts: (n, g) float32, size_factors (n,), cells (n,), genes (g,)."""
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}")
    name = dataset.name or "dataset"
    x = sp.csr_matrix(dataset.counts, dtype=np.float32)
    problem = count_problem(x.data, "counts")
    if problem:
        raise ValueError(f"{name}: {problem}")
    n0, g0 = x.shape
    cells = np.flatnonzero(np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() > 0)
    genes = np.flatnonzero(np.asarray(x.sum(axis=0, dtype=np.float64)).ravel() > 0)
    if len(cells) < 3 or len(genes) < 3:
        raise ValueError(f"{name}: only {len(cells)} cells and {len(genes)} genes with non-zero "
                         "counts (need at least 3 of each)")
    if len(cells) < n0:
        x = x[cells]
    library = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    size_factors = library / np.median(library)
    mean, var = _normalised_mean_var(x, size_factors)  # of every gene: no copy of x without
    hvg = _seurat_hvg(mean[genes], var[genes], n_top_genes)  # the empty ones
    counts = x[:, genes[hvg]]
    counts.sort_indices()
    if counts.shape[0] * counts.shape[1] <= dense_limit:
        counts = counts.toarray()
        log = np.log1p(counts / size_factors[:, None].astype(np.float32))
        mean, sd = _gene_scaling(log)
        encoder_input = _scaled(log, mean, sd)
    else:
        mean, sd = _sparse_gene_scaling(_log_counts(counts, size_factors))
        encoder_input = _scaled_counts(counts, size_factors, mean, sd)
    kept_genes = len(genes)
    genes = genes[hvg]
    note = (f"{name}: dropped {n0 - len(cells)} of {n0} cells and {g0 - kept_genes} of {g0} "
            f"genes with zero counts; kept {len(genes)} highly variable genes")
    labels = None if dataset.labels is None else np.asarray(dataset.labels)[cells]
    if labels is not None and not np.any(labels >= 0):
        labels = None  # all missing: unlabelled
    gene_names = names_or_numbered(dataset.gene_names, "gene", g0)[genes]
    return Prepared(
        x=encoder_input,
        counts=counts,
        size_factors=size_factors.astype(np.float32),
        genes=genes,
        cells=cells,
        labels=labels,
        label_names=dataset.label_names,
        gene_names=gene_names,
        cell_names=names_or_numbered(dataset.cell_names, "cell", n0)[cells],
        name=dataset.name,
        notes=list(dataset.notes) + [note],
        scaling=Scaling(gene_names, float(np.median(library)), mean, sd),
    )


def _normalised_mean_var(x, size_factors):
    """Mean and variance (ddof=1, as scanpy) of each gene of the normalised counts X_ij / s_i.

    x: (n, g) CSR counts; computed as E[y] and E[y^2] - E[y]^2 without densifying x."""
    n = x.shape[0]
    inv = 1.0 / size_factors
    mean = (x.T @ inv) / n
    mean_sq = (x.multiply(x).T @ (inv * inv)) / n
    var = np.maximum(mean_sq - mean * mean, 0.0) * n / (n - 1)
    return np.asarray(mean).ravel(), np.asarray(var).ravel()


def _seurat_hvg(mean, var, n_top):
    """Indices (ascending) of the n_top genes of highest normalised dispersion; all when
    g <= n_top."""
    if n_top >= len(mean):
        return np.arange(len(mean))
    z = normalised_dispersion(mean, var)
    return np.sort(np.argsort(-z, kind="stable")[:n_top])


def normalised_dispersion(mean, var, n_bins=20):
    """Seurat's normalised dispersion (Satija et al. 2015; scanpy flavor="seurat").

    mean, var: (g,) of the normalised (not log) counts. Dispersion d = log(var / mean); genes are
    binned into n_bins equal-width bins of log1p(mean) and d is z-scored within its bin (ddof=1).
    A bin holding a single gene has no spread: as in scanpy, its gene gets 1 (one standard
    deviation, so it is kept only when few genes stand out more). A bin whose genes all have the
    same d gets 0. Genes with zero variance get -inf (ranked last). -> (g,)"""
    with np.errstate(divide="ignore"):
        disp = np.log(var / mean)
    log_mean = np.log1p(mean)
    lo, hi = log_mean.min(), log_mean.max()
    # pandas.cut widens the range by 0.1%
    edges = np.linspace(lo - 0.001 * (hi - lo), hi, n_bins + 1)
    bins = np.digitize(log_mean, edges[1:-1], right=True)
    z = np.full(len(disp), -np.inf)
    for b in np.unique(bins):
        members = (bins == b) & np.isfinite(disp)
        d = disp[members]
        if len(d) == 1:
            z[members] = 1.0
        elif len(d) > 1:
            std = d.std(ddof=1)
            z[members] = (d - d.mean()) / std if std > 0 else 0.0
    return z


def _log_counts(counts, size_factors):
    """log1p(x / s) of CSR counts, a CSR matrix on the counts' own index arrays (no copy)."""
    rows = np.repeat(size_factors.astype(np.float32), np.diff(counts.indptr))
    return sp.csr_matrix((np.log1p(counts.data / rows), counts.indices, counts.indptr),
                         shape=counts.shape)


def _sparse_gene_scaling(log):
    """_gene_scaling of a CSR matrix: each column's mean and sd (ddof=1) from its non-zeros (the
    zeros add nothing to either sum), sd inf for a column constant over the rows."""
    n = log.shape[0]
    mean = np.asarray(log.sum(axis=0, dtype=np.float64)).ravel() / n
    mean_sq = np.asarray(log.multiply(log).sum(axis=0, dtype=np.float64)).ravel() / n
    sd = np.sqrt(np.maximum(mean_sq - mean ** 2, 0.0) * n / (n - 1))
    low = np.asarray(log.min(axis=0).toarray()).ravel()  # 0 wherever a gene has a zero
    high = np.asarray(log.max(axis=0).toarray()).ravel()
    sd[high == low] = np.inf
    return mean, sd


def _scaled_counts(counts, size_factors, mean, sd, clip=10.0):
    """_scaled(log1p(counts / s), mean, sd) of CSR counts (n, g) as a ScaledCounts, without a
    dense n x g array: v = min(mean / sd, clip), S = clip((L - mean) / sd) + v on the counts'
    non-zeros (ScaledCounts says why that is X exactly)."""
    log = _log_counts(counts, size_factors)
    v = np.minimum(mean / sd, clip)
    columns = log.indices
    log.data = (np.clip((log.data - mean[columns]) / sd[columns], -clip, clip)
                + v[columns]).astype(np.float32)
    return ScaledCounts(log, v.astype(np.float32))


def _gene_scaling(x):
    """Each column's mean and sd (ddof=1) of x (n, g); sd inf for a constant column (its float32
    sd is round-off, not always 0), which _scaled then sets to 0."""
    mean = x.mean(axis=0)
    sd = x.std(axis=0, ddof=1)
    sd[np.ptp(x, axis=0) == 0] = np.inf
    return mean, sd


def _scaled(x, mean, sd, clip=10.0):
    """Each column of x to zero mean and unit variance by the given mean and sd, clipped to
    [-clip, clip], float32."""
    return np.clip((x - mean) / sd, -clip, clip).astype(np.float32)


def prepare_like(dataset, scaling, dense_limit=DENSE_LIMIT):
    """Other cells preprocessed as the cells scaling was learned from (reuse: a saved model on
    new cells): the same genes, matched by name (a gene the dataset lacks reads as no counts in
    every cell, said in a note), size factors by the same median library size, log1p and each
    gene scaled by the same mean and sd and clipped alike. Cells without counts are dropped, as
    by preprocess. On the cells scaling was learned from it gives preprocess's Prepared again.
    -> Prepared (genes: each kept gene's column in dataset, -1 where it lacks one); ValueError
    when the dataset has no gene names or none of the genes."""
    name = dataset.name or "dataset"
    if dataset.gene_names is None:
        raise ValueError(f"{name}: no gene names, so its genes cannot be matched to the model's")
    x = sp.csr_matrix(dataset.counts, dtype=np.float32)
    problem = count_problem(x.data, "counts")
    if problem:
        raise ValueError(f"{name}: {problem}")
    column = {gene: j for j, gene in enumerate(np.asarray(dataset.gene_names).astype(str))}
    genes = np.array([column.get(str(gene), -1) for gene in scaling.genes])
    found = genes >= 0
    if not found.any():
        raise ValueError(f"{name}: none of the model's {len(genes)} genes is among its "
                         f"{x.shape[1]} genes (another gene naming?)")
    n0 = x.shape[0]
    cells = np.flatnonzero(np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() > 0)
    if len(cells) < 3:
        raise ValueError(f"{name}: only {len(cells)} cells with non-zero counts")
    if len(cells) < n0:
        x = x[cells]
    library = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    size_factors = library / scaling.median_library
    pick = sp.csr_matrix((np.ones(found.sum(), np.float32), (genes[found], np.flatnonzero(found))),
                         shape=(x.shape[1], len(genes)))  # column j <- the dataset's gene
    counts = x[:, genes] if found.all() else sp.csr_matrix(x @ pick)
    counts.sort_indices()
    if counts.shape[0] * counts.shape[1] <= dense_limit:
        counts = counts.toarray()
        log = np.log1p(counts / size_factors[:, None].astype(np.float32))
        encoder_input = _scaled(log, scaling.mean, scaling.sd, scaling.clip)
    else:
        encoder_input = _scaled_counts(counts, size_factors, scaling.mean, scaling.sd,
                                       scaling.clip)
    note = (f"{name}: dropped {n0 - len(cells)} of {n0} cells with zero counts; "
            f"{found.sum()} of the model's {len(genes)} genes found"
            + ("" if found.all() else f", the other {(~found).sum()} read as zero counts"))
    labels = None if dataset.labels is None else np.asarray(dataset.labels)[cells]
    return Prepared(
        x=encoder_input, counts=counts, size_factors=size_factors.astype(np.float32),
        genes=genes, cells=cells,
        labels=labels if labels is not None and np.any(labels >= 0) else None,
        label_names=dataset.label_names, gene_names=np.asarray(scaling.genes),
        cell_names=names_or_numbered(dataset.cell_names, "cell", n0)[cells],
        name=dataset.name, notes=list(dataset.notes) + [note], scaling=scaling)


def digest(prepared, adjacency):
    """A hex digest of preprocessed cells (x, counts, size factors, labels) and their graph A:
    equal for the same data only (sctcm's cache of phase 1, a saved model's --resume)."""
    hashed = hashlib.sha256()
    matrices = [prepared.x, prepared.counts, prepared.size_factors, adjacency]
    for matrix in matrices + ([] if prepared.labels is None else [prepared.labels]):
        if isinstance(matrix, ScaledCounts):
            hashed.update(matrix.v.tobytes())
            matrix = matrix.s
        arrays = [matrix.data, matrix.indices, matrix.indptr] if sp.issparse(matrix) else [matrix]
        for array in arrays:
            hashed.update(np.ascontiguousarray(array).tobytes())
    return hashed.hexdigest()


# ---------------------------------------------------------------- kNN graph


EXACT_KNN_CELLS = 20_000  # knn_graph searches exactly up to this many cells, approximately above


def knn_graph(x, k=15, n_pcs=50, exact=None):
    """Symmetric 0/1 adjacency A of the paper: i ~ j iff one is among the other's k nearest
    neighbours.

    x: (n, g) cells; Euclidean distances on the top n_pcs principal components (all of them when
    n_pcs >= min(n, g)); union of the two directions; no self loops. Neighbours are exact (a k-d
    tree) when `exact`, approximate (approximate_neighbours) otherwise; None picks exact up to
    EXACT_KNN_CELLS cells: in 50 dimensions a k-d tree degrades to a near n^2 search (114 s for
    100,000 synthetic cells on 2 cores; the approximate search takes 32 s there and finds 94% of
    the true neighbours). x may be a ScaledCounts (randomized_components).
    -> (n, n) scipy.sparse.csr_matrix, float32."""
    return cell_graph(x, k, n_pcs, exact)[0]


def cell_graph(x, k=15, n_pcs=50, exact=None):
    """knn_graph, with the principal components it is built on -> (A, (mean (g,), axes (g, m))):
    other cells' coordinates on them are project(x, components), as a saved model's graph of
    new cells is built (reuse)."""
    if not isinstance(x, ScaledCounts):
        x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2 or k < 1:
        raise ValueError(f"knn_graph needs at least 2 cells and k >= 1 (got {x.shape[0]} cells, "
                         f"k={k})")
    mean, axes, pcs = principal_components(x, n_pcs)
    return neighbour_graph(pcs, k, exact), (mean, axes)


def project(x, components):
    """The coordinates (x - mean) axes of the rows of x (dense, or a ScaledCounts: S axes -
    1 ((v + mean) axes), no n x g array) on given components (mean, axes) -> (n, m)."""
    mean, axes = components
    if isinstance(x, ScaledCounts):
        return x.s @ axes - (x.v + mean) @ axes
    return (np.asarray(x, dtype=np.float64) - mean) @ axes


def neighbour_graph(points, k=15, exact=None):
    """The symmetric kNN graph of knn_graph on given coordinates points (n, m)."""
    n = points.shape[0]
    k = min(k, n - 1)
    if exact or (exact is None and n <= EXACT_KNN_CELLS):
        _, idx = cKDTree(points).query(points, k=k + 1, workers=-1)
    else:
        idx = approximate_neighbours(points, k + 1)
    keep = idx != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False  # duplicates of a cell can push it out of its own list
    cols = idx[keep].reshape(n, k)
    indptr = np.arange(0, n * k + 1, k)
    a = sp.csr_matrix((np.ones(n * k, np.float32), cols.ravel(), indptr), (n, n))
    return a.maximum(a.T).tocsr()


def approximate_neighbours(x, k, n_trees=8, leaf_size=1024, seed=0):
    """The k nearest rows of x (itself included) of every row, approximately, at a cost near n.

    A random projection forest, then one round of NN-descent (Dasgupta & Freund 2008; Dong,
    Charikar & Li 2011): each of n_trees trees splits the points at the median of a random
    direction, level by level, into leaves of at most leaf_size points, searched exactly; every
    point keeps its k best over the trees, then also looks among its neighbours' neighbours
    (a neighbour of a neighbour is likely a neighbour). x: (n, d) -> (n, k) indices, nearest
    first."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    found = [_leaf_neighbours(x, leaf, k)
             for _ in range(n_trees) for leaf in _rp_leaves(x, leaf_size, rng)]
    rows = np.concatenate([leaf for leaf, _ in found])
    order = np.argsort(rows, kind="stable")
    candidates = np.concatenate([c for _, c in found])[order].reshape(n, -1)
    best = _nearest(x, candidates, k)
    return _nearest(x, np.hstack([best, best[best].reshape(n, -1)]), k)


def _rp_leaves(x, leaf_size, rng):
    """Index arrays of the leaves of one random projection tree of x (see
    approximate_neighbours)."""
    node = np.zeros(len(x), dtype=np.int64)
    while np.bincount(node).max() > leaf_size:
        projection = x @ rng.normal(size=x.shape[1]).astype(np.float32)
        order = np.lexsort((projection, node))
        start = np.searchsorted(node[order], node[order], side="left")
        size = np.bincount(node)[node[order]]
        upper = (np.arange(len(x)) - start) >= size // 2
        node[order] = 2 * node[order] + upper
    order = np.argsort(node, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(node[order])) + 1)


def _leaf_neighbours(x, leaf, k):
    """(leaf, (len(leaf), k) nearest members of the leaf of each member, padded by repeats)."""
    d = squared_distances(x[leaf], x[leaf])
    near = np.argsort(d, axis=1)[:, :k] if len(leaf) > k else np.argsort(d, axis=1)
    near = np.pad(near, ((0, 0), (0, k - near.shape[1])), mode="edge")
    return leaf, leaf[near]


def _nearest(x, candidates, k, block=4096):
    """The k nearest distinct candidates of each row of x; candidates: (n, c) indices, c >= k."""
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), block):
        cand = np.sort(candidates[start:start + block], axis=1)
        d = ((x[cand] - x[start:start + block, None]) ** 2).sum(2)
        d[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf  # a candidate listed twice counts once
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        out[start:start + block] = np.take_along_axis(cand, nearest, axis=1)
    return out


def pca(x, n_pcs=50):
    """Coordinates of x on its top n_pcs principal components (principal_components), (n, m)."""
    return principal_components(x, n_pcs)[2]


def principal_components(x, n_pcs=50):
    """The top n_pcs principal components of x (n, g), a dense array or a ScaledCounts ->
    (mean (g,), axes (g, m), scores (n, m)), m = min(n_pcs, n, g), scores = (x - mean) axes.
    Dense: an eigendecomposition of the smaller of X^T X (g x g) and X X^T (n x n), X = x
    centred, exact; when every component is asked for, axes is the identity and the scores X
    itself (the rotation changes no distance). ScaledCounts: randomized_components, by products
    alone."""
    if isinstance(x, ScaledCounts):
        return randomized_components(x, min(n_pcs, *x.shape))
    mean = x.mean(axis=0)
    xc = x - mean
    n, g = xc.shape
    m = min(n_pcs, n, g)
    if m == g:
        return mean, np.eye(g), xc
    if g <= n:
        _, v = scipy.linalg.eigh(xc.T @ xc, subset_by_index=[g - m, g - 1])  # ascending eigenvalues
        return mean, v[:, ::-1], xc @ v[:, ::-1]
    w, u = scipy.linalg.eigh(xc @ xc.T, subset_by_index=[n - m, n - 1])
    s = np.sqrt(np.maximum(w[::-1], 0.0))
    axes = (xc.T @ u[:, ::-1]) / np.where(s > 0, s, np.inf)  # X = U S V^T: V = X^T U / S
    return mean, axes, u[:, ::-1] * s  # scores U S


def randomized_components(x, m, n_iter=5, oversample=10, seed=0):
    """The top m principal components of a ScaledCounts x by a randomized SVD of the centred
    X_c = X - 1 mean^T (Halko, Martinsson & Tropp, SIAM Review 2011: Alg. 4.4, a range found by
    subspace iteration, then Alg. 5.1), with products alone: X = S - 1 v^T, so X_c = S - 1 u^T
    with u the column means of S, X_c M = S M - 1 (u^T M) and X_c^T Y = S^T Y - u (1^T Y); no
    n x g array is made. -> (mean (g,), axes (g, m), scores (n, m)) as principal_components."""
    s = x.s
    u = np.asarray(s.mean(axis=0, dtype=np.float64)).ravel()
    right = lambda matrix: s @ matrix - u @ matrix  # X_c M
    left = lambda matrix: s.T @ matrix - np.outer(u, matrix.sum(axis=0))  # X_c^T Y
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(right(rng.normal(size=(s.shape[1], m + oversample))))[0]
    for _ in range(n_iter):
        q = np.linalg.qr(left(q))[0]
        q = np.linalg.qr(right(q))[0]
    axes = np.linalg.svd(left(q).T, full_matrices=False)[2][:m].T  # B = Q^T X_c = U S V^T
    return u - x.v, axes, right(axes)


# ---------------------------------------------------------------- the first lines of a run


def describe(prepared, adjacency, k, log):
    """The lines a run starts with: what preprocessing kept, the graph, the cells scored."""
    n, g = prepared.x.shape
    for note in prepared.notes:
        log(note)
    log(f"{prepared.name}: {n} cells x {g} genes, K = {k}, graph {adjacency.nnz // 2} edges")
    if prepared.labels is not None and np.any(prepared.labels < 0):
        labelled = np.count_nonzero(prepared.labels >= 0)
        log(f"scored {labelled} of {n} cells with labels; the other {n - labelled} have none and "
            "are clustered, not scored")


# ---------------------------------------------------------------- synthetic data

# Shape of the demo data, tuned so that k-means on the top PCs of preprocess(synthetic()).x reaches
# an ARI of about 0.7-0.85 (it cuts each pair of interlocking arcs the wrong way) while spectral
# clustering of knn_graph() reaches 0.95-1.0.
SYN_SEPARATION = 4.0   # distance of each pair of arcs from the origin, along its own direction
SYN_RADIUS = 2.0       # radius of each arc
SYN_OFFSET = -0.25     # vertical offset of the second arc of a pair, in radii (two moons: 0.5)
SYN_WIDTH = 0.3        # half thickness of each sheet, along a third direction
SYN_NOISE = 0.1        # sd of the isotropic latent noise
SYN_GAIN = 2.5         # scale of the log fold changes made by the random decoder
SYN_INFORMATIVE = 0.7  # fraction of genes that depend on the latent position
SYN_DROPOUT = 0.6      # pi_ig = SYN_DROPOUT / (1 + mu_ig): dropout hits weakly expressed entries
DEMOS = {  # --demo PRESET -> synthetic()'s keywords
    "easy": {},
    "hard": {"noise": 0.3},  # three times the latent noise: the two arcs of each pair touch
}


def synthetic(n_cells=1500, n_genes=1000, n_clusters=6, seed=0, depth=3000.0, noise=SYN_NOISE,
              chunk=None):
    """Labelled ZINB counts whose clusters lie on curved manifolds (the demo and test data).

    Latent z: clusters 2p and 2p+1 are two interlocking arcs thickened into bent sheets
    (_bent_sheets). Genes: eta_ig = b_g + m_g (tanh(z_i W1 + c) W2)_g, a random one-hidden-layer
    map; m_g = 1 for a fraction SYN_INFORMATIVE of the genes, 0 for the rest. Counts:
    mu_ig = l_i softmax_g(eta_i) with library sizes l_i log-normal (median `depth` counts per
    cell, 3000 by default: UMI-like); X_ig ~ NB(mu_ig, theta_g) drawn as Poisson(Gamma(theta_g,
    mu_ig / theta_g)); then a dropout zero with probability pi_ig. noise: the latent noise's sd
    (DEMOS["hard"]: 0.3). chunk: cells whose counts are drawn at a time; by default all of them
    up to DENSE_LIMIT entries (counts dense, int64), else 20,000 (counts CSR float32, as load
    gives them: never dense, so that a million cells fit in memory). Deterministic for a seed and
    chunk. -> Dataset: counts (n_cells, n_genes), labels 0..K-1 named "arc 1a", "arc 1b" (the
    first pair), "arc 2a", ... (types, not clusters)."""
    if chunk is None:
        chunk = n_cells if n_cells * n_genes <= DENSE_LIMIT else 20_000
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_cells) % n_clusters)
    z = _bent_sheets(labels, n_clusters, rng, noise)
    decoder = _random_decoder(z.shape[1], n_genes, rng)
    library = rng.lognormal(np.log(depth), 0.35, n_cells)
    theta = rng.lognormal(np.log(4.0), 0.5, n_genes)  # NB inverse dispersion, one per gene
    parts = []
    for start in range(0, n_cells, chunk):
        cells = slice(start, start + chunk)
        eta = decoder(z[cells])
        profile = np.exp(eta - eta.max(axis=1, keepdims=True))
        mu = library[cells, None] * profile / profile.sum(axis=1, keepdims=True)
        counts = rng.poisson(rng.gamma(theta, mu / theta))
        counts[rng.random(counts.shape) < SYN_DROPOUT / (1.0 + mu)] = 0
        parts.append(counts if chunk >= n_cells else sp.csr_matrix(counts, dtype=np.float32))
    return Dataset(
        counts=parts[0] if chunk >= n_cells else sp.vstack(parts, format="csr"),
        labels=labels.astype(np.int64),
        label_names=np.array([f"arc {k // 2 + 1}{'ab'[k % 2]}" for k in range(n_clusters)]),
        gene_names=numbered("gene", n_genes),
        cell_names=numbered("cell", n_cells),
        name="synthetic",
    )


def _bent_sheets(labels, n_clusters, rng, noise):
    """Latent codes (n, 4P), P = ceil(K / 2) pairs: pair p sits at SYN_SEPARATION * e_p; in its
    plane (f_p, g_p) cluster 2p is the upper arc R (cos t, sin t) and cluster 2p+1 the lower arc
    R (1 - cos t, SYN_OFFSET - sin t), t ~ U[0, pi] (two moons); a width s ~ U[-1, 1] along h_p
    bends the arcs into sheets; then isotropic noise of sd noise. e, f, g, h: a random
    orthonormal basis."""
    n, n_pairs = len(labels), (n_clusters + 1) // 2
    dim = 4 * n_pairs
    e, f, g, h = np.linalg.qr(rng.normal(size=(dim, dim)))[0].reshape(4, n_pairs, dim)
    pair, lower = labels // 2, (labels % 2).astype(bool)
    t = rng.uniform(0.0, np.pi, n)
    u = SYN_RADIUS * np.where(lower, 1 - np.cos(t), np.cos(t))
    v = SYN_RADIUS * np.where(lower, SYN_OFFSET - np.sin(t), np.sin(t))
    s = SYN_WIDTH * rng.uniform(-1.0, 1.0, n)
    z = (SYN_SEPARATION * e[pair] + u[:, None] * f[pair] + v[:, None] * g[pair]
         + s[:, None] * h[pair])
    return z + rng.normal(0.0, noise, z.shape)


def _random_decoder(dim, n_genes, rng, hidden=32):
    """A random nonlinear map from latent codes to log relative expression, drawn once:
    -> decoder((n, dim) codes) -> (n, g)."""
    w1 = rng.normal(0.0, 1.0 / np.sqrt(dim), (dim, hidden))
    c = rng.normal(0.0, 0.5, hidden)
    w2 = rng.normal(0.0, SYN_GAIN / np.sqrt(hidden), (hidden, n_genes))
    base = rng.normal(0.0, 1.5, n_genes)  # b_g: log-normal spread of gene abundances
    informative = rng.random(n_genes) < SYN_INFORMATIVE
    return lambda z: base + informative * (np.tanh(z @ w1 + c) @ w2)

