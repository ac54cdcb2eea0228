"""Reproduce Table 1, Table 2 and Fig. 2 of the paper on a folder of labelled count matrices.

    python reproduce.py FOLDER --seeds 3 --out reproduction

FOLDER holds labelled .h5/.h5ad files, e.g. the benchmark files of README.md's "Getting the
data". Every scTCM run uses the defaults; the variants add flags (VARIANTS).

Every (dataset, variant, seed) is one run of sctcm.py's command line in its own process, so
its time and peak memory are its own; it lands in OUT/runs/<dataset>/<variant>/seed<s>/.
A run whose folder exists is not repeated, so an interrupted reproduction resumes where it
stopped. K is the number of labels of each file, as in the paper. Then OUT/results.md gets
the tables, OUT/fig2_<dataset>.csv the ID and LID curves, and OUT/fig2_<dataset>.png a plot
when matplotlib happens to be installed.

--protocol also runs phase 2's candidates (CANDIDATES) and chooses among them leave-one-file-out.

benchmark() times the parts of one epoch on a file (README, "Many cells"); depth_series() runs
the synthetic cells at several sequencing depths (RESULTS.md, "Deep counts"); evidence() the
seeds, confidence and stability tables and k_choice() the choosing-K table (RESULTS.md):
    python -c "import reproduce; reproduce.benchmark('synthetic_100k.h5', 6)"
    OMP_NUM_THREADS=1 python -c "import reproduce; reproduce.depth_series()"
    python -c "import reproduce; reproduce.evidence('../shared/data')"
    python -c "import reproduce; reproduce.k_choice('../shared/data')"
"""
import argparse
import csv
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import clustering
import datasets
import formats
import geometry
import reuse
import sctcm
import training
from clustering import ari, centroid_ari, kmeans, scores, spectral_clustering
from evidence import judge
from model import (Config, clustering_loss, feature_loss, optimise, self_supervised_loss,
                   self_supervision, soft_assign, structure_loss, target_distribution)
from plots import plot_fig2

SCTCM = Path(__file__).resolve().with_name("sctcm.py")
VARIANTS = {  # the runs and the flags that make them
    "full": [],  # the defaults, Table 1 and Table 2
    "paper start": ["--init", "spectral"],  # Table 1: phi^c from spectral clustering of A
    # Table 1: the lowest-inertia restart merged (the default until 2026-12)
    "merge start": ["--init", "merge"],
    "consensus start": ["--init", "consensus"],  # Table 1: what the merges of every restart share
    "exact losses": ["--losses", "exact"],  # Table 1: every cell and pair each epoch
    "sampled losses": ["--losses", "sampled"],  # Table 1: sampled also below batch_size cells
    "no adversarial": ["--no-adversarial"],  # the ablations of Table 2
    "no overclustering": ["--no-overclustering"],
    "neither": ["--no-adversarial", "--no-overclustering"],
    # the candidates of phase 2's protocol (RESULTS.md, "Phase 2"), each setting named
    "global, genes": ["--reliable-rule", "global", "--adversary", "genes"],
    "per-cluster, genes": ["--reliable-rule", "per-cluster", "--adversary", "genes"],
    "global, latent": ["--reliable-rule", "global", "--adversary", "latent"],
    # diagnoses: can the discriminators learn when nobody fools them; the authors' interval
    "global, generator off": ["--reliable-rule", "global", "--gamma-g", "0"],
    "per-cluster, targets every 8": ["--reliable-rule", "per-cluster", "--update-every", "8"],
    # the authors' code (MMAMAR/scTConvexMan, main_Young.py), one piece at a time, then all
    "authors: rewire": ["--rewire"],
    "authors: schedule": ["--schedule", "authors"],
    "authors: spectral start, n_o 10": ["--init", "spectral", "--n-over", "10"],
    "authors: w_a 1": ["--w-a", "1"],
    "authors: 500 phase-1 epochs": ["--pretrain-epochs", "500"],
    "authors' recipe": ["--rewire", "--schedule", "authors", "--init", "spectral", "--n-over",
                        "10", "--w-a", "1", "--pretrain-epochs", "500", "--update-every", "8"],
    # phase 2 from its start: the start itself as the first targets; the thread-stable start
    "start targets 10": ["--start-targets", "10"],
    "start targets 30": ["--start-targets", "30"],
    "consensus, start targets 10": ["--init", "consensus", "--start-targets", "10"],
    "consensus, start targets 30": ["--init", "consensus", "--start-targets", "30"],
    "medoid start": ["--init", "medoid"],  # the merge the others agree with: thread-stable
    "repair": ["--repair"],  # a split-merge move where one cluster is two humps, a pair one
}
CANDIDATES = ("full", "authors: rewire", "authors: schedule", "start targets 10",
              "start targets 30", "consensus start", "consensus, start targets 10",
              "consensus, start targets 30", "medoid start", "repair")
