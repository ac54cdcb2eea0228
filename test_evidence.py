"""Tests of evidence.py: the markers against a brute-force rank-sum test and scanpy, and each
warning on cells made to show it (and to not show it).

Run: python -m pytest -q (README, "Tests").
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

import datasets
import evidence
import formats

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


def _expression(groups, markers, n_genes=30, seed=0):
    """Log expression (CSC) of cells in groups (n,), each group k expressing the genes of
    markers[k] highly and the rest at a low background; zeros where a Poisson draw gives 0."""
    rng = np.random.default_rng(seed)
    rate = np.full((len(groups), n_genes), 0.3)
    for k, genes in enumerate(markers):
        rate[np.ix_(groups == k, genes)] = 6.0
    return sp.csc_matrix(np.log1p(rng.poisson(rate)).astype(np.float32))


def _rank_sums_by_hand(x, labels, k):
    """The z-score of the rank sum of group k against the rest, each gene ranked over every cell
    by scipy.stats.rankdata (ties: mean rank), without tie correction."""
    n, n_k = len(labels), np.sum(labels == k)
    ranks = stats.rankdata(x, axis=0)
    r = ranks[labels == k].sum(0)
    return (r - n_k * (n + 1) / 2) / np.sqrt(n_k * (n - n_k) * (n + 1) / 12)


def test_rank_genes_is_the_rank_sum_test_of_each_group_against_the_rest():
    groups = np.repeat([0, 1, 2], [40, 25, 15])
    log = _expression(groups, [[0, 1], [2], [3, 4, 5]])
    ranked = evidence.rank_genes(log, groups, 3)
    dense = log.toarray()
    for k in range(3):
        np.testing.assert_allclose(ranked["scores"][k], _rank_sums_by_hand(dense, groups, k),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ranked["pvals"][k],
                                   2 * stats.norm.sf(np.abs(ranked["scores"][k])))
        np.testing.assert_allclose(ranked["pvals_adj"][k],
                                   stats.false_discovery_control(ranked["pvals"][k]))
        inside, outside = dense[groups == k], dense[groups != k]
        np.testing.assert_allclose(ranked["logfoldchanges"][k], np.log2(
            (np.expm1(inside.mean(0)) + 1e-9) / (np.expm1(outside.mean(0)) + 1e-9)), atol=1e-5)
        np.testing.assert_allclose(ranked["pct"][k], (inside > 0).mean(0))
        np.testing.assert_allclose(ranked["pct_rest"][k], (outside > 0).mean(0))
    top = evidence.marker_rows(ranked, [f"g{j}" for j in range(30)], top=3)
    assert {row["gene"] for row in top if row["cluster"] == 2} == {"g3", "g4", "g5"}
    assert [row["rank"] for row in top[:3]] == [1, 2, 3]
    assert [row["score"] for row in top[:3]] == sorted((row["score"] for row in top[:3]),
                                                        reverse=True)


@pytest.mark.skipif(importlib.util.find_spec("scanpy") is None, reason="scanpy not installed")
@pytest.mark.skipif(not (DATA / "Baron_mouse.h5").exists(), reason="../shared/data absent")
def test_markers_match_scanpys_rank_genes_groups_on_a_shared_file():
    """scanpy's rank_genes_groups (method wilcoxon) on the same log-normalised counts of
    Baron_mouse's kept genes, grouped by its 13 types: for each type's top 50 genes our scores
    rank them as scanpy's do (Spearman >= 0.99) and equal them."""
    import anndata
    import scanpy as sc
    prepared = datasets.preprocess(formats.load(DATA / "Baron_mouse.h5"))
    log = evidence.log_expression(prepared)
    ranked = evidence.rank_genes(log, prepared.labels, len(prepared.label_names))
    adata = anndata.AnnData(sp.csr_matrix(log))
    adata.var_names = [str(g) for g in prepared.gene_names]
    adata.obs["type"] = prepared.labels.astype(str)
    sc.tl.rank_genes_groups(adata, "type", method="wilcoxon", n_genes=log.shape[1])
    theirs = adata.uns["rank_genes_groups"]
    column = {str(g): j for j, g in enumerate(prepared.gene_names)}
    for k in range(len(prepared.label_names)):
        names = list(theirs["names"][str(k)][:50])
        ours = ranked["scores"][k][[column[name] for name in names]]
        scanpys = np.asarray(theirs["scores"][str(k)][:50], dtype=np.float64)
        assert stats.spearmanr(ours, scanpys).statistic >= 0.99
        np.testing.assert_allclose(ours, scanpys, rtol=1e-4)


