"""Tests of the scTCM reference implementation, one section per module.

Run: python -m pytest -q. Each test compares against something independent of the code under
test: files written here by h5py / scipy.io / csv, numbers worked out by hand, brute-force loops.
Tests on the real data in ../shared/data skip cleanly when that folder is absent.
"""
import gzip
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import datasets
import sctcm

REPO = Path(__file__).resolve().parent
DATA = REPO.parent / "shared" / "data"


# ---------------------------------------------------------------- datasets.py


def _toy(seed=0, n=30, g=12):
    """A small count matrix (n cells x g genes, every cell and gene non-zero) with string labels."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n, g))
    x[:, 0] += 1
    x[0] += 1
    labels = np.array(["beta", "alpha", "delta"])[np.arange(n) % 3]
    return x, labels


def _strings(values):
    return np.array(values, dtype="S")  # bytes, as the paper's and scDCC's files store them


def _write_csr_group(group, x):
    """A CSR group as scziDesk and scDCC write it: data, indices, indptr and a shape dataset."""
    m = sp.csr_matrix(x)
    for key in ("data", "indices", "indptr"):
        group.create_dataset(key, data=getattr(m, key))
    group.create_dataset("shape", data=np.array(m.shape))


def _write_h5ad(path, x, labels, fmt="csr", categorical="codes"):
    """An AnnData-style file: X (dense / CSR / CSC group), obs with a categorical cell_type, var."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        if fmt == "dense":
            f.create_dataset("X", data=x.astype(np.float32))
        else:
            m = sp.csr_matrix(x, dtype=np.float32) if fmt == "csr" else sp.csc_matrix(x, dtype=np.float32)
            g = f.create_group("X")
            g.attrs["encoding-type"] = f"{fmt}_matrix"
            g.attrs["shape"] = m.shape
            for key in ("data", "indices", "indptr"):
                g.create_dataset(key, data=getattr(m, key))
        categories, codes = np.unique(labels, return_inverse=True)
        obs = f.create_group("obs")
        obs.attrs["_index"] = "_index"
        obs.create_dataset("_index", data=_strings([f"c{i}" for i in range(len(x))]))
        if categorical == "codes":  # anndata >= 0.8
            col = obs.create_group("cell_type")
            col.attrs["encoding-type"] = "categorical"
            col.create_dataset("categories", data=_strings(categories))
            col.create_dataset("codes", data=codes.astype(np.int8))
        else:  # older anndata: integer codes, categories in obs/__categories
            obs.create_dataset("cell_type", data=codes.astype(np.int8))
            obs.create_group("__categories").create_dataset("cell_type", data=_strings(categories))
        var = f.create_group("var")
        var.attrs["_index"] = "_index"
        var.create_dataset("_index", data=_strings([f"g{j}" for j in range(x.shape[1])]))


def _assert_same(ds, x, labels):
    """ds holds the counts x (cells x genes) and the label strings `labels`."""
    assert ds.counts.shape == x.shape
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.labels.dtype == np.int64 and set(ds.labels) == set(range(len(ds.label_names)))
    np.testing.assert_array_equal(ds.label_names[ds.labels], labels)


@pytest.mark.parametrize("sparse", [False, True])
def test_load_xy_layout(tmp_path, sparse):
    x, labels = _toy()
    path = tmp_path / "toy.h5"
    with h5py.File(path, "w") as f:
        if sparse:
            _write_csr_group(f.create_group("X"), x)
        else:
            f.create_dataset("X", data=x.astype(np.int32))
        f.create_dataset("Y", data=_strings(labels))
        f.create_dataset("genes", data=_strings([f"g{j}" for j in range(x.shape[1])]))
    ds = datasets.load(path)
    _assert_same(ds, x, labels)
    assert sp.issparse(ds.counts) and ds.counts.dtype == np.float32
    assert ds.gene_names[3] == "g3" and ds.name == "toy" and ds.notes == []


def test_load_xy_integer_labels_with_names(tmp_path):
    x, _ = _toy()
    y = np.arange(len(x)) % 3 + 1  # codes 1..3 of the four names: "zero" never occurs
    path = tmp_path / "toy.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x)
        f.create_dataset("Y", data=y)
        f.create_dataset("cell_types", data=_strings(["zero", "one", "two", "three"]))
    ds = datasets.load(path)
    np.testing.assert_array_equal(ds.labels, y - 1)
    np.testing.assert_array_equal(ds.label_names, ["one", "two", "three"])


