"""scTCM: deep graph clustering of scRNA-seq data toward convex manifolds (Mrabah et al., IJCAI
2023), from a count matrix to a folder of results.

The method itself is in model.py (Config and Eqs. 1-13, in the paper's order) and training.py
(Sec. 3.2: phase 1, the start, phase 2 and its stop). This file is the front door around them:
choosing K among several, runs with several seeds, the evidence a user without labels can judge
a partition by, `cluster` (counts in, labels out, in Python), the command line and the files a
run writes. Reading files and writing the formats is in formats.py, preprocessing and the graph
in datasets.py.

    python sctcm.py --demo
    python sctcm.py data.h5 --clusters 9 --out results --plot
    result = sctcm.cluster(counts, 9)   # in Python: raw counts, cells x genes
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

import datasets
import evidence
import formats
import plots
import reuse
import settings
from clustering import (ari, kept, kmeans_restarts, lowest_inertia, merges,
                        merge_overclusters, modularity, most_central, most_kept, nearest_mean,
                        pairwise_ari, scores, stability)
from model import Config, convex_combinations, draw_combinations
from report import Report
from training import (PHASE1_FIELDS, PHASE1_FORMAT, Pretrained, codes, fit, kmeans_on_pcs,
                      pretrain)


# ---------------------------------------------------------------- choosing K

def k_criteria(z, adjacency, restarts, k, config):
    """Label-free measures of K (README, "Choosing K") on the codes z after phase 1 and the
    k-means restarts of its n_o overclusters -> (start at K, {criterion: value}):
    merge_modularity, the modularity at the merges' resolution of the lowest-inertia restart
    merged down to K (the objective the merge climbs: it peaks where merging further would
    join groups the graph A keeps apart, and where a greedy modularity merge stops by
    itself); agreement, the mean pairwise ARI of the ten restarts' merges (how reproducible a
    partition into K is); kept, the share of cells whose nearest cluster mean is their own in
    the start (how well K centres, what Eq. 5 holds, describe it)."""
    merged = merges(adjacency, restarts, k, config.resolution)
    path = merge_overclusters(adjacency, lowest_inertia(restarts)[1], k, config.resolution)
    start = most_kept(z, merged)
    table = pairwise_ari(merged)
    return start, {"merge_modularity": modularity(adjacency, path, config.resolution),
                   "agreement": float(table[~np.eye(len(merged), dtype=bool)].mean()),
                   "kept": kept(z, start)}


def recommend_k(rows):
    """The recommended K of choose_k's rows: where the merge's own objective peaks
    (merge_modularity; the smaller K on a tie)."""
    return max(rows, key=lambda row: (row["merge_modularity"], -row["k"]))["k"]


def peak_certainty(rows, recommended, near=0.1):
    """How sure the recommended K is, on the merge's modularity over choose_k's rows: how far
    its peak stands above its neighbouring K and above the range's lowest value, and the K
    whose value lies within `near` of the curve's span (highest - lowest) of the peak -> dict
    (k, value, above_neighbours, above_lowest, close: those K, flat: another K is close)."""
    values = {row["k"]: row["merge_modularity"] for row in rows}
    ks = sorted(values)
    peak = values[recommended]
    i = ks.index(recommended)
    neighbours = [values[k] for k in ks[max(i - 1, 0):i + 2] if k != recommended]
    span = peak - min(values.values())
    close = [k for k in ks if peak - values[k] <= near * span]
    return {"k": recommended, "value": peak,
            "above_neighbours": peak - max(neighbours) if neighbours else 0.0,
            "above_lowest": span, "close": close, "flat": len(close) > 1}


def choose_k(prepared, adjacency, ks, config, log=print, pretrained=None):
    """One phase 1 for every K of ks (or pretrained, given), then at each K the start (the
    consistent merge) and the label-free criteria of k_criteria, and the recommended K
    (recommend_k) -> (rows, recommended, pretrained): one row per K, with the start's scores
    when cells are labelled. Phase 1's log rows measure k-means of Z at the first K of ks."""
    if pretrained is None:
        pretrained = pretrain(prepared, adjacency, config,
                              Report(prepared.labels, ks[0], config, log))
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
    sure = peak_certainty(rows, recommended)
    log(f"recommended K = {recommended}: the merge's modularity peaks there{edge}, "
        f"{sure['value']:.4f}, {sure['above_neighbours']:.4f} above its neighbours and "
        f"{sure['above_lowest']:.4f} above the range's lowest")
    if sure["flat"]:
        log(f"a flat peak: K = {', '.join(map(str, sure['close']))} lie within 10% of the "
            "curve's span of it; the graph does not single out one K (markers decide)")
    return rows, recommended, pretrained


