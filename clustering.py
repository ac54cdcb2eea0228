"""The standard algorithms scTCM starts from and is judged by; none of them is a paper equation.

k-means (greedy k-means++ seeding), spectral clustering of the cell graph A, the modularity of a
partition and the overcluster merge that --init merge starts phase 2 from, and the scores
ACC / NMI / ARI with the centroid_ari diagnostic. numpy and scipy only: reproduce.py and the
tests use them without the model.

References
- Arthur & Vassilvitskii. k-means++: the advantages of careful seeding (SODA 2007).
- Ng, Jordan, Weiss. On spectral clustering: analysis and an algorithm (NeurIPS 2001).
- Newman. Modularity and community structure in networks (PNAS 2006); Clauset, Newman & Moore.
  Finding community structure in very large networks (Phys. Rev. E 2004).
- Hubert & Arabie. Comparing partitions (J. Classif. 1985) (ARI); Strehl & Ghosh. Cluster
  ensembles (JMLR 2002) (NMI); Kuhn 1955 (the Hungarian matching of ACC).
"""
import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.linalg import eigsh


def squared_distances(a, b):
    """(len(a), len(b)) squared Euclidean distances between the rows of a and b, clipped at 0
    against round-off (k-means, centroid_ari and datasets' approximate kNN search)."""
    return np.maximum((a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None], 0)


def symmetric_normalize(a):
    """D^-1/2 A D^-1/2 with D = diag(A 1), as a float64 scipy sparse matrix (spectral clustering
    here; with A + I, the propagation matrix of Eq. 1 in sctcm)."""
    a = sp.csr_matrix(a, dtype=np.float64)
    d = sp.diags(np.asarray(a.sum(axis=1)).ravel() ** -0.5)
    return d @ a @ d


# ---------------------------------------------------------------- k-means and spectral clustering

def kmeans(x, k, seed=0, n_init=10, max_iter=300, tol=1e-6):
    """k-means: greedy k-means++ seeding, Lloyd iterations, n_init restarts, lowest inertia kept.

    x: (n, d) array -> labels (n,), centers (k, d)."""
    _, labels, centers = lowest_inertia(kmeans_restarts(x, k, seed, n_init, max_iter, tol))
    return labels, centers


def lowest_inertia(restarts):
    """The first of kmeans_restarts' runs with the lowest inertia: the one kmeans returns."""
    return min(restarts, key=lambda run: run[0])


def kmeans_restarts(x, k, seed=0, n_init=10, max_iter=300, tol=1e-6):
    """Every restart of kmeans, in order: [(inertia, labels (n,), centers (k, d))] * n_init."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, rng)
        for _ in range(max_iter):
            dist = squared_distances(x, centers)
            labels = dist.argmin(1)
            new = _cluster_means(x, labels, centers)
            shift = np.sum((new - centers) ** 2)
            centers = new
            if shift <= tol * np.mean(np.var(x, 0)):
                break
        dist = squared_distances(x, centers)
        runs.append((dist.min(1).sum(), dist.argmin(1), centers))
    return runs


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
    closest = squared_distances(x, centers[0][None])[:, 0]
    n_trials = 2 + int(np.log(k))
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            candidates = rng.choice(len(x), n_trials, p=closest / total)
        else:
            candidates = rng.integers(len(x), size=n_trials)
        after = np.minimum(closest, squared_distances(x, x[candidates]).T)  # (n_trials, n)
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
    _, vectors = eigsh(symmetric_normalize(a), k=k, which="LA", v0=v0)
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
    a: (n, n) scipy sparse adjacency; over: (n,) overcluster of each cell -> labels (n,) in
    0..k-1."""
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


def merges(a, restarts, k, resolution=0.5):
    """Each of kmeans_restarts' overclusterings merged on the graph A down to k clusters
    (merge_overclusters) -> one partition (n,) per restart, in the restarts' order."""
    return [merge_overclusters(a, over, k, resolution) for _, over, _ in restarts]


