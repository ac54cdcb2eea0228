"""Tests of formats.py, the file formats: every layout load reads (each new one against the same
counts written as X/Y), which way a table lies, label files, cells without a label, bad files and
bad counts, the real files, and the command line on each new layout.

Run: python -m pytest -q runs these with test_sctcm.py. Files are written here as each tool
writes them (h5py, scipy.io, csv), from counts known in advance. The helpers that test_sctcm.py's
own tests use too (the toy matrix, the HDF5 and AnnData writers, the command line) are imported
from it; nothing is imported the other way.
"""
import gzip
import json
import re

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

import datasets
import formats
import reproduce
import sctcm
from testkit import (QUICK, REPO, refused, run_cli, strings, toy, toy_csv, write_anndata_matrix,
                     write_arrays, write_h5ad)

DATA = REPO.parent / "shared" / "data"


# ---------------------------------------------------------------- each layout, read
# (each new layout against the same counts written as X/Y: _assert_same_as_xy)


def _write_csr_group(group, x):
    """A CSR group as scziDesk and scDCC write it: data, indices, indptr and a shape dataset."""
    m = sp.csr_matrix(x)
    for key in ("data", "indices", "indptr"):
        group.create_dataset(key, data=getattr(m, key))
    group.create_dataset("shape", data=np.array(m.shape))


def _assert_same(ds, x, labels):
    """ds holds the counts x (cells x genes) and the label strings `labels`."""
    assert ds.counts.shape == x.shape
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.labels.dtype == np.int64 and set(ds.labels) == set(range(len(ds.label_names)))
    np.testing.assert_array_equal(ds.label_names[ds.labels], labels)


def _write_matrix(f, name, x, sparse, dtype):
    """x as f[name]: a CSR group (data/indices/indptr/shape) if sparse, else a dense dataset."""
    if sparse:
        _write_csr_group(f.create_group(name), x)
    else:
        f.create_dataset(name, data=x.astype(dtype))


@pytest.mark.parametrize("sparse", [False, True])
def test_load_xy_layout(tmp_path, sparse):
    x, labels = toy()
    path = tmp_path / "toy.h5"
    with h5py.File(path, "w") as f:
        _write_matrix(f, "X", x, sparse, np.int32)
        f.create_dataset("Y", data=strings(labels))
        f.create_dataset("genes", data=strings([f"g{j}" for j in range(x.shape[1])]))
    ds = formats.load(path)
    _assert_same(ds, x, labels)
    assert sp.issparse(ds.counts) and ds.counts.dtype == np.float32
    assert ds.gene_names[3] == "g3" and ds.name == "toy" and ds.notes == []


def test_load_xy_integer_labels_with_names(tmp_path):
    x, _ = toy()
    y = np.arange(len(x)) % 3 + 1  # codes 1..3 of the four names: "zero" never occurs
    path = tmp_path / "toy.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x)
        f.create_dataset("Y", data=y)
        f.create_dataset("cell_types", data=strings(["zero", "one", "two", "three"]))
    ds = formats.load(path)
    np.testing.assert_array_equal(ds.labels, y - 1)
    np.testing.assert_array_equal(ds.label_names, ["one", "two", "three"])


@pytest.mark.parametrize("sparse", [False, True])
def test_load_paper_layout(tmp_path, sparse):
    x, labels = toy()
    path = tmp_path / "Quake_toy.h5"
    with h5py.File(path, "w") as f:
        _write_matrix(f, "exprs", x, sparse, np.float64)
        f.create_group("obs").create_dataset("cell_type1", data=strings(labels))
        f.create_dataset("obs_names", data=strings([f"c{i}" for i in range(len(x))]))
        f.create_dataset("var_names", data=strings([f"g{j}" for j in range(x.shape[1])]))
    ds = formats.load(path)
    _assert_same(ds, x, labels)
    assert ds.cell_names[2] == "c2" and ds.gene_names[-1] == f"g{x.shape[1] - 1}"


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("categorical", ["codes", "__categories"])
def test_load_h5ad(tmp_path, fmt, categorical):
    x, labels = toy()
    path = tmp_path / "toy.h5ad"
    write_h5ad(path, x, labels, fmt, categorical)
    ds = formats.load(path)
    _assert_same(ds, x, labels)
    assert ds.cell_names[1] == "c1" and ds.gene_names[0] == "g0" and ds.notes == []


def test_load_h5ad_label_key(tmp_path):
    x, labels = toy()
    path = tmp_path / "toy.h5ad"
    write_h5ad(path, x, labels)
    with h5py.File(path, "a") as f:
        f["obs"].create_dataset("batch", data=np.arange(len(x)) % 2)
    ds = formats.load(path, label_key="batch")
    np.testing.assert_array_equal(ds.labels, np.arange(len(x)) % 2)
    with pytest.raises(ValueError, match="no obs column 'donor'"):
        formats.load(path, label_key="donor")


@pytest.mark.parametrize("gz", [False, True])
def test_load_10x_folder(tmp_path, gz):
    x, _ = toy()
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
    ds = formats.load(folder)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.labels is None and ds.gene_names[4] == "g4" and ds.cell_names[5] == "AAAC-5"


def test_load_10x_genes_tsv(tmp_path):
    x, _ = toy()
    scipy.io.mmwrite(tmp_path / "matrix.mtx", sp.coo_matrix(x.T))
    (tmp_path / "genes.tsv").write_text("".join(f"ENSG{j}\tg{j}\n" for j in range(x.shape[1])))
    (tmp_path / "barcodes.tsv").write_text("".join(f"b{i}\n" for i in range(len(x))))
    ds = formats.load(tmp_path / "matrix.mtx")
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.gene_names[1] == "g1"


