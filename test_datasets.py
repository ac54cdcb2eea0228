"""Tests of datasets.py: preprocessing by hand, the kNN graph against brute force, the
synthetic data.

Run: python -m pytest -q (README, "Tests").
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial import cKDTree

import datasets
from testkit import toy


def test_preprocess_by_hand():
    # cell 2 and gene 3 are all zero; library sizes of the others: 2, 4, 12 -> median 4
    counts = np.array([[1, 0, 1, 0],
                       [3, 0, 1, 0],
                       [0, 0, 0, 0],
                       [3, 6, 3, 0]])
    p = datasets.preprocess(datasets.Dataset(counts=counts, labels=np.array([0, 1, 1, 0]),
                                             name="toy"))
    np.testing.assert_array_equal(p.cells, [0, 1, 3])
    np.testing.assert_array_equal(p.genes, [0, 1, 2])
    np.testing.assert_array_equal(p.labels, [0, 1, 0])
    np.testing.assert_array_equal(p.counts, [[1, 0, 1], [3, 0, 1], [3, 6, 3]])
    np.testing.assert_allclose(p.size_factors, [0.5, 1.0, 3.0])
    # normalised to 4 counts per cell: [[2, 0, 2], [3, 0, 1], [1, 2, 1]]; log1p of that:
    logx = np.log([[3, 1, 3], [4, 1, 2], [2, 3, 2]])
    expected = (logx - logx.mean(0)) / logx.std(0, ddof=1)
    np.testing.assert_allclose(p.x, expected, rtol=1e-5)
    # gene 1 is (0, 0, log 3): z = (-1, -1, 2) / sqrt(3)
    np.testing.assert_allclose(p.x[:, 1], [-0.57735, -0.57735, 1.1547], atol=1e-4)
    assert p.x.dtype == np.float32 and p.counts.dtype == np.float32
    assert p.notes[-1] == ("toy: dropped 1 of 4 cells and 1 of 4 genes with zero counts; "
                           "kept 3 highly variable genes")


def test_preprocess_clips_scaled_values_at_10():
    # 200 cells of 4 counts (size factors 1): [1, 1, 2], and one cell [3, 1, 0]. A column of n - 1
    # equal values and one other scales (ddof=1) to -1/sqrt(n) and (n - 1)/sqrt(n) = 14.07 -> 10;
    # the constant gene 1 scales to 0.
    n = 200
    counts = np.tile([1, 1, 2], (n, 1))
    counts[-1] = [3, 1, 0]
    p = datasets.preprocess(datasets.Dataset(counts=counts))
    expected = np.zeros((n, 3))
    expected[:, 0], expected[:, 2] = -n ** -0.5, n ** -0.5
    expected[-1] = [10, 0, -10]
    np.testing.assert_allclose(p.x, expected, rtol=1e-3, atol=1e-6)  # float32 scaling


def test_preprocess_finds_the_variable_genes():
    # 2000 flat negative-binomial genes (theta = 5, so var/mean = 1 + mu/5 grows with the mean:
    # plain var/mean would pick the most expressed of them) and 5 bimodal genes (off in half of
    # the cells) of middling mean, which stand out only against the genes of their own bin of
    # mean expression
    rng = np.random.default_rng(0)
    n, n_flat, n_var = 200, 2000, 5
    mu = np.geomspace(0.2, 500, n_flat)
    flat = rng.poisson(rng.gamma(5.0, mu / 5.0, (n, n_flat)))
    on = rng.random((n, n_var)) < 0.5
    variable = np.where(on, rng.poisson(np.geomspace(5, 30, n_var), (n, n_var)), 0)
    counts = np.hstack([flat, variable])
    p = datasets.preprocess(datasets.Dataset(counts=counts), n_top_genes=n_var)
    np.testing.assert_array_equal(p.genes, np.arange(n_flat, n_flat + n_var))
    np.testing.assert_array_equal(p.counts, counts[:, p.genes])
    assert np.all(np.abs(p.x) <= 10)


def test_normalised_dispersion_by_hand():
    # three genes in the lowest bin with log dispersions 0, 1, 2 -> z = -1, 0, 1;
    # one alone at the top
    mean = np.array([1.0, 1.1, 1.2, 100.0])
    var = mean * np.exp([0.0, 1.0, 2.0, 0.5])
    np.testing.assert_allclose(datasets.normalised_dispersion(mean, var), [-1, 0, 1, 1])


def test_preprocess_sparse_equals_dense_and_keeps_all_genes():
    x, _ = toy()
    dense = datasets.preprocess(datasets.Dataset(counts=x))
    sparse = datasets.preprocess(datasets.Dataset(counts=sp.csr_matrix(x)))
    assert dense.x.shape == x.shape  # fewer genes than n_top_genes: all kept
    np.testing.assert_allclose(dense.x, sparse.x, rtol=1e-6)


def _brute_force_graph(points, k):
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    a = np.zeros_like(d)
    for i, row in enumerate(d):
        a[i, np.argsort(row)[:k]] = 1
    return np.maximum(a, a.T)


def test_knn_graph_matches_brute_force():
    x = np.random.default_rng(0).normal(size=(40, 6))
    a = datasets.knn_graph(x, k=4, n_pcs=50)  # more PCs than dimensions: all of them
    assert sp.isspmatrix_csr(a)
    np.testing.assert_array_equal(a.toarray(), _brute_force_graph(x, 4))


def test_knn_graph_on_top_pcs():
    x = np.random.default_rng(1).normal(size=(50, 20)) * np.linspace(3, 0.5, 20)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    a = datasets.knn_graph(x, k=5, n_pcs=3)
    np.testing.assert_array_equal(a.toarray(), _brute_force_graph(u[:, :3] * s[:3], 5))
    # n < g: PCA through the 12 x 12 Gram matrix
    wide = np.random.default_rng(2).normal(size=(12, 30))
    u, s, _ = np.linalg.svd(wide - wide.mean(0), full_matrices=False)
    np.testing.assert_array_equal(datasets.knn_graph(wide, k=3, n_pcs=4).toarray(),
                                  _brute_force_graph(u[:, :4] * s[:4], 3))


def _gaussian_mixture(n, dim, centres, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(centres, dim))[rng.integers(centres, size=n)] * 3
            + rng.normal(size=(n, dim)))


def test_approximate_neighbours_find_most_true_neighbours():
    x = _gaussian_mixture(3000, 12, 5, 0)
    _, exact = cKDTree(x).query(x, k=10)
    got = datasets.approximate_neighbours(x, 10, n_trees=4, leaf_size=200)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])
    assert recall > 0.9
    assert (got[:, 0] == np.arange(3000)).mean() > 0.99  # itself first
    assert all(len(set(row)) == 10 for row in got)
    lone = datasets.approximate_neighbours(x, 10, n_trees=1, leaf_size=200)
    lone_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, lone)])
    assert lone_recall < recall  # more trees find more


def test_knn_graph_switches_to_the_approximate_search_above_its_size(monkeypatch):
    x = _gaussian_mixture(1200, 8, 4, 1)
    exact = datasets.knn_graph(x, k=8, n_pcs=8, exact=True)
    monkeypatch.setattr(datasets, "EXACT_KNN_CELLS", 1000)
    calls = []
    search = datasets.approximate_neighbours
    monkeypatch.setattr(datasets, "approximate_neighbours",
                        lambda *args: calls.append(1) or search(*args, leaf_size=100))
    approximate = datasets.knn_graph(x, k=8, n_pcs=8)
    assert calls == [1]
    assert (approximate != approximate.T).nnz == 0 and approximate.diagonal().sum() == 0
    assert approximate.multiply(exact).sum() / exact.sum() > 0.9


def test_knn_graph_duplicates_no_self_loops():
    x = np.repeat(np.random.default_rng(0).normal(size=(10, 3)), 6, axis=0)  # six copies: ties at 0
    a = datasets.knn_graph(x, k=3).toarray()
    assert np.all(np.diag(a) == 0) and np.array_equal(a, a.T) and set(np.unique(a)) <= {0, 1}
    assert np.all(a.sum(1) >= 3)


def test_bad_too_few_cells_after_filtering():
    counts = np.zeros((5, 4))
    counts[0] = counts[1] = 1
    with pytest.raises(ValueError, match="toy: only 2 cells and 4 genes with non-zero counts"):
        datasets.preprocess(datasets.Dataset(counts=counts, name="toy"))


def test_synthetic_is_deterministic_labelled_counts():
    a, b = datasets.synthetic(seed=3), datasets.synthetic(seed=3)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.counts, datasets.synthetic(seed=4).counts)
    assert a.counts.shape == (1500, 1000) and a.labels.shape == (1500,)
    np.testing.assert_array_equal(np.unique(a.labels), np.arange(6))
    assert len(a.label_names) == 6
    assert a.counts.dtype.kind == "i" and a.counts.min() >= 0
    library = a.counts.sum(1)
    assert 1000 < np.median(library) < 10000 and 0.3 < np.mean(a.counts == 0) < 0.95
    small = datasets.synthetic(n_cells=90, n_genes=40, n_clusters=3, seed=1)
    assert small.counts.shape == (90, 40) and set(small.labels) == {0, 1, 2}
    deep = datasets.synthetic(seed=3, depth=3e6)    # the same cells and types, 1000x the reads
    np.testing.assert_array_equal(deep.labels, a.labels)
    assert 800 < np.median(deep.counts.sum(1)) / np.median(library) < 1200


def test_hard_demo_is_the_easy_one_with_three_times_the_latent_noise():
    easy, hard = (datasets.synthetic(**datasets.DEMOS[name]) for name in ("easy", "hard"))
    np.testing.assert_array_equal(easy.counts, datasets.synthetic().counts)
    np.testing.assert_array_equal(hard.counts,
                                  datasets.synthetic(noise=3 * datasets.SYN_NOISE).counts)
    np.testing.assert_array_equal(hard.labels, easy.labels)  # the same cells and types
    assert hard.counts.shape == (1500, 1000) and not np.array_equal(hard.counts, easy.counts)


@pytest.mark.slow
def test_hard_demo_arcs_touch_where_the_easy_ones_do_not():
    """In the kNN graph the hard preset's clusters share edges (5 times the easy share)."""
    shares = []
    for name in ("easy", "hard"):
        p = datasets.preprocess(datasets.synthetic(**datasets.DEMOS[name]))
        a = datasets.knn_graph(p.x).tocoo()
        shares.append(np.mean(p.labels[a.row] != p.labels[a.col]))
    assert shares[0] < 0.015 and shares[1] > 3 * shares[0]