AUTHORS_FILES = ("Young_top2000", "10X_PBMC_top2000", "Baron_mouse")  # their Young and two more
AUTHORS = ("authors: rewire", "authors: schedule", "authors: spectral start, n_o 10",
           "authors: w_a 1", "authors: 500 phase-1 epochs", "per-cluster, targets every 8",
           "authors' recipe")
TABLE1 = {"full": "scTCM", "paper start": "scTCM, `--init spectral`",
          "merge start": "scTCM, `--init merge`", "consensus start": "scTCM, `--init consensus`",
          "exact losses": "scTCM, `--losses exact`", "sampled losses": "scTCM, `--losses sampled`"}
TABLE2 = ("full", "no adversarial", "no overclustering", "neither")
PAPER_YOUNG = {  # paper, Tables 1 and 2, Young: ACC, NMI, ARI in %, mean of ten runs
    "full": (85.30, 84.86, 79.74),
    "no adversarial": (84.57, 84.08, 75.71),
    "no overclustering": (84.22, 84.01, 77.59),
    "neither": (82.11, 82.41, 74.33),
}
LEIDEN_ARI = {  # scanpy, 2000 HVGs, 50 PCs, 15 neighbours, Leiden tuned to K (quoted, not run)
    "Young_top2000": 0.565, "10X_PBMC_top2000": 0.692, "Mouse_bladder_top2000": 0.528,
    "Mouse_bladder_select2100": 0.442, "Baron_mouse": 0.402,
}
METRICS = ("acc", "nmi", "ari")


def labelled_files(folder, stems=None):
    """The .h5 / .h5ad files of folder that carry labels, as (stem, path, K, dataset); an .h5ad
    file with the same stem as an .h5 file is taken to be the same data and skipped. stems: read
    only the files with these stems (default: all). K counts the label classes, not the cells
    whose label is missing. A file that cannot be read raises formats.load's one-line error."""
    try:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix in (".h5", ".h5ad"))
    except OSError as err:
        raise ValueError(f"{folder}: cannot list the folder ({err.strerror})") from None
    h5_stems = {p.stem for p in paths if p.suffix == ".h5"}
    found = []
    for path in paths:
        if (path.suffix == ".h5ad" and path.stem in h5_stems) or (stems and path.stem not in stems):
            continue
        dataset = formats.load(path)
        if dataset.labels is not None:
            found.append((path.stem, path, len(dataset.label_names), dataset))
    return found


def _folder(out, stem, variant):
    """OUT/runs/<stem>/<variant>, the variant's spaces made dashes."""
    return out / "runs" / stem / variant.replace(" ", "-")


def run(path, k, variant, seed, out, extra):
    """One sctcm.py run into OUT/runs/<stem>/<variant>/seed<seed>, unless it is there already.
    Phase 1 is kept in OUT/phase1 (--cache): the variants that share phase-1 settings share it."""
    folder = _folder(out, path.stem, variant) / f"seed{seed}"
    if folder.exists():
        return
    log = out / "logs" / f"{path.stem}-{folder.parent.name}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{path.stem} | {variant} | seed {seed}", flush=True)
    command = [sys.executable, str(SCTCM), str(path), "--clusters", str(k), "--seed", str(seed),
               "--out", str(folder), "--cache", str(out / "phase1"), *VARIANTS[variant], *extra]
    with open(log, "w") as f:
        if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"{path.stem} {variant} seed {seed} failed, see {log}")


def references(dataset, k, seeds, codes):
    """Per-seed scores of the label-free partitions scTCM is compared with, all built with the
    default Config: our kmeans on the top n_pcs (50) principal components of the preprocessed
    matrix (10 restarts, as the kmeans default and the `--init kmeans` start; and 100 restarts,
    which reach a lower k-means objective), and spectral clustering of the kNN graph A, the
    partition the paper's phase 2 starts from. Last, a diagnostic that reads the labels: the
    centroid_ari of scTCM's final codes `codes` (one array per finished run), how well they
    separate the types once the types' centres are known. -> {row name: [scores per seed]}."""
    config = Config()
    prepared = datasets.preprocess(dataset, n_top_genes=config.n_top_genes)
    pcs = datasets.pca(prepared.x, config.n_pcs)
    graph = datasets.knn_graph(prepared.x, k=config.n_neighbors, n_pcs=config.n_pcs)
    y = prepared.labels
    return {
        f"k-means, {config.n_pcs} PCs": [scores(y, kmeans(pcs, k, seed=s)[0]) for s in seeds],
        f"k-means, {config.n_pcs} PCs, 100 restarts": [
            scores(y, kmeans(pcs, k, seed=s, n_init=100)[0]) for s in seeds],
        "spectral clustering of A (the paper's phase-2 start)": [
            scores(y, spectral_clustering(graph, k, s)) for s in seeds],
        "true centres in scTCM's Z (uses the labels)": [{"ari": centroid_ari(y, z)}
                                                        for z in codes],
    }