# ---------------------------------------------------------------- seeds, baseline, evidence

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


def fit_seeds(prepared, adjacency, n_clusters, config, seeds=1, log=print, pretrained=None,
              cache=None, lap=None):
    """fit with `seeds` seeds (config.seed, config.seed + 1, ...) -> the Result of the run that
    agrees best with the others, with its stability and seed_agreement (most_agreed) and its
    evidence (clusters and warnings). Every result also carries the baseline: k-means on the
    n_pcs principal components of the same preprocessed matrix (Result.baseline;
    metrics["baseline"]: its ARI to scTCM's partition and, with labels, its scores).
    pretrained: phase 1 of the first seed, already run; cache: a folder of phase 1s (phase1);
    lap: Stopwatch.lap, or None."""
    if seeds > 1:
        log(f"{seeds} runs (seeds {config.seed}-{config.seed + seeds - 1}): about {seeds} times "
            "the time of one")
    runs = []
    for i in range(seeds):
        if seeds > 1:
            log(f"seed {config.seed + i} ({i + 1} of {seeds})")
        seeded = dataclasses.replace(config, seed=config.seed + i)
        if i > 0 or pretrained is None:
            pretrained = phase1(prepared, adjacency, n_clusters, seeded, cache, log)
        runs.append(fit(prepared, adjacency, n_clusters, seeded, log=log, pretrained=pretrained,
                        lap=lap))
    chosen = most_agreed(runs, config.seed, log) if seeds > 1 else runs[0]
    chosen.baseline = kmeans_on_pcs(prepared, n_clusters, config)
    agreement = ari(chosen.baseline, chosen.labels)
    chosen.metrics["baseline"] = {"ari_to_sctcm": agreement,
                                  **scores(prepared.labels, chosen.baseline)}
    scored = "".join(f" | {key.upper()} {value:.3f}" for key, value in
                     scores(prepared.labels, chosen.baseline).items())
    log(f"baseline: k-means on {config.n_pcs} principal components, ARI to scTCM's partition "
        f"{agreement:.3f}{scored}")
    evidence.judge(chosen, prepared, config.m_cvx, log)
    if lap:
        lap("evidence and baseline")
    return chosen


def phase1(prepared, adjacency, n_clusters, config, cache, log=print):
    """Phase 1 from the folder cache, where a run of the same data, phase-1 settings
    (training.PHASE1_FIELDS), K of its log rows, threads and torch stored it (the file named by
    phase1_key), or else run (pretrain) and stored there; None without a cache (fit runs it).
    A phase 2 from it gives what a run without the cache gives, byte for byte."""
    if cache is None:
        return None
    path = Path(cache) / f"phase1-{phase1_key(prepared, adjacency, n_clusters, config)}.pt"
    if path.exists():
        log(f"phase 1 | read from {path}")
        return Pretrained.load(path, prepared, adjacency, config)
    pretrained = pretrain(prepared, adjacency, config,
                          Report(prepared.labels, n_clusters, config, log))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")  # parallel runs never see half a file
    pretrained.save(scratch)
    scratch.replace(path)
    return pretrained


