"""Tests of reproduce.py: the tables over a folder of files, the protocol, the benchmark.

Run: python -m pytest -q (README, "Tests").
"""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import clustering
import datasets
import formats
import reproduce
from testkit import QUICK, REPO, write_arrays, write_h5ad


@pytest.mark.slow
def test_epoch_benchmark_times_every_part(tmp_path, capsys):
    ds = datasets.synthetic(n_cells=300, n_genes=80, n_clusters=3)
    write_arrays(tmp_path / "toy.h5", X=np.asarray(ds.counts), Y=ds.labels)
    seconds = reproduce.benchmark(tmp_path / "toy.h5", 3, repeats=1, batch_size=100, latent=4)
    assert list(seconds) == ["encoder", "ZINB", "structure", "clustering", "evaluation",
                             "phase-1 epoch"]
    assert all(v > 0 for v in seconds.values())
    assert capsys.readouterr().out.startswith("300 cells, sampled losses | encoder ")


def _reproduce(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def _row(table, start):
    """Cells of the first markdown table row that starts with the given cells."""
    line = next(l for l in table.splitlines() if l.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_reproduce_runs_every_variant_resumes_and_tabulates(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for stem, seed in (("a", 0), ("b", 1)):
        ds = datasets.synthetic(n_cells=240, n_genes=120, n_clusters=3, seed=seed)
        write_arrays(data / f"{stem}.h5", X=np.asarray(ds.counts), Y=ds.labels)
    write_h5ad(data / "a.h5ad", np.asarray(ds.counts), ds.labels)  # same stem as a.h5: skipped
    write_arrays(data / "c.h5", X=np.asarray(ds.counts))  # no labels: skipped
    args = [str(data), "--seeds", "1", "--out", "rep", "--ablate", "a", "--figure", "a",
            "--sctcm-args", QUICK]
    first = _reproduce(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = tmp_path / "rep" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (runs / "a").iterdir()) == [
        "exact-losses", "full", "neither", "no-adversarial", "no-overclustering", "paper-start"]
    assert sorted(p.name for p in (runs / "b").iterdir()) == ["exact-losses", "full", "paper-start"]

    summary = runs / "a" / "full" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    second = _reproduce(*args, cwd=tmp_path)
    assert second.returncode == 0 and "seed 0" not in second.stdout  # nothing re-run
    assert summary.stat().st_mtime_ns == before

    results = (tmp_path / "rep" / "results.md").read_text()
    metrics = json.loads(summary.read_text())["metrics"]
    cells = _row(results, "| a (K=3) | scTCM | 1 |")
    assert cells[5] == f"{metrics['ari']:.3f} ± 0.000"
    paper = json.loads((runs / "a" / "paper-start" / "seed0" / "summary.json").read_text())
    assert paper["config"]["init"] == "spectral"
    assert (_row(results, "| | scTCM, `--init spectral` | 1 |")[5]
            == f"{paper['metrics']['ari']:.3f} ± 0.000")
    exact = json.loads((runs / "a" / "exact-losses" / "seed0" / "summary.json").read_text())
    assert exact["config"]["losses"] == "exact"
    assert (_row(results, "| | scTCM, `--losses exact` | 1 |")[5]
            == f"{exact['metrics']['ari']:.3f} ± 0.000")
    assert _row(results, "| | k-means, 50 PCs |")[2] == "1"
    assert _row(results, "| | k-means, 50 PCs, 100 restarts |")[2] == "1"
    prepared = datasets.preprocess(formats.load(data / "a.h5"))
    start = clustering.spectral_clustering(datasets.knn_graph(prepared.x), 3, seed=0)
    assert (_row(results, "| | spectral clustering of A (the paper's phase-2 start) |")[5]
            == f"{clustering.ari(prepared.labels, start):.3f} ± 0.000")
    codes = np.loadtxt(runs / "a" / "full" / "seed0" / "embedding.csv", delimiter=",",
                       skiprows=1, usecols=range(1, 5))  # z1..z4: --latent 4 in QUICK
    assert (_row(results, "| | true centres in scTCM's Z (uses the labels) |")[3:6]
            == ["", "", f"{clustering.centroid_ari(prepared.labels, codes):.3f} ± 0.000"])
    neither = json.loads((runs / "a" / "neither" / "seed0" / "summary.json").read_text())
    assert _row(results, "| neither |")[4] == f"{neither['metrics']['ari']:.3f} ± 0.000"

    curve = list(csv.DictReader(open(tmp_path / "rep" / "fig2_a.csv")))
    history = list(csv.DictReader(open(runs / "a" / "neither" / "seed0" / "history.csv")))
    mine = [r for r in curve if r["variant"] == "neither"]
    assert [r["ID"] for r in mine] == [r["ID"] for r in history if r["ID"]]
    assert {r["phase"] for r in mine} == {"1", "2"}
    assert {r["variant"] for r in curve} == {"full", "neither"}


def test_evidence_measures_by_brute_force():
    """right_cells: ACC's matched cells; auroc: the share of (right, wrong) pairs the signal
    orders right, ties half; halves: the right share above and below the median signal."""
    rng = np.random.default_rng(5)
    y, pred = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    right = reproduce.right_cells(y, pred)
    assert right.mean() == pytest.approx(clustering.cluster_acc(y, pred))
    signal = np.round(rng.random(60), 1)  # with ties
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0)
             for a, ra in zip(signal, right) for b, rb in zip(signal, right) if ra and not rb]
    assert reproduce.auroc(signal, right) == pytest.approx(np.mean(pairs))
    order = sorted(range(60), key=lambda i: -signal[i])
    assert reproduce.halves(signal, right) == pytest.approx(
        (right[order[:30]].mean(), right[order[30:]].mean()))


def _fake_run(folder, final, start, reliable_k):
    """A finished run as protocol() reads it: summary.json and two phase-2 history rows."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"metrics": {"ari": final},
                                                    "config": {"m_cvx": 3}}))
    (folder / "history.csv").write_text(f"phase,epoch,ari,reliable_k\n2,0,{start},\n"
                                        f"2,1,{start},{reliable_k}\n")


def test_protocol_chooses_each_file_on_the_others_among_complete_candidates(tmp_path):
    """Leave-one-file-out by hand: A wins f0 alone, B is steady, C (one file only) beats both
    but never competes; the table shows every candidate's mean, sd, gain and clusters < m."""
    finals = {"A": (0.9, 0.5, 0.5), "B": (0.6, 0.6, 0.6), "C": (0.99, None, None)}
    for c, values in finals.items():
        for f, value in enumerate(values):
            for seed in (0, 1) if c != "C" else (0,):
                if value is not None:
                    _fake_run(tmp_path / "runs" / f"f{f}" / c / f"seed{seed}", value, 0.55, "2 5 4")
    table = reproduce.protocol(tmp_path, [("f0",), ("f1",), ("f2",)], range(2), ("A", "B", "C"))
    assert _row(table, "| A |") == ["A", "0.900 ± 0.000 (+0.350; 1.0 below m)",
                                    "0.500 ± 0.000 (-0.050; 1.0 below m)",
                                    "0.500 ± 0.000 (-0.050; 1.0 below m)", "0.633"]
    assert _row(table, "| C |")[1:4] == ["0.990 (+0.440; 1.0 below m; 1 of 2 seeds)", "", ""]
    assert _row(table, "| f0 |") == ["f0", "B", "0.600", "A (0.900)"]  # others: A 0.5, B 0.6
    assert _row(table, "| f1 |") == ["f1", "A", "0.500", "B (0.600)"]  # others: A 0.7, B 0.6
    assert _row(table, "| f2 |") == ["f2", "A", "0.500", "B (0.600)"]
    assert _row(table, "| mean |")[2] == f"{(0.6 + 0.5 + 0.5) / 3:.3f}"


@pytest.mark.parametrize("folder, message", [("missing", "no such folder"),
                                             ("empty", "no labelled")])
@pytest.mark.slow
def test_reproduce_bad_folder_exits_2_with_one_line(tmp_path, folder, message):
    (tmp_path / "empty").mkdir()
    run = _reproduce(folder, "--out", "rep", cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_reproduce_datasets_runs_only_the_files_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("a", "b"):
        ds = datasets.synthetic(n_cells=120, n_genes=60, n_clusters=3, seed=0)
        write_arrays(data / f"{stem}.h5", X=np.asarray(ds.counts), Y=ds.labels)
    unknown = _reproduce(str(data), "--datasets", "b", "zzz", "--out", "rep", cwd=tmp_path)
    assert unknown.returncode == 2 and "no labelled file named zzz" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
    only_b = _reproduce(str(data), "--datasets", "b", "--seeds", "1", "--out", "rep", "--ablate",
                        "--figure", "--variants", "sampled losses", "--sctcm-args", QUICK,
                        cwd=tmp_path)
    assert only_b.returncode == 0, only_b.stderr
    assert [p.name for p in (tmp_path / "rep" / "runs").iterdir()] == ["b"]
    ran = {p.name for p in (tmp_path / "rep" / "runs" / "b").iterdir()}
    assert ran == {"sampled-losses", "full", "no-adversarial", "no-overclustering", "neither"}
    assert (tmp_path / "rep" / "fig2_b.csv").exists()  # --ablate, --figure alone: every dataset
    results = (tmp_path / "rep" / "results.md").read_text()
    assert "| b (K=3) | scTCM | 1 |" in results and "| | scTCM, `--losses sampled` | 1 |" in results
    assert "| b | seeds |" in results  # Table 2 of b


def test_each_warning_is_judged_against_the_types_it_speaks_of():
    """warning_hit by hand: types y = 0 0 0 0 1 1 1 1 2 2 2 2; scTCM splits type 0 into clusters
    0 and 1 and joins types 1 and 2 in cluster 2."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    baseline = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    hit = lambda line: reproduce.warning_hit(line, y, labels, baseline)
    assert hit("clusters 0 and 1 share 5 of their strong markers (a, ...): ...") is True
    assert hit("clusters 0 and 2 share 5 of their strong markers (a, ...): ...") is False
    assert hit("cluster 2: its cells fall into two groups on its own markers (4 and 4 cells")
    assert not hit("cluster 0: its cells fall into two groups on its own markers (1 and 1")
    assert hit("the baseline splits cluster 2: 4 of its cells in its group 1 (a), 4 in its "
               "group 2 (b)") is True
    assert hit("the baseline joins clusters 0 and 1 (its group 0 holds 2 and 2 of their "
               "cells); ...") is True
    assert hit("cluster 0: no reliable cell: none of its margins reaches ...") is True
    assert hit("cluster 3: 2 cells, fewer than m = 3") is None
    assert reproduce.warning_kind("clusters 0 and 1: centres 1 apart, ...: one hump, not two; "
                                  "try K - 1") == "one hump"


def test_halves_of_a_dataset_split_its_cells_at_random_and_keep_its_names():
    data = datasets.synthetic(n_cells=101, n_genes=20, seed=0)
    first, second = reproduce.halves_of(data)
    assert first.counts.shape == (50, 20) and second.counts.shape == (51, 20)
    names = sorted(list(first.cell_names) + list(second.cell_names))
    assert names == sorted(data.cell_names)
    rows = [int(name[4:]) for name in first.cell_names]
    assert np.array_equal(first.counts, data.counts[rows])
    assert np.array_equal(first.labels, data.labels[rows])
    assert list(first.gene_names) == list(data.gene_names)
