"""What a user without labels can judge a partition by: each cluster's numbers, its marker
genes, and warnings that say only what their numbers show.

- Markers: each cluster's Wilcoxon rank-sum test against the other cells, gene by gene, on the
  log-normalised counts of the kept genes, with the z-score, Benjamini-Hochberg adjusted
  p-value and log2 fold change that scanpy's rank_genes_groups(method="wilcoxon") reports (its
  defaults: no tie correction). The same test between two clusters names what tells them apart.
- Cluster rows: size, reliable cells, mean confidence and its rank, the nearest cluster and
  both spreads along the line between them, beta_c, the top markers.
- Warnings, each a sentence about its own numbers: a cluster without a reliable cell (its
  confidence rank said, high or low), one below m cells, two whose centres lie closer than
  their spreads (one hump), two sharing most of their top markers (one population split?), a
  cluster whose cells fall into two groups on its own markers (a mixture?), and the clusters
  the baseline (k-means on the principal components) splits or joins against scTCM, with the
  cells concerned and both sides' markers, so that markers can decide.

References: Mann & Whitney (Ann. Math. Stat. 1947), the rank-sum statistic and its normal
approximation; Benjamini & Hochberg (JRSS B 1995); Wolf, Angerer & Theis (Genome Biol. 2018),
scanpy; Ashman, Bird & Zepf (Astron. J. 1994), D, the separation of two groups.
"""
import numpy as np
import scipy.sparse as sp
from scipy import stats

import geometry
from clustering import squared_distances

TOP = 20           # the top markers a cluster is compared by (split, mixture)
SHARED = 0.5       # two clusters sharing this share of their top markers: one population split?
SPLIT_SHARE = 0.25  # the baseline splits a cluster when two of its groups hold this much each
JOIN_SHARE = 0.5   # the baseline joins two clusters when one of its groups holds this of each
MIXTURE_D = 2.0    # Ashman's D above which a cluster's two groups on its markers are two humps


# ---------------------------------------------------------------- marker genes

def log_expression(prepared):
    """log1p(x / s) of the kept genes of every cell, CSC (n, g) float32: what the markers rank
    (the log-normalised counts scanpy's rank_genes_groups reads)."""
    counts = sp.csr_matrix(prepared.counts, dtype=np.float32)
    size = np.repeat(prepared.size_factors.astype(np.float32), np.diff(counts.indptr))
    log = sp.csr_matrix((np.log1p(counts.data / size), counts.indices, counts.indptr),
                        shape=counts.shape)
    log.eliminate_zeros()
    return log.tocsc()