def phase1_key(prepared, adjacency, n_clusters, config):
    """A digest of what phase 1 and its log rows depend on: the preprocessed cells and the graph
    (datasets.digest), the Config fields of training.PHASE1_FIELDS, K (its rows' k-means),
    torch's threads (they change the float sums) and version."""
    fields = {name: getattr(config, name) for name in PHASE1_FIELDS}
    key = json.dumps([datasets.digest(prepared, adjacency), fields, int(n_clusters),
                      torch.get_num_threads(), torch.__version__, PHASE1_FORMAT])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def fit_ks(prepared, adjacency, ks, config, seeds=1, every_k=False, log=print, cache=None,
           lap=None, pretrained=None):
    """fit_seeds at the one K of ks, or for several: choose_k's one phase 1, its criteria and
    recommended K, then fit_seeds at that K from the same phase 1 (metrics: k_selection, one
    row per K, and recommended_k), and with every_k the labels of a phase 2 at each K from that
    phase 1 too (Result.every_k). cache: a folder of phase 1s (phase1), for one K only; lap:
    Stopwatch.lap, or None; pretrained: phase 1 already run (--resume)."""
    if len(ks) == 1:
        return fit_seeds(prepared, adjacency, ks[0], config, seeds, log, pretrained, cache, lap)
    log(f"choosing K among {ks[0]}-{ks[-1]}: one phase 1, then the start at each of {len(ks)} "
        f"K (a few seconds each), then phase 2 at the recommended K"
        + (" and at every K" if every_k else ""))
    rows, k, pretrained = choose_k(prepared, adjacency, ks, config, log, pretrained)
    if lap:
        lap("choosing K")
    result = fit_seeds(prepared, adjacency, k, config, seeds, log, pretrained, lap=lap)
    result.metrics.update(k_selection=rows, recommended_k=k, k_peak=peak_certainty(rows, k))
    if every_k:
        result.every_k = {other: fit(prepared, adjacency, other, config, log=log,
                                     pretrained=pretrained).labels for other in ks}
    return result


# ---------------------------------------------------------------- one call: counts in, labels out

def cluster(counts, n_clusters, labels=None, log=print, seeds=1, every_k=False, layer=None,
            key_added="sctcm", threads=None, **config):
    """Cluster raw counts in one call: preprocess, kNN graph A and fit, as the command line runs
    them (the same seed gives the command line's labels on the same counts).

    counts: (n, g) raw counts, cells x genes, numpy or scipy sparse; or an AnnData (any object
    with .X, .obs and .var_names: anndata is not needed), read as the command line reads an
    .h5ad (layer: a key of .layers, or "raw" for .raw.X; by default .X when it holds counts,
    else .layers["counts"]), and the results written into it, scanpy's way (write_anndata:
    obs[key_added] and obs[key_added + "_confidence"], ..., obsm["X_" + key_added],
    uns[key_added]). n_clusters: K, or several (range(5, 16), [6, 8, 10]): one phase 1, the
    recommended K and phase 2 there (fit_ks; every_k: at each K too); labels: optional, for
    scoring only: (n,) values (missing: -1, NaN, "", "NA") or, with an AnnData, the name of an
    obs column; seeds: runs with seeds seed, seed + 1, ... (fit_seeds: the run that agrees best
    with the others, and each cell's stability); threads: torch's threads during the call (the
    command line's --threads also sets numpy's); config: Config fields as keywords (seed=1,
    ...); log: where the progress lines go (log=lambda line: None silences them).
    -> Result whose per-cell arrays (labels, embedding, pretrained, start, confidence, margin,
    reliable, stability, baseline, every_k) line up with the rows of counts: -1 (labels, start,
    baseline), NaN or False for a cell preprocessing dropped (it had no counts).
    Bad input raises the command line's one-line ValueError; a divergent run FloatingPointError."""
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}: not a field of model.Config")
    config = Config(**config)
    ks = [n_clusters] if np.ndim(n_clusters) == 0 else list(n_clusters)
    _check_settings(ks, config)
    _check_seeds(seeds)
    adata = counts if formats.is_anndata(counts) else None
    if adata is not None:
        counts, gene_names, labels = formats.anndata_counts(adata, layer, labels)
    elif layer is not None:
        raise ValueError("layer= names where an AnnData keeps its counts; these are counts")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a whole number, 1 or more, got {threads!r}")
    dataset = datasets.from_counts(counts, labels)
    if adata is not None:
        dataset.gene_names, dataset.cell_names = gene_names, np.asarray(adata.obs_names, str)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        prepared, adjacency = prepare(dataset, ks, config)
        datasets.describe(prepared, adjacency, ks[0] if len(ks) == 1 else f"{ks[0]}-{ks[-1]}",
                          log)
        result = fit_ks(prepared, adjacency, ks, config, seeds, every_k, log)
    finally:
        torch.set_num_threads(before)
    aligned = aligned_result(result, prepared.cells, dataset.counts.shape[0])
    if adata is not None:
        write_anndata(adata, aligned, config, key_added)
    return aligned