@pytest.mark.parametrize("name, sep, corner", [("toy.csv", ",", True), ("toy.tsv.gz", "\t", False)])
def test_load_csv_tsv(tmp_path, name, sep, corner):
    x, _ = toy()
    header = ([""] if corner else []) + [f"g{j}" for j in range(x.shape[1])]
    lines = [sep.join(header)] + [sep.join([f"c{i}"] + [str(v) for v in row])
                                  for i, row in enumerate(x)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    ds = formats.load(path)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert ds.gene_names[0] == "g0" and ds.cell_names[-1] == f"c{len(x) - 1}" and ds.name == "toy"


def test_load_transposes_matrices_written_from_r(tmp_path):
    x, labels = toy()
    path = tmp_path / "from_r.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x.T)  # genes x cells, as rhdf5 writes a cells x genes R matrix
        f.create_dataset("Y", data=strings(labels))
    ds = formats.load(path)
    _assert_same(ds, x, labels)
    assert len(ds.notes) == 1 and "transposed" in ds.notes[0] and "\n" not in ds.notes[0]

    path = tmp_path / "from_r_paper.h5"  # no labels: the cell names decide
    with h5py.File(path, "w") as f:
        _write_csr_group(f.create_group("exprs"), x.T)
        f.create_dataset("obs_names", data=strings([f"c{i}" for i in range(len(x))]))
    ds = formats.load(path)
    np.testing.assert_array_equal(ds.counts.toarray(), x)
    assert "transposed" in ds.notes[0]


@pytest.mark.parametrize("chunks", [None, (4, 12)])
def test_load_reads_a_dense_matrix_in_blocks(tmp_path, monkeypatch, chunks):
    x, labels = toy()  # 30 x 12
    path = tmp_path / "toy.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x, chunks=chunks)
        f.create_dataset("Y", data=strings(labels))
    monkeypatch.setattr(formats, "BLOCK_ENTRIES", 7 * 12)  # 7 rows a block (4 when chunked)
    _assert_same(formats.load(path), x, labels)


def _barcodes(n, seed=0):
    """n distinct 10x-style cell barcodes: 16 bases and a GEM well suffix."""
    rng = np.random.default_rng(seed)
    return np.array(["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n)])


def _write_xy(path, x, labels=None, genes=None, cells=None):
    """The toy data in the X/Y layout, the reference every other layout is compared with."""
    arrays = dict(X=x, Y=None if labels is None else strings(labels),
                  genes=None if genes is None else strings(genes),
                  cells=None if cells is None else strings(cells))
    return write_arrays(path, **{key: value for key, value in arrays.items() if value is not None})


def _assert_same_as_xy(ds, tmp_path, x, labels=None, genes=None, cells=None):
    """ds holds what the same counts, names and labels give in the X/Y layout."""
    ref = formats.load(_write_xy(tmp_path / "reference.h5", x, labels, genes, cells))
    assert sp.isspmatrix_csr(ds.counts) and ds.counts.dtype == np.float32
    assert (ds.counts != ref.counts).nnz == 0 and ds.counts.shape == ref.counts.shape
    np.testing.assert_array_equal(ds.gene_names, ref.gene_names)
    np.testing.assert_array_equal(ds.cell_names, ref.cell_names)
    if labels is None:
        assert ds.labels is None
    else:
        np.testing.assert_array_equal(ds.label_names[ds.labels], ref.label_names[ref.labels])


def _write_cellranger(path, x, genes, barcodes, version=3, other=()):
    """Counts (cells x genes) as Cell Ranger writes filtered_feature_bc_matrix.h5: v3 and later,
    group matrix (genes x cells by column: CSC), features/{_all_tag_keys, feature_type, genome,
    id, name}; v2 (filtered_gene_bc_matrices_h5.h5), one group per genome with genes and
    gene_names. other: (name, type, counts per cell) features of another modality, appended."""
    names, types = list(genes), ["Gene Expression"] * len(genes)
    for name, kind, column in other:
        x = np.column_stack([x, column])
        names.append(name)
        types.append(kind)
    m = sp.csc_matrix(np.asarray(x).T)  # genes x cells, one column (indptr entry) per cell
    with h5py.File(path, "w") as f:
        f.attrs["filetype"], f.attrs["version"] = "matrix", 2
        group = f.create_group("matrix" if version == 3 else "mm10")
        group.create_dataset("barcodes", data=strings(barcodes))
        group.create_dataset("data", data=m.data.astype(np.int32), compression="gzip")
        group.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=m.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        ids = strings([f"ENSMUSG{j:011d}" for j in range(len(names))])
        if version == 2:
            group.create_dataset("genes", data=ids)
            group.create_dataset("gene_names", data=strings(names))
            return path
        features = group.create_group("features")
        features.create_dataset("_all_tag_keys", data=strings(["genome"]))
        features.create_dataset("feature_type", data=strings(types))
        features.create_dataset("genome", data=strings(["mm10"] * len(names)))
        features.create_dataset("id", data=ids)
        features.create_dataset("name", data=strings(names))
    return path


@pytest.mark.parametrize("version", [3, 2])
def test_load_cellranger_h5(tmp_path, version):
    x, _ = toy()
    genes, cells = [f"Gene{j}" for j in range(x.shape[1])], _barcodes(len(x))
    ds = formats.load(_write_cellranger(tmp_path / "filtered.h5", x, genes, cells, version))
    _assert_same_as_xy(ds, tmp_path, x, genes=genes, cells=cells)
    assert ds.notes == [] and ds.name == "filtered"


def test_load_cellranger_h5_keeps_gene_expression_and_counts_the_rest(tmp_path):
    x, _ = toy()
    genes, cells = [f"Gene{j}" for j in range(x.shape[1])], _barcodes(len(x))
    other = [("CD3_TotalSeqB", "Antibody Capture", np.arange(30)),
             ("CD4_TotalSeqB", "Antibody Capture", np.arange(30) % 7),
             ("sgRNA1", "CRISPR Guide Capture", np.ones(30, int))]
    ds = formats.load(_write_cellranger(tmp_path / "multi.h5", x, genes, cells, other=other))
    _assert_same_as_xy(ds, tmp_path, x, genes=genes, cells=cells)
    assert ds.notes == [f"{tmp_path / 'multi.h5'}: kept the 12 Gene Expression features; set aside "
                        "2 Antibody Capture, 1 CRISPR Guide Capture"]


def _normalised(x):
    """What X holds after scanpy's normalize_total (to 10,000) and log1p."""
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)


def _write_processed_h5ad(path, x, labels, counts_in="layers", more_genes=None):
    """An .h5ad saved after normalize_total and log1p: X normalised; the raw counts x kept in
    layers["counts"] (scvi-tools' convention) or in .raw (raw/X, raw/var), where raw can hold
    more genes than X (more_genes: their counts, the columns after x's)."""
    write_h5ad(path, _normalised(x), labels)
    with h5py.File(path, "r+") as f:
        layers = f.require_group("layers")
        layers.attrs["encoding-type"], layers.attrs["encoding-version"] = "dict", "0.1.0"
        write_anndata_matrix(layers, "lognorm", _normalised(x))
        if counts_in == "layers":
            write_anndata_matrix(layers, "counts", x)
            return path
        raw_x = x if more_genes is None else np.hstack([x, more_genes])
        raw = f.create_group("raw")
        raw.attrs["encoding-type"], raw.attrs["encoding-version"] = "raw", "0.1.0"
        write_anndata_matrix(raw, "X", raw_x)
        var = raw.create_group("var")
        var.attrs["_index"], var.attrs["encoding-type"] = "_index", "dataframe"
        var.create_dataset("_index", data=strings([f"g{j}" for j in range(raw_x.shape[1])]))
    return path


def test_load_h5ad_finds_the_counts_in_layers_counts(tmp_path):
    x, labels = toy()
    path = _write_processed_h5ad(tmp_path / "processed.h5ad", x, labels)
    genes, cells = [f"g{j}" for j in range(12)], [f"c{i}" for i in range(30)]
    ds = formats.load(path)
    _assert_same_as_xy(ds, tmp_path, x, labels, genes, cells)
    fractions = np.count_nonzero(_normalised(x) % 1)
    assert ds.notes == [f"{path}: {fractions} non-integer counts in X (raw counts expected, not "
                        "normalised or log data); read the raw counts in layers/counts"]
    named = formats.load(path, layer="counts")
    _assert_same_as_xy(named, tmp_path, x, labels, genes, cells)
    assert named.notes == []


def test_load_h5ad_layer_raw_reads_raw_x_and_its_genes(tmp_path):
    x, labels = toy()
    extra = np.arange(60).reshape(30, 2) % 4  # raw keeps two genes that X left out
    path = _write_processed_h5ad(tmp_path / "processed.h5ad", x, labels, "raw", extra)
    ds = formats.load(path, layer="raw")
    _assert_same_as_xy(ds, tmp_path, np.hstack([x, extra]), labels, [f"g{j}" for j in range(14)],
                       [f"c{i}" for i in range(30)])
    assert ds.counts.shape == (30, 14) and ds.notes == []


def _write_loom(path, x, genes, cells, labels=None, layers=None):
    """Counts (cells x genes) as loompy 3 writes a .loom file: matrix genes x cells (gzip, chunks
    of at most 64 x 64), attrs/LOOM_SPEC_VERSION, row_attrs (Gene, Accession), col_attrs (CellID,
    ClusterName), layers, col_graphs, row_graphs; strings variable-length UTF-8."""
    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.create_group("attrs").create_dataset("LOOM_SPEC_VERSION", data="3.0.0", dtype=text)
        chunks = (min(64, x.shape[1]), min(64, x.shape[0]))
        f.create_dataset("matrix", data=x.T.astype(np.float32), chunks=chunks, compression="gzip")
        group = f.create_group("layers")
        for name, values in (layers or {}).items():
            group.create_dataset(name, data=values.T, chunks=chunks, compression="gzip")
        rows, cols = f.create_group("row_attrs"), f.create_group("col_attrs")
        rows.create_dataset("Gene", data=np.array(genes, dtype=object), dtype=text)
        rows.create_dataset("Accession", data=np.array([f"ENSG{j:011d}" for j in range(len(genes))],
                                                       dtype=object), dtype=text)
        cols.create_dataset("CellID", data=np.array(cells, dtype=object), dtype=text)
        if labels is not None:
            cols.create_dataset("ClusterName", data=np.array(labels, dtype=object), dtype=text)
        cols.create_dataset("Clusters", data=np.unique(labels, return_inverse=True)[1]
                            if labels is not None else np.zeros(len(cells), int))
        f.create_group("col_graphs")
        f.create_group("row_graphs")
    return path


def test_load_loom(tmp_path):
    x, labels = toy()
    genes, cells = [f"Gene{j}" for j in range(12)], _barcodes(30)
    path = _write_loom(tmp_path / "toy.loom", x, genes, cells, labels)
    ds = formats.load(path)
    _assert_same_as_xy(ds, tmp_path, x, labels, genes, cells)
    assert ds.notes == [] and ds.name == "toy"
    clusters = formats.load(path, label_key="Clusters")
    codes = np.unique(labels, return_inverse=True)[1]
    np.testing.assert_array_equal(clusters.label_names[clusters.labels], codes.astype(str))


def test_load_loom_reads_a_layer_only_when_asked(tmp_path):
    x, labels = toy()
    genes, cells = [f"Gene{j}" for j in range(12)], _barcodes(30)
    spliced = x // 2
    path = _write_loom(tmp_path / "velocyto.loom", x, genes, cells, labels, {"spliced": spliced})
    _assert_same_as_xy(formats.load(path), tmp_path, x, labels, genes, cells)
    _assert_same_as_xy(formats.load(path, layer="spliced"), tmp_path, spliced, labels, genes, cells)


# ---------------------------------------------------------------- which way a table lies


def _write_r_csv(path, table, row_names, col_names):
    """A table as R's write.csv writes a matrix: quoted names, an empty corner cell."""
    lines = [",".join(f'"{name}"' for name in ["", *col_names])]
    lines += [",".join([f'"{name}"', *map(str, row)]) for name, row in zip(row_names, table)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _synthetic_counts(n_cells=240, n_genes=120):
    """Counts whose genes differ in how often they are detected, as real genes do."""
    data = datasets.synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, seed=2)
    return np.asarray(data.counts), data.label_names[data.labels]


ORIENTATION_EVIDENCE = [  # (counts, gene names, cell names, what the note gives as the reason)
    (toy()[0], [f"ENSMUSG{j:011d}" for j in range(12)], [f"cell{i}" for i in range(30)],
     "names look like gene ids or mitochondrial genes"),
    (toy()[0], ["Actb", "MT-CO1", "mt-Nd4l", *[f"Gm{j}" for j in range(9)]],
     [f"cell{i}" for i in range(30)], "names look like gene ids or mitochondrial genes"),
    (toy()[0], [f"Gene{j}" for j in range(12)], _barcodes(30), "names look like cell barcodes"),
    (_synthetic_counts()[0], [f"r{j}" for j in range(120)], [f"c{i}" for i in range(240)],
     "times wider, as genes' do"),
]


@pytest.mark.parametrize("x, genes, cells, reason", ORIENTATION_EVIDENCE,
                         ids=["ensembl", "mitochondrial", "barcodes", "detection"])
def test_load_tells_which_way_a_table_lies_and_says_so(tmp_path, x, genes, cells, reason):
    from_r = formats.load(_write_r_csv(tmp_path / "from_r.csv", x.T, genes, cells))  # genes x cells
    _assert_same_as_xy(from_r, tmp_path, x, genes=genes, cells=cells)
    [note] = from_r.notes
    assert note.startswith(f"{tmp_path / 'from_r.csv'}: read the rows of the table as genes and "
                           "its columns as cells (")
    assert reason in note and note.endswith("; --no-transpose reads them the other way")
    as_is = formats.load(_write_r_csv(tmp_path / "cells.csv", x, cells, genes))  # cells x genes
    _assert_same_as_xy(as_is, tmp_path, x, genes=genes, cells=cells)
    [note] = as_is.notes
    assert "read the rows of the table as cells and its columns as genes" in note and reason in note
    assert note.endswith("; --transpose reads them the other way")


def test_load_transpose_says_which_way_a_table_lies(tmp_path):
    x, _ = toy()
    genes, cells = [f"g{j}" for j in range(12)], [f"c{i}" for i in range(30)]
    path = _write_r_csv(tmp_path / "toy.csv", x, cells, genes)
    [note] = formats.load(path).notes  # Poisson counts, plain names: nothing tells the axes apart
    assert "as cells and its columns as genes (nothing tells its axes apart" in note
    _assert_same_as_xy(formats.load(path, transpose=False), tmp_path, x, genes=genes, cells=cells)
    flipped = formats.load(path, transpose=True)
    _assert_same_as_xy(flipped, tmp_path, x.T, genes=cells, cells=genes)
    assert flipped.notes == [] and formats.load(path, transpose=False).notes == []
    counts, _ = _synthetic_counts()
    # no labels, no names: the counts decide
    path = write_arrays(tmp_path / "genes_by_cells.h5", X=counts.T)
    ds = formats.load(path)
    assert ds.counts.shape == (240, 120) and "read the rows of X as genes" in ds.notes[0]
    assert formats.load(path, transpose=False).counts.shape == (120, 240)


# ---------------------------------------------------------------- label files


def _write_label_file(path, names, labels, header=("barcode", "cell_type")):
    """A label file as a spreadsheet or R's write.table leaves it: (cell name, label) rows, a
    header or none, comma- or tab-separated by its suffix, gzipped when it ends in .gz."""
    sep = "," if ".csv" in path.name else "\t"
    rows = ([list(header)] if header else []) + [[n, y] for n, y in zip(names, labels)]
    text = "".join(sep.join(row) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


@pytest.mark.parametrize("name, header", [("annotation.csv", ("barcode", "cell_type")),
                                          ("annotation.tsv.gz", None),
                                          ("annotation.txt", ("", "type"))])
def test_load_label_file_matches_cells_by_name(tmp_path, name, header):
    x, labels = toy()
    genes, cells = [f"Gene{j}" for j in range(12)], _barcodes(30)
    path = _write_cellranger(tmp_path / "filtered.h5", x, genes, cells)
    listed = ~MISSING  # the MISSING cells have no row; two rows name cells that are not in the file
    names = np.concatenate([cells[listed][::-1], ["TTTTTTTTTTTTTTTT-1", "GGGGGGGGGGGGGGGG-1"]])
    values = np.concatenate([labels[listed][::-1], ["beta", "alpha"]])
    values[0] = "NA"  # cell 28: a label written as missing
    table = _write_label_file(tmp_path / name, names, values, header)
    ds = formats.load(path, labels=table)
    expected = np.where(listed, labels, "")
    expected[28] = ""
    _assert_same_as_xy(ds, tmp_path, x, expected, genes, cells)
    assert np.count_nonzero(ds.labels == -1) == 6
    assert ds.notes == [f"{table}: labels for 25 of 30 cells; 2 of its 27 names match no cell "
                        "(e.g. 'TTTTTTTTTTTTTTTT-1')"]


def test_label_file_replaces_the_files_labels_and_label_key_picks_its_column(tmp_path):
    x, labels = toy()
    path = tmp_path / "toy.h5ad"
    write_h5ad(path, x, labels)
    batch = np.array(["b1", "b2"])[np.arange(30) % 2]
    table = tmp_path / "obs.csv"  # what adata.obs.to_csv() writes: the index, then every column
    table.write_text(",n_genes,batch,cell_type\n" + "".join(
        f"c{i},{100 + i},{batch[i]},{labels[i]}\n" for i in range(30)))
    ds = formats.load(path, labels=table, label_key="batch")
    np.testing.assert_array_equal(ds.label_names[ds.labels], batch)
    assert ds.notes == [f"{table}: labels for 30 of 30 cells (not the file's own)"]
    with pytest.raises(ValueError,
                       match=r"obs\.csv: 4 columns \(, n_genes, batch, cell_type, \.\.\.\)"):
        formats.load(path, labels=table)


def test_label_file_tells_which_way_a_table_lies(tmp_path):
    x, labels = toy()  # plain names, Poisson counts: only the label file can tell the axes apart
    genes, cells = [f"g{j}" for j in range(12)], [f"c{i}" for i in range(30)]
    table = _write_label_file(tmp_path / "labels.csv", cells, labels)
    from_r = formats.load(_write_r_csv(tmp_path / "from_r.csv", x.T, genes, cells), labels=table)
    _assert_same_as_xy(from_r, tmp_path, x, labels, genes, cells)
    assert from_r.notes == [f"{tmp_path / 'from_r.csv'}: transposed the table to 30 cells x 12 "
                            "genes: the label file names its columns",
                            f"{table}: labels for 30 of 30 cells"]
    as_is = formats.load(_write_r_csv(tmp_path / "cells.csv", x, cells, genes), labels=table)
    _assert_same_as_xy(as_is, tmp_path, x, labels, genes, cells)
    assert as_is.notes == [f"{table}: labels for 30 of 30 cells"]


# ---------------------------------------------------------------- cells without a label


MISSING = np.isin(np.arange(30), [0, 4, 5, 17, 29])  # toy cells without a label


def _with_missing_labels(path, how):
    """The toy counts with labels missing for the MISSING cells, stored as `how` says."""
    x, labels = toy()
    classes, codes = np.unique(labels, return_inverse=True)
    if how == "categorical code -1":  # how anndata stores NaN in a categorical column
        write_h5ad(path, x, labels)
        with h5py.File(path, "r+") as f:
            f["obs/cell_type/codes"][...] = np.where(MISSING, -1, codes)
    elif how == "empty and NA strings":
        y = labels.astype(object)
        y[MISSING] = ["", "NA", "nan", " NaN ", "n/a"]
        write_arrays(path, X=x, Y=strings(y))
    elif how == "negative integers":
        write_arrays(path, X=x, Y=np.where(MISSING, -1 - np.arange(30) % 2, codes),
               cell_types=strings(classes))
    else:  # NaN in a float column of codes
        write_arrays(path, X=x, Y=np.where(MISSING, np.nan, codes), cell_types=strings(classes))


@pytest.mark.slow
def test_reproduce_k_counts_the_label_classes_not_the_missing_labels(tmp_path):
    _with_missing_labels(tmp_path / "toy.h5", "empty and NA strings")
    [(stem, _, k, _)] = reproduce.labelled_files(tmp_path)
    assert (stem, k) == ("toy", 3)


@pytest.mark.parametrize("how", ["categorical code -1", "empty and NA strings", "negative integers",
                                 "NaN codes"])
def test_load_keeps_cells_without_a_label_as_minus_1(tmp_path, how):
    path = tmp_path / ("toy.h5ad" if how.startswith("categorical") else "toy.h5")
    _with_missing_labels(path, how)
    ds = formats.load(path)
    _, labels = toy()
    assert ds.counts.shape == (30, 12) and list(ds.label_names) == ["alpha", "beta", "delta"]
    np.testing.assert_array_equal(ds.labels == -1, MISSING)
    np.testing.assert_array_equal(ds.label_names[ds.labels[~MISSING]], labels[~MISSING])


def test_a_file_whose_labels_are_all_missing_is_unlabelled(tmp_path):
    x, _ = toy()
    ds = formats.load(write_arrays(tmp_path / "toy.h5", X=x, Y=strings(["NA"] * 30)))
    assert ds.labels is None and ds.label_names is None


# ---------------------------------------------------------------- bad files and bad counts
# Every bad file ends in one line (a ValueError from load; on the command line, one line on
# stderr, exit code 2 and nothing written: refused; two of them as subprocesses, to see that
# no traceback gets out).


def test_bad_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.h5: no such file"):
        formats.load(tmp_path / "nothing.h5")


def test_bad_unknown_layout(tmp_path):
    (tmp_path / "counts.xlsx").write_text("not a matrix")
    with pytest.raises(ValueError, match=r"counts\.xlsx: unknown layout"):
        formats.load(tmp_path / "counts.xlsx")
    path = write_arrays(tmp_path / "other.h5", matrix=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"other\.h5: unknown HDF5 layout"):
        formats.load(path)


@pytest.mark.parametrize("value, message", [(-1.0, "2 negative counts in X"),
                                            (np.nan, "2 non-finite counts"),
                                            (0.5, "2 non-integer counts in X")])
def test_bad_counts(tmp_path, value, message):
    x, _ = toy()
    x = x.astype(np.float64)
    x[3, 4] = x[7, 1] = value
    path = write_arrays(tmp_path / "bad.h5", X=x)
    with pytest.raises(ValueError, match=rf"bad\.h5: {message}") as err:
        formats.load(path)
    assert "\n" not in str(err.value)


def test_bad_inconsistent_csr_group(tmp_path):
    x, _ = toy()
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        _write_csr_group(f.create_group("X"), x)
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=sp.csr_matrix(x).indptr[:-3])
    message = r"bad\.h5: inconsistent CSR group X: indptr has 28 entries for 30 rows"
    with pytest.raises(ValueError, match=message):
        formats.load(path)


def test_bad_label_count(tmp_path):
    x, labels = toy()
    path = write_arrays(tmp_path / "bad.h5", X=x, Y=strings(labels[:-1]))
    with pytest.raises(ValueError, match=r"bad\.h5: 29 labels for 30 cells"):
        formats.load(path)


def test_bad_non_numeric_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(",g0,g1\nc0,1,2\nc1,3,abc\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: non-numeric count 'abc'"):
        formats.load(path)


def _half(data):
    """The first half of a file's bytes: a download that stopped early."""
    return data[:len(data) // 2]


def _zeroed_chunk(path):
    """An HDF5 file whose second compressed chunk of X is overwritten with zeros."""
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=toy()[0], chunks=(10, 12), compression="gzip")
        chunk = f["X"].id.get_chunk_info(1)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset:chunk.byte_offset + chunk.size] = bytes(chunk.size)
    path.write_bytes(bytes(data))


def _float_indices(path):
    m = sp.csr_matrix(toy()[0])
    with h5py.File(path, "w") as f:
        _write_csr_group(f.create_group("X"), m)
        del f["X/indices"]
        f["X/indices"] = m.indices + 0.5


def _tenx(folder, broken):
    """A 10x folder of the toy counts whose matrix.mtx.gz is cut short or whose barcodes file
    is a folder."""
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(toy()[0].T))
    matrix = gzip.compress((folder / "matrix.mtx").read_bytes())
    (folder / "matrix.mtx").unlink()
    (folder / "matrix.mtx.gz").write_bytes(_half(matrix) if broken == "matrix" else matrix)
    if broken == "barcodes":
        (folder / "barcodes.tsv.gz").mkdir()