@pytest.mark.parametrize("sparse", [False, True])
def test_load_paper_layout(tmp_path, sparse):
    x, labels = _toy()
    path = tmp_path / "Quake_toy.h5"
    with h5py.File(path, "w") as f:
        if sparse:
            _write_csr_group(f.create_group("exprs"), x)
        else:
            f.create_dataset("exprs", data=x.astype(np.float64))
        f.create_group("obs").create_dataset("cell_type1", data=_strings(labels))
        f.create_dataset("obs_names", data=_strings([f"c{i}" for i in range(len(x))]))
        f.create_dataset("var_names", data=_strings([f"g{j}" for j in range(x.shape[1])]))
    ds = datasets.load(path)
    _assert_same(ds, x, labels)
    assert ds.cell_names[2] == "c2" and ds.gene_names[-1] == f"g{x.shape[1] - 1}"


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("categorical", ["codes", "__categories"])
def test_load_h5ad(tmp_path, fmt, categorical):
    x, labels = _toy()
    path = tmp_path / "toy.h5ad"
    _write_h5ad(path, x, labels, fmt, categorical)
    ds = datasets.load(path)
    _assert_same(ds, x, labels)
    assert ds.cell_names[1] == "c1" and ds.gene_names[0] == "g0" and ds.notes == []


def test_load_h5ad_label_key(tmp_path):
    x, labels = _toy()
    path = tmp_path / "toy.h5ad"
    _write_h5ad(path, x, labels)
    with h5py.File(path, "a") as f:
        f["obs"].create_dataset("batch", data=np.arange(len(x)) % 2)
    ds = datasets.load(path, label_key="batch")
    np.testing.assert_array_equal(ds.labels, np.arange(len(x)) % 2)
    with pytest.raises(ValueError, match="no obs column 'donor'"):
        datasets.load(path, label_key="donor")


@pytest.mark.parametrize("gz", [False, True])
def test_load_10x_folder(tmp_path, gz):
    x, _ = _toy()
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(x.T), field="integer")  # genes x cells
    features = "".join(f"ENSG{j}\tg{j}\tGene Expression\n" for j in range(x.shape[1]))
    barcodes = "".join(f"AAAC-{i}\n" for i in range(len(x)))
    (folder / "features.tsv").write_text(features)
    (folder / "barcodes.tsv").write_text(barcodes)
    if gz:
        for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            (folder / (name + ".gz")).write_bytes(gzip.compress((folder / name).read_bytes()))
            (folder / name).unlink()
    ds = datasets.load(folder)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.labels is None and ds.gene_names[4] == "g4" and ds.cell_names[5] == "AAAC-5"


def test_load_10x_genes_tsv(tmp_path):
    x, _ = _toy()
    scipy.io.mmwrite(tmp_path / "matrix.mtx", sp.coo_matrix(x.T))
    (tmp_path / "genes.tsv").write_text("".join(f"ENSG{j}\tg{j}\n" for j in range(x.shape[1])))
    (tmp_path / "barcodes.tsv").write_text("".join(f"b{i}\n" for i in range(len(x))))
    ds = datasets.load(tmp_path / "matrix.mtx")
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.gene_names[1] == "g1"