def test_synthetic_clusters_are_graph_separable():
    p = datasets.preprocess(datasets.synthetic())
    a = datasets.knn_graph(p.x).tocoo()
    assert np.mean(p.labels[a.row] == p.labels[a.col]) > 0.97  # edges stay inside clusters


# ---------------------------------------------------------------- many cells: the sparse path

def _both_paths(n_cells=400, n_genes=150, seed=0):
    """preprocess of one synthetic dataset on the dense path and, forced, on the sparse one."""
    data = datasets.synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=4, seed=seed)
    return (datasets.preprocess(data, n_top_genes=100),
            datasets.preprocess(data, n_top_genes=100, dense_limit=0))


def test_scaled_counts_hold_the_dense_scaled_matrix_clipping_included():
    dense, sparse = _both_paths()
    assert isinstance(sparse.x, datasets.ScaledCounts) and sp.issparse(sparse.counts)
    assert np.array_equal(sparse.counts.toarray(), dense.counts)
    np.testing.assert_allclose(sparse.x.dense(), dense.x, atol=1e-4)
    assert np.array_equal(sparse.x.s.indices, sparse.counts.indices)  # the counts' non-zeros
    assert np.array_equal(sparse.genes, dense.genes) and np.array_equal(sparse.cells, dense.cells)
    assert dense.x.max() == 10.0  # clipped entries are in the comparison
    rows = np.array([3, 0, 7])
    np.testing.assert_allclose(sparse.x.dense(rows), dense.x[rows], atol=1e-4)


