"""Tests of sctcm.py: the command line, `cluster`, the files of a run, seeds, choosing K, the
evidence and every bad input refused in one line.

Run: python -m pytest -q (README, "Tests").
"""
import csv
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import sys

import h5py
import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch

import clustering
import datasets
import evidence
import formats
import sctcm
import training
from model import Config
from testkit import (QUICK, REPO, inertia_by_loop, kept_by_loop, pairs_ari, pairwise_modularity,
                     plot_run, refused, run_cli, strings, tiny_config, tiny_problem, toy_csv,
                     write_arrays, write_h5ad)


@pytest.mark.slow
def test_cli_end_to_end_on_synthetic_data(tmp_path):
    """A short run of the command line writes its four files (what training must achieve is
    test_training_lowers_the_losses_and_improves_the_codes)."""
    data = datasets.synthetic(n_cells=300, n_genes=200, n_clusters=3, seed=1)
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"] = np.asarray(data.counts), data.labels
    run = run_cli(str(path), "--clusters", "3", "--out", "out", "--pretrain-epochs", "10",
               "--eval-every", "2", "--max-epochs", "4", "--min-epochs", "4", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"acc", "nmi", "ari"} <= set(summary["metrics"]) and summary["clusters"] == 3
    assert all(line.startswith("cluster") for line in summary["metrics"]["warnings"])  # no
    # run warning (run_warnings); a 4-epoch phase 2 may leave a cluster without reliable cells
    stages = summary["stages"]  # each stage's seconds and the peak memory at its end, in order
    assert list(stages) == ["reading", "preprocessing", "graph", "phase 1", "start", "phase 2",
                            "evidence and baseline", "writing"]
    assert sum(row["seconds"] for row in stages.values()) <= summary["seconds"]["total"]
    peaks = [row["peak_memory_mb"] for row in stages.values()]
    assert peaks == sorted(peaks) and peaks[-1] == summary["peak_memory_mb"] > 0
    assert "stages (seconds, peak memory): reading" in run.stdout
    labels = (tmp_path / "out" / "labels.csv").read_text().splitlines()
    assert labels[0] == "cell,cluster,confidence,margin,reliable,baseline,note"
    assert len(labels) == 301
    embedding = (tmp_path / "out" / "embedding.csv").read_text().splitlines()
    assert len(embedding) == 301 and len(embedding[1].split(",")) == 16
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert "ID" in history[0].split(",") and len(history) == 1 + 5 + 1 + 2  # phase 1, start, 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small.h5"]


def test_threads_reruns_the_command_with_the_blas_variables_set(tmp_path, monkeypatch):
    """numpy's BLAS reads its threads only as it loads: --threads N makes a child process with
    OMP/OPENBLAS/MKL_NUM_THREADS = N and the same arguments, unless they are set so already."""
    calls = []
    monkeypatch.setattr(sctcm.subprocess, "call", lambda argv, env: calls.append((argv, env)) or 7)
    for name in sctcm.BLAS_THREADS:
        monkeypatch.setenv(name, "4")
    args = ["--demo", "--threads", "2", "--out", str(tmp_path / "out")]
    assert sctcm.main(args) == 7  # the child's exit code
    (argv, env), = calls
    assert argv[1:] == [str(REPO / "sctcm.py"), *args]
    assert all(env[name] == "2" for name in sctcm.BLAS_THREADS)
    monkeypatch.setattr(sctcm.subprocess, "call", None)  # started so: no child
    threads = torch.get_num_threads()
    try:
        assert sctcm.main(["--demo", "--threads", "4", "--clusters", "1"]) == 2
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_threads_gives_torch_that_many_threads(tmp_path):
    run = run_cli("--demo", "--threads", "1", "--pretrain-epochs", "2", "--max-epochs", "1",
               "--out", "out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["threads"] == 1


BAD_CLI = [
    (["missing.h5", "--clusters", "3"], "missing.h5"),
    (["data.h5", "--clusters", "1"], "at least 2"),
    (["data.h5", "--clusters", "three"], "give K (a whole number), a range such as 5-15"),
    (["data.h5", "--clusters", "2.5"], "give K (a whole number), a range such as 5-15"),
    (["data.h5", "--clusters", "5-3"], "--clusters names no K (a range such as 5-3 is empty)"),
    (["data.h5", "--clusters", "1-4"], "--clusters must be at least 2, got 1"),
    (["data.h5", "--clusters", "30-45"], "--clusters 45 or --n-over 30 is more than the 40"),
    (["data.h5", "--clusters", "3", "--every-k"], "--every-k runs phase 2 at each K of a range"),
    (["data.h5", "--clusters", "3-4", "--cache", "phase1"], "--cache keeps the phase 1 of a run"),
    (["data.h5", "--clusters", "500"], "more than the"),
    (["data.h5", "--clusters", "3", "--n-over", "100"], "more than the"),
    (["data.h5", "--clusters", "3", "--dropout", "1.5"], "--dropout"),
    (["data.h5", "--clusters", "3", "--pretrain-epochs", "0"], "--pretrain-epochs"),
    (["data.h5", "--clusters", "3", "--init", "random"], "--init"),
    (["data.h5", "--clusters", "5", "--init", "merge", "--n-over", "4"], "--n-over"),
    (["data.h5", "--clusters", "3", "--init", "merge", "--resolution", "0"], "--resolution"),
    (["data.h5"], "--clusters K is required"),
    (["data.h5", "--clusters", "3", "--threads", "0"], "--threads"),
    (["data.h5", "--clusters", "3", "--seeds", "0"], "--seeds must be a whole number of runs"),
    ([], "PATH or --demo"),
    (["notes.txt", "--clusters", "3"], "notes.txt"),
    (["data.h5", "--clusters", "3", "--out", "full"], "not empty"),
    (["data.h5", "--clusters", "3", "--lr-pretrain", "1e10"], "training diverged"),
]


IN_A_SUBPROCESS = [BAD_CLI[2], BAD_CLI[-1]]  # a usage error; an error once training has started


def _cli_folder(tmp_path):
    """data.h5 (40 cells x 30 genes), notes.txt (not a matrix), full/old.csv (an earlier run)."""
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["X"] = np.random.default_rng(0).poisson(2, (40, 30))
    (tmp_path / "notes.txt").write_text("not a count matrix\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.csv").write_text("x\n")


def _assert_refused(returncode, stderr, tmp_path, message):
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "sctcm_output").exists()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["old.csv"]