def write_anndata(adata, result, config, key_added="sctcm"):
    """A run's results into an AnnData, as scanpy's tools write theirs: obs[key_added] the
    clusters (categorical; missing for a cell without counts), obs[key_added + "_confidence"],
    "_margin", "_reliable", "_stability" (several seeds), "_baseline" (categorical), "_K9"
    (every_k): labels.csv's columns (obs_key); obsm["X_" + key_added] the codes Z; uns[key_added]
    the settings ("params") and the evidence ("warnings", and "clusters" and "markers" as
    columns). Another key_added adds another set, so that runs never collide."""
    for column, values in _per_cell(result).items():
        name = obs_key(column, key_added)
        if column.startswith(("cluster", "baseline")):
            adata.obs[name] = np.array([str(v) if v >= 0 else None for v in values], dtype=object)
            if hasattr(adata.obs, "columns"):  # a DataFrame, as in anndata: categories
                adata.obs[name] = adata.obs[name].astype("category")
        else:
            adata.obs[name] = values
    adata.obsm[f"X_{key_added}"] = result.embedding
    as_columns = lambda rows: {key: np.array([row[key] for row in rows]) for key in rows[0]}
    adata.uns[key_added] = {
        "params": {key: list(value) if isinstance(value, tuple) else value
                   for key, value in dataclasses.asdict(config).items()},
        "warnings": np.array(result.metrics.get("warnings", []), dtype=object),
        **{key: as_columns(result.metrics[key]) for key in ("clusters", "markers")
           if result.metrics.get(key)}}


def load(folder):
    """The model a run saved in its output folder (model.pt: reuse.load) -> reuse.Trained."""
    return reuse.load(folder)


def assign(trained, counts, gene_names, labels=None, log=print, device="cpu"):
    """New cells assigned by a saved model (load), without training (reuse.assign): counts
    (n, g) raw counts, cells x genes, numpy or scipy sparse, with gene_names (g,) matched by
    name to the model's genes; labels: optional, for scoring only -> Result whose per-cell
    arrays line up with the rows of counts (-1 or NaN for a row without counts)."""
    dataset = datasets.from_counts(counts, labels)
    dataset.gene_names = np.asarray(gene_names).astype(str)
    prepared, result = reuse.assign(trained, dataset, log, device)
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
    settings.check(config)
    if ks is None:
        return
    if not ks:
        raise ValueError("--clusters names no K (a range such as 5-3 is empty)")
    for k in ks:
        if not isinstance(k, (int, np.integer)):
            raise ValueError(f"--clusters must be a whole number, got {k!r}")
        if k < 2:
            raise ValueError(f"--clusters must be at least 2, got {k}")


def prepare(dataset, ks, config, lap=None):
    """Preprocess, check K (the largest of ks) and n_o against the cells that remain, build the
    kNN graph A (main and cluster) -> (prepared, adjacency). lap: Stopwatch.lap, or None."""
    lap = lap or (lambda stage: None)
    k = int(np.max(ks))
    prepared = datasets.preprocess(dataset, n_top_genes=config.n_top_genes)
    lap("preprocessing")
    if max(k, config.n_over) > prepared.x.shape[0]:
        raise ValueError(f"--clusters {k} or --n-over {config.n_over} is more than the "
                         f"{prepared.x.shape[0]} cells")
    if config.init in ("consistent", "merge", "consensus", "medoid") and k > config.n_over:
        raise ValueError(f"--init {config.init} merges the {config.n_over} overclusters: "
                         f"--clusters {k} needs --n-over at least as large")
    adjacency, prepared.components = datasets.cell_graph(prepared.x, config.n_neighbors,
                                                         config.n_pcs)
    lap("graph")
    return prepared, adjacency