UNREADABLE = [  # (file, how to write it, what its one line says)
    ("cut.h5", lambda p: p.write_bytes(_half(write_arrays(p, X=toy()[0]).read_bytes())),
     r"cut\.h5: truncated: [\d,]+ of its [\d,]+ bytes"),
    ("zeroed.h5", _zeroed_chunk, r"zeroed\.h5: cannot be read \(.*read data"),
    ("text.h5", lambda p: p.write_text(toy_csv()), r"text\.h5: not an HDF5 file"),
    ("folder.h5", lambda p: p.mkdir(), r"folder\.h5: a folder where a file is expected"),
    ("strings.h5", lambda p: write_arrays(p, X=strings([["1", "2"], ["3", "4"]])),
     r"strings\.h5: X holds non-numeric values"),
    ("compound.h5",
     lambda p: write_arrays(p, X=toy()[0], Y=np.zeros(30, dtype=[("a", "i8"), ("b", "f8")])),
     r"compound\.h5: /Y is not an array of numbers or strings"),
    ("float_indices.h5", _float_indices,
     r"float_indices\.h5: group X: indices and indptr must be integers"),
    ("empty.csv", lambda p: p.write_text(""), r"empty\.csv: empty file"),
    ("header.csv", lambda p: p.write_text("cell,g0,g1\n"), r"header\.csv: no data rows"),
    ("latin1.csv", lambda p: p.write_bytes("cell,gène\nc0,1\n".encode("latin-1")),
     r"latin1\.csv: holds text that is not UTF-8 \(byte 0xe8\)"),
    ("cut.csv.gz", lambda p: p.write_bytes(_half(gzip.compress(toy_csv().encode()))),
     r"cut\.csv\.gz: the compressed stream ends early"),
    ("bad_crc.csv.gz", lambda p: p.write_bytes(gzip.compress(toy_csv().encode())[:-8] + bytes(8)),
     r"bad_crc\.csv\.gz: not a valid gzip file \(CRC check failed"),
    ("plain.csv.gz", lambda p: p.write_text(toy_csv()), r"plain\.csv\.gz: not a valid gzip file"),
    ("cut_10x", lambda p: _tenx(p, "matrix"), r"matrix\.mtx\.gz: the compressed stream ends early"),
    ("folder_10x", lambda p: _tenx(p, "barcodes"),
     r"barcodes\.tsv\.gz: a folder where a file is expected"),
]