@pytest.mark.parametrize("args, message", [c for c in BAD_CLI if c not in IN_A_SUBPROCESS[1:]])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    """In this process (a usage error raises SystemExit(2), the rest return 2)."""
    _cli_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    try:
        code = sctcm.main(args)
    except SystemExit as exit_:
        code = exit_.code
    _assert_refused(code, capsys.readouterr().err, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", IN_A_SUBPROCESS)
def test_cli_bad_input_in_a_fresh_process_prints_no_traceback(tmp_path, args, message):
    _cli_folder(tmp_path)
    run = run_cli(*args, cwd=tmp_path)
    _assert_refused(run.returncode, run.stderr, tmp_path, message)


@pytest.mark.slow
def test_cli_output_folder_empty_a_file_or_overwritten(tmp_path, monkeypatch, capsys):
    _cli_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = lambda *args: sctcm.main(["data.h5", "--clusters", "3", *QUICK.split(), *args])
    files = ["centres.csv", "clusters.csv", "embedding.csv", "history.csv", "labels.csv",
             "markers.csv", "model.pt", "results.h5ad", "summary.json"]
    (tmp_path / "empty").mkdir()
    assert run("--out", "empty") == 0  # an existing empty folder is used
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == files
    (tmp_path / "file").write_text("mine\n")
    assert run("--out", "file") == 2 and "file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine\n"
    assert run("--out", "full", "--overwrite") == 0  # replaced, not mixed with old.csv
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # and no temporary folder left
        "data.h5", "empty", "file", "full", "notes.txt"]


@pytest.mark.slow
def test_cli_label_key_chooses_the_labels_scored(tmp_path, capsys):
    data = datasets.synthetic(n_cells=120, n_genes=60, n_clusters=3, seed=0)
    batch = np.arange(120) % 2
    path, out = tmp_path / "toy.h5ad", tmp_path / "out"
    write_h5ad(path, np.asarray(data.counts), data.label_names[data.labels])
    with h5py.File(path, "a") as f:
        f["obs"].create_dataset("batch", data=batch)
    args = [str(path), "--clusters", "3", *QUICK.split()]
    assert sctcm.main([*args, "--label-key", "batch", "--out", str(out)]) == 0
    pred = np.loadtxt(out / "labels.csv", delimiter=",", skiprows=1, usecols=1)
    ari = json.loads((out / "summary.json").read_text())["metrics"]["ari"]
    assert ari == pytest.approx(pairs_ari(batch, pred), rel=1e-10)
    assert abs(ari - clustering.ari(data.labels, pred)) > 0.1  # not the default cell_type column's
    assert sctcm.main([*args, "--label-key", "donor", "--out", str(tmp_path / "other")]) == 2
    assert "no obs column 'donor'" in capsys.readouterr().err


QUICK_KEYWORDS = dict(pretrain_epochs=3, max_epochs=3, min_epochs=1, eval_every=1, n_over=4,
                      hidden=16, latent=4, decoder=(16,), disc_hidden=4, n_cvx=4)  # QUICK


EMPTY_ROWS = [0, 57, 158]  # cells with no counts, dropped by preprocessing


def _counts_with_empty_rows():
    """240 synthetic cells x 120 genes, three of them all zero, and their labels."""
    data = datasets.synthetic(n_cells=240, n_genes=120, n_clusters=3, seed=2)
    counts = np.asarray(data.counts)
    counts[EMPTY_ROWS] = 0
    return counts, data.labels