@pytest.mark.parametrize("name, sep, corner", [("toy.csv", ",", True), ("toy.tsv.gz", "\t", False)])
def test_load_csv_tsv(tmp_path, name, sep, corner):
    x, _ = _toy()
    header = ([""] if corner else []) + [f"g{j}" for j in range(x.shape[1])]
    lines = [sep.join(header)] + [sep.join([f"c{i}"] + [str(v) for v in row]) for i, row in enumerate(x)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    ds = datasets.load(path)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.gene_names[0] == "g0" and ds.cell_names[-1] == f"c{len(x) - 1}" and ds.name == "toy"


def test_load_transposes_matrices_written_from_r(tmp_path):
    x, labels = _toy()
    path = tmp_path / "from_r.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x.T)  # genes x cells, as rhdf5 writes a cells x genes R matrix
        f.create_dataset("Y", data=_strings(labels))
    ds = datasets.load(path)
    _assert_same(ds, x, labels)
    assert len(ds.notes) == 1 and "transposed" in ds.notes[0] and "\n" not in ds.notes[0]

    path = tmp_path / "from_r_paper.h5"  # no labels: the cell names decide
    with h5py.File(path, "w") as f:
        _write_csr_group(f.create_group("exprs"), x.T)
        f.create_dataset("obs_names", data=_strings([f"c{i}" for i in range(len(x))]))
    ds = datasets.load(path)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert "transposed" in ds.notes[0]


def test_preprocess_by_hand():
    # cell 2 and gene 3 are all zero; library sizes of the others: 2, 4, 12 -> median 4
    counts = np.array([[1, 0, 1, 0],
                       [3, 0, 1, 0],
                       [0, 0, 0, 0],
                       [3, 6, 3, 0]])
    p = datasets.preprocess(datasets.Dataset(counts=counts, labels=np.array([0, 1, 1, 0]), name="toy"))
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


def test_preprocess_finds_the_variable_genes():
    # 2000 flat negative-binomial genes (theta = 5, so var/mean = 1 + mu/5 grows with the mean: plain
    # var/mean would pick the most expressed of them) and 5 bimodal genes (off in half of the cells)
    # of middling mean, which stand out only against the genes of their own bin of mean expression
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
    # three genes in the lowest bin with log dispersions 0, 1, 2 -> z = -1, 0, 1; one alone at the top
    mean = np.array([1.0, 1.1, 1.2, 100.0])
    var = mean * np.exp([0.0, 1.0, 2.0, 0.5])
    np.testing.assert_allclose(datasets._normalised_dispersion(mean, var), [-1, 0, 1, 1])


def test_preprocess_sparse_equals_dense_and_keeps_all_genes():
    x, _ = _toy()
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
    wide = np.random.default_rng(2).normal(size=(12, 30))  # n < g: PCA through the 12 x 12 Gram matrix
    u, s, _ = np.linalg.svd(wide - wide.mean(0), full_matrices=False)
    np.testing.assert_array_equal(datasets.knn_graph(wide, k=3, n_pcs=4).toarray(),
                                  _brute_force_graph(u[:, :4] * s[:4], 3))


def test_knn_graph_duplicates_no_self_loops():
    x = np.repeat(np.random.default_rng(0).normal(size=(10, 3)), 6, axis=0)  # six copies: ties at 0
    a = datasets.knn_graph(x, k=3).toarray()
    assert np.all(np.diag(a) == 0) and np.array_equal(a, a.T) and set(np.unique(a)) <= {0, 1}
    assert np.all(a.sum(1) >= 3)


def _write(path, **arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def test_bad_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.h5: no such file"):
        datasets.load(tmp_path / "nothing.h5")


def test_bad_unknown_layout(tmp_path):
    (tmp_path / "counts.xlsx").write_text("not a matrix")
    with pytest.raises(ValueError, match=r"counts\.xlsx: unknown layout"):
        datasets.load(tmp_path / "counts.xlsx")
    path = _write(tmp_path / "other.h5", matrix=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"other\.h5: unknown HDF5 layout"):
        datasets.load(path)


@pytest.mark.parametrize("value, message", [(-1.0, "2 negative counts in X"),
                                            (np.nan, "2 non-finite counts"),
                                            (0.5, "2 non-integer counts in X")])
def test_bad_counts(tmp_path, value, message):
    x, _ = _toy()
    x = x.astype(np.float64)
    x[3, 4] = x[7, 1] = value
    path = _write(tmp_path / "bad.h5", X=x)
    with pytest.raises(ValueError, match=rf"bad\.h5: {message}") as err:
        datasets.load(path)
    assert "\n" not in str(err.value)


def test_bad_inconsistent_csr_group(tmp_path):
    x, _ = _toy()
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        _write_csr_group(f.create_group("X"), x)
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=sp.csr_matrix(x).indptr[:-3])
    message = r"bad\.h5: inconsistent CSR group X: indptr has 28 entries for 30 rows"
    with pytest.raises(ValueError, match=message):
        datasets.load(path)


def test_bad_label_count(tmp_path):
    x, labels = _toy()
    path = _write(tmp_path / "bad.h5", X=x, Y=_strings(labels[:-1]))
    with pytest.raises(ValueError, match=r"bad\.h5: 29 labels for 30 cells"):
        datasets.load(path)


def test_bad_non_numeric_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(",g0,g1\nc0,1,2\nc1,3,abc\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: non-numeric count 'abc'"):
        datasets.load(path)


def test_bad_too_few_cells_after_filtering():
    counts = np.zeros((5, 4))
    counts[0] = counts[1] = 1
    with pytest.raises(ValueError, match="toy: only 2 cells and 4 genes with non-zero counts"):
        datasets.preprocess(datasets.Dataset(counts=counts, name="toy"))


def _manifest():
    """(file, cells, genes, types, cells per label) for each file in the table of MANIFEST.md."""
    if not (DATA / "MANIFEST.md").exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{DATA} is absent"))]
    text = (DATA / "MANIFEST.md").read_text()
    sizes = {name: sorted(int(v) for v in counts.split(","))
             for name, counts in re.findall(r"^- (\S+): ([\d, ]+)", text, re.M)}
    rows = []
    for first, second, n, g, k in re.findall(r"^\| `([^`]+)`(?: / `([^`]+)`)? \| (\d+) \| (\d+) \| (\d+) \|",
                                             text, re.M):
        stem = first.split(".")[0]
        for name in [first] + ([stem + second] if second else []):
            rows.append(pytest.param((name, int(n), int(g), int(k), sizes.get(stem)), id=name))
    return rows


@pytest.mark.parametrize("entry", _manifest())
def test_real_data_matches_manifest(entry):
    name, n, g, k, sizes = entry
    ds = datasets.load(DATA / name)
    assert ds.counts.shape == (n, g) and sp.isspmatrix_csr(ds.counts)
    assert len(ds.label_names) == k and ds.labels.shape == (n,)
    assert sorted(np.bincount(ds.labels)) == sizes
    assert np.all(ds.counts.data > 0) and np.all(ds.counts.data == np.round(ds.counts.data))


def test_real_h5ad_equals_h5():
    if not (DATA / "Baron_mouse.h5ad").exists():
        pytest.skip(f"{DATA} is absent")
    a, b = datasets.load(DATA / "Baron_mouse.h5ad"), datasets.load(DATA / "Baron_mouse.h5")
    assert a.counts.shape == (1886, 14878) and len(a.label_names) == 13
    assert (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.label_names[a.labels], b.label_names[b.labels])
    np.testing.assert_array_equal(a.gene_names, b.gene_names)


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


def test_synthetic_clusters_are_graph_separable():
    p = datasets.preprocess(datasets.synthetic())
    a = datasets.knn_graph(p.x).tocoo()
    assert np.mean(p.labels[a.row] == p.labels[a.col]) > 0.97  # edges stay inside clusters


# ---------------------------------------------------------------- sctcm.py

def _random_graph(n, p, seed):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, 1)
    return sp.csr_matrix((upper | upper.T).astype(np.float32))