def most_kept(x, partitions):
    """The partition whose cluster means keep most of its points (kept), the first of equals:
    of the merges of every restart, the one Eq. (5)'s centres at its means describe best."""
    return max(partitions, key=lambda partition: kept(x, partition))


def check_partition(labels, n, k):
    """labels as an array, or ValueError unless it puts each of n points in one of the clusters
    0..k-1 and leaves none of them empty (fit's start: phi^c is the mean code of each)."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.array_equal(np.unique(labels), np.arange(k)):
        raise ValueError(f"start must give each of the {n} cells a cluster in 0..{k - 1}, with "
                         "no cluster empty")
    return labels


def agreement_groups(partitions):
    """The groups of cells that every one of several partitions puts together (their
    intersection: co-association 1 in the sense of evidence accumulation, Fred & Jain 2005),
    numbered 0..C-1. A cell pair split by any partition is split here, so no single partition
    decides where the groups end. partitions: R arrays (n,) -> (n,) group of each cell."""
    return np.unique(np.stack(partitions, 1), axis=0, return_inverse=True)[1].ravel()


# ---------------------------------------------------------------- scores

def _contingency(y, pred):
    """Counts n_ij of cells with true class i and predicted cluster j. A cell whose label is
    missing (negative; formats.load writes -1) is left out, here and so in every metric."""
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


def matching(y, pred):
    """ACC's one-to-one map of clusters to classes (Hungarian, on the cells with a label) ->
    {cluster: class}; a cluster left over (more clusters than classes) is not in it."""
    y, pred = np.asarray(y), np.asarray(pred)
    classes, clusters = np.unique(y[y >= 0]), np.unique(pred[y >= 0])
    rows, cols = linear_sum_assignment(-_contingency(y, pred))
    return {int(clusters[j]): int(classes[i]) for i, j in zip(rows, cols)}


def renamed(y, pred):
    """pred with each cluster named after its class under ACC's map (matching), -1 for a cluster
    left without a class: where renamed(y, pred) == y, a cell's cluster is its type."""
    classes = matching(y, pred)
    return np.array([classes.get(int(c), -1) for c in np.asarray(pred)], dtype=np.int64)


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
    y = np.asarray(y)[keep]
    return ari(y, nearest_mean(np.asarray(z)[keep], y))


def nearest_mean(x, labels):
    """The cluster of labels whose mean is nearest to each point of x (n, d): the partition
    Eq. (5)'s argmax gives with its centres at the cluster means (its kernel falls with the
    distance)."""
    x, types = np.asarray(x, dtype=np.float64), np.unique(labels)
    means = np.stack([x[labels == t].mean(0) for t in types])
    return types[squared_distances(x, means).argmin(1)]


def kept(x, labels):
    """Share of the points whose nearest cluster mean (nearest_mean) is their own cluster's: 1
    when the centres at the means give the partition back."""
    return float(np.mean(nearest_mean(x, labels) == labels))


# ---------------------------------------------------------------- evidence without labels

def pairwise_ari(partitions):
    """ARI between every two of R partitions of the same cells -> (R, R), ones on the diagonal."""
    r = len(partitions)
    table = np.ones((r, r))
    for i in range(r):
        for j in range(i + 1, r):
            table[i, j] = table[j, i] = ari(partitions[i], partitions[j])
    return table


def most_central(partitions):
    """The index of the partition whose mean ARI to the others is highest: the run that agrees
    best with the rest (a medoid under ARI), chosen without labels."""
    table = pairwise_ari(partitions)
    return int(np.argmax((table.sum(1) - 1) / max(len(partitions) - 1, 1)))


def stability(partitions, reference):
    """Per cell, the share of the partitions that put it in its cluster of `reference`, each
    partition's clusters first renamed after the reference's (renamed) -> (n,) in [0, 1]; a
    cluster left without a match counts as a disagreement."""
    reference = np.asarray(reference)
    agree = np.zeros(len(reference))
    for partition in partitions:
        agree += renamed(reference, partition) == reference
    return agree / len(partitions)