class Stopwatch:
    """The seconds and the peak memory (formats.peak_memory_mb: the highest RSS so far) at the
    end of each stage of a run, in order; lap(stage) ends one, and a stage met again (several
    seeds) adds its seconds."""

    def __init__(self):
        self.stages, self.last = {}, time.time()

    def lap(self, stage):
        now = time.time()
        row = self.stages.setdefault(stage, {"seconds": 0.0, "peak_memory_mb": 0.0})
        row["seconds"] += now - self.last
        row["peak_memory_mb"] = formats.peak_memory_mb()
        self.last = now


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
    settings.add_flags(groups, Config)
    groups["run"].add_argument("--threads", type=int, help="threads of torch and of numpy's BLAS "
                               "(>= 1); default: theirs, every core (on a busy machine try 1)")
    groups["run"].add_argument("--cache", metavar="FOLDER", help="keep phase 1 in FOLDER: read it "
                               "from there when a run of the same data, phase-1 settings, seed "
                               "and threads stored it, else store it there (one K only); the "
                               "same labels either way")
    groups["run"].add_argument("--seeds", type=int, default=1, help="runs, with seeds SEED, SEED "
                               "+ 1, ...: the one that agrees best with the others is written, "
                               "with each cell's stability (>= 1); default 1")
    return parser


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
    parser.add_argument("--blind", action="store_true", help="read no labels from the file, so "
                        "that no score against them is printed, plotted or written (to choose "
                        "K, or judge a run, as without labels)")
    parser.add_argument("--model", metavar="RUN", help="assign the cells of PATH with the model a "
                        "run saved in its folder RUN (RUN/model.pt): its genes, scaling, "
                        "encoder and centres; no training")
    parser.add_argument("--resume", metavar="RUN", help="phase 2 again, at --clusters K (or a "
                        "range), from the phase 1 saved in RUN, on the same file: what a run at "
                        "K from that phase 1 gives")
    parser.add_argument("--plot", action="store_true", help="also draw fig2.png, embedding.png "
                        "and losses.png (needs matplotlib, an optional extra)")


def _inputs(args, config, lap):
    """Check the command line, then load, preprocess and build the graph -> (dataset, prepared,
    adjacency, ks, config, pretrained): config with the saved run's phase-1 settings and
    pretrained its phase 1 with --resume, else config as given and None. Every bad input
    raises ValueError (one line). lap: Stopwatch.lap."""
    _check_settings(args.clusters, config)
    _check_seeds(args.seeds)
    _check_files(args)
    if args.cache and len(args.clusters or ()) > 1:
        raise ValueError("--cache keeps the phase 1 of a run at one K; choosing K among several "
                         "runs its own")
    if args.every_k and len(args.clusters or ()) < 2:
        raise ValueError("--every-k runs phase 2 at each K of a range: give --clusters 5-15 "
                         "or a list 6,8,10")
    trained = None
    if args.resume:
        for flag, given in (("--cache", args.cache), ("--seeds", args.seeds > 1)):
            if given:
                raise ValueError(f"{flag} runs phase 1 again; --resume runs phase 2 from the "
                                 "saved phase 1")
        trained = reuse.load(args.resume)
        config = _resumed_config(config, trained)
    dataset, ks = _read(args)
    lap("reading")
    prepared, adjacency = prepare(dataset, ks, config, lap)
    pretrained = None if trained is None else reuse.resumed(trained, prepared, adjacency, config)
    return dataset, prepared, adjacency, ks, config, pretrained


def _check_files(args):
    """The checks of what a run reads and writes (PATH or --demo, --out, --plot)."""
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