@pytest.mark.slow
def test_cluster_lines_its_results_up_with_the_input_rows():
    """A dropped cell gets -1 and a row of NaN; the others get what fit gives on the kept cells."""
    counts, _ = _counts_with_empty_rows()
    lines = []
    result = sctcm.cluster(sp.csr_matrix(counts), 3, log=lines.append, **QUICK_KEYWORDS)
    dropped = np.isin(np.arange(240), EMPTY_ROWS)
    assert result.labels.shape == (240,) and result.embedding.shape == (240, 4)
    assert np.all(result.labels[dropped] == -1) and np.all(np.isnan(result.embedding[dropped]))
    assert "dropped 3 of 240 cells" in lines[0] and "ari" not in result.metrics
    prepared = datasets.preprocess(datasets.Dataset(counts=counts[~dropped]))
    alone = training.fit(prepared, datasets.knn_graph(prepared.x), 3,
                      Config(**QUICK_KEYWORDS), log=lambda line: None)
    assert np.array_equal(result.labels[~dropped], alone.labels)
    assert np.array_equal(result.embedding[~dropped], alone.embedding)
    assert np.array_equal(result.pretrained[~dropped], alone.pretrained)
    assert np.all(np.isnan(result.pretrained[dropped]))
    assert result.history == alone.history