def final_codes(out, stem, seeds):
    """The codes Z (embedding.csv) of every finished seed of the full model on one dataset."""
    files = [_folder(out, stem, "full") / f"seed{seed}" / "embedding.csv" for seed in seeds]
    return [_read_codes(f) for f in files if f.exists()]


def _read_codes(path):
    """embedding.csv (cell, z1..zd) -> (n, d) array."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([row[1:] for row in rows], dtype=float)


def summaries(out, stem, variant, seeds):
    """summary.json of every finished seed of one dataset and variant."""
    files = [_folder(out, stem, variant) / f"seed{seed}" / "summary.json" for seed in seeds]
    return [json.loads(f.read_text()) for f in files if f.exists()]


def _mean_std(values, scale=1.0):
    """'mean +- std' (sample std over seeds) of a list of numbers."""
    values = np.asarray(values, dtype=float) * scale
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {std:.3f}"


def _score_cells(rows):
    """The ACC, NMI and ARI cells of a table row from per-seed metric dicts (blank where the
    dicts do not have the metric)."""
    return [_mean_std([r[m] for r in rows]) if m in rows[0] else "" for m in METRICS]


def table1(out, files, seeds, reference):
    """Markdown: scTCM with the defaults, from the paper's start and with exact or sampled losses
    per dataset (the variants that were run), with time, memory and phase-2 epochs, beside the
    reference partitions (run here) and the Leiden ARI (quoted)."""
    lines = ["| dataset | method | seeds | ACC | NMI | ARI | mean time (s) | peak memory (GB) "
             "| phase-2 epochs |", "|---|---|---|---|---|---|---|---|---|"]
    for stem, _, k, _ in files:
        first = f"{stem} (K={k}) "
        for variant, name in TABLE1.items():
            runs = summaries(out, stem, variant, seeds)
            if runs:
                epochs = ", ".join(str(r["metrics"]["phase2_epochs"]) for r in runs)
                lines.append(
                    f"| {first}| {name} | {len(runs)} | "
                    + " | ".join(_score_cells([r["metrics"] for r in runs]))
                    + f" | {np.mean([r['seconds']['total'] for r in runs]):.0f}"
                    f" | {max(r['peak_memory_mb'] for r in runs) / 1024:.2f} | {epochs} |")
                first = ""
        for name, rows in reference[stem].items():
            if rows:  # no codes of the full model when that variant did not run
                lines.append(f"| | {name} | {len(rows)} | " + " | ".join(_score_cells(rows))
                             + " | | | |")
        if stem in LEIDEN_ARI:
            lines.append(f"| | Leiden (scanpy, quoted) | | | | {LEIDEN_ARI[stem]:.3f} | | | |")
    return "\n".join(lines)


def table2(out, stem, seeds):
    """Markdown: the four variants of the paper's Table 2 on one dataset (the paper's numbers
    beside ours where the paper has them)."""
    paper = PAPER_YOUNG if stem.startswith("Young") else {}
    lines = [f"| {stem} | seeds | ACC | NMI | ARI | mean time (s) |"
             + (" paper ACC / NMI / ARI |" if paper else ""),
             "|---|---|---|---|---|---|" + ("---|" if paper else "")]
    for variant in TABLE2:
        runs = summaries(out, stem, variant, seeds)
        if not runs:
            continue
        seconds = np.mean([r["seconds"]["total"] for r in runs])
        cells = [variant, str(len(runs)), *_score_cells([r["metrics"] for r in runs]),
                 f"{seconds:.0f}"]
        if paper:
            cells.append(" / ".join(f"{v / 100:.3f}" for v in paper[variant]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _phase2_numbers(out, stem, variant, seeds):
    """Per finished seed: (final ARI, the start's ARI, clusters with fewer than m reliable cells
    when phase 2 starts: the first phase-2 row's reliable_k, of the targets of epoch 1)."""
    numbers = []
    for seed in seeds:
        folder = _folder(out, stem, variant) / f"seed{seed}"
        if not (folder / "summary.json").exists():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        with open(folder / "history.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["phase"] == "2"]
        m = summary["config"]["m_cvx"]
        few = sum(int(c) < m for c in rows[1]["reliable_k"].split()) if rows[1].get(
            "reliable_k") else None
        numbers.append((summary["metrics"]["ari"], float(rows[0]["ari"]), few))
    return numbers


def candidate_table(out, stems, seeds, candidates):
    """Markdown: each candidate on every file: final ARI mean ± sd over seeds, its change from
    the start, the clusters below m reliable cells at the start, the seeds found where some are
    missing; and the mean over the files."""
    lines = ["| candidate | " + " | ".join(stems) + " | mean |",
             "|---|" + "---|" * (len(stems) + 1)]
    for c in candidates:
        cells, means = [], []
        for stem in stems:
            runs = _phase2_numbers(out, stem, c, seeds)
            if not runs:
                cells.append("")
                continue
            final = [r[0] for r in runs]
            means.append(np.mean(final))
            few = [r[2] for r in runs if r[2] is not None]
            notes = [f"{np.mean([a - b for a, b, _ in runs]):+.3f}"]
            notes += [f"{np.mean(few):.1f} below m"] if few else []
            notes += [f"{len(runs)} of {len(seeds)} seeds"] if len(runs) < len(seeds) else []
            value = _mean_std(final) if len(runs) > 1 else f"{final[0]:.3f}"
            cells.append(f"{value} ({'; '.join(notes)})")
        mean = f"{np.mean(means):.3f}" if means else ""
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def protocol(out, files, seeds, candidates=CANDIDATES):
    """Markdown: phase 2's candidates on every file (candidate_table), then the choice made
    leave-one-file-out: for each file, the candidate with the best mean ARI over the other
    files, and what it gives on the file left out. Only candidates with every seed on every
    file compete."""
    stems = [stem for stem, *_ in files]
    numbers = {(stem, c): _phase2_numbers(out, stem, c, seeds) for stem in stems
               for c in candidates}
    lines = [candidate_table(out, stems, seeds, candidates), "",
             "| left out | chosen on the other files | its ARI there | best there |",
             "|---|---|---|---|"]
    complete = [c for c in candidates  # only these compete: the same seeds on every file
                if all(len(numbers[stem, c]) == len(seeds) for stem in stems)]
    mean_of = lambda stem, c: np.mean([r[0] for r in numbers[stem, c]])
    left = []
    for stem in stems:
        others = [s for s in stems if s != stem]
        chosen = max(complete, key=lambda c: np.mean([mean_of(s, c) for s in others]))
        best = max(complete, key=lambda c: mean_of(stem, c))
        left.append(mean_of(stem, chosen))
        lines.append(f"| {stem} | {chosen} | {mean_of(stem, chosen):.3f} | {best} "
                     f"({mean_of(stem, best):.3f}) |")
    lines.append(f"| mean | | {np.mean(left):.3f} | |")
    return "\n".join(lines)


def fig2(out, stem, seed):
    """ID and LID per logged epoch, both phases, full model and 'neither': a CSV, and a PNG
    when matplotlib is installed. Returns the CSV path, or None before the runs exist."""
    curves = {}
    for variant in ("full", "neither"):
        history = _folder(out, stem, variant) / f"seed{seed}" / "history.csv"
        if not history.exists():
            return None
        with open(history) as f:
            curves[variant] = [r for r in csv.DictReader(f) if r.get("ID")]
    path = out / f"fig2_{stem}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "phase", "epoch", "step", "ID", "LID"])
        for variant, rows in curves.items():
            for step, r in enumerate(rows):
                writer.writerow([variant, r["phase"], r["epoch"], step, r["ID"], r["LID"]])
    try:
        plot_fig2(out / f"fig2_{stem}.png", {f"{stem}: {v}": rows for v, rows in curves.items()})
    except ImportError:  # matplotlib is an optional extra
        pass
    return path


def benchmark(path, n_clusters, repeats=3, **config):
    """Where an epoch's time goes (README, "Many cells") on the count matrix at path, with the
    defaults (or config): seconds of forward + backward of the encoder (Eq. 1), the feature head
    with the ZINB loss (Eq. 3), the structure loss (Eq. 2) and the clustering loss (Eqs. 5-7) on
    the Batch of one epoch; a phase-1 evaluation (codes, k-means with 3 restarts, ID/LID,
    scores) divided by eval_every; and a whole phase-1 epoch (forward, backward, Adam step)."""
    config = Config(**config)
    prepared, adjacency = sctcm.prepare(formats.load(path), n_clusters, config)
    data, sampler, model = training.setup(prepared, adjacency, config)
    n = len(prepared.x)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_pretrain)
    z = training.codes(model, data)
    phi = z[torch.randperm(n)[:n_clusters]]
    q, _ = target_distribution(soft_assign(z, phi), 0.1)

    def backward(loss_of_codes):
        loss_of_codes(z.clone().requires_grad_()).backward()


    def evaluation():
        codes = training.codes(model, data).cpu().numpy()
        km = kmeans(codes, n_clusters, seed=config.seed, n_init=3)[0]
        geometry.cluster_geometry(codes, km)
        if prepared.labels is not None:
            ari(prepared.labels, km)
            centroid_ari(prepared.labels, codes)

    def epoch():
        out = self_supervision(model, data, sampler(), config.block)
        optimise(optimizer, self_supervised_loss(out, config))

    parts = {
        "encoder": lambda: model.encoder(data["x"], data["a_norm"]).sum().backward(),
        "ZINB": lambda: backward(lambda c: feature_loss(model, data, c, sampler())[1]),
        "structure": lambda: backward(
            lambda c: structure_loss(c, data["edges"], config.block, sampler().pairs)),
        "clustering": lambda: backward(lambda c: clustering_loss(q, c, phi, sampler())),
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
    losses = "sampled" if sampler.sampled else "exact"
    print(f"{n} cells, {losses} losses | "
          + " | ".join(f"{name} {value:.3f} s" for name, value in seconds.items()))
    return seconds


def right_cells(y, pred):
    """Whether each labelled cell's cluster is its type under ACC's map (clustering.renamed)."""
    return clustering.renamed(y, pred) == y


def auroc(signal, right):
    """How well a per-cell signal ranks right cells above wrong ones: the probability that a
    right cell scores higher than a wrong one, ties counting half (Mann-Whitney)."""
    ranks = stats.rankdata(signal)
    n_right, n_wrong = right.sum(), (~right).sum()
    if n_right == 0 or n_wrong == 0:
        return float("nan")
    return float((ranks[right].sum() - n_right * (n_right + 1) / 2) / (n_right * n_wrong))


def halves(signal, right):
    """(share right among the half of the cells with the higher signal, among the lower half);
    ties are ordered as the cells are, so a signal with many ties splits them arbitrarily."""
    order = np.argsort(-np.asarray(signal), kind="stable")
    top = order[: len(order) // 2]
    low = order[len(order) // 2:]
    return float(right[top].mean()), float(right[low].mean())


def evidence(folder, seeds=3, stems=None, **config):
    """RESULTS.md's phase-2 and evidence tables: on each labelled file of folder, what
    `sctcm.py FILE --clusters K --seeds N` runs (N fits and most_agreed), timed, and per run:
    the final ARI, the start's, the clusters with fewer than m reliable cells when phase 2
    starts, and how well the confidence (p of Eq. 5) tells the cells whose cluster is their
    type from the others (halves and AUROC); for the kept run, the same for the stability, the
    seeds' agreement and the kept run's rank by ARI. Prints markdown rows as it goes."""
    quiet = lambda line: None
    print("| dataset | seed | ARI | start ARI | clusters < m reliable at the start | "
          "confidence: right in the top half / bottom half, AUROC |")
    print("|---|---|---|---|---|---|")
    kept_rows = []
    for stem, path, k, dataset in labelled_files(folder, stems):
        settings = Config(**config)
        prepared, adjacency = sctcm.prepare(dataset, [k], settings)
        y, began, runs = prepared.labels, time.time(), []
        for seed in range(seeds):
            runs.append(training.fit(prepared, adjacency, k, Config(**{**config,
                                                                          "seed": seed}),
                                  log=quiet))
            run, labelled = runs[-1], y >= 0
            right = right_cells(y[labelled], run.labels[labelled])
            top, low = halves(run.confidence[labelled], right)
            row = next(r for r in run.history if r["phase"] == 2 and r["epoch"] > 0)
            few = sum(int(c) < settings.m_cvx for c in row["reliable_k"].split())
            print(f"| {stem} | {seed} | {run.metrics['ari']:.3f} | "
                  f"{run.metrics['start']['ari']:.3f} | {few} of {k} | {top:.3f} / {low:.3f}, "
                  f"{auroc(run.confidence[labelled], right):.3f} |", flush=True)
        chosen = sctcm.most_agreed(runs, 0, quiet)
        seconds = time.time() - began
        right = right_cells(y[labelled], chosen.labels[labelled])
        stable = chosen.stability[labelled]
        rank = 1 + sum(r.metrics["ari"] > chosen.metrics["ari"] for r in runs)
        agreement = chosen.metrics["seed_agreement"]
        kept_rows.append(
            f"| {stem} | {agreement['mean_ari']:.3f} / {agreement['min_ari']:.3f} | "
            f"{agreement['chosen']} ({rank} of {seeds} by ARI) | {seconds:.0f} | "
            f"{right[stable == 1].mean():.3f} / {right[stable < 1].mean():.3f} "
            f"({np.mean(stable < 1):.1%} below 1), {auroc(stable, right):.3f} | "
            f"{auroc(chosen.confidence[labelled], right):.3f} |")
    print(f"\n| dataset | seeds' pairwise ARI, mean / min | seed kept | seconds ({seeds} runs) | "
          "stability: right where 1 / below 1, AUROC | confidence AUROC, the kept run |")
    print("|---|---|---|---|---|---|")
    print("\n".join(kept_rows))


def k_choice(folder, ks=range(4, 21), stems=None, **config):
    """RESULTS.md's choosing-K table: on each labelled file, choose_k over ks (one phase 1, seed
    0), the recommended K beside the labelled number of types, and the final ARI of phase 2 at
    both, from the same phase 1. Prints markdown rows as it goes."""
    quiet, ks = (lambda line: None), list(ks)
    print("| dataset | types | recommended K | within 20% (at least 2) | ARI at the recommended "
          "K | ARI at the types' K | K where the start's ARI peaks |")
    print("|---|---|---|---|---|---|---|")
    for stem, path, k, dataset in labelled_files(folder, stems):
        settings = Config(**config)
        prepared, adjacency = sctcm.prepare(dataset, ks + [k], settings)
        rows, recommended, pretrained = sctcm.choose_k(prepared, adjacency, ks, settings, quiet)
        final = {kk: training.fit(prepared, adjacency, kk, settings, log=quiet,
                               pretrained=pretrained).metrics["ari"] for kk in {recommended, k}}
        peak = max(rows, key=lambda row: row["ari"])["k"]
        near = abs(recommended - k) <= max(2, 0.2 * k)
        print(f"| {stem} | {k} | {recommended} | {'yes' if near else 'no'} | "
              f"{final[recommended]:.3f} | {final[k]:.3f} | {peak} |", flush=True)


def halves_of(dataset, seed=100):
    """A dataset split at random into two halves of its cells (a permutation of seed): the
    first half, then the second; labels, label names and gene names kept."""
    order = np.random.default_rng(seed).permutation(dataset.counts.shape[0])
    first, second = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    names = datasets.names_or_numbered(dataset.cell_names, "cell", dataset.counts.shape[0])
    genes = datasets.names_or_numbered(dataset.gene_names, "gene", dataset.counts.shape[1])
    return [dataclasses.replace(dataset, counts=dataset.counts[cells], cell_names=names[cells],
                                labels=dataset.labels[cells], gene_names=genes)
            for cells in (first, second)]


def transfer(folder, seeds=3, stems=None, **config):
    """RESULTS.md's "Train once, use again": each labelled file split at random into halves
    (halves_of, seed 100); the defaults trained on the first (seeds 0..seeds-1), their model
    saved and loaded (reuse.save, reuse.load) and applied to the second (reuse.assign, no
    training). Per seed: ARI on the trained half, ARI on the applied half, and how the
    confidence tells right from wrong cells on each (halves and AUROC, as evidence()).
    Prints markdown rows as it goes."""
    import tempfile
    quiet = lambda line: None
    print("| dataset | seed | ARI, trained half | ARI, applied half | confidence AUROC, "
          "trained / applied | applied: right in the top half / bottom half |")
    print("|---|---|---|---|---|---|")
    for stem, path, k, dataset in labelled_files(folder, stems):
        train, other = halves_of(dataset)
        for seed in range(seeds):
            settings = Config(**{**config, "seed": seed})
            prepared, adjacency = sctcm.prepare(train, [k], settings)
            run = training.fit(prepared, adjacency, k, settings, log=quiet)
            with tempfile.TemporaryDirectory() as folder_:
                reuse.save(Path(folder_) / reuse.MODEL_FILE, run, settings, prepared, adjacency)
                applied_prepared, applied = reuse.assign(reuse.load(folder_), other, quiet)
            cells = []
            for y, result in ((prepared.labels, run), (applied_prepared.labels, applied)):
                labelled = y >= 0
                right = right_cells(y[labelled], result.labels[labelled])
                cells.append((auroc(result.confidence[labelled], right),
                              halves(result.confidence[labelled], right)))
            print(f"| {stem} | {seed} | {run.metrics['ari']:.3f} | "
                  f"{applied.metrics['ari']:.3f} | {cells[0][0]:.3f} / {cells[1][0]:.3f} | "
                  f"{cells[1][1][0]:.3f} / {cells[1][1][1]:.3f} |", flush=True)


def warning_kind(line):
    """The kind of a warning line of evidence.judge."""
    for kind, start in (("split", "share"), ("mixture", "fall into two groups"),
                        ("baseline splits", "the baseline splits"),
                        ("baseline joins", "the baseline joins"), ("one hump", "one hump"),
                        ("no reliable cell", "no reliable cell"), ("small", "fewer than m")):
        if start in line:
            return kind
    return "run"


def warning_hit(line, y, labels, baseline, mixed=0.15):
    """Whether a warning of evidence.judge points at a real error of the partition labels
    against the types y: two clusters it names (split, baseline joins, one hump) hold the same
    majority type (one type split); a cluster it calls a mixture holds a second type on at
    least `mixed` of its cells; a cluster the baseline splits, into two sides whose majority
    types differ (two types joined); a cluster without reliable cell, one of either kind.
    None for the kinds that claim no error (run-level, small)."""
    numbers = [int(w) for w in re.findall(r"clusters? (\d+)(?: and (\d+))?", line)[0] if w]
    major = lambda cells: np.bincount(y[cells]).argmax() if cells.any() else -1
    second = lambda cells: np.sort(np.bincount(y[cells]))[::-1][1] / cells.sum() \
        if len(np.unique(y[cells])) > 1 else 0.0
    kind = warning_kind(line)
    if kind in ("split", "baseline joins", "one hump"):
        a, b = numbers
        return bool(major(labels == a) == major(labels == b))
    if kind == "mixture":
        return bool(second(labels == numbers[0]) >= mixed)
    if kind == "baseline splits":
        groups = [int(g) for g in re.findall(r"in its group (\d+)", line)]
        sides = [(labels == numbers[0]) & (baseline == g) for g in groups]
        return bool(major(sides[0]) != major(sides[1]))
    if kind == "no reliable cell":
        k = numbers[0]
        same = [j for j in np.unique(labels) if j != k and major(labels == j) ==
                major(labels == k)]
        return bool(same) or bool(second(labels == k) >= mixed)
    return None


def warning_hits(out, files, seeds, variant="full"):
    """RESULTS.md "Evidence": per kind of warning, over the runs of variant (their summary.json
    and labels.csv), how many point at a real error (warning_hit) and how many at none; and of
    the real errors (two clusters of one majority type, a cluster whose second type holds 15%
    of it), how many some warning names. Markdown."""
    counts = {}
    errors = found = 0
    for stem, _, _, dataset in files:
        for seed in seeds:
            folder = _folder(out, stem, variant) / f"seed{seed}"
            if not (folder / "summary.json").exists():
                continue
            summary = json.loads((folder / "summary.json").read_text())
            with open(folder / "labels.csv") as f:
                rows = [r for r in csv.DictReader(f) if r["cluster"] != ""]
            labels = np.array([int(r["cluster"]) for r in rows])
            baseline = np.array([int(r["baseline"]) for r in rows])
            y = _labels_of(dataset, [r["cell"] for r in rows])
            keep = y >= 0
            y, labels, baseline = y[keep], labels[keep], baseline[keep]
            named = set()
            for line in summary["metrics"]["warnings"]:
                hit = warning_hit(line, y, labels, baseline)
                if hit is None:
                    continue
                hits, alarms = counts.get(warning_kind(line), (0, 0))
                counts[warning_kind(line)] = (hits + hit, alarms + (not hit))
                named |= {int(w) for w in re.findall(r"clusters? (\d+)(?: and (\d+))?", line)[0]
                          if w}
            majors = [np.bincount(y[labels == k]).argmax() for k in np.unique(labels)]
            for k, major in zip(np.unique(labels), majors):
                cells = labels == k
                twin = sum(m == major for m in majors) > 1
                share = np.sort(np.bincount(y[cells]))[::-1]
                mixed = len(share) > 1 and share[1] / cells.sum() >= 0.15
                if twin or mixed:
                    errors += 1
                    found += k in named
    lines = ["| warning | points at a real error | at none |", "|---|---|---|"]
    lines += [f"| {kind} | {hits} | {alarms} |" for kind, (hits, alarms) in sorted(counts.items())]
    lines.append(f"\nClusters in a real error (one of two of a majority type, or 15% of a second "
                 f"type): {errors}; named by some warning: {found}.")
    return "\n".join(lines)


def _labels_of(dataset, cells):
    """The labels of the named cells of dataset (labels.csv's cell column order)."""
    names = datasets.names_or_numbered(dataset.cell_names, "cell", len(dataset.labels))
    index = {name: i for i, name in enumerate(names)}
    return dataset.labels[[index[cell] for cell in cells]]


def thread_agreement(one, two, files, seeds, variant="full"):
    """The ARI between the partitions of the same runs on one thread (folder one) and on two
    (folder two): the same command and seed on a laptop and on a server. Markdown rows."""
    lines = ["| dataset | seed | ARI one thread | ARI two threads | agreement |",
             "|---|---|---|---|---|"]
    for stem, *_ in files:
        for seed in seeds:
            got = []
            for out in (one, two):
                folder = _folder(Path(out), stem, variant) / f"seed{seed}"
                if (folder / "labels.csv").exists():
                    with open(folder / "labels.csv") as f:
                        got.append(np.array([int(r["cluster"]) if r["cluster"] else -1
                                             for r in csv.DictReader(f)]))
                    got.append(json.loads((folder / "summary.json").read_text())["metrics"]
                               ["ari"])
            if len(got) == 4:
                lines.append(f"| {stem} | {seed} | {got[1]:.3f} | {got[3]:.3f} | "
                             f"{ari(got[0], got[2]):.3f} |")
    return "\n".join(lines)


def depth_series(depths=(1e3, 3e3, 3e4, 3e5, 3e6), seeds=(0, 1, 2), scale=1, **config):
    """RESULTS.md's depth table: the demo's cells (datasets.synthetic, K = 6) drawn at each median
    depth, their counts times scale, one default run per seed (config: other Config fields),
    one markdown row each: depth, scale, seed, ARI, L_A at the end of phase 1, beta_c, reliable
    cells at the end, seconds, warnings."""
    quiet = lambda line: None
    for depth in depths:
        for seed in seeds:
            data = datasets.synthetic(depth=depth)
            data.counts = data.counts * np.int64(scale)
            settings, start = Config(seed=seed, **config), time.time()
            prepared, adjacency = sctcm.prepare(data, 6, settings)
            result = judge(training.fit(prepared, adjacency, 6, settings, log=quiet), prepared,
                           settings.m_cvx, quiet)
            l_a = [row for row in result.history if row["phase"] == 1][-1]["L_A"]
            beta_c = next(row for row in result.history if row["phase"] == 2)["beta_c"]
            print(f"| {depth:,.0f} | {scale} | {seed} | {result.metrics['ari']:.3f} | {l_a:.2f} | "
                  f"{beta_c:.4f} | {result.history[-1]['reliable_c']} | "
                  f"{time.time() - start:.0f} | "
                  f"{len(result.metrics['warnings'])} |", flush=True)


def _parser():
    parser = argparse.ArgumentParser(description="Reproduce the paper's tables and Fig. 2.")
    parser.add_argument("folder", help="folder of labelled .h5/.h5ad count matrices "
                        "(README, 'Getting the data')")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per dataset")
    parser.add_argument("--out", default="reproduction", help="output folder (resumed if there)")
    parser.add_argument("--datasets", nargs="+", metavar="STEM",
                        help="run only these files of the folder (default: every labelled one)")
    parser.add_argument("--ablate", nargs="*", metavar="STEM",
                        default=["Young_top2000", "10X_PBMC_top2000", "Baron_mouse"],
                        help="datasets that also run the three ablations of Table 2 (the flag "
                        "alone: every dataset)")
    parser.add_argument("--figure", nargs="*", metavar="STEM",
                        default=["Young_top2000", "10X_PBMC_top2000"],
                        help="datasets whose ID/LID curves make Fig. 2 (the flag alone: every "
                        "dataset)")
    parser.add_argument("--variants", nargs="+", choices=list(TABLE1), metavar="NAME",
                        default=["full", "paper start", "exact losses"],
                        help="Table 1 rows run for every dataset: " + ", ".join(TABLE1))
    parser.add_argument("--protocol", action="store_true", help="also run phase 2's "
                        "candidates (" + "; ".join(CANDIDATES) + ") on every file and choose "
                        "among them leave-one-file-out")
    parser.add_argument("--authors", nargs="*", metavar="STEM", help="datasets that also run "
                        "the authors' code's pieces (AUTHORS), one at a time and all together "
                        "(the flag alone: " + ", ".join(AUTHORS_FILES) + ")")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own "
                        "process: with --sctcm-args '--threads 1', one a core)")
    parser.add_argument("--sctcm-args", default="",
                        help="extra sctcm.py flags for every run, e.g. '--max-epochs 50'")
    return parser


def _split_args(text):
    """--sctcm-args as a list of flags, split as a shell would."""
    try:
        return shlex.split(text)
    except ValueError as err:  # an unclosed quote
        raise ValueError(f"--sctcm-args {text}: {err}") from None


def main(argv=None):
    args = _parser().parse_args(argv)
    out, seeds = Path(args.out), range(args.seeds)
    try:
        extra = _split_args(args.sctcm_args)
        if args.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        if not Path(args.folder).is_dir():
            raise ValueError(f"{args.folder}: no such folder")
        files = labelled_files(args.folder, args.datasets)
        missing = set(args.datasets or ()) - {stem for stem, *_ in files}
        if missing:
            raise ValueError(f"{args.folder}: no labelled file named {sorted(missing)[0]}")
        if not files:
            raise ValueError(f"{args.folder}: no labelled .h5 or .h5ad file")
    except ValueError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    every = [stem for stem, *_ in files]
    args.ablate = every if args.ablate == [] else args.ablate
    args.figure = every if args.figure == [] else args.figure
    ablate = set(args.ablate) | set(args.figure)
    args.authors = AUTHORS_FILES if args.authors == [] else args.authors or []
    jobs = []
    for seed in seeds:
        for stem, path, k, _ in files:
            variants = args.variants + (list(TABLE2) if stem in ablate else [])
            variants += list(CANDIDATES) if args.protocol else []
            variants += list(AUTHORS) if stem in args.authors else []
            jobs += [(path, k, variant, seed) for variant in dict.fromkeys(variants)]
    jobs.sort(key=lambda job: job[2] != "full")  # the defaults first: they store the phase 1s
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(run, *job, out, extra) for job in jobs]:
                done.result()
    except RuntimeError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 1
    reference = {stem: references(dataset, k, seeds, final_codes(out, stem, seeds))
                 for stem, _, k, dataset in files}
    parts = ["## Table 1: scTCM with the defaults", table1(out, files, seeds, reference),
             "## Table 2: ablations"]
    parts += [table2(out, stem, seeds) for stem, *_ in files if stem in args.ablate]
    if args.protocol:
        parts += ["## Phase 2: the candidates, chosen leave-one-file-out",
                  protocol(out, files, seeds)]
    if args.authors:
        parts += ["## The authors' code's phase 2, one piece at a time",
                  candidate_table(out, [s for s in every if s in args.authors], seeds,
                                  ("full",) + AUTHORS)]
    figures = [fig2(out, stem, 0) for stem, *_ in files if stem in args.figure]
    parts += ["## Fig. 2: ID and LID per logged epoch (seed 0)"]
    parts += [f"- `{p}`" for p in figures if p]
    (out / "results.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
