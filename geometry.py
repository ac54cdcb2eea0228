"""Intrinsic dimension (ID, TwoNN) and linear intrinsic dimension (LID, PCA) of latent codes,
the two curves of Fig. 2 of scTCM and its phase-2 stopping rule.

ID counts the independent directions in which a point can move without leaving the manifold;
LID is the dimension of the smallest linear subspace that holds the manifold (in the
least-squares sense). A flat piece of a manifold fills its span, so ID = LID; a curved one needs
more linear directions than it has intrinsic ones, so ID < LID, and the gap grows with the
curvature (a circle has ID 1 and LID 2; a swiss roll, ID 2 and LID 3). The paper (Sec. 1 and
the geometric study of Fig. 2, after Mrabah et al. 2022) reports that pretraining gives curved
cluster manifolds of low ID; a plain clustering loss then flattens them abruptly (ID up, LID
down, within a few iterations), while scTCM flattens them gradually. Its phase 2 ends when the
mean ID of the clusters reaches their mean LID. Last, two Gaussians fitted to values along a
line tell one hump from two (Ashman's D), for the evidence's mixtures and --repair.

References
- Facco, d'Errico, Rodriguez, Laio. Estimating the intrinsic dimension of datasets by a minimal
  neighborhood information. Sci. Rep. 7, 12140 (2017) (TwoNN).
- Mrabah, Amar, Bouguessa, Diallo. Toward convex manifolds: a geometric perspective for deep
  graph clustering of single-cell RNA-seq data. IJCAI 2023 (Fig. 2, Sec. 3.2).
- Ashman, Bird & Zepf. Detecting bimodality in astronomical datasets. AJ 108, 1994 (D).
"""
import numpy as np
from scipy import stats
from scipy.spatial import cKDTree


def twonn_id(z, discard=0.1):
    """TwoNN intrinsic dimension of the points z, (n, d) -> float (Facco et al. 2017).

    For each point, mu = r2 / r1, the ratio of the distances to its second and first nearest
    neighbours. On a manifold of dimension ID with locally uniform density, mu follows the
    Pareto law F(mu) = 1 - mu^-ID, so -log(1 - F(mu)) = ID log(mu): ID is the slope of the
    least-squares line through the origin, with the empirical F(mu_(i)) = i / N of the sorted
    ratios and the largest `discard` fraction of them dropped (the tail is the noisiest part
    and holds F = 1).

    Duplicate points (r1 = 0, mu undefined; e.g. cells whose codes collapsed onto one another)
    are merged before the neighbour search: copies carry no information on the dimension, and
    dropping the points with r1 = 0 instead would drop every copy of a repeated point.
    Returns nan with fewer than 3 distinct points."""
    z = np.unique(np.asarray(z, dtype=np.float64), axis=0)
    n = len(z)
    if n < 3:
        return float("nan")
    # k = 3: the point itself (distinct points, so at distance 0 only from itself), r1, r2
    dist, _ = cKDTree(z).query(z, k=3, workers=-1)
    mu = np.sort(dist[:, 2] / dist[:, 1])
    keep = int(n * (1 - discard))
    x = np.log(mu[:keep])
    y = -np.log1p(-np.arange(1, keep + 1) / n)
    return float(x @ y / (x @ x))


def pca_lid(z, variance=0.99):
    """Linear intrinsic dimension of the points z, (n, d) -> int: the number of principal
    components needed to explain a fraction `variance` of the total variance of z after each
    coordinate is standardised (zero mean, unit variance).

    A constant coordinate (max == min) carries no variance and cannot be standardised: it is
    dropped. Returns at least 1, and 0 only when every coordinate is constant."""
    z = np.asarray(z, dtype=np.float64)
    z = z[:, np.ptp(z, axis=0) > 0]
    if z.shape[1] == 0:
        return 0
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    eigenvalues = np.linalg.svd(z, compute_uv=False) ** 2
    explained = np.cumsum(eigenvalues) / eigenvalues.sum()
    return int(min(np.searchsorted(explained, variance) + 1, len(explained)))


def cluster_geometry(z, labels, min_size=20, max_size=5000):
    """Mean ID (twonn_id) and mean LID (pca_lid) over the clusters of at least `min_size` cells,
    (n, d) codes and (n,) labels -> (mean_id, mean_lid); (nan, nan) when no cluster qualifies.

    A cluster of more than `max_size` cells is measured on `max_size` of them drawn at random
    (the same draw for the same input): TwoNN's error shrinks as 1 / sqrt(points) and is
    already a few percent at 5000, while the neighbour search grows faster than the cluster.
    A cluster whose ID is undefined (fewer than 3 distinct codes) is left out of both means.
    The paper's phase 2 stops when mean_id reaches mean_lid (Sec. 3.2, Fig. 2)."""
    z, labels = np.asarray(z), np.asarray(labels)
    rng = np.random.default_rng(0)
    ids, lids = [], []
    for label, size in zip(*np.unique(labels, return_counts=True)):
        if size < min_size:
            continue
        members = np.flatnonzero(labels == label)
        if size > max_size:
            members = np.sort(rng.choice(members, max_size, replace=False))
        intrinsic = twonn_id(z[members])
        if not np.isnan(intrinsic):
            ids.append(intrinsic)
            lids.append(pca_lid(z[members]))
    if not ids:
        return float("nan"), float("nan")
    return float(np.mean(ids)), float(np.mean(lids))


# ---------------------------------------------------------------- one hump or two

def two_gaussians(values, iterations=200):
    """A mixture of two Gaussians fitted to 1-d values by EM, started from the best cut of the
    sorted values into two (1-d k-means) -> (upper (n,) bool: the values the upper component
    holds, Ashman's D = |m1 - m2| / sqrt((s1^2 + s2^2) / 2), the smaller weight). D > 2 marks
    two humps (Ashman et al. 1994); one Gaussian fits with D well below."""
    x = np.sort(values)
    n = len(x)
    cumsum, cumsq = np.cumsum(x), np.cumsum(x ** 2)
    left = np.arange(1, n)
    within = (cumsq[:-1] - cumsum[:-1] ** 2 / left) + (
        (cumsq[-1] - cumsq[:-1]) - (cumsum[-1] - cumsum[:-1]) ** 2 / (n - left))
    cut = int(np.argmin(within)) + 1
    mean = np.array([x[:cut].mean(), x[cut:].mean()])
    sd = np.maximum([x[:cut].std(), x[cut:].std()], 1e-6)
    weight = np.array([cut, n - cut]) / n
    for _ in range(iterations):
        density = weight * stats.norm.pdf(values[:, None], mean, sd) + 1e-300
        responsibility = density / density.sum(1, keepdims=True)
        weight = responsibility.mean(0)
        mean = (responsibility * values[:, None]).sum(0) / responsibility.sum(0)
        sd = np.sqrt((responsibility * (values[:, None] - mean) ** 2).sum(0)
                     / responsibility.sum(0))
        sd = np.maximum(sd, 1e-6)
    upper = responsibility[:, 1] > 0.5
    separation = abs(mean[1] - mean[0]) / np.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2)
    return upper, float(separation), float(weight.min())


def humps_on_first_axis(points):
    """two_gaussians of points (n, d) along their first principal axis (the centred points'
    scores on it): whether a cloud is two humps where it is widest."""
    centred = points - points.mean(0)
    return two_gaussians(centred @ np.linalg.svd(centred, full_matrices=False)[2][0])