def test_scaled_counts_clip_a_gene_present_in_almost_every_cell_at_its_zeros():
    """A gene with counts in 399 of 400 cells at one level: its one zero scales below -10, so
    v_j = 10 and every X_ij off the non-zeros is -10, as the dense path clips it."""
    counts = np.random.default_rng(0).poisson(2.0, (400, 30)) + 1
    counts[:, 0] = 50
    counts[5, 0] = 0
    data = datasets.Dataset(counts=counts)
    dense = datasets.preprocess(data)
    sparse = datasets.preprocess(data, dense_limit=0)
    assert dense.x[5, 0] == -10.0 and sparse.x.v[0] == 10.0
    np.testing.assert_allclose(sparse.x.dense(), dense.x, atol=1e-4)


def test_randomized_components_find_the_exact_principal_subspace():
    """On the sparse path the PCA is a randomized SVD by products: the leading components (a
    clear gap in the spectrum) match the exact ones, and the m components keep at least 99.5%
    of the variance the exact ones keep (beyond the gap the noise directions are not unique)."""
    dense, sparse = _both_paths(n_cells=800, n_genes=300, seed=1)
    mean, axes, scores = datasets.principal_components(dense.x, 20)
    mean_s, axes_s, scores_s = datasets.principal_components(sparse.x, 20)
    np.testing.assert_allclose(mean_s, mean, atol=1e-4)
    angles = np.degrees(scipy.linalg.subspace_angles(axes[:, :4], axes_s[:, :4]))
    assert angles.max() < 0.5
    assert (scores_s ** 2).sum() >= 0.995 * (scores ** 2).sum()
    np.testing.assert_allclose(scores_s, (sparse.x.dense() - mean_s) @ axes_s, atol=1e-3)