def _read(args):
    """The dataset of PATH (formats.load) or --demo, and the K to run -> (dataset, ks)."""
    if args.demo:
        dataset = datasets.synthetic(**datasets.DEMOS[args.demo])
        return dataset, args.clusters or [len(dataset.label_names)]
    if args.clusters is None and not args.model:
        raise ValueError("--clusters K is required with a file")
    dataset = formats.load(args.path, label_key=args.label_key, layer=args.layer,
                           transpose=args.transpose, labels=args.labels)
    if args.blind:  # no label score anywhere: the labels are not read
        dataset = dataclasses.replace(dataset, labels=None, label_names=None)
    return dataset, args.clusters


def _resumed_config(config, trained):
    """config with the saved run's phase-1 settings (training.PHASE1_FIELDS but the device), so
    that phase 2 starts from its phase 1 as the run did; ValueError for one given with another
    value."""
    defaults = Config()
    for name in PHASE1_FIELDS:
        given, saved = getattr(config, name), getattr(trained.config, name)
        if name != "device" and given != getattr(defaults, name) and given != saved:
            raise ValueError(f"--{name.replace('_', '-')} {given}: --resume runs phase 2 from "
                             f"the phase 1 of {trained.folder}, trained with {saved}")
    return dataclasses.replace(config, **{name: getattr(trained.config, name)
                                          for name in PHASE1_FIELDS if name != "device"})


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
    start, stopwatch = time.time(), Stopwatch()
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    config.decoder = tuple(config.decoder)
    if args.model:
        return _assign_main(args, config, start, stopwatch)
    try:
        dataset, prepared, adjacency, ks, config, pretrained = _inputs(args, config,
                                                                       stopwatch.lap)
    except ValueError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    n_input = dataset.counts.shape[0]
    dataset = dataclasses.replace(dataset, counts=None)  # read no more: free its memory
    datasets.describe(prepared, adjacency, ks[0] if len(ks) == 1 else f"{ks[0]}-{ks[-1]}",
                      print)
    try:
        result = fit_ks(prepared, adjacency, ks, config, args.seeds, args.every_k,
                        cache=args.cache, lap=stopwatch.lap, pretrained=pretrained)
    except FloatingPointError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    scored = " | ".join(f"{key.upper()} {v:.4f}" for key, v in result.metrics.items()
                        if key in ("acc", "nmi", "ari"))
    print(f"done in {time.time() - start:.1f} s" + (f" | {scored}" if scored else ""))
    summary = _summary(dataset.name, prepared, result, config, stopwatch,
                       clusters=result.metrics.get("recommended_k", ks[0]))
    tmp = formats.scratch_folder(Path(args.out))
    written = write_files(tmp, dataset.cell_names, n_input, prepared, result, summary)
    reuse.save(tmp / reuse.MODEL_FILE, result, config, prepared, adjacency)
    written.append(reuse.MODEL_FILE)
    if args.plot:
        written += plots.draw(tmp, result.history, result.embedding, result.labels,
                              prepared.labels, prepared.label_names, prepared.name,
                              result.pretrained, result.start,
                              convexity_panels(result, config.m_cvx))
    if args.plot and "k_selection" in result.metrics:
        plots.plot_k_selection(tmp / "k_selection.png", result.metrics["k_selection"],
                               result.metrics["recommended_k"])
        written.append("k_selection.png")
    return _publish(args, tmp, written, summary, start, stopwatch)