@pytest.mark.parametrize("name, write, message", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_file_is_one_line(capsys, tmp_path, name, write, message):
    write(tmp_path / name)
    assert re.search(message, refused(capsys, tmp_path, tmp_path / name, "--clusters", "3"))
    with pytest.raises(ValueError, match=message):  # the same line from the Python API
        formats.load(tmp_path / name)


def _cellranger_toy(path, change=None):
    """The toy counts as a Cell Ranger v3 file, then change(file) applied to it."""
    x, _ = toy()
    _write_cellranger(path, x, [f"Gene{j}" for j in range(12)], _barcodes(30))
    if change:
        with h5py.File(path, "r+") as f:
            change(f)


def _only_antibodies(f):
    del f["matrix/features/feature_type"]
    f["matrix/features/feature_type"] = strings(["Antibody Capture"] * 12)


LABELS = ["--labels", "labels.csv"]


def _with_labels(path, text):
    """The toy counts as a Cell Ranger file, and labels.csv beside it holding text."""
    _cellranger_toy(path)
    (path.parent / "labels.csv").write_text(text)


def _drop(path, key):
    """Delete the object key from the HDF5 file path."""
    with h5py.File(path, "r+") as f:
        del f[key]


BAD_LAYOUTS = [  # (file, how to write it, flags, load() keywords, what its one line says)
    ("cut_cellranger.h5", lambda p: (_cellranger_toy(p), p.write_bytes(_half(p.read_bytes()))),
     [], {}, r"cut_cellranger\.h5: truncated"),
    ("antibodies.h5", lambda p: _cellranger_toy(p, _only_antibodies), [], {},
     r"antibodies\.h5: no Gene Expression features \(it holds 12 Antibody Capture\)"),
    ("no_barcodes.h5", lambda p: _cellranger_toy(p, lambda f: f["matrix"].pop("barcodes")), [], {},
     r"no_barcodes\.h5: /matrix/barcodes is missing"),
    ("no_names.h5", lambda p: _cellranger_toy(p, lambda f: f["matrix"].pop("features/name")),
     [], {}, r"no_names\.h5: /matrix/features/name is missing"),
    ("spliced.h5ad", lambda p: _write_processed_h5ad(p, *toy()), ["--layer", "spliced"],
     dict(layer="spliced"), r"spliced\.h5ad: no layer 'spliced' \(it has counts, lognorm\)"),
    ("in_raw.h5ad", lambda p: _write_processed_h5ad(p, *toy(), counts_in="raw"), [], {},
     r"in_raw\.h5ad: \d+ non-integer counts in X \(raw counts expected, not normalised or log "
     r"data\); --layer NAME reads the raw counts from one of its layers \(lognorm, raw\)"),
    ("lognorm.h5ad", lambda p: _write_processed_h5ad(p, *toy()), ["--layer", "lognorm"],
     dict(layer="lognorm"), r"lognorm\.h5ad: \d+ non-integer counts in layers/lognorm"),
    ("no_matrix.loom",
     lambda p: _drop(_write_loom(p, toy()[0], [f"g{j}" for j in range(12)], _barcodes(30)),
                     "matrix"),
     [], {}, r"no_matrix\.loom: /matrix is missing"),
    ("xy_layer.h5", lambda p: write_arrays(p, X=toy()[0]), ["--layer", "counts"],
     dict(layer="counts"),
     r"xy_layer\.h5: a layer \(counts\) is for AnnData and loom files"),
    ("layer.csv", lambda p: p.write_text(toy_csv()), ["--layer", "counts"], dict(layer="counts"),
     r"layer\.csv: a layer \(counts\) is for AnnData and loom files"),
    ("fixed.h5ad", lambda p: write_h5ad(p, *toy()), ["--transpose"], dict(transpose=True),
     r"fixed\.h5ad: transpose is for CSV/TSV tables and X/Y or exprs matrices"),
    ("one_column.h5", lambda p: _with_labels(p, "c0\nc1\n"), LABELS, dict(labels="labels.csv"),
     r"labels\.csv: one column; a label file has two, cell name and label"),
    ("three_columns.h5", lambda p: _with_labels(p, "cell,type,batch\nc0,a,1\n"), LABELS,
     dict(labels="labels.csv"),
     r"labels\.csv: 3 columns \(cell, type, batch, \.\.\.\); name the one"),
    ("unmatched.h5", lambda p: _with_labels(p, "cell,type\nc0,a\nc1,b\nc2,a\n"), LABELS,
     dict(labels="labels.csv"),
     r"labels\.csv: none of its 3 names is a cell of the count matrix \(its first: 'c0'; the first "
     r"cell: '[ACGT]{16}-1'\)"),
    ("nameless.h5",
     lambda p: (write_arrays(p, X=toy()[0]), (p.parent / "labels.csv").write_text("c0,a\n")),
     LABELS, dict(labels="labels.csv"), r"labels\.csv: the count matrix has no cell names"),
    ("unlabelled.h5", _cellranger_toy, ["--labels", "nothing.csv"], dict(labels="nothing.csv"),
     r"nothing\.csv: no such label file"),
]


@pytest.mark.parametrize("name, write, flags, keywords, message", BAD_LAYOUTS,
                         ids=[b[0] for b in BAD_LAYOUTS])
def test_bad_file_of_a_new_layout_is_one_line(capsys, tmp_path, monkeypatch, name, write, flags,
                                              keywords, message):
    monkeypatch.chdir(tmp_path)  # label files are named relative to it
    write(tmp_path / name)
    assert re.search(message, refused(capsys, tmp_path, tmp_path / name, "--clusters", "3",
                                       *flags))
    with pytest.raises(ValueError, match=message):
        formats.load(tmp_path / name, **keywords)


def test_file_without_read_permission_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "locked.csv").write_text(toy_csv())

    def refuse(path):  # what open() raises for a file we may not read (root may read any file)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(formats, "_open_text", refuse)
    err = refused(capsys, tmp_path, tmp_path / "locked.csv", "--clusters", "3")
    assert "locked.csv: permission denied" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cut.h5", "cut.csv.gz"])