@pytest.mark.parametrize("shape", [(60, 20), (20, 60), (30, 8)])
def test_principal_components_score_the_centred_rows_on_their_axes(shape):
    """Dense PCA, both of its eigendecompositions (g <= n, g > n) and all components: the
    scores are (x - mean) axes, the axes orthonormal, the scores pca's."""
    x = np.random.default_rng(2).normal(size=shape)
    mean, axes, scores = datasets.principal_components(x, 8)
    np.testing.assert_allclose(scores, (x - mean) @ axes, atol=1e-10)
    np.testing.assert_allclose(axes.T @ axes, np.eye(axes.shape[1]), atol=1e-10)
    np.testing.assert_array_equal(scores, datasets.pca(x, 8))


def test_the_sparse_path_builds_the_graph_of_the_dense_one():
    dense, sparse = _both_paths(n_cells=600, seed=3)
    a, b = datasets.knn_graph(dense.x, k=10, n_pcs=5), datasets.knn_graph(sparse.x, k=10, n_pcs=5)
    assert (a != b).nnz <= 0.02 * a.nnz  # the same neighbours but for near ties


def test_many_synthetic_cells_are_drawn_in_chunks_as_sparse_counts():
    """chunk: the counts come out CSR, never dense; the labels, library sizes and latent
    positions are drawn first, so they do not depend on the chunk; the same seed and chunk give
    the same counts; one chunk of every cell is the dense data itself."""
    whole = datasets.synthetic(n_cells=300, n_genes=50, seed=4)
    one = datasets.synthetic(n_cells=300, n_genes=50, seed=4, chunk=300)
    chunked = datasets.synthetic(n_cells=300, n_genes=50, seed=4, chunk=70)
    again = datasets.synthetic(n_cells=300, n_genes=50, seed=4, chunk=70)
    assert isinstance(whole.counts, np.ndarray) and np.array_equal(one.counts, whole.counts)
    assert sp.issparse(chunked.counts) and chunked.counts.shape == (300, 50)
    assert (chunked.counts != again.counts).nnz == 0
    assert np.array_equal(chunked.labels, whole.labels)
    assert np.all(chunked.counts.data == np.round(chunked.counts.data))
    # the same distribution: the mean count of each gene within 15% on average
    ratio = np.asarray(chunked.counts.mean(0)).ravel() / np.maximum(whole.counts.mean(0), 1e-9)
    assert abs(np.median(ratio) - 1) < 0.15