def rank_genes(log_expr, labels, n_groups):
    """Each group's Wilcoxon rank-sum test against the other cells, for every gene (scanpy's
    rank_genes_groups, method "wilcoxon", reference "rest", no tie correction): the cells are
    ranked per gene (ties share their mean rank; the zeros of a sparse column share theirs),
    z = (R - n_k (n + 1) / 2) / sqrt(n_k (n - n_k) (n + 1) / 12) for the rank sum R of the
    group's n_k cells. log_expr: CSC (n, g) >= 0; labels: (n,) in 0..n_groups-1.
    -> dict of (n_groups, g) arrays: scores (z), pvals (two-sided, normal), pvals_adj
    (Benjamini-Hochberg over the genes of each group), logfoldchanges (log2 of the ratio of
    expm1 of the mean log expression in and out of the group, + 1e-9 each), pct and pct_rest
    (the share of cells expressing the gene in and out of the group)."""
    n, g = log_expr.shape
    labels = np.asarray(labels)
    sizes = np.bincount(labels, minlength=n_groups).astype(np.float64)
    rank_sums, sums, expressing = (np.zeros((n_groups, g)) for _ in range(3))
    for j in range(g):
        cells = log_expr.indices[log_expr.indptr[j]:log_expr.indptr[j + 1]]
        values = log_expr.data[log_expr.indptr[j]:log_expr.indptr[j + 1]]
        zeros = n - len(values)
        group = labels[cells]
        in_group = np.bincount(group, minlength=n_groups)
        ranks = zeros + stats.rankdata(values)  # the zeros hold ranks 1..zeros, mean (zeros+1)/2
        rank_sums[:, j] = (np.bincount(group, weights=ranks, minlength=n_groups)
                           + (sizes - in_group) * (zeros + 1) / 2)
        sums[:, j] = np.bincount(group, weights=values, minlength=n_groups)
        expressing[:, j] = in_group
    rest = n - sizes[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = ((rank_sums - sizes[:, None] * (n + 1) / 2)
                  / np.sqrt(sizes[:, None] * rest * (n + 1) / 12))
        mean_in, mean_out = sums / sizes[:, None], (sums.sum(0) - sums) / rest
        result = {"logfoldchanges": np.log2((np.expm1(mean_in) + 1e-9)
                                            / (np.expm1(mean_out) + 1e-9)),
                  "pct": expressing / sizes[:, None],
                  "pct_rest": (expressing.sum(0) - expressing) / rest}
    scores[np.isnan(scores)] = 0.0
    pvals = 2 * stats.norm.sf(np.abs(scores))
    return {"scores": scores, "pvals": pvals,
            "pvals_adj": np.stack([benjamini_hochberg(p) for p in pvals]), **result}


def benjamini_hochberg(pvals):
    """Benjamini-Hochberg adjusted p-values: p_(i) m / i, made monotone from the largest down,
    capped at 1, in the order given."""
    order = np.argsort(pvals)
    m = len(pvals)
    adjusted = np.minimum.accumulate((pvals[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def top_genes(scores, top=TOP):
    """The indices of the top genes by score, highest first (ties in gene order)."""
    return np.argsort(-scores, kind="stable")[:top]


def marker_rows(ranked, gene_names, top=50):
    """markers.csv: each cluster's top genes against the rest, one row each: cluster, rank,
    gene, score, logfoldchange, pval_adj, pct, pct_rest."""
    rows = []
    for k, scores in enumerate(ranked["scores"]):
        for rank, j in enumerate(top_genes(scores, top), start=1):
            rows.append({"cluster": k, "rank": rank, "gene": str(gene_names[j]),
                         "score": float(scores[j]),
                         "logfoldchange": float(ranked["logfoldchanges"][k, j]),
                         "pval_adj": float(ranked["pvals_adj"][k, j]),
                         "pct": float(ranked["pct"][k, j]),
                         "pct_rest": float(ranked["pct_rest"][k, j])})
    return rows


def telling_apart(log_expr, first, second, gene_names, top=3, alpha=0.01):
    """The genes that tell two groups of cells apart (index arrays first and second): the top
    of each against the other by the same rank-sum test, those significant at alpha (adjusted)
    -> (genes up in first, up in second)."""
    cells = np.concatenate([first, second])
    sub = sp.csc_matrix(sp.csr_matrix(log_expr)[cells])
    ranked = rank_genes(sub, np.repeat([0, 1], [len(first), len(second)]), 2)
    return tuple([str(gene_names[j]) for j in top_genes(ranked["scores"][side], top)
                  if ranked["scores"][side, j] > 0 and ranked["pvals_adj"][side, j] < alpha]
                 for side in (0, 1))


def apart(log_expr, labels, a, b, gene_names):
    """'what tells them apart: a <genes up in a>; b <genes up in b>' for clusters a and b of
    labels (telling_apart), the end of a warning about the two."""
    up_a, up_b = telling_apart(log_expr, np.flatnonzero(labels == a),
                               np.flatnonzero(labels == b), gene_names)
    return f"what tells them apart: {a} {', '.join(up_a) or '-'}; {b} {', '.join(up_b) or '-'}"


# ---------------------------------------------------------------- the clusters and the warnings

def cluster_rows(z, labels, centres, confidence, reliable, beta_c, top_markers=()):
    """One row per cluster k of labels (n,) with centres (K, d) in the codes z (n, d): size,
    reliable cells (reliable (n,) bool), mean confidence (confidence (n,)) and its rank among the
    clusters (1 = the most confident), the nearest other cluster by centre distance, that
    distance, the two clusters' spreads along the line joining their centres (the sd of their
    cells' projections on it), beta_c (what a margin must reach, Eq. 6), the top markers."""
    z, labels = np.asarray(z, dtype=np.float64), np.asarray(labels)
    centres = np.asarray(centres, dtype=np.float64)
    distances = np.sqrt(squared_distances(centres, centres))
    np.fill_diagonal(distances, np.inf)
    means = [float(confidence[labels == k].mean()) if np.any(labels == k) else 0.0
             for k in range(len(centres))]
    rank = 1 + np.argsort(np.argsort(-np.array(means), kind="stable"), kind="stable")
    rows = []
    for k in range(len(centres)):
        cells = labels == k
        nearest = int(np.argmin(distances[k])) if len(centres) > 1 else k
        spread = _spreads(z, labels, centres, k, nearest)
        rows.append({"cluster": k, "size": int(cells.sum()), "reliable": int(reliable[cells].sum()),
                     "mean_confidence": means[k], "confidence_rank": int(rank[k]),
                     "nearest": nearest, "distance": float(distances[k, nearest]),
                     "spread": spread[0], "nearest_spread": spread[1],
                     "beta_c": float(beta_c[k]),
                     "markers": " ".join(top_markers[k]) if len(top_markers) else ""})
    return rows


def _spreads(z, labels, centres, a, b):
    """The sd of the codes of clusters a and b projected on the line from centre a to centre
    b (0 for a cluster of fewer than 2 cells)."""
    axis = centres[b] - centres[a]
    axis = axis / max(np.linalg.norm(axis), 1e-12)
    sd = lambda k: float((z[labels == k] @ axis).std()) if (labels == k).sum() > 1 else 0.0
    return sd(a), sd(b)


def cluster_warnings(rows, m):
    """The warnings of cluster_rows: a cluster below m cells; one without a reliable cell (its
    confidence rank said as it is: such a cluster may be the most confident of the run, when
    all its margins fell below the beta_c set for it when phase 2 began); a pair whose centres
    are closer than the sum of their spreads along the line between them: one hump rather than
    two (two equal Gaussians are bimodal only when their means lie more than 2 sd apart)."""
    lines = []
    for row in rows:
        k = row["cluster"]
        if row["size"] < m:
            lines.append(f"cluster {k}: {row['size']} cells, fewer than m = {m}")
        elif row["reliable"] == 0:
            lines.append(f"cluster {k}: no reliable cell: none of its margins reaches its beta_c "
                         f"{row['beta_c']:.3g} (set when phase 2 began); its mean confidence "
                         f"{row['mean_confidence']:.3f} ranks {row['confidence_rank']} of "
                         f"{len(rows)} (1: the most confident)")
        other = rows[row["nearest"]]
        overlap = row["distance"] < row["spread"] + row["nearest_spread"]
        if overlap and (other["nearest"] != k or k < other["cluster"]):
            lines.append(f"clusters {k} and {other['cluster']}: centres {row['distance']:.3g} "
                         f"apart, less than their spreads along that line ({row['spread']:.3g} "
                         f"+ {row['nearest_spread']:.3g}): one hump, not two; try K - 1")
    return lines


def strong_markers(ranked, k, top=TOP):
    """Cluster k's top markers that are up at least 2-fold and significant (adjusted p < 0.01),
    highest score first: the genes a split or a mixture is judged by (noise has none)."""
    return [j for j in top_genes(ranked["scores"][k], top)
            if ranked["logfoldchanges"][k, j] > 1 and ranked["pvals_adj"][k, j] < 0.01]


def split_warnings(ranked, log_expr, labels, gene_names, top=TOP, shared=SHARED):
    """Two clusters sharing at least `shared` of their strong top markers (strong_markers; at
    least 3): one population split in two? With what tells them apart."""
    tops = [set(strong_markers(ranked, k, top)) for k in range(len(ranked["scores"]))]
    lines = []
    for a in range(len(tops)):
        for b in range(a + 1, len(tops)):
            common = tops[a] & tops[b]
            if len(common) >= max(3, shared * min(len(tops[a]), len(tops[b]))):
                names = [str(gene_names[j]) for j in top_genes(ranked["scores"][a], top)
                         if j in common][:4]
                lines.append(f"clusters {a} and {b} share {len(common)} of their strong markers "
                             f"({', '.join(names)}, ...): one population split in two? "
                             + apart(log_expr, labels, a, b, gene_names))
    return lines


def mixture_warnings(ranked, log_expr, labels, gene_names, m, top=TOP, d=MIXTURE_D):
    """A cluster whose cells fall into two groups on its own markers: on the first principal
    component of their (standardised) expression of its top markers (those up at least 2-fold
    and significant, adjusted p < 0.01), two Gaussians fit (geometry.two_gaussians) more than
    d pooled sds apart (Ashman's D), the smaller holding at least 10% of the cluster and m
    cells, and each group has genes of its own (telling_apart): a mixture of two populations?"""
    csr = sp.csr_matrix(log_expr)
    lines = []
    for k in range(len(ranked["scores"])):
        cells = np.flatnonzero(labels == k)
        genes = strong_markers(ranked, k, top)
        if len(cells) < 2 * max(m, 10) or len(genes) < 2:
            continue
        x = csr[cells][:, genes].toarray().astype(np.float64)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
        upper, separation, smaller = geometry.humps_on_first_axis(x)
        if separation <= d or smaller < 0.1 or min(upper.sum(), (~upper).sum()) < m:
            continue
        up_a, up_b = telling_apart(log_expr, cells[~upper], cells[upper], gene_names)
        if up_a and up_b:
            lines.append(f"cluster {k}: its cells fall into two groups on its own markers "
                         f"({(~upper).sum()} and {upper.sum()} cells, D = {separation:.2f} > "
                         f"{d:g}), each with genes of its own: a mixture of two populations? "
                         f"what tells them apart: {', '.join(up_a)}; {', '.join(up_b)}")
    return lines


def baseline_warnings(labels, baseline, log_expr, gene_names, split=SPLIT_SHARE,
                      join=JOIN_SHARE, least=10):
    """Where the baseline partition disagrees with scTCM's as a whole: a cluster whose cells the
    baseline splits (two of its groups holding at least `split` of them each), and two clusters
    the baseline joins (one of its groups holding at least `join` of each), each side at least
    `least` cells, with the cells concerned and the genes that tell the two sides apart
    ("-": none does): markers decide, not the method."""
    labels, baseline = np.asarray(labels), np.asarray(baseline)
    table = np.zeros((labels.max() + 1, baseline.max() + 1), dtype=np.int64)
    np.add.at(table, (labels, baseline), 1)
    share = table / np.maximum(table.sum(1, keepdims=True), 1)
    lines = []
    for k, row in enumerate(share):
        parts = np.argsort(-row, kind="stable")[:2]
        if len(parts) == 2 and row[parts[1]] >= split and table[k, parts[1]] >= least:
            sides = [np.flatnonzero((labels == k) & (baseline == b)) for b in parts]
            up = telling_apart(log_expr, *sides, gene_names)
            lines.append(f"the baseline splits cluster {k}: {len(sides[0])} of its cells in its "
                         f"group {parts[0]} ({', '.join(up[0]) or '-'}), {len(sides[1])} in its "
                         f"group {parts[1]} ({', '.join(up[1]) or '-'})")
    for b in range(table.shape[1]):
        joined = np.flatnonzero((share[:, b] >= join) & (table[:, b] >= least))
        for i, first in enumerate(joined):
            for second in joined[i + 1:]:
                lines.append(f"the baseline joins clusters {first} and {second} (its group {b} "
                             f"holds {table[first, b]} and {table[second, b]} of their cells); "
                             + apart(log_expr, labels, first, second, gene_names))
    return lines


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


def judge(result, prepared, m, log=print):
    """The evidence of a run into result.metrics and the log: "markers" (marker_rows, top 50
    each), "clusters" (cluster_rows, with the top 5 markers), "warnings" (every kind above,
    the baseline's where result.baseline is set), each warning logged; for each cluster a line
    with its top markers and what tells it from its nearest cluster."""
    log_expr = log_expression(prepared)
    k = len(result.centres)
    ranked = rank_genes(log_expr, result.labels, k)
    names = prepared.gene_names
    tops = [[str(names[j]) for j in top_genes(scores, 5)] for scores in ranked["scores"]]
    rows = cluster_rows(result.embedding, result.labels, result.centres, result.confidence,
                        result.reliable, result.beta_c, tops)
    for row in rows:
        near = row["nearest"]
        up = telling_apart(log_expr, np.flatnonzero(result.labels == row["cluster"]),
                           np.flatnonzero(result.labels == near), names)
        log(f"cluster {row['cluster']} ({row['size']} cells): markers {row['markers'] or '-'}; "
            f"against its nearest, cluster {near}: {', '.join(up[0]) or '-'} up, "
            f"{', '.join(up[1]) or '-'} down")
    alerts = run_warnings(result.history) + cluster_warnings(rows, m)
    alerts += split_warnings(ranked, log_expr, result.labels, names)
    alerts += mixture_warnings(ranked, log_expr, result.labels, names, m)
    if result.baseline is not None:
        alerts += baseline_warnings(result.labels, result.baseline, log_expr, names)
    for line in alerts:
        log(f"warning: {line}")
    result.metrics.update(clusters=rows, warnings=alerts,
                          markers=marker_rows(ranked, names))
    return result