def test_normalized_adjacency_matches_dense_formula():
    a = _random_graph(30, 0.2, 0)
    a_tilde = a.toarray() + np.eye(30)
    d = a_tilde.sum(1) ** -0.5
    expected = d[:, None] * a_tilde * d[None, :]
    assert np.allclose(sctcm.normalized_adjacency(a).to_dense().numpy(), expected, atol=1e-6)


def test_structure_loss_matches_dense_weighted_bce():
    a = _random_graph(50, 0.1, 1)
    coo = a.tocoo()
    edges = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    z = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    target = torch.as_tensor(a.toarray(), dtype=torch.float64)
    n, e = 50, a.nnz
    pos_weight = torch.tensor((n * n - e) / e, dtype=torch.float64)
    norm = n * n / (2 * (n * n - e))
    expected = norm * F.binary_cross_entropy_with_logits(z1 @ z1.T, target, pos_weight=pos_weight)
    got = sctcm.structure_loss(z2, edges, block=7)  # blocks that do not divide n
    expected.backward()
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-10)
    assert torch.allclose(z2.grad, z1.grad, rtol=1e-8, atol=1e-12)


def test_soft_assign_matches_student_t_loop():
    rng = np.random.default_rng(2)
    z, centers = rng.normal(size=(20, 3)), rng.normal(size=(4, 3))
    expected = np.empty((20, 4))
    for i in range(20):
        kernel = [1 / (1 + np.sum((z[i] - c) ** 2)) for c in centers]
        expected[i] = np.array(kernel) / sum(kernel)
    got = sctcm.soft_assign(torch.as_tensor(z), torch.as_tensor(centers)).numpy()
    assert np.allclose(got, expected, rtol=1e-12)