@pytest.mark.slow
def test_cluster_gives_the_command_line_labels_for_the_same_seed(tmp_path):
    counts, labels = _counts_with_empty_rows()
    write_arrays(tmp_path / "toy.h5", X=counts, Y=labels)
    flags = ["--clusters", "3", "--seed", "1", "--out", str(tmp_path / "out"), *QUICK.split()]
    assert sctcm.main([str(tmp_path / "toy.h5"), *flags]) == 0
    with open(tmp_path / "out" / "labels.csv") as f:
        cells = list(csv.DictReader(f))
    result = sctcm.cluster(counts, 3, labels=labels, seed=1, log=lambda line: None,
                           **QUICK_KEYWORDS)
    assert [row["cell"] for row in cells] == [f"cell{i}" for i in range(240)]
    assert [i for i, row in enumerate(cells) if row["cluster"] == ""] == EMPTY_ROWS
    assert [int(row["cluster"] or -1) for row in cells] == result.labels.tolist()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert result.metrics == summary["metrics"]


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_runs_files_give_every_input_cell_its_evidence(tmp_path):
    """labels.csv holds every input cell: a dropped one with an empty cluster and a note; a kept
    one with its cluster, the confidence and margin of Eq. (5) recomputed here from
    embedding.csv and centres.csv, reliable = margin >= its cluster's beta_c (clusters.csv),
    and the baseline's cluster (k-means on the principal components). clusters.csv counts
    them; results.h5ad holds the same rows, read back by formats.read_obs; the folder has the
    user's umask permissions."""
    counts, labels = _counts_with_empty_rows()
    write_arrays(tmp_path / "toy.h5", X=counts, Y=labels)
    old = os.umask(0o027)
    try:
        assert sctcm.main([str(tmp_path / "toy.h5"), "--clusters", "3", "--out",
                           str(tmp_path / "out"), *QUICK.split()]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777) == 0o750
    cells, codes = _read_csv(out / "labels.csv"), _read_csv(out / "embedding.csv")
    centres = np.array([[float(v) for k, v in row.items() if k != "cluster"]
                        for row in _read_csv(out / "centres.csv")])
    z = np.array([[float(v) for k, v in row.items() if k != "cell"] for row in codes])
    kernel = 1 / (1 + ((z[:, None] - centres[None]) ** 2).sum(2))
    p = np.sort(kernel / kernel.sum(1, keepdims=True), axis=1)
    kept = [row for row in cells if row["cluster"] != ""]
    assert [row["cell"] for row in kept] == [row["cell"] for row in codes]
    for i in EMPTY_ROWS:
        assert cells[i]["note"] == sctcm.DROPPED and cells[i]["confidence"] == ""
    confidence = np.array([float(row["confidence"]) for row in kept])
    margin = np.array([float(row["margin"]) for row in kept])
    assert np.allclose(confidence, p[:, -1], rtol=1e-5)
    assert np.allclose(margin, p[:, -1] - p[:, -2], rtol=1e-4, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    history = _read_csv(out / "history.csv")
    beta_c = {row["cluster"]: float(row["beta_c"]) for row in _read_csv(out / "clusters.csv")}
    start = next(row for row in history if row["phase"] == "2" and row["epoch"] == "0")
    assert np.mean(list(beta_c.values())) == pytest.approx(float(start["beta_c"]), rel=1e-5)
    reliable = np.array([row["reliable"] == "true" for row in kept])
    threshold = np.array([beta_c[row["cluster"]] for row in kept])
    assert np.array_equal(reliable, margin >= threshold - 1e-6)
    prepared = datasets.preprocess(datasets.from_counts(counts, labels), n_top_genes=1500)
    baseline = clustering.kmeans(datasets.pca(prepared.x, 50), 3, seed=0)[0]
    assert [int(row["baseline"]) for row in kept] == baseline.tolist()
    assert summary["metrics"]["baseline"]["ari_to_sctcm"] == pytest.approx(
        clustering.ari(baseline, [int(row["cluster"]) for row in kept]))
    sizes = {row["cluster"]: int(row["size"]) for row in _read_csv(out / "clusters.csv")}
    assert sizes == {str(k): sum(row["cluster"] == str(k) for row in kept) for k in range(3)}
    names, obs = formats.read_obs(out / "results.h5ad")  # labels.csv's columns, prefixed
    assert names.tolist() == [row["cell"] for row in cells]
    assert [str(c) if c is not None else "" for c in obs["sctcm"]] == \
        [row["cluster"] for row in cells]
    assert np.allclose(obs["sctcm_confidence"][np.array([row["cluster"] != "" for row in cells])],
                       confidence)
    assert np.isnan(obs["sctcm_confidence"][EMPTY_ROWS]).all()
    assert obs["sctcm_note"].tolist() == [row["note"] for row in cells]
    assert list(obs) == ["sctcm", "sctcm_confidence", "sctcm_margin", "sctcm_reliable",
                         "sctcm_baseline", "sctcm_note"]
    markers = _read_csv(out / "markers.csv")  # each cluster's rank-sum test of its kept genes
    ranked = evidence.rank_genes(evidence.log_expression(prepared),
                                 np.array([int(row["cluster"]) for row in kept]), 3)
    for row in markers:
        k, gene = int(row["cluster"]), list(prepared.gene_names).index(row["gene"])
        assert float(row["score"]) == pytest.approx(ranked["scores"][k, gene])
    assert [row["rank"] for row in markers if row["cluster"] == "0"] == \
        [str(r) for r in range(1, 51)]  # the top 50 of the 120 genes


@pytest.mark.slow
def test_results_h5ad_opens_in_anndata(tmp_path):
    """When anndata is installed (it is not a dependency), read_h5ad opens the run's file: obs
    row for row as labels.csv, obsm X_sctcm the codes, uns the summary."""
    anndata = pytest.importorskip("anndata")
    counts, labels = _counts_with_empty_rows()
    write_arrays(tmp_path / "toy.h5", X=counts, Y=labels)
    assert sctcm.main([str(tmp_path / "toy.h5"), "--clusters", "3", "--out",
                       str(tmp_path / "out"), *QUICK.split()]) == 0
    adata = anndata.read_h5ad(tmp_path / "out" / "results.h5ad")
    cells = _read_csv(tmp_path / "out" / "labels.csv")
    assert list(adata.obs_names) == [row["cell"] for row in cells]
    assert [str(c) if c == c else "" for c in adata.obs["sctcm"]] == \
        [row["cluster"] for row in cells]
    assert adata.obsm["X_sctcm"].shape == (240, 4)
    assert adata.uns["sctcm"]["clusters"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("losses", ["exact", "sampled"])
def test_a_cached_phase_1_gives_the_uncached_run_byte_for_byte(tmp_path, losses):
    """--cache: the first run stores each seed's phase 1, a second run reads it (no phase-1 log
    line) and both give the labels, codes and history of a run without the cache; a phase 2 of
    other settings reads the same phase 1; the file loads with weights_only."""
    prepared, adjacency = tiny_problem()
    config = tiny_config(losses=losses, batch_size=100)
    quiet = lambda line: None
    plain = sctcm.fit_seeds(prepared, adjacency, 3, config, seeds=2, log=quiet)
    lines = []
    stored = sctcm.fit_seeds(prepared, adjacency, 3, config, seeds=2, log=quiet, cache=tmp_path)
    read = sctcm.fit_seeds(prepared, adjacency, 3, config, seeds=2, log=lines.append,
                           cache=tmp_path)
    assert len(list(tmp_path.glob("phase1-*.pt"))) == 2  # one a seed
    assert sum("read from" in line for line in lines) == 2
    assert not any(line.startswith("phase 1 | epoch") for line in lines)
    for run in (stored, read):
        assert np.array_equal(run.labels, plain.labels)
        assert np.array_equal(run.embedding, plain.embedding)
        assert np.array_equal(run.stability, plain.stability)
        assert run.history == plain.history
    other = dataclasses.replace(config, gamma_c=3.0)
    assert np.array_equal(
        sctcm.fit_seeds(prepared, adjacency, 3, other, log=quiet, cache=tmp_path).embedding,
        sctcm.fit_seeds(prepared, adjacency, 3, other, log=quiet).embedding)
    assert len(list(tmp_path.glob("phase1-*.pt"))) == 2  # gamma_c is not a phase-1 setting
    saved = torch.load(next(tmp_path.glob("phase1-*.pt")), weights_only=True)
    assert saved["format"] == training.PHASE1_FORMAT


def test_the_phase_1_key_changes_with_every_phase_1_setting_and_no_other():
    prepared, adjacency = tiny_problem()
    config = tiny_config()
    key = sctcm.phase1_key(prepared, adjacency, 3, config)
    changed = dict(n_top_genes=100, hidden=16, latent=5, decoder=(16,), dropout=0.1, w_x=0.5,
                   w_a=0.5, pretrain_epochs=11, lr_pretrain=1e-4, eval_every=5, block=64,
                   losses="sampled", batch_size=99, seed=1, n_neighbors=9, n_pcs=10)
    assert set(changed) | {"device"} == set(training.PHASE1_FIELDS)
    for name, value in changed.items():
        assert sctcm.phase1_key(prepared, adjacency, 3,
                                dataclasses.replace(config, **{name: value})) != key, name
    for name, value in dict(gamma_c=2.0, init="merge", rewire=True, max_epochs=5).items():
        assert sctcm.phase1_key(prepared, adjacency, 3,
                                dataclasses.replace(config, **{name: value})) == key, name
    assert sctcm.phase1_key(prepared, adjacency, 2, config) != key  # the K of its log rows


def test_a_phase_1_file_of_another_format_is_refused(tmp_path):
    prepared, adjacency = tiny_problem()
    torch.save({"format": 0}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="another format"):
        training.Pretrained.load(tmp_path / "old.pt", prepared, adjacency, tiny_config())


@pytest.mark.slow
def test_seeds_keep_the_run_that_agrees_best_and_each_cells_stability():
    """seeds=3: the labels of the seed whose mean ARI to the other two is highest, the pairwise
    ARI's mean and minimum, and per cell the share of runs that put it in its cluster, each run
    matched to the kept one by the Hungarian assignment (brute force over the 3! maps here)."""
    prepared, adjacency = tiny_problem(seed=1)
    config = tiny_config(pretrain_epochs=3, max_epochs=3, min_epochs=3)
    quiet = lambda line: None
    runs = [training.fit(prepared, adjacency, 3, dataclasses.replace(config, seed=s), log=quiet)
            .labels for s in range(3)]
    result = sctcm.fit_seeds(prepared, adjacency, 3, config, seeds=3, log=quiet)
    pairs = {(i, j): pairs_ari(runs[i], runs[j]) for i in range(3) for j in range(3) if i != j}
    chosen = max(range(3), key=lambda i: sum(pairs[i, j] for j in range(3) if j != i))
    assert np.array_equal(result.labels, runs[chosen])
    agreement = result.metrics["seed_agreement"]
    assert agreement["chosen"] == chosen and agreement["seeds"] == [0, 1, 2]
    assert agreement["mean_ari"] == pytest.approx(np.mean(list(pairs.values())))
    assert agreement["min_ari"] == pytest.approx(min(pairs.values()))
    agree = np.zeros(len(runs[0]))
    for run in runs:
        best = max(itertools.permutations(range(3)),
                   key=lambda perm: sum(perm[c] == r for c, r in zip(run, runs[chosen])))
        agree += np.array([best[c] for c in run]) == runs[chosen]
    np.testing.assert_allclose(result.stability, agree / 3)


def test_clusters_flag_reads_one_k_a_range_or_a_list():
    assert sctcm._parser().parse_args(["x", "--clusters", "8"]).clusters == [8]
    assert sctcm._parser().parse_args(["x", "--clusters", "5-15"]).clusters == list(range(5, 16))
    assert sctcm._parser().parse_args(["x", "--clusters", "10,6,8"]).clusters == [6, 8, 10]


@pytest.mark.slow
def test_choose_k_measures_each_k_by_brute_force_and_recommends_the_merges_peak():
    """At each K: the modularity (at the merge's resolution, the pairwise sum) of the
    lowest-inertia restart merged to K, the mean pairwise ARI of the ten restarts' merges, the
    kept share of the start, the start's scores; the recommended K is where the first peaks."""
    prepared, adjacency = tiny_problem(seed=1)
    config = tiny_config()
    rows, recommended, pretrained = sctcm.choose_k(prepared, adjacency, [2, 3, 4, 5], config,
                                                   log=lambda line: None)
    z = training.codes(pretrained.model, pretrained.data).numpy()
    restarts = clustering.kmeans_restarts(z, config.n_over, seed=0)
    lowest = min(restarts, key=lambda restart: inertia_by_loop(z, restart[1], restart[2]))
    for row in rows:
        k = row["k"]
        merged = [clustering.merge_overclusters(adjacency, over, k, config.resolution)
                  for _, over, _ in restarts]
        path = clustering.merge_overclusters(adjacency, lowest[1], k, config.resolution)
        assert row["merge_modularity"] == pytest.approx(  # the pairwise sum adds float32s
            pairwise_modularity(adjacency, path, config.resolution), rel=1e-4)
        pairs = [pairs_ari(a, b) for a, b in itertools.combinations(merged, 2)]
        assert row["agreement"] == pytest.approx(np.mean(pairs))
        start = merged[int(np.argmax([kept_by_loop(z, m) for m in merged]))]
        assert row["kept"] == pytest.approx(kept_by_loop(z, start))
        assert row["ari"] == pytest.approx(clustering.ari(prepared.labels, start))
    assert recommended == max(rows, key=lambda row: row["merge_modularity"])["k"]


@pytest.mark.slow
def test_a_range_of_k_writes_its_criteria_and_the_recommended_ks_run(tmp_path):
    """--clusters 2-4 --every-k: k_selection.csv (one row per K), summary.json's recommended_k,
    labels.csv's cluster column = a run at the recommended K alone (--clusters K), and one
    cluster_K column per K, each a run at that K alone."""
    data = datasets.synthetic(n_cells=200, n_genes=80, n_clusters=3, seed=0)
    write_arrays(tmp_path / "toy.h5", X=np.asarray(data.counts), Y=data.labels)
    run = lambda out, k, *flags: sctcm.main([str(tmp_path / "toy.h5"), "--clusters", k,
                                             "--out", str(tmp_path / out), *QUICK.split(),
                                             *flags])
    assert run("range", "2-4", "--every-k") == 0
    summary = json.loads((tmp_path / "range" / "summary.json").read_text())
    recommended = summary["metrics"]["recommended_k"]
    assert summary["clusters"] == recommended
    selection = _read_csv(tmp_path / "range" / "k_selection.csv")
    assert [row["k"] for row in selection] == ["2", "3", "4"]
    cells = _read_csv(tmp_path / "range" / "labels.csv")
    for k in (2, 3, 4):
        assert run(f"k{k}", str(k)) == 0
        alone = [row["cluster"] for row in _read_csv(tmp_path / f"k{k}" / "labels.csv")]
        assert [row[f"cluster_K{k}"] for row in cells] == alone
        if k == recommended:
            assert [row["cluster"] for row in cells] == alone


@pytest.mark.parametrize("k, keywords, flags", [
    (3, dict(dropout=1.5), ["--dropout", "1.5"]),
    (1, {}, []),
    (500, {}, []),
    (5, dict(n_over=4), ["--n-over", "4"]),
])
def test_cluster_refuses_bad_input_with_the_command_line_message(tmp_path, capsys, k, keywords,
                                                                 flags):
    counts, _ = _counts_with_empty_rows()
    write_arrays(tmp_path / "toy.h5", X=counts)
    assert sctcm.main([str(tmp_path / "toy.h5"), "--clusters", str(k), *flags,
                       "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip().removeprefix("sctcm: error: ")
    with pytest.raises(ValueError) as error:
        sctcm.cluster(counts, k, log=lambda line: None, **keywords)
    assert str(error.value) == message


@pytest.mark.parametrize("counts, keywords, message", [
    (np.ones((30, 12)), dict(max_epoch=5), "unknown setting 'max_epoch'"),
    (-np.ones((30, 12)), {}, "360 negative counts"),
    (np.full((30, 12), "1"), {}, "numeric matrix"),
    (np.ones((30, 12)), dict(labels=[0, 1]), "2 labels for 30 cells"),
])
def test_cluster_refuses_bad_arguments_in_one_line(counts, keywords, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        sctcm.cluster(counts, 3, log=lambda line: None, **keywords)
    assert "\n" not in str(error.value)


def test_cluster_reads_the_labels_of_a_pandas_column_with_missing_values():
    labels = np.array(["b", "a", np.nan, "b"], dtype=object)  # what .to_numpy() gives
    assert datasets.from_counts(np.ones((4, 3)), labels).labels.tolist() == [1, 0, -1, 1]


def test_convexity_panels_show_convex_combinations_of_one_clusters_reliable_cells():
    """The cluster with the most reliable cells at the start (clusters: nearest start mean),
    and each combination a convex combination of m of its reliable cells (it lies in their
    convex hull: a least-squares fit with weights >= 0 summing to 1 reproduces it)."""
    rng = np.random.default_rng(0)
    pretrained = np.concatenate([rng.normal(c, 0.3, (40, 2)) for c in ((0, 0), (3, 0), (0, 3))])
    start = np.repeat([0, 1, 2], 40)
    reliable_start = rng.random(120) < np.repeat([0.2, 0.6, 0.4], 40)
    result = training.Result(labels=start, embedding=pretrained + 1, pretrained=pretrained,
                          start=start, reliable=reliable_start, reliable_start=reliable_start)
    panels = sctcm.convexity_panels(result, m=3, count=50)
    assert [panel[4] for panel in panels] == [1, 1]
    for title, codes, clusters, reliable, k, combos in panels:
        members = codes[reliable & (clusters == k)]
        for point in combos:
            weights = scipy.optimize.nnls(np.vstack([members.T, np.ones(len(members))]),
                                          np.append(point, 1.0))[0]
            assert np.allclose(weights @ members, point, atol=1e-5)
            assert weights.sum() == pytest.approx(1, abs=1e-5)


def test_plot_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setattr(formats, "load", lambda *args, **kw: pytest.fail("read the file"))
    code, out = plot_run(tmp_path)
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--plot draws with matplotlib, which is not installed" in err[0]


@pytest.mark.parametrize("args, message", [
    (["--demo", "--clusters", "0"], "--clusters must be at least 2, got 0"),
    (["--demo", "--label-key", "cell_type"], "--label-key"),
    (["--demo", "--layer", "counts"], "--layer is about a file's contents"),
    (["--demo", "--no-transpose"], "--transpose is about a file's contents"),
    (["--demo", "--labels", "labels.csv"], "--labels is about a file's contents"),
    (["toy.csv", "--clusters", "3", "--label-key", "cell_type"],
     "toy.csv: a label key (cell_type)"),
])
def test_meaningless_flags_are_refused(capsys, tmp_path, monkeypatch, args, message):
    (tmp_path / "toy.csv").write_text(toy_csv())
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, tmp_path, *args)


def test_output_folder_that_cannot_be_created_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    err = refused(capsys, tmp_path, "--demo", out=tmp_path / "file" / "out")
    assert "cannot create the output folder" in err


def test_unparsable_setting_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        sctcm.main(["--demo", "--beta-c", "high"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.slow
def test_cli_clusters_every_cell_and_scores_those_with_a_label(capsys, tmp_path):
    data = datasets.synthetic(n_cells=120, n_genes=60, n_clusters=3, seed=0)
    keep = np.arange(120) % 10 > 0
    path, out = tmp_path / "part.h5", tmp_path / "out"
    write_arrays(path, X=np.asarray(data.counts),
           Y=strings(np.where(keep, data.labels.astype(str), "NA")))
    assert sctcm.main([str(path), "--clusters", "3", "--out", str(out), *QUICK.split()]) == 0
    assert "scored 108 of 120 cells with labels" in capsys.readouterr().out
    pred = np.loadtxt(out / "labels.csv", delimiter=",", skiprows=1, usecols=1)
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert len(pred) == 120
    assert metrics["ari"] == pytest.approx(pairs_ari(data.labels[keep], pred[keep]), rel=1e-10)


# ---------------------------------------------------------------- an AnnData in and back

class _LikeAnnData:
    """What sctcm.cluster reads of an AnnData and writes into it, without anndata: X, layers,
    obs (a dict here), obs_names, var_names, obsm, uns."""

    def __init__(self, x, layers=None, obs=None):
        self.X, self.layers, self.obs = x, layers or {}, obs or {}
        self.obs_names = [f"c{i}" for i in range(x.shape[0])]
        self.var_names = [f"g{j}" for j in range(x.shape[1])]
        self.obsm, self.uns = {}, {}


QUICK_FIT = dict(pretrain_epochs=4, max_epochs=3, min_epochs=3, eval_every=2, n_over=4,
                 hidden=16, latent=4, decoder=(16,), disc_hidden=4, n_cvx=4)


def test_cluster_reads_an_anndatas_counts_and_writes_its_results_into_it_scanpys_way():
    """X holds log data, layers["counts"] the counts (read by default, as from an .h5ad); the
    results go into obs (prefixed: sctcm, sctcm_confidence, ...), obsm and uns; a second call
    with another key_added adds its own and leaves the first."""
    data = datasets.synthetic(n_cells=120, n_genes=60, n_clusters=3, seed=2)
    counts = np.asarray(data.counts, dtype=np.float32)
    adata = _LikeAnnData(np.log1p(counts), {"counts": counts},
                         {"type": np.array(data.label_names)[data.labels]})
    quiet = lambda line: None
    result = sctcm.cluster(adata, 3, log=quiet, labels="type", **QUICK_FIT)
    plain = sctcm.cluster(counts, 3, log=quiet, labels=data.labels, **QUICK_FIT)
    assert np.array_equal(result.labels, plain.labels)  # the counts layer was read
    assert result.metrics["ari"] == plain.metrics["ari"]
    assert list(adata.obs["sctcm"]) == [str(k) for k in result.labels]
    np.testing.assert_allclose(adata.obs["sctcm_confidence"], result.confidence, atol=5e-7)
    assert np.array_equal(adata.obs["sctcm_reliable"], result.reliable)
    assert list(adata.obs["sctcm_baseline"]) == [str(k) for k in result.baseline]
    assert np.array_equal(adata.obsm["X_sctcm"], result.embedding)
    assert adata.uns["sctcm"]["params"]["latent"] == 4
    assert list(adata.uns["sctcm"]["warnings"]) == result.metrics["warnings"]
    assert len(adata.uns["sctcm"]["markers"]["gene"]) == 3 * 50
    sctcm.cluster(adata, 4, log=quiet, key_added="sctcm_k4", **QUICK_FIT)
    assert {"sctcm", "sctcm_k4", "sctcm_k4_margin"} <= set(adata.obs)
    assert list(adata.obs["sctcm"]) == [str(k) for k in result.labels]  # left as it was
    assert set(adata.uns) == {"sctcm", "sctcm_k4"} and "X_sctcm_k4" in adata.obsm


@pytest.mark.parametrize("make, keywords, message", [
    (lambda c: _LikeAnnData(np.log1p(c)), {}, "non-integer counts in adata.X (raw counts "
                                               "expected, not normalised or log data); layer="),
    (lambda c: _LikeAnnData(c), {"layer": "counts"}, "adata: no layer 'counts' (it has none)"),
    (lambda c: _LikeAnnData(c), {"labels": "type"}, "labels='type' is not a column of obs"),
    (lambda c: c, {"layer": "counts"}, "layer= names where an AnnData keeps its counts"),
    (lambda c: _LikeAnnData(c), {"threads": 0}, "threads must be a whole number, 1 or more"),
])
def test_cluster_refuses_an_anndata_it_cannot_read_in_one_line(make, keywords, message):
    counts = np.random.default_rng(0).poisson(2.0, (40, 20)).astype(np.float32) + 1
    with pytest.raises(ValueError, match=re.escape(message)) as refused_:
        sctcm.cluster(make(counts), 3, log=lambda line: None, **keywords)
    assert "\n" not in str(refused_.value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("anndata") is None, reason="anndata not installed")
@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "Baron_mouse.h5ad").exists(),
                    reason="../shared/data absent")
def test_cluster_on_anndatas_own_baron_file_writes_what_anndata_writes_and_reads(tmp_path):
    import anndata
    adata = anndata.read_h5ad(REPO.parent / "shared" / "data" / "Baron_mouse.h5ad")
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()  # what a scanpy user's X holds
    quick = {**QUICK_FIT, "n_over": 10}
    result = sctcm.cluster(adata, 8, layer="counts", log=lambda line: None, **quick)
    assert str(adata.obs["sctcm"].dtype) == "category"
    assert list(adata.obs["sctcm"].astype(int)) == list(result.labels)
    assert adata.obsm["X_sctcm"].shape == (adata.n_obs, 4)
    sctcm.cluster(adata, 9, layer="counts", key_added="sctcm9", log=lambda line: None, **quick)
    adata.write_h5ad(tmp_path / "baron.h5ad")
    back = anndata.read_h5ad(tmp_path / "baron.h5ad")
    assert {"sctcm", "sctcm_confidence", "sctcm9", "sctcm9_margin"} <= set(back.obs.columns)
    assert set(back.uns["sctcm"]["markers"]) >= {"cluster", "gene", "score"}


def test_choosing_k_says_how_far_the_peak_stands_and_a_flat_peak_in_words():
    """peak_certainty by hand: modularity 0.80 0.83 0.8338 0.8328 0.70 at K = 5..9: the peak at
    7 stands 0.0008 above its neighbours and 0.1338 above the lowest; K within 10% of that span
    of it are 6, 7 and 8: flat."""
    rows = [{"k": k, "merge_modularity": v}
            for k, v in zip(range(5, 10), (0.80, 0.83, 0.8338, 0.8328, 0.70))]
    sure = sctcm.peak_certainty(rows, sctcm.recommend_k(rows))
    assert sure["k"] == 7 and sure["value"] == 0.8338
    assert sure["above_neighbours"] == pytest.approx(0.001)
    assert sure["above_lowest"] == pytest.approx(0.1338)
    assert sure["close"] == [6, 7, 8] and sure["flat"]
    sharp = [{"k": k, "merge_modularity": v} for k, v in zip(range(5, 8), (0.5, 0.9, 0.6))]
    assert not sctcm.peak_certainty(sharp, 6)["flat"]


def test_blind_reads_no_labels_so_no_score_is_written(tmp_path, capsys):
    counts, labels = _counts_with_empty_rows()
    write_arrays(tmp_path / "toy.h5", X=counts, Y=labels)
    assert sctcm.main([str(tmp_path / "toy.h5"), "--clusters", "3", "--blind", "--out",
                       str(tmp_path / "out"), *QUICK.split()]) == 0
    out = capsys.readouterr().out  # ARI appears only between scTCM and the baseline
    assert "ACC" not in out and "NMI" not in out and "true centres" not in out
    assert out.count("ARI") == out.count("ARI to scTCM's partition")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "ari" not in summary["metrics"] and "ari" not in summary["metrics"]["baseline"]
    assert "ari" not in (tmp_path / "out" / "history.csv").read_text().splitlines()[0]