def _assign_main(args, config, start, stopwatch):
    """python sctcm.py PATH --model RUN: the cells of PATH assigned by RUN's saved model
    (reuse.assign), no training; labels.csv, embedding.csv, centres.csv, clusters.csv,
    results.h5ad and summary.json as a run writes them."""
    try:
        _check_model_flags(args, config)
        _check_files(args)
        trained = reuse.load(args.model)
        dataset, _ = _read(args)
        stopwatch.lap("reading")
        prepared, result = reuse.assign(trained, dataset, print, config.device)
        stopwatch.lap("assigning")
    except ValueError as err:
        print(f"sctcm: error: {err}", file=sys.stderr)
        return 2
    evidence.judge(result, prepared, trained.config.m_cvx)
    scored = " | ".join(f"{key.upper()} {v:.4f}" for key, v in result.metrics.items()
                        if key in ("acc", "nmi", "ari"))
    print(f"done in {time.time() - start:.1f} s" + (f" | {scored}" if scored else ""))
    summary = _summary(dataset.name, prepared, result, trained.config, stopwatch,
                       clusters=trained.n_clusters, model=str(trained.folder))
    tmp = formats.scratch_folder(Path(args.out))
    written = write_files(tmp, dataset.cell_names, dataset.counts.shape[0], prepared, result,
                          summary)
    return _publish(args, tmp, written, summary, start, stopwatch)


def _check_model_flags(args, config):
    """--model trains nothing: refuse, in one line, a flag that sets how a run trains (any
    Config field but the device off its default, --clusters, --seeds, ...)."""
    defaults = Config()
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config)
             if f.name != "device" and getattr(config, f.name) != getattr(defaults, f.name)]
    given += [flag for flag, value in (("--clusters", args.clusters), ("--seeds", args.seeds != 1),
                                       ("--every-k", args.every_k), ("--cache", args.cache),
                                       ("--resume", args.resume), ("--plot", args.plot))
              if value]
    if given:
        raise ValueError(f"{given[0]} sets how a run trains; --model assigns the cells with the "
                         f"model trained in {args.model}, with its own settings")


def _summary(name, prepared, result, config, stopwatch, **more):
    """summary.json of a run: the data, the metrics, each stage (Stopwatch), the settings and
    the versions; more: further top-level entries (clusters, model)."""
    n, g = prepared.x.shape
    return {
        "dataset": name, "cells": n, "genes": g, **more, "metrics": result.metrics,
        "seconds": {}, "stages": stopwatch.stages, "peak_memory_mb": formats.peak_memory_mb(),
        "threads": torch.get_num_threads(), "config": dataclasses.asdict(config),
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": torch.__version__},
    }


def _publish(args, tmp, written, summary, start, stopwatch):
    """The end of a run: summary.json again with the writing's time and the total, the scratch
    folder moved to --out, the files and the stages printed -> 0."""
    stopwatch.lap("writing")
    summary["seconds"]["total"] = time.time() - start
    summary["peak_memory_mb"] = formats.peak_memory_mb()
    formats.write_summary(tmp, summary)
    out = Path(args.out)
    formats.publish(tmp, out, args.overwrite)
    print(f"wrote {out}/: " + " ".join(written))
    print("stages (seconds, peak memory): " + ", ".join(
        f"{stage} {row['seconds']:.1f} s {row['peak_memory_mb'] / 1024:.2f} GB"
        for stage, row in stopwatch.stages.items()))
    return 0


# ---------------------------------------------------------------- a run's files

def convexity_panels(result, m, count=300, seed=0):
    """plots.plot_convexity's two panels for a run (Eq. 11 made visible): the cluster with the
    most reliable cells when phase 2 starts, its reliable cells and `count` convex combinations
    of m of them, on the codes after phase 1 (clusters: the start's centres' nearest, as Eq. 5
    assigns them) and at the end."""
    start = nearest_mean(result.pretrained, result.start)
    k = int(np.argmax(np.bincount(start[result.reliable_start], minlength=start.max() + 1)))
    rng, panels = np.random.default_rng(seed), []
    for when, z, clusters, reliable in (
            ("start of phase 2", result.pretrained, start, result.reliable_start),
            ("end", result.embedding, result.labels, result.reliable)):
        drawn = draw_combinations([np.flatnonzero(reliable & (clusters == k))], m, count, rng)
        combos = (convex_combinations(torch.as_tensor(z), *drawn[1:])[0].numpy() if drawn
                  else np.empty((0, z.shape[1])))
        panels.append((f"cluster {k}, {when}", z, clusters, reliable, k, combos))
    return panels


DROPPED = "dropped by preprocessing: no counts"  # the note of an input cell without a cluster