def test_target_distribution_one_hot_only_for_reliable_cells():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    q, reliable = sctcm.target_distribution(p, beta=0.3)
    for i, row in enumerate(p.tolist()):
        top1, top2 = sorted(row, reverse=True)[:2]
        assert bool(reliable[i]) == (top1 - top2 >= 0.3)
        if reliable[i]:
            assert q[i].tolist() == [float(j == int(np.argmax(row))) for j in range(3)]
        else:
            assert torch.equal(q[i], p[i])
    assert reliable.tolist() == [True, False, True, False]


def test_kl_divergence_matches_loop_with_zero_targets():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(5), size=8)
    q = rng.dirichlet(np.ones(5), size=8)
    q[0] = [0, 1, 0, 0, 0]
    expected = sum(q[i, j] * np.log(q[i, j] / p[i, j])
                   for i in range(8) for j in range(5) if q[i, j] > 0)
    q_t, p_t = torch.as_tensor(q), torch.as_tensor(p)
    assert np.isclose(sctcm.kl_divergence(q_t, p_t, reduction="sum").item(), expected, rtol=1e-12)
    assert np.isclose(sctcm.kl_divergence(q_t, p_t).item(), expected / 8, rtol=1e-12)
    assert sctcm.kl_divergence(p_t, p_t).item() == pytest.approx(0, abs=1e-12)


def test_auto_threshold_makes_the_requested_share_reliable():
    p = torch.softmax(torch.randn(1000, 6, generator=torch.Generator().manual_seed(4)), 1)
    beta = sctcm.auto_threshold(p, 0.15)
    _, reliable = sctcm.target_distribution(p, beta)
    assert abs(reliable.float().mean().item() - 0.15) <= 0.002


def test_convex_combinations_lie_on_the_simplex_of_their_cluster():
    # codes of cluster 0 are the unit vectors e_0..e_2, so a combination's coordinates ARE theta
    z = torch.cat([torch.eye(6), torch.ones(1, 6)])
    members = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6])]
    z_cvx, active = sctcm.convex_combinations(z, members, m=3, n_cvx=50,
                                              rng=np.random.default_rng(5))
    assert active.tolist() == [0, 1]  # cluster 2 has fewer than m members
    assert z_cvx.shape == (2, 50, 6)
    assert torch.all(z_cvx[0, :, 3:] == 0) and torch.all(z_cvx[1, :, :3] == 0)
    assert torch.all(z_cvx >= 0)
    assert torch.allclose(z_cvx.sum(2), torch.ones(2, 50))
    assert z_cvx[0, :, :3].std(0).min() > 0.1  # random weights, not a fixed point
    assert sctcm.convex_combinations(z, [np.array([0])], 3, 5, np.random.default_rng(0)) is None


def test_adversarial_losses_match_log_sigmoid_formulas():
    real = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -2.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, -0.5, 0.2], [-3.0, 0.1, 4.0]], dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected_d = sum(-torch.log(d_real[k]).mean() - torch.log(1 - d_fake[k]).mean()
                     for k in range(2))
    expected_g = sum(torch.log(1 - d_fake[k]).mean() for k in range(2))
    assert torch.isclose(sctcm.discriminator_loss(real, fake), expected_d, rtol=1e-12)
    assert torch.isclose(sctcm.generator_loss(fake), expected_g, rtol=1e-12)
    assert torch.isfinite(sctcm.generator_loss(torch.tensor([[200.0]])))


def test_discriminators_are_separate_networks():
    disc = sctcm.Discriminators(3, 5, 4)
    x = torch.randn(2, 6, 5)
    out = disc(x, torch.tensor([2, 0]))
    for row, k in enumerate([2, 0]):
        h = torch.relu(x[row] @ disc.w1[k] + disc.b1[k])
        assert torch.allclose(out[row], (h @ disc.w2[k] + disc.b2[k]).squeeze(-1))
    out.sum().backward()
    assert disc.w1.grad[1].abs().sum() == 0  # discriminator 1 was not used