def test_unreadable_file_in_a_subprocess_has_no_traceback(tmp_path, name):
    write = next(w for n, w, _ in UNREADABLE if n == name)
    write(tmp_path / name)
    run = run_cli(name, "--clusters", "3", cwd=tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and name in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.slow
def test_reproduce_refuses_a_broken_file_of_the_folder_in_one_line(capsys, tmp_path):
    x, labels = toy()
    write_arrays(tmp_path / "a.h5", X=x, Y=strings(labels))
    (tmp_path / "b.h5").write_bytes(_half((tmp_path / "a.h5").read_bytes()))
    assert reproduce.main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "b.h5: truncated" in err, err
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------- the real files of ../shared/data


def _manifest():
    """(file, cells, genes, types, cells per label) for each file in the table of MANIFEST.md."""
    if not (DATA / "MANIFEST.md").exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{DATA} is absent"))]
    text = (DATA / "MANIFEST.md").read_text()
    sizes = {name: sorted(int(v) for v in counts.split(","))
             for name, counts in re.findall(r"^- (\S+): ([\d, ]+)", text, re.M)}
    rows = []
    for first, second, n, g, k in re.findall(
            r"^\| `([^`]+)`(?: / `([^`]+)`)? \| (\d+) \| (\d+) \| (\d+) \|", text, re.M):
        stem = first.split(".")[0]
        for name in [first] + ([stem + second] if second else []):
            rows.append(pytest.param((name, int(n), int(g), int(k), sizes.get(stem)), id=name))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("entry", _manifest())
def test_real_data_matches_manifest(entry):
    name, n, g, k, sizes = entry
    ds = formats.load(DATA / name)
    assert ds.counts.shape == (n, g) and sp.isspmatrix_csr(ds.counts)
    assert len(ds.label_names) == k and ds.labels.shape == (n,)
    assert sorted(np.bincount(ds.labels)) == sizes
    assert np.all(ds.counts.data > 0) and np.all(ds.counts.data == np.round(ds.counts.data))


@pytest.mark.slow
def test_real_h5ad_equals_h5():
    if not (DATA / "Baron_mouse.h5ad").exists():
        pytest.skip(f"{DATA} is absent")
    a, b = formats.load(DATA / "Baron_mouse.h5ad"), formats.load(DATA / "Baron_mouse.h5")
    assert a.counts.shape == (1886, 14878) and len(a.label_names) == 13
    assert (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.label_names[a.labels], b.label_names[b.labels])
    np.testing.assert_array_equal(a.gene_names, b.gene_names)


# ---------------------------------------------------------------- each layout on the command line


# write_h5ad's names
E2E_GENES, E2E_CELLS = [f"g{j}" for j in range(60)], [f"c{i}" for i in range(120)]


E2E_LAYOUTS = {  # name: (how to write the counts x and labels y into folder d -> file, its flags)
    "cellranger_v3": lambda d, x, y: (
        _write_cellranger(d / "filtered_feature_bc_matrix.h5", x, E2E_GENES, E2E_CELLS),
        ["--labels", _write_label_file(d / "annotation.csv", E2E_CELLS, y)]),
    "cellranger_v2": lambda d, x, y: (
        _write_cellranger(d / "filtered_gene_bc_matrices_h5.h5", x, E2E_GENES, E2E_CELLS, 2),
        ["--labels", _write_label_file(d / "annotation.tsv.gz", E2E_CELLS, y, None)]),
    "h5ad_layers_counts": lambda d, x, y: (_write_processed_h5ad(d / "processed.h5ad", x, y), []),
    "h5ad_raw": lambda d, x, y: (_write_processed_h5ad(d / "processed.h5ad", x, y, "raw"),
                                 ["--layer", "raw"]),
    "loom": lambda d, x, y: (_write_loom(d / "toy.loom", x, E2E_GENES, E2E_CELLS, y), []),
    "r_csv": lambda d, x, y: (_write_r_csv(d / "counts.csv", x.T, E2E_GENES, E2E_CELLS),
                              ["--labels", _write_label_file(d / "annotation.csv", E2E_CELLS, y)]),
    "r_csv_transpose": lambda d, x, y: (_write_r_csv(d / "counts.csv", x.T, E2E_GENES, E2E_CELLS),
                                        ["--transpose"]),
}


@pytest.mark.parametrize("layout", E2E_LAYOUTS)
def test_cli_clusters_a_new_layout_as_the_same_counts_written_as_x_and_y(tmp_path, capsys, layout):
    data = datasets.synthetic(n_cells=120, n_genes=60, n_clusters=3, seed=0)
    x, y = np.asarray(data.counts), data.label_names[data.labels]
    reference = _write_xy(tmp_path / "reference.h5", x, y, E2E_GENES, E2E_CELLS)
    (tmp_path / "layout").mkdir()
    path, flags = E2E_LAYOUTS[layout](tmp_path / "layout", x, y)
    runs = {}
    for name, args in (("reference", [reference]), (layout, [path, *flags])):
        assert sctcm.main([*map(str, args), "--clusters", "3", "--seed", "1",
                           "--out", str(tmp_path / name), *QUICK.split()]) == 0
        runs[name] = ((tmp_path / name / "labels.csv").read_text(),
                      json.loads((tmp_path / name / "summary.json").read_text())["metrics"])
    # the same cells, named the same, in the same clusters
    assert runs[layout][0] == runs["reference"][0]
    if layout != "r_csv_transpose":  # labelled: the same scores
        assert runs[layout][1] == runs["reference"][1]


# ---------------------------------------------------------------- writing a count matrix

@pytest.mark.parametrize("sparse", [False, True])
def test_write_xy_gives_back_the_counts_labels_and_genes(tmp_path, sparse):
    """formats.write_xy (the many-cells command): X a CSR group when the counts are sparse,
    dense otherwise; load reads the same counts, labels, their names and the genes."""
    data = datasets.synthetic(n_cells=90, n_genes=30, seed=2, chunk=40 if sparse else None)
    formats.write_xy(tmp_path / "s.h5", data)
    with h5py.File(tmp_path / "s.h5") as f:
        assert isinstance(f["X"], h5py.Group) is sparse
    back = formats.load(tmp_path / "s.h5")
    counts = data.counts.toarray() if sparse else data.counts
    assert np.array_equal(back.counts.toarray(), counts)
    assert np.array_equal(back.labels, data.labels)
    assert list(back.label_names) == list(data.label_names)
    assert list(back.gene_names) == list(data.gene_names)