def write_files(folder, cell_names, n, prepared, result, summary):
    """A run's files into folder -> their names. cell_names (or None: numbered) and n: the input's
    cells, all of them, preprocessing's dropped ones too. labels.csv: one row per input cell: its
    cluster, confidence, margin and reliable flag (Result), stability (several seeds), the
    baseline's cluster, the cluster at each K (--every-k) and a note for a cell preprocessing
    dropped (no cluster); embedding.csv (the codes of the cells kept), centres.csv (phi^c:
    Eq. 5 from embedding.csv), clusters.csv (metrics["clusters"]), markers.csv (each cluster's
    top genes, metrics["markers"]), k_selection.csv (several K), history.csv, summary.json, and
    results.h5ad: the same as AnnData (obs: the columns of labels.csv named by obs_key, the
    clusters and baseline as categories; obsm X_sctcm: the codes, NaN for a dropped cell; uns
    sctcm: the summary)."""
    names = datasets.names_or_numbered(cell_names, "cell", n)
    cells = aligned_result(result, prepared.cells, n)
    clustered = cells.labels >= 0
    per_cell = _per_cell(cells)
    per_cell["note"] = np.where(clustered, "", DROPPED)
    shown = {key: [value if has else None for has, value in zip(clustered, values.tolist())]
             for key, values in per_cell.items()}
    shown["note"] = per_cell["note"].tolist()
    rows = result.metrics["clusters"]
    tables = {"labels.csv": {"cell": names.tolist(), **shown},
              "embedding.csv": {"cell": prepared.cell_names.tolist(),
                                **_code_columns(result.embedding)},
              "centres.csv": {"cluster": list(range(len(result.centres))),
                              **_code_columns(result.centres)},
              "clusters.csv": {key: [row[key] for row in rows] for key in rows[0]}}
    for name, key in (("markers.csv", "markers"), ("k_selection.csv", "k_selection")):
        if result.metrics.get(key):
            rows = result.metrics[key]
            tables[name] = {column: [row[column] for row in rows] for column in rows[0]}
    formats.write_run(folder, tables, result.history, summary)  # no history.csv without history
    obs = {obs_key(key): values for key, values in per_cell.items()}
    formats.write_h5ad(folder / "results.h5ad", names, obs, {"X_sctcm": cells.embedding},
                       {"sctcm": summary},
                       categorical=[obs_key(key) for key in per_cell
                                    if key.startswith(("cluster", "baseline"))])
    return [*tables, *(["history.csv"] if result.history else []), "summary.json",
            "results.h5ad"]


def _per_cell(cells):
    """labels.csv's columns but the note, of a Result aligned with the input rows: cluster,
    confidence and margin (six digits), reliable, stability and baseline where known, and the
    cluster at each K (every_k)."""
    per_cell = {"cluster": cells.labels, "confidence": _rounded(cells.confidence),
                "margin": _rounded(cells.margin), "reliable": cells.reliable}
    if cells.stability is not None:
        per_cell["stability"] = _rounded(cells.stability)
    if cells.baseline is not None:
        per_cell["baseline"] = cells.baseline
    for k, labels in (cells.every_k or {}).items():
        per_cell[f"cluster_K{k}"] = labels
    return per_cell


def obs_key(column, key_added="sctcm"):
    """The name of a labels.csv column in an AnnData's obs, prefixed as scanpy's tools name
    theirs, so that the columns of two runs never collide: cluster -> sctcm, confidence ->
    sctcm_confidence, cluster_K9 -> sctcm_K9."""
    if column == "cluster":
        return key_added
    return f"{key_added}_{column.removeprefix('cluster_')}"


def _code_columns(z):
    """The columns z1, z2, ... of a CSV file of codes z (n, d) (embedding.csv, centres.csv)."""
    return {f"z{j + 1}": z[:, j].tolist() for j in range(z.shape[1])}


def _rounded(values):
    """Probabilities and shares to six significant digits (float64), for the files."""
    return np.array([float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64)])


if __name__ == "__main__":
    sys.exit(main())