def _blobs(n_per, centers, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    x = np.vstack([c + scale * rng.normal(size=(n_per, len(c))) for c in centers])
    return x, np.repeat(np.arange(len(centers)), n_per)


def test_kmeans_finds_separated_blobs_and_is_a_lloyd_fixed_point():
    x, y = _blobs(40, [[0, 0], [5, 0], [0, 5], [5, 5]], seed=6)
    labels, centers = sctcm.kmeans(x, 4, seed=0)
    assert sctcm.ari(y, labels) == 1.0
    for j in range(4):
        assert np.allclose(centers[j], x[labels == j].mean(0))
    dist = ((x[:, None] - centers[None]) ** 2).sum(2)
    assert np.array_equal(labels, dist.argmin(1))


def test_spectral_clustering_recovers_a_planted_partition():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(4), 50)
    prob = np.where(y[:, None] == y[None, :], 0.3, 0.01)
    upper = np.triu(rng.random((200, 200)) < prob, 1)
    a = sp.csr_matrix((upper | upper.T).astype(float))
    assert sctcm.ari(y, sctcm.spectral_clustering(a, 4, seed=0)) == 1.0


def _pairs_ari(y, pred):
    """ARI from its definition over all pairs of cells (Hubert & Arabie 1985)."""
    n = len(y)
    same_y = [y[i] == y[j] for i, j in itertools.combinations(range(n), 2)]
    same_p = [pred[i] == pred[j] for i, j in itertools.combinations(range(n), 2)]
    a = sum(s and t for s, t in zip(same_y, same_p))
    total = n * (n - 1) / 2
    expected = sum(same_y) * sum(same_p) / total
    top = (sum(same_y) + sum(same_p)) / 2
    return (a - expected) / (top - expected)


def _loop_nmi(y, pred):
    n = len(y)
    def entropy(v):
        return -sum(c / n * np.log(c / n) for c in np.unique(v, return_counts=True)[1])
    mi = 0.0
    for a in set(y):
        for b in set(pred):
            nab = sum(1 for i in range(n) if y[i] == a and pred[i] == b)
            if nab:
                na, nb = sum(y == a), sum(pred == b)
                mi += nab / n * np.log(n * nab / (na * nb))
    return 2 * mi / (entropy(y) + entropy(pred))


def _best_permutation_acc(y, pred):
    k = max(y.max(), pred.max()) + 1
    return max(np.mean(np.array(perm)[pred] == y) for perm in itertools.permutations(range(k)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 4, 60))
    assert sctcm.ari(y, pred) == pytest.approx(_pairs_ari(y, pred), rel=1e-10)
    assert sctcm.nmi(y, pred) == pytest.approx(_loop_nmi(y, pred), rel=1e-10)
    assert sctcm.cluster_acc(y, pred) == pytest.approx(_best_permutation_acc(y, pred))