def _line_of_clusters():
    """Three clusters on a line in 2-d: A at x = 0 and B at x = 0.5 (sd 0.5 along x: one hump),
    C at x = 10, and a fourth cluster D of 2 cells; confidences rise with the cell's index."""
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal((0, 0), 0.5, (50, 2)), rng.normal((0.5, 0), 0.5, (50, 2)),
                        rng.normal((10, 0), 0.5, (50, 2)), [[30, 0], [30.2, 0]]])
    labels = np.repeat([0, 1, 2, 3], [50, 50, 50, 2])
    centres = np.stack([z[labels == k].mean(0) for k in range(4)])
    return z, labels, centres, np.linspace(0.2, 0.9, len(z))


def test_cluster_rows_measure_each_cluster_and_the_warnings_say_what_they_show():
    z, labels, centres, confidence = _line_of_clusters()
    reliable = (confidence > 0.5) | (labels < 2)
    reliable[labels == 2] = False
    beta = np.array([0.1, 0.2, 0.3, 0.4])
    rows = evidence.cluster_rows(z, labels, centres, confidence, reliable, beta,
                                 [["a"], ["b"], ["c", "d"], []])
    means = [confidence[labels == k].mean() for k in range(4)]
    for k, row in enumerate(rows):
        cells = labels == k
        others = [j for j in range(4) if j != k]
        nearest = min(others, key=lambda j: np.linalg.norm(centres[k] - centres[j]))
        axis = (centres[nearest] - centres[k]) / np.linalg.norm(centres[nearest] - centres[k])
        assert row["size"] == cells.sum() and row["reliable"] == reliable[cells].sum()
        assert row["mean_confidence"] == pytest.approx(means[k])
        assert row["confidence_rank"] == 1 + sum(m > means[k] for m in means)
        assert row["nearest"] == nearest and row["beta_c"] == pytest.approx(beta[k])
        assert row["distance"] == pytest.approx(np.linalg.norm(centres[k] - centres[nearest]))
        assert row["spread"] == pytest.approx(np.std(z[cells] @ axis))
        assert row["nearest_spread"] == pytest.approx(np.std(z[labels == nearest] @ axis))
    assert rows[2]["markers"] == "c d"
    warnings = evidence.cluster_warnings(rows, m=3)
    assert len(warnings) == 3
    assert warnings[0].startswith("clusters 0 and 1: centres")
    assert warnings[1] == ("cluster 2: no reliable cell: none of its margins reaches its beta_c "
                           f"0.3 (set when phase 2 began); its mean confidence {means[2]:.3f} "
                           "ranks 2 of 4 (1: the most confident)")
    assert warnings[2] == "cluster 3: 2 cells, fewer than m = 3"


def test_a_confident_cluster_without_reliable_cells_is_not_called_uncertain():
    """The false warning of issue 41: a cluster with the highest confidence of the run and no
    reliable cell (its margins all fell below its own beta_c) is said to rank 1, never to be
    the least certain."""
    z, labels, centres, confidence = _line_of_clusters()
    confidence = np.where(labels == 2, 0.95, 0.3)
    reliable = labels != 2
    rows = evidence.cluster_rows(z, labels, centres, confidence, reliable, np.full(4, 0.9))
    (line,) = [w for w in evidence.cluster_warnings(rows, m=3) if w.startswith("cluster 2")]
    assert "ranks 1 of 4 (1: the most confident)" in line
    assert "least" not in line and "uncertain" not in line


