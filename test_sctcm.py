"""Tests of the scTCM reference implementation, one section per module.

Run: python -m pytest -q. Each test compares against something independent of the code under
test: files written here by h5py / scipy.io / csv, numbers worked out by hand, brute-force loops.
Tests on the real data in ../shared/data skip cleanly when that folder is absent.
"""
import gzip
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import datasets

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


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