def test_metrics_on_label_permutations_and_independence():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert sctcm.ari(y, (y + 1) % 3) == 1.0
    assert sctcm.nmi(y, (y + 1) % 3) == pytest.approx(1.0)
    assert sctcm.cluster_acc(y, (y + 1) % 3) == 1.0
    assert sctcm.ari(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(-0.5)


def _tiny_problem(n_cells=300, seed=0):
    data = datasets.synthetic(n_cells=n_cells, n_genes=200, n_clusters=3, seed=seed)
    prepared = datasets.preprocess(data, n_top_genes=150)
    return prepared, datasets.knn_graph(prepared.x, k=10, n_pcs=20)


def _tiny_config(**changes):
    base = dict(pretrain_epochs=10, max_epochs=12, min_epochs=12, eval_every=6, update_every=3,
                n_over=6, hidden=32, decoder=(32,), disc_hidden=8, n_cvx=8)
    return sctcm.Config(**{**base, **changes})


def _phase2_parts(seed=0):
    """A model, its discriminators, optimisers and reliable members, as fit builds them."""
    prepared, adjacency = _tiny_problem()
    config = _tiny_config()
    torch.manual_seed(seed)
    model = sctcm._Model(prepared.x.shape[1], config)
    disc = sctcm.Discriminators(3, prepared.x.shape[1], config.disc_hidden)
    data = {"x": torch.as_tensor(prepared.x), "counts": torch.as_tensor(prepared.counts),
            "size_factors": torch.as_tensor(prepared.size_factors)[:, None],
            "a_norm": sctcm.normalized_adjacency(adjacency),
            "edges": torch.as_tensor(np.vstack(adjacency.nonzero()), dtype=torch.long)}
    z, rate, l_x, l_a = sctcm._self_supervision(model, data, config)
    members = [np.arange(k, 300, 3)[:20] for k in range(3)]
    return model, disc, config, z, rate, l_x + l_a, members


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return [not torch.equal(p, q) for p, q in zip(module.parameters(), before)]


def test_discriminator_step_changes_only_discriminator_parameters():
    model, disc, config, z, rate, _, members = _phase2_parts()
    before_model, before_disc = _snapshot(model), _snapshot(disc)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
    assert sctcm._discriminator_step(opt_d, model, disc, z, rate, members, config,
                                     np.random.default_rng(0)) is not None
    assert not any(_changed(model, before_model))
    assert all(_changed(disc, before_disc))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_generator_step_changes_no_discriminator_parameter():
    model, disc, config, z, rate, l_ss, members = _phase2_parts()
    before_model, before_disc = _snapshot(model), _snapshot(disc)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-2)
    sctcm._generator_step(opt_g, model, disc, z, rate, l_ss, members, config,
                          np.random.default_rng(0))
    assert not any(_changed(disc, before_disc))
    assert any(_changed(model.encoder, before_model[:4]))


def _fit(**changes):
    prepared, adjacency = _tiny_problem()
    return sctcm.fit(prepared, adjacency, 3, _tiny_config(**changes), log=lambda line: None)


def test_ablation_flags_remove_their_losses():
    full = {k for row in _fit().history for k in row}
    assert {"L_c", "L_o", "L_g", "L_d"} <= full
    no_adv = {k for row in _fit(adversarial=False).history for k in row}
    assert "L_c" in no_adv and "L_o" in no_adv and not {"L_g", "L_d"} & no_adv
    no_over = {k for row in _fit(overclustering=False).history for k in row}
    assert "L_o" not in no_over and "reliable_c" in no_over


def test_fit_is_deterministic_for_a_seed():
    first, second = _fit(seed=3), _fit(seed=3)
    assert np.array_equal(first.labels, second.labels)
    # parallel sparse kernels may sum in another order: equal up to float32 round-off
    assert np.allclose(first.embedding, second.embedding, rtol=0, atol=1e-5)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "sctcm.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_on_synthetic_data(tmp_path):
    """The whole method on a small synthetic problem must cluster it well (< 60 s)."""
    data = datasets.synthetic(n_cells=800, n_genes=500, n_clusters=4, seed=1)
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["Y"] = np.asarray(data.counts), data.labels
    run = _cli(str(path), "--clusters", "4", "--out", "out", "--pretrain-epochs", "60",
               "--max-epochs", "30", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["ari"] >= 0.9
    labels = (tmp_path / "out" / "labels.csv").read_text().splitlines()
    assert labels[0] == "cell,cluster" and len(labels) == 801
    embedding = (tmp_path / "out" / "embedding.csv").read_text().splitlines()
    assert len(embedding) == 801 and len(embedding[1].split(",")) == 16
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert "ID" in history[0].split(",") and len(history) > 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small.h5"]


@pytest.mark.parametrize("args, message", [
    (["missing.h5", "--clusters", "3"], "missing.h5"),
    (["data.h5", "--clusters", "1"], "at least 2"),
    (["data.h5", "--clusters", "three"], "invalid int value"),
    (["data.h5", "--clusters", "2.5"], "invalid int value"),
    (["data.h5", "--clusters", "500"], "more than the"),
    (["data.h5"], "--clusters K is required"),
    ([], "PATH or --demo"),
    (["notes.txt", "--clusters", "3"], "notes.txt"),
    (["data.h5", "--clusters", "3", "--out", "full"], "not empty"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["X"] = np.random.default_rng(0).poisson(2, (40, 30))
    (tmp_path / "notes.txt").write_text("not a count matrix\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.csv").write_text("x\n")
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "sctcm_output").exists()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["old.csv"]