def test_run_warnings_flag_blown_up_codes_and_an_empty_reliable_set():
    """From the last phase-1 row (L_A above log 2 = 0.6931) and the last phase-2 row
    (reliable_c == 0); earlier rows do not count."""
    p1 = lambda l_a: {"phase": 1, "L_A": l_a}
    p2 = lambda reliable: {"phase": 2, "reliable_c": reliable}
    assert evidence.run_warnings([p1(9.0), p1(0.69), p2(0), p2(12)]) == []
    (line,) = evidence.run_warnings([p1(0.5), p1(0.70), p2(3)])
    assert "L_A ended phase 1 at 0.700" in line
    (line,) = evidence.run_warnings([p1(0.4), p2(5), p2(0)])
    assert "no cell was reliable" in line
    assert len(evidence.run_warnings([p1(13.0), p2(0)])) == 2
    assert evidence.run_warnings([p1(0.4)]) == []


GENES = np.array([f"g{j}" for j in range(30)])


def test_a_population_split_in_two_is_named_and_distinct_ones_are_not():
    """Four populations with their own markers; one of them (genes 6-9) labelled as clusters 2
    and 3, told apart only by gene 10, expressed in cluster 3 alone."""
    population = np.repeat([0, 1, 2, 2], [60, 60, 40, 40])
    labels = np.repeat([0, 1, 2, 3], [60, 60, 40, 40])
    log = _expression(population, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]).tolil()
    log[160:, 10] = np.log1p(8.0)
    log = sp.csc_matrix(log)
    ranked = evidence.rank_genes(log, labels, 4)
    (line,) = evidence.split_warnings(ranked, log, labels, GENES, top=5)
    assert line.startswith("clusters 2 and 3 share 4 of their strong markers (g")
    assert "one population split in two" in line
    assert line.endswith("what tells them apart: 2 -; 3 g10")
    distinct = evidence.rank_genes(log, population, 3)
    assert evidence.split_warnings(distinct, log, population, GENES, top=5) == []
    noise = np.random.default_rng(1).integers(0, 4, len(labels))  # no marker at all: silent
    noisy = evidence.rank_genes(log, noise, 4)
    assert evidence.split_warnings(noisy, log, noise, GENES, top=5) == []


def test_a_cluster_of_two_populations_is_named_a_mixture_and_a_pure_one_is_not():
    population = np.repeat([0, 1, 2], [80, 50, 50])
    log = _expression(population, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    joined = np.where(population == 2, 1, population)  # cluster 1 holds populations 1 and 2
    ranked = evidence.rank_genes(log, joined, 2)
    (line,) = evidence.mixture_warnings(ranked, log, joined, GENES, m=3, top=6)
    assert line.startswith("cluster 1: its cells fall into two groups") and "50 and 50" in line
    pure = evidence.rank_genes(log, population, 3)
    assert evidence.mixture_warnings(pure, log, population, GENES, m=3, top=6) == []


def test_the_clusters_the_baseline_splits_or_joins_are_named_with_both_sides_markers():
    """scTCM's cluster 0 holds populations 0 and 1 (the baseline splits it); populations 2 is
    scTCM's clusters 1 and 2 (the baseline joins them)."""
    population = np.repeat([0, 1, 2, 2], [50, 50, 40, 40])
    log = _expression(population, [[0, 1], [2, 3], [4, 5]])
    labels = np.repeat([0, 0, 1, 2], [50, 50, 40, 40])
    baseline = np.repeat([0, 1, 2, 2], [50, 50, 40, 40])
    lines = evidence.baseline_warnings(labels, baseline, log, GENES)
    assert len(lines) == 2
    assert lines[0].startswith("the baseline splits cluster 0: 50 of its cells in its group 0 ")
    assert "(g0, g1" in lines[0] and "(g2, g3" in lines[0]
    assert lines[1].startswith("the baseline joins clusters 1 and 2 (its group 2 holds 40 and "
                               "40 of their cells)")
    assert evidence.baseline_warnings(labels, labels, log, GENES) == []
