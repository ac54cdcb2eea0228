"""File formats: read a count matrix and its labels from any of seven layouts into a
datasets.Dataset (load), and write a run's output folder. Nothing here knows about the model or
changes a count: preprocessing, the kNN graph and the demo data are datasets.py's.

    file -> load() -> datasets.Dataset -> datasets.preprocess() -> ... -> training.fit
    training.fit's labels, codes and history -> write_run() -> publish() -> the output folder

load() reads seven layouts, one reader each, in this order:
  X/Y (_read_xy): HDF5 with X (counts, dense or a CSR group data, indices, indptr, shape) and Y
      (labels; the names of integer codes in cell_types, gene names in genes): the
      scDeepCluster / scDCC files;
  exprs (_read_exprs): HDF5 with exprs (dense or a CSR group), obs/cell_type1, obs_names,
      var_names: the files of the scTCM paper (scziDesk's layout);
  AnnData .h5ad (_read_h5ad): X dense or a CSR/CSC group (encoding-type csr_matrix /
      csc_matrix, shape attribute), labels from an obs column, names from the _index of obs and
      var. The raw counts may sit elsewhere: layers/NAME (a matrix of X's shape), or raw/X with
      raw/var's names (raw/X may hold more genes than X); without a layer asked for, X when it
      holds counts, else layers/counts when that does (in a note);
  Cell Ranger .h5 (_read_cellranger): the HDF5 feature-barcode matrix
      (filtered_feature_bc_matrix.h5), strings as fixed-length bytes. v3 and later: group
      matrix with data, indices, indptr, shape = (genes, cells) (stored by cell: indptr has
      cells + 1 entries, indices are gene rows), barcodes (cell names), features/name (gene
      names) and features/feature_type: only "Gene Expression" rows are kept (Antibody Capture,
      CRISPR Guide Capture, ... are counted in a note); features/id and genome are not read.
      v2 (filtered_gene_bc_matrices_h5.h5): one group per genome (/mm10) with the same matrix
      datasets, barcodes, genes (ids, not read) and gene_names;
  loom (_read_loom; loom 3 spec, .loom): matrix, genes x cells, dense (chunked, gzip: read in
      blocks), or layers/NAME of its shape when asked for; row_attrs/Gene (else Accession) gene
      names, col_attrs/CellID cell names, labels from a col_attrs column (LOOM_LABEL_KEYS);
      attrs/LOOM_SPEC_VERSION, col_graphs and row_graphs are not read;
  10x folder (_read_10x): matrix.mtx[.gz] (genes x cells), barcodes.tsv[.gz],
      features.tsv[.gz] or genes.tsv; the folder, or the .mtx file in it;
  CSV/TSV table (_read_table; .csv, .tsv, .txt, .gz too): a header of names, then one row per
      cell (or per gene, as R's write.csv writes), its name first.
AnnData, Cell Ranger, loom and 10x fix which axis holds the cells. X/Y and exprs matrices and
CSV/TSV tables may lie either way (R writes genes x cells): --transpose says which; else labels
or names whose number matches one axis decide, else what can be seen (_guess_orientation), and
a note says which way the file was read. A label file (CSV/TSV of cell name, label; any layout)
replaces a file's labels, matched by cell name. Every bad file or bad content is refused in one
line (a ValueError that names the file).

Sections: load; the readers, one per layout, in the order above; their HDF5 and text pieces;
which way a matrix lies; label files; a run's output folder.

References (the layouts as their tools write them): anndata's on-disk format (>= 0.8, and the
__categories of older versions); 10x Genomics, Cell Ranger's feature-barcode matrix HDF5 (v2,
v3+) and MEX folders; the loom file format specification, version 3 (loompy); NIST Matrix
Market exchange format; R's write.csv.
"""
import csv
import gzip
import json
import os
import re
import resource
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

import datasets

LABEL_KEYS = ("cell_type", "celltype", "cell_type1", "CellType", "cell_types", "labels", "label")
LOOM_LABEL_KEYS = LABEL_KEYS + ("ClusterName",)  # + loompy's (Linnarsson lab atlases')
BLOCK_ENTRIES = 1 << 22  # a dense matrix is read this many entries at a time and kept as CSR
FILE_SUFFIXES = (".h5", ".h5ad", ".hdf5", ".loom", ".mtx", ".csv", ".tsv", ".txt", ".gz")
READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)  # what reading a bad file raises


@dataclass
class _Parts:
    """What a reader found in a file, before load orients, checks and encodes it.

    axes says which way x lies: "fixed", the layout says which axis holds the cells and the
    reader made x cells x genes (AnnData, Cell Ranger, loom, 10x); "matrix", an X/Y or exprs
    matrix that may lie either way, whose genes and cells name what they say; "table", a
    CSV/TSV table that may lie either way, whose genes and cells are its column and row names
    as stored."""
    x: sp.csr_matrix                    # the counts
    what: str                           # their name in messages: X, exprs, matrix, ...
    axes: str                           # "fixed", "matrix" or "table"
    labels: np.ndarray | None = None    # raw label values (codes or strings), one per cell
    names: np.ndarray | None = None     # the names of integer label codes
    genes: np.ndarray | None = None     # gene names
    cells: np.ndarray | None = None     # cell names
    notes: list[str] = field(default_factory=list)  # one-line remarks of the reader


# ---------------------------------------------------------------- load


def load(path, label_key=None, layer=None, transpose=None, labels=None):
    """Read a count matrix and its labels from any of the seven layouts -> datasets.Dataset
    (cells x genes).

    label_key: the obs column (h5ad, paper layout), col_attrs column (loom) or dataset (X/Y
    layout) holding the labels; by default Y, cell_type1, or the first of LABEL_KEYS (loom:
    LOOM_LABEL_KEYS) present. layer (AnnData, loom): where the raw counts are, a key of layers
    or "raw" (AnnData's raw/X); by default X (loom: matrix), or layers/counts when only that
    holds counts (see _pick_counts). Counts are checked (numeric, finite, non-negative, whole
    numbers: datasets.count_problem) and kept as CSR float32. transpose (CSV/TSV, X/Y, exprs):
    True, the file lies genes x cells; False, cells x genes; None: decided (_orient), and
    Dataset.notes says so in one line unless labels or names made it certain. labels: a label
    file (_read_label_file), matched to the cells by name, in place of the file's own labels;
    then label_key names its label column.
    Missing labels (see datasets.encode_labels) become -1. A file that cannot be read (empty,
    truncated, corrupt, not permitted, ...) raises a one-line ValueError naming it, as does any
    bad content."""
    path = Path(path)
    label_file = None if labels is None else Path(labels)
    parts = _read(path, label_key, layer, label_file)
    by_name = None if label_file is None else _read_label_file(label_file, label_key, parts)
    parts = _orient(path, parts, transpose, by_name)
    n, g = parts.x.shape  # cells x genes from here on: labels and names must fit it
    for kind, values, size in (("labels", parts.labels, n), ("cell names", parts.cells, n),
                               ("gene names", parts.genes, g)):
        if values is not None and len(values) != size:
            raise ValueError(f"{path}: {len(values)} {kind} for {n} cells x {g} genes in "
                             f"{parts.what}")
    if by_name is not None:
        parts = _labels_by_name(parts, by_name, label_file)
    problem = datasets.count_problem(parts.x.data, parts.what)
    if problem:
        raise ValueError(f"{path}: {problem}")
    parts.x.sum_duplicates()
    codes, label_names = datasets.encode_labels(parts.labels, parts.names)
    return datasets.Dataset(
        counts=parts.x.astype(np.float32),
        labels=codes,
        label_names=label_names,
        gene_names=datasets.names_or_numbered(parts.genes, "gene", g),
        cell_names=datasets.names_or_numbered(parts.cells, "cell", n),
        name=_stem(path),
        notes=parts.notes,
    )


def _read(path, label_key, layer, label_file):
    """The file at path, read by the reader of its layout -> _Parts. label_key is the file's
    label column unless there is a label_file (then it is that file's column, not read here).
    What needs no reading is refused first: a missing or empty file, a folder with a file's
    name, a label key or a layer for a layout without them, an unknown layout."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if path.is_dir() and path.name.lower().endswith(FILE_SUFFIXES):
        raise ValueError(f"{path}: a folder where a file is expected")
    hdf5 = path.is_file() and _is_hdf5(path)
    if label_key is not None and not hdf5 and label_file is None:
        raise ValueError(f"{path}: a label key ({label_key}) is for HDF5 files; this one has "
                         "no labels")
    if not hdf5:
        _refuse_layer(path, layer)
    if path.is_dir() or path.name.endswith((".mtx", ".mtx.gz")):
        return _read_10x(path)
    if hdf5:
        return _read_hdf5(path, label_key if label_file is None else None, layer)
    if path.suffix.lower() in (".h5", ".h5ad", ".hdf5", ".loom"):
        raise ValueError(f"{path}: not an HDF5 file (damaged, or another format under an HDF5 "
                         "name)")
    if path.name.lower().removesuffix(".gz").endswith((".csv", ".tsv", ".txt")):
        return _read_table(path)
    raise ValueError(f"{path}: unknown layout (expected .h5/.h5ad/.loom, a 10x folder, or "
                     ".csv/.tsv)")


def _refuse_layer(path, layer):
    """Refuse a layer asked of a file that has none: only AnnData and loom files have layers."""
    if layer is not None:
        raise ValueError(f"{path}: a layer ({layer}) is for AnnData and loom files; this one "
                         "has none")


def _stem(path):
    """The data set's short name: the folder of a 10x matrix, else the file name without
    suffixes."""
    if path.is_dir() or path.name.endswith((".mtx", ".mtx.gz")):
        return (path if path.is_dir() else path.parent).resolve().name
    return Path(path.name.removesuffix(".gz")).stem


@contextmanager
def _reading(path, errors=READ_ERRORS):
    """Re-raise an error of reading the file path as a one-line ValueError that names it."""
    try:
        yield
    except errors as err:
        raise ValueError(f"{path}: {_unreadable(err)}") from None


def _unreadable(err):
    """What is wrong with a file, in a few words, from the error that reading it raised."""
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, IsADirectoryError):
        return "a folder where a file is expected"
    if isinstance(err, EOFError):
        return "the compressed stream ends early (a truncated file?)"
    if isinstance(err, gzip.BadGzipFile):
        return f"not a valid gzip file ({err})"
    if isinstance(err, UnicodeDecodeError):
        return (f"holds text that is not UTF-8 (byte {err.object[err.start]:#04x}); save it as "
                "UTF-8")
    detail = getattr(err, "strerror", None) or str(err.args[0] if err.args else err)
    detail = detail.partition("\n")[0]
    size = re.search(r"truncated file: eof = (\d+), .*stored_eof = (\d+)", detail)
    if size:  # HDF5 knows its own length
        return (f"truncated: {int(size[1]):,} of its {int(size[2]):,} bytes "
                "(a download that stopped early?)")
    if isinstance(err, zlib.error):
        return f"corrupt compressed data ({detail})"
    return f"cannot be read ({detail})"


# ---------------------------------------------------------------- the readers, one per layout


def _is_hdf5(path):
    """Whether the file at path is HDF5 (its signature), whatever its name."""
    with _reading(path):
        return h5py.is_hdf5(path)


def _read_hdf5(path, label_key, layer):
    """An HDF5 file, read by the reader of its layout (_h5_reader). h5py reports damaged
    metadata as OSError, and some of it as RuntimeError or KeyError (an object whose header
    cannot be read)."""
    with _reading(path, READ_ERRORS + (RuntimeError, KeyError)), h5py.File(path, "r") as f:
        reader = _h5_reader(f, path)
        if reader in (_read_h5ad, _read_loom):
            return reader(f, path, label_key, layer)
        _refuse_layer(path, layer)
        return reader(f, path, label_key)


def _h5_reader(f, path):
    """Pick the reader of an open HDF5 file from its top-level keys."""
    if "exprs" in f:
        return _read_exprs
    if "obs" in f and ("X" in f or "layers" in f) and "Y" not in f:
        return _read_h5ad
    if "X" in f:
        return _read_xy
    if isinstance(f.get("row_attrs"), h5py.Group) or isinstance(f.get("col_attrs"), h5py.Group):
        return _read_loom
    genomes = len(f) and all(isinstance(g, h5py.Group) and "barcodes" in g and "genes" in g
                             for g in f.values())
    if isinstance(f.get("matrix"), h5py.Group) or genomes:  # Cell Ranger v3+, v2
        return _read_cellranger
    keys = ", ".join(list(f)[:8])
    raise ValueError(f"{path}: unknown HDF5 layout (keys: {keys}; expected X and Y, exprs, "
                     "AnnData, a Cell Ranger matrix or loom)")


def _read_xy(f, path, label_key):
    """X/Y: X counts, Y labels, optional cell_types (names of the label codes) and genes."""
    x = _read_matrix(f["X"], path, "X")
    key = label_key or "Y"
    if label_key and key not in f:
        raise ValueError(f"{path}: no dataset '{key}' for the labels")
    labels = _h5_strings(f[key], path, keep_numbers=True) if key in f else None
    names = _h5_strings(f["cell_types"], path) if "cell_types" in f else None
    genes = _first_names(f, ("genes", "gene_names", "var_names"), path)
    cells = _first_names(f, ("cells", "cell_names", "obs_names", "barcodes"), path)
    return _Parts(x, "X", "matrix", labels, names, genes, cells)


def _read_exprs(f, path, label_key):
    """exprs, the scTCM paper's files: exprs, obs/cell_type1, obs_names, var_names."""
    x = _read_matrix(f["exprs"], path, "exprs")
    labels, names = None, None
    if "obs" in f:
        labels, names = _obs_labels(f["obs"], path, label_key, ("cell_type1",) + LABEL_KEYS)
    genes = _first_names(f, ("var_names",), path)
    cells = _first_names(f, ("obs_names",), path)
    return _Parts(x, "exprs", "matrix", labels, names, genes, cells)


def _read_h5ad(f, path, label_key, layer):
    """AnnData .h5ad: X or a layer (_pick_counts), obs (index + columns), var (index = gene
    names; raw/var for raw/X, which may hold more genes than X)."""
    if not isinstance(f["obs"], h5py.Group):
        raise ValueError(f"{path}: obs is a compound table (anndata < 0.7); save the file again "
                         "with anndata")
    x, key, notes = _pick_counts(f, path, "X", layer, {"raw": "raw/X"})
    labels, names = _obs_labels(f["obs"], path, label_key, LABEL_KEYS)
    var = f.get("raw/var") if key == "raw/X" else f.get("var")
    return _Parts(x, key, "fixed", labels, names, _frame_index(var, path),
                  _frame_index(f["obs"], path), notes=notes)


def _pick_counts(f, path, main, layer, extra):
    """The raw counts of an AnnData or loom file, as stored -> (CSR x, its key, notes).

    layer: a key of the group layers, or of extra (AnnData: {"raw": "raw/X"}). Without one:
    main (X, matrix) when it holds raw counts; else layers/counts when that does (where
    scvi-tools keeps them), and a note says so; else a one-line error that lists the layers to
    choose from."""
    layers = list(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
    choices = layers + [name for name, key in extra.items() if key in f]
    if layer is not None:
        if layer not in choices:
            raise ValueError(f"{path}: no layer '{layer}' (it has {', '.join(choices) or 'none'})")
        key = extra.get(layer, f"layers/{layer}")
        return _read_matrix(f[key], path, key), key, []
    if main in f:
        x = _read_matrix(f[main], path, main)
        problem = datasets.count_problem(x.data, main)
        if problem is None:
            return x, main, []
        del x  # before the counts layer is read: the two may not fit in memory together
    else:
        problem = f"no {main}"
    if "counts" in layers:
        x = _read_matrix(f["layers/counts"], path, "layers/counts")
        if datasets.count_problem(x.data, "layers/counts") is None:
            return x, "layers/counts", [f"{path}: {problem}; read the raw counts in layers/counts"]
    raise ValueError(f"{path}: {problem}; --layer NAME reads the raw counts from one of its "
                     f"layers ({', '.join(choices) or 'it has none'})")


def _read_cellranger(f, path, label_key):
    """Cell Ranger .h5, the HDF5 feature-barcode matrix: the Gene Expression features of every
    cell (barcode). It holds no labels (they come from a label file)."""
    if label_key is not None:
        raise ValueError(f"{path}: a Cell Ranger matrix holds no labels ({label_key}); give them "
                         "in a label file")
    if isinstance(f.get("matrix"), h5py.Group):
        x, genes, cells, notes = _cellranger_v3(f["matrix"], path)
    else:
        x, genes, cells, notes = _cellranger_v2(f, path)
    return _Parts(x, "matrix", "fixed", genes=genes, cells=cells, notes=notes)


def _cellranger_v3(group, path):
    """Cell Ranger >= 3: group matrix with barcodes and features/{id, name, feature_type,
    genome}; features of other types (Antibody Capture, CRISPR Guide Capture, ...) are set
    aside, in one note. -> (x cells x genes, gene names, barcodes, notes)"""
    _require(group, ("barcodes", "features/name", "features/feature_type"), path)
    x = _cellranger_counts(group, path)
    names = _h5_strings(group["features/name"], path)
    types = _h5_strings(group["features/feature_type"], path)
    if len(types) != x.shape[1]:
        raise ValueError(f"{path}: {len(types)} features for the {x.shape[1]} rows of "
                         f"{group.name}")
    keep = types == "Gene Expression"
    if not keep.any():
        raise ValueError(f"{path}: no Gene Expression features (it holds {_tally(types)})")
    notes = []
    if not keep.all():
        notes.append(f"{path}: kept the {keep.sum()} Gene Expression features; set aside "
                     f"{_tally(types[~keep])}")
        x = x[:, np.flatnonzero(keep)]
    return x, names[keep], _h5_strings(group["barcodes"], path), notes


def _cellranger_v2(f, path):
    """Cell Ranger 2: one group per genome (/mm10, /GRCh38) with barcodes, genes (ids) and
    gene_names; several genomes of the same cells are joined, gene after gene -> as
    _cellranger_v3."""
    parts = []
    for genome in f.values():
        _require(genome, ("barcodes", "gene_names"), path)
        parts.append((_cellranger_counts(genome, path), _h5_strings(genome["gene_names"], path),
                      _h5_strings(genome["barcodes"], path)))
    cells = parts[0][2]
    if any(not np.array_equal(barcodes, cells) for _, _, barcodes in parts[1:]):
        raise ValueError(f"{path}: its genomes ({', '.join(f)}) hold different barcodes; "
                         "expected one genome, or several of the same cells")
    x = sp.hstack([x for x, _, _ in parts], format="csr")
    return x, np.concatenate([genes for _, genes, _ in parts]), cells, []


def _cellranger_counts(group, path):
    """A Cell Ranger matrix group (data, indices, indptr, shape: genes x cells, stored by cell,
    so CSC) -> CSR cells x genes."""
    return _read_sparse_group(group, path, group.name.lstrip("/"), fmt="csc").T.tocsr()


def _tally(values):
    """How many of each value: '31 Antibody Capture, 5 CRISPR Guide Capture'."""
    kinds, counts = np.unique(values, return_counts=True)
    return ", ".join(f"{c} {k}" for k, c in zip(kinds, counts))


def _read_loom(f, path, label_key, layer):
    """loom: matrix or a layer (_pick_counts), genes x cells; gene names in row_attrs/Gene
    (else Accession), cell names in col_attrs/CellID, labels in a col_attrs column."""
    _require(f, ("matrix", "row_attrs", "col_attrs"), path)
    x, key, notes = _pick_counts(f, path, "matrix", layer, {})
    labels, names = _obs_labels(f["col_attrs"], path, label_key, LOOM_LABEL_KEYS)
    genes = _first_names(f["row_attrs"], ("Gene", "Accession"), path)
    cells = _first_names(f["col_attrs"], ("CellID",), path)
    return _Parts(x.T.tocsr(), key, "fixed", labels, names, genes, cells, notes=notes)


def _read_10x(path):
    """10x folder: matrix.mtx[.gz] (genes x cells), barcodes.tsv[.gz], features.tsv[.gz] or
    genes.tsv; path is the folder or the .mtx file in it.

    features.tsv columns are id, name, type: the name is kept."""
    folder = path if path.is_dir() else path.parent
    mtx = path if path.is_file() else _find(folder, ("matrix.mtx.gz", "matrix.mtx"))
    barcodes = _find(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    features = _find(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    if mtx is None:
        raise ValueError(f"{path}: unknown layout (a folder without matrix.mtx[.gz])")
    with _reading(mtx):
        try:
            m = sp.csr_matrix(scipy.io.mmread(str(mtx)))
        except ValueError as err:
            reason = str(err).partition("\n")[0]
            raise ValueError(f"{mtx}: not a readable Matrix Market file ({reason})") from None
    cells = np.array([row[0] for row in _read_lines(barcodes)]) if barcodes else None
    genes = None
    if features:
        genes = np.array([row[1] if len(row) > 1 else row[0] for row in _read_lines(features)])
    if cells is None or len(cells) != m.shape[0] or len(cells) == m.shape[1]:
        m = m.T.tocsr()  # 10x writes genes x cells; a cells x genes file is told by its barcodes
    return _Parts(m, mtx.name, "fixed", genes=genes, cells=cells)


def _find(folder, names):
    """The first of names (files) that folder holds, or None."""
    return next((folder / n for n in names if (folder / n).exists()), None)


def _read_table(path):
    """CSV/TSV table (.gz too): a header of column names (with or without a corner cell), then
    rows that start with their name; which axis holds the cells is _orient's to say."""
    cells, rows, blocks = [], [], []
    with _reading(path), _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=_delimiter(path))
        header = next(reader, None)
        for row in reader:
            if not row:
                continue
            cells.append(row[0])
            rows.append(row[1:])
            if len(rows) == 1024:
                blocks.append(_parse_rows(rows, len(cells) - len(rows) + 2, path))
                rows = []
    if rows:
        blocks.append(_parse_rows(rows, len(cells) - len(rows) + 2, path))
    if header is None or not blocks:
        raise ValueError(f"{path}: no data rows (expected a header of gene names, then one row "
                         "per cell)")
    n_genes = blocks[0].shape[1]
    if any(b.shape[1] != n_genes for b in blocks) or len(header) not in (n_genes, n_genes + 1):
        raise ValueError(f"{path}: header has {len(header)} fields for {n_genes} genes per row")
    genes = np.array(header[-n_genes:])
    x = sp.vstack(blocks, format="csr")
    return _Parts(x, "the table", "table", genes=genes, cells=np.array(cells))


def _parse_rows(rows, first_line, path):
    """Text rows of numbers -> CSR block; a ragged row or a non-number names its line."""
    try:
        return sp.csr_matrix(np.array(rows, dtype=np.float64))
    except ValueError:
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ValueError(f"{path}: line {first_line + i} has {len(row) + 1} fields, "
                                 f"line {first_line} has {len(rows[0]) + 1}") from None
            for value in row:
                try:
                    float(value)
                except ValueError:
                    raise ValueError(f"{path}: line {first_line + i}: non-numeric count "
                                     f"{value!r}") from None
        raise


# -- the HDF5 pieces: matrices, labels, names and strings


def _read_matrix(item, path, what):
    """A dense HDF5 dataset or a CSR/CSC group -> CSR, in the stored orientation."""
    if isinstance(item, h5py.Group):
        return _read_sparse_group(item, path, what).tocsr()
    if not isinstance(item, h5py.Dataset):
        raise ValueError(f"{path}: {what} is neither a matrix nor a sparse matrix group")
    problem = datasets.dtype_problem(item.dtype, what)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if item.ndim != 2:
        raise ValueError(f"{path}: {what} has {item.ndim} dimensions, expected a 2-d matrix")
    rows = max(1, BLOCK_ENTRIES // max(1, item.shape[1]))
    if item.chunks:  # whole chunks, each unzipped once
        rows = max(item.chunks[0], rows // item.chunks[0] * item.chunks[0])
    blocks = [sp.csr_matrix(item[i:i + rows]) for i in range(0, item.shape[0], rows)]
    if not blocks:
        return sp.csr_matrix(item.shape, dtype=item.dtype)
    return sp.vstack(blocks, format="csr")


def _read_sparse_group(group, path, what, fmt=None):
    """A CSR or CSC group (data, indices, indptr, shape as attribute or dataset) -> checked
    scipy CSR or CSC matrix; fmt ("csc", "csr") when the group does not say."""
    if not all(k in group for k in ("data", "indices", "indptr")):
        raise ValueError(f"{path}: group {what} is not a sparse matrix (needs data, indices, "
                         "indptr)")
    fmt = fmt or group.attrs.get("encoding-type", group.attrs.get("h5sparse_format", "csr"))
    fmt = (fmt.decode() if isinstance(fmt, bytes) else str(fmt))[:3].upper()
    shape = _sparse_shape(group, path, what)
    data, indices, indptr = (_h5_values(group[k], path) for k in ("data", "indices", "indptr"))
    problem = datasets.dtype_problem(data.dtype, what)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise ValueError(f"{path}: group {what}: indices and indptr must be integers, not "
                         f"{indices.dtype} and {indptr.dtype}")
    n_major, n_minor = (shape[0], shape[1]) if fmt != "CSC" else (shape[1], shape[0])
    axis = "rows" if fmt != "CSC" else "columns"
    problem = None
    if len(indptr) != n_major + 1:
        problem = f"indptr has {len(indptr)} entries for {n_major} {axis}"
    elif len(indices) != len(data):
        problem = f"{len(indices)} indices for {len(data)} values"
    elif indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0):
        problem = f"indptr must rise from 0 to {len(data)}"
    elif len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        problem = f"indices outside 0..{n_minor - 1}"
    if problem:
        raise ValueError(f"{path}: inconsistent {fmt} group {what}: {problem}")
    if fmt == "CSC":
        return sp.csc_matrix((data, indices, indptr), shape=shape)
    return sp.csr_matrix((data, indices, indptr), shape=shape)


def _sparse_shape(group, path, what):
    """The (rows, columns) of a sparse group: its shape attribute (anndata; h5sparse_shape) or
    shape dataset (scDCC, Cell Ranger), two whole numbers."""
    shape = group.attrs.get("shape", group.attrs.get("h5sparse_shape"))
    if shape is None and "shape" in group:
        shape = _h5_values(group["shape"], path)
    shape = np.asarray(shape if shape is not None else []).ravel()
    whole = shape.dtype.kind in "iuf" and np.all(shape == np.round(shape)) and np.all(shape >= 0)
    if len(shape) != 2 or not whole:
        raise ValueError(f"{path}: group {what} has no 2-d shape (two whole numbers)")
    return tuple(int(s) for s in shape)


def _obs_labels(obs, path, label_key, default_keys):
    """Labels from an obs column (loom: a col_attrs column) -> (codes or strings, category
    names or None).

    Categoricals are a group with categories + codes (anndata >= 0.8), or integer codes with
    their categories in obs/__categories/<column> (older anndata)."""
    key = label_key or next((k for k in default_keys if k in obs), None)
    if key is None:
        return None, None
    if key not in obs:
        raise ValueError(f"{path}: no {obs.name.lstrip('/')} column '{key}' "
                         f"(columns: {', '.join(list(obs)[:12])})")
    column = obs[key]
    if isinstance(column, h5py.Group):
        if "codes" not in column or "categories" not in column:
            raise ValueError(f"{path}: {obs.name.lstrip('/')} column '{key}' is neither "
                             "categorical nor a plain array")
        return _h5_values(column["codes"], path), _h5_strings(column["categories"], path)
    if "__categories" in obs and key in obs["__categories"]:
        return _h5_values(column, path), _h5_strings(obs["__categories"][key], path)
    return _h5_strings(column, path, keep_numbers=True), None


def _frame_index(frame, path):
    """The index (obs or var names) of an AnnData dataframe group, or None."""
    if not isinstance(frame, h5py.Group):
        return None
    key = frame.attrs.get("_index", "_index")
    key = key.decode() if isinstance(key, bytes) else key
    return _first_names(frame, (key,), path)


def _first_names(group, keys, path):
    """The strings of the first of keys that is a dataset of group (names), or None."""
    for key in keys:
        if isinstance(group.get(key), h5py.Dataset):
            return _h5_strings(group[key], path)
    return None


def _require(group, keys, path):
    """Raise a one-line ValueError naming the first of keys (paths inside group) that it lacks."""
    missing = next((key for key in keys if key not in group), None)
    if missing:
        raise ValueError(f"{path}: {group.name.rstrip('/')}/{missing} is missing")


def _h5_values(item, path):
    """The values of an HDF5 dataset of numbers or strings (labels, names, codes, the arrays of
    a sparse group), as stored, as a 1-d array."""
    if not isinstance(item, h5py.Dataset) or item.dtype.kind not in "biufSO":
        raise ValueError(f"{path}: {item.name} is not an array of numbers or strings")
    return np.asarray(item[()]).ravel()


def _h5_strings(item, path, keep_numbers=False):
    """The strings of an HDF5 dataset (names, categories, labels) -> 1-d str array: bytes (as
    most writers store them) decoded as UTF-8, numbers written as strings, or left as numbers
    with keep_numbers (labels: codes, and -1 or NaN where a label is missing)."""
    values = _h5_values(item, path)
    if values.dtype.kind in "SO":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])
    return values if keep_numbers else values.astype(str)


# -- the text pieces


def _open_text(path):
    """A text file, gzipped when its name ends in .gz, opened for reading."""
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _read_lines(path):
    """The non-blank lines of a text file, split at tabs (10x's barcodes and features)."""
    with _reading(path), _open_text(path) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def _delimiter(path):
    """A .csv[.gz] is split at commas, a .tsv or .txt (or anything else) at tabs."""
    return "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"


# ---------------------------------------------------------------- which way a matrix lies


GENE_NAME = re.compile(r"(ENS[A-Z]*G\d{11}(\.\d+)?|MT-(CO[1-3]|ND[1-6]|ND4L|ATP[68]|CYTB?))$",
                       re.I)
BARCODE = re.compile(r".*[ACGT]{10}")  # 10 bases in a row: a cell barcode (10x: 16, Drop-seq: 12)
DETECTION_SPREAD = 2.0  # the gene axis's detection rates spread at least this many times wider


def _orient(path, parts, transpose, by_name):
    """parts with x cells x genes, and a note where the file was turned or its way guessed.

    A layout that fixes the axes (parts.axes "fixed") is as its reader made it, and refuses
    transpose=True. An X/Y or exprs matrix or a table lies genes x cells when transpose is
    True, cells x genes when False; None: what is certain decides (_matrix_orientation,
    _table_orientation; by_name: a label file's (names, labels), or None), else what can be
    seen (_guess_orientation: a table's names and counts, an HDF5 matrix's counts), in a note
    that says how to read the file the other way. A table's names turn with it; an HDF5
    matrix's names say what they name."""
    if parts.axes == "fixed":
        if transpose:
            raise ValueError(f"{path}: transpose is for CSV/TSV tables and X/Y or exprs "
                             "matrices; this layout fixes which axis holds the cells")
        return parts
    if transpose is not None:
        flip, note = transpose, None
    elif parts.axes == "matrix":
        flip, note = _matrix_orientation(path, parts)
    else:
        flip, note = _table_orientation(path, parts, by_name)
    if flip is None:  # nothing certain: what can be seen decides
        names = (parts.cells, parts.genes) if parts.axes == "table" else (None, None)
        flip, reason = _guess_orientation(parts.x, *names)
        if flip:
            rows, cols, flag = "genes", "cells", "--no-transpose"
        else:
            rows, cols, flag = "cells", "genes", "--transpose"
        note = (f"{path}: read the rows of {parts.what} as {rows} and its columns as {cols} "
                f"({reason}); {flag} reads them the other way")
    if flip:
        x = parts.x.T.tocsr()
        if parts.axes == "table":
            parts = replace(parts, x=x, genes=parts.cells, cells=parts.genes)
        else:
            parts = replace(parts, x=x)
    return parts if note is None else replace(parts, notes=parts.notes + [note])


def _matrix_orientation(path, parts):
    """Whether an X/Y or exprs matrix lies genes x cells, where that is certain -> (flip, a note
    or None), else (None, None).

    Certain: its labels, cell names or gene names, the first of these whose number matches
    one axis only (matrices written from R, rhdf5 or writeMM of a genes x cells object arrive
    transposed: a note says so; a number matching neither axis fails in load)."""
    shape = parts.x.shape
    for kind, values, axis in (("labels", parts.labels, 0), ("cell names", parts.cells, 0),
                               ("gene names", parts.genes, 1)):
        if values is None or len(values) == shape[0] == shape[1]:
            continue
        if len(values) != shape[axis] and len(values) == shape[1 - axis]:
            return True, (f"{path}: transposed {parts.what} to {shape[1]} cells x {shape[0]} "
                          f"genes: the {len(values)} {kind} match its other axis (R writes "
                          "matrices genes x cells)")
        return False, None
    return None, None


def _table_orientation(path, parts, by_name):
    """Whether a table lies genes x cells, where that is certain -> (flip, a note or None), else
    (None, None). Its row and column names say nothing of which is which; a label file's
    names (by_name) that name more of its columns than of its rows decide, or the reverse."""
    shape = parts.x.shape
    if by_name is not None:
        in_rows = np.count_nonzero(np.isin(parts.cells, by_name[0]))
        in_cols = np.count_nonzero(np.isin(parts.genes, by_name[0]))
        if in_cols > in_rows:
            return True, (f"{path}: transposed the table to {shape[1]} cells x {shape[0]} "
                          "genes: the label file names its columns")
        if in_rows > in_cols:
            return False, None
    return None, None


def _guess_orientation(x, rows, cols):
    """Whether the rows of x are genes, from what can be seen -> (flip, why, in a few words).

    1. Names (a table's row and column names, or None): Ensembl gene ids (ENSG..., ENSMUSG...)
       and the 13 mitochondrial protein genes (MT-CO1, mt-Nd1, ...) mark the gene axis, cell
       barcodes (GEMs: 10 bases in a row) the cell axis; the axis whose names look more like
       genes' and less like barcodes' holds the genes.
    2. Counts: genes differ far more in how often they are detected than cells do (a marker in
       1% of the cells, a housekeeping gene in all; every cell that passed quality control
       detects some hundreds to thousands of genes): the axis whose detection rates (shares of
       non-zero entries) spread DETECTION_SPREAD times wider, 90th over 10th percentile, holds
       the genes. On the five files of ../shared/data the genes' spread is 2.4 to 39 times the
       cells'; on Poisson counts of one rate (no gene apart) the ratio is 0.6 to 1.3.
    3. Else cells x genes, the convention of these layouts.
    The shape is no evidence: a 20,000 x 3,000 table may be genes x cells or cells x HVGs."""
    by_genes = _share(rows, GENE_NAME) - _share(cols, GENE_NAME)  # > 0: the rows look like genes
    by_barcodes = _share(cols, BARCODE) - _share(rows, BARCODE)  # > 0: the columns look like cells
    if by_genes or by_barcodes:
        if abs(by_genes) >= abs(by_barcodes):
            sign, looks = by_genes, "gene ids or mitochondrial genes"
        else:
            sign, looks = -by_barcodes, "cell barcodes"
        return (by_genes + by_barcodes > 0,
                f"its {'row' if sign > 0 else 'column'} names look like {looks}")
    if min(x.shape) > 0:
        rows_spread = _detection_spread(x.getnnz(axis=1), x.shape[1])
        cols_spread = _detection_spread(x.getnnz(axis=0), x.shape[0])
        for flip, wide, narrow in ((True, rows_spread, cols_spread),
                                   (False, cols_spread, rows_spread)):
            if wide >= DETECTION_SPREAD * narrow:
                return flip, (f"the detection rates of its {'rows' if flip else 'columns'} "
                              f"spread {wide / narrow:.1f} times wider, as genes' do")
    return False, "nothing tells its axes apart; cells x genes is the convention"


def _share(names, pattern):
    """The share of names (None: none) that pattern matches from their start."""
    if names is None or len(names) == 0:
        return 0.0
    return sum(pattern.match(str(name)) is not None for name in names) / len(names)


def _detection_spread(nonzero, size):
    """90th / 10th percentile of the detection rates (nonzero + 1) / (size + 1) of an axis."""
    low, high = np.percentile((np.asarray(nonzero) + 1) / (size + 1), [10, 90])
    return high / low


# ---------------------------------------------------------------- label files


def _read_label_file(path, key, parts):
    """A label file: CSV/TSV[.gz] rows of (cell name, label) -> (names, labels), str arrays.

    Its names are the cell names of parts (a table's column names too: it may lie genes x
    cells), and a count matrix without cell names is refused. The label is the second column,
    or with key the column of that name in the header (more columns than two need key). The
    first row is a header when key is given or when its first field names none of the cells.
    A name listed twice keeps its last label (_labels_by_name)."""
    cells = set(parts.cells if parts.cells is not None else [])
    if parts.axes == "table":
        cells |= set(parts.genes)
    if not cells:
        raise ValueError(f"{path}: the count matrix has no cell names to match this label "
                         "file's with")
    if not path.exists():
        raise ValueError(f"{path}: no such label file")
    with _reading(path), _open_text(path) as fh:
        rows = [row for row in csv.reader(fh, delimiter=_delimiter(path)) if row]
    if not rows:
        raise ValueError(f"{path}: empty label file (expected rows of cell name, label)")
    width = len(rows[0])
    if width < 2:
        raise ValueError(f"{path}: one column; a label file has two, cell name and label (a "
                         ".csv is split at commas, a .tsv or .txt at tabs)")
    if key is None and width > 2:
        raise ValueError(f"{path}: {width} columns ({', '.join(rows[0][:4])}, ...); name the "
                         "one with the labels by its header (--label-key)")
    if key is not None and key not in rows[0]:
        raise ValueError(f"{path}: no column '{key}' in its header ({', '.join(rows[0][:8])})")
    column = 1 if key is None else rows[0].index(key)
    body = rows[1:] if key is not None or rows[0][0] not in cells else rows
    if not body:
        raise ValueError(f"{path}: no labels below its header")
    short = next((row for row in body if len(row) <= column), None)
    if short is not None:
        raise ValueError(f"{path}: the row of {short[0]!r} has no field {column + 1} (the "
                         "labels)")
    return np.array([row[0] for row in body]), np.array([row[column] for row in body])


def _labels_by_name(parts, by_name, path):
    """parts with the label of each cell from a label file's (names, labels), and a note; a
    cell the file does not name gets "" (no label)."""
    names, values = by_name
    cells = parts.cells
    named = np.isin(names, cells)
    if not named.any():
        raise ValueError(f"{path}: none of its {len(names)} names is a cell of the count matrix "
                         f"(its first: {str(names[0])!r}; the first cell: {str(cells[0])!r})")
    lookup = dict(zip(names, values))
    labels = np.array([lookup.get(cell, "") for cell in cells])
    found = sum(cell in lookup for cell in cells)
    note = f"{path}: labels for {found} of {len(cells)} cells"
    if parts.labels is not None:
        note += " (not the file's own)"
    if not named.all():
        note += (f"; {np.count_nonzero(~named)} of its {len(names)} names match no cell "
                 f"(e.g. {str(names[~named][0])!r})")
    return replace(parts, labels=labels, names=None, notes=parts.notes + [note])


# ---------------------------------------------------------------- an AnnData in memory

def is_anndata(obj):
    """Whether obj looks like an AnnData in memory (duck-typed: .X, .obs and .var_names), as
    sctcm.cluster takes one without importing anndata."""
    return all(hasattr(obj, name) for name in ("X", "obs", "var_names"))


def anndata_counts(adata, layer=None, labels=None):
    """The raw counts of an AnnData in memory, found as load finds an .h5ad's: layer a key of
    .layers, or "raw" (.raw.X, with .raw.var_names); without it .X when it holds raw counts,
    else .layers["counts"] -> (counts, gene names, labels: as given, or the values of the obs
    column labels names). A one-line ValueError when none holds counts or a name is missing."""
    layers = dict(getattr(adata, "layers", None) or {})
    raw = getattr(adata, "raw", None)
    choices = list(layers) + (["raw"] if raw is not None else [])
    if layer == "raw" and raw is not None:
        matrix, genes, where = raw.X, raw.var_names, "raw.X"
    elif layer is not None:
        if layer not in layers:
            raise ValueError(f"adata: no layer '{layer}' (it has {', '.join(choices) or 'none'})")
        matrix, genes, where = layers[layer], adata.var_names, f"layers['{layer}']"
    else:
        matrix, genes, where = adata.X, adata.var_names, "X"
        if _matrix_problem(matrix, "X") and "counts" in layers:
            matrix, where = layers["counts"], "layers['counts']"
    problem = _matrix_problem(matrix, f"adata.{where}")
    if problem:
        raise ValueError(f"{problem}; layer= names the layer of raw counts (it has "
                         f"{', '.join(choices) or 'none'})")
    if isinstance(labels, str):
        if labels not in adata.obs:
            raise ValueError(f"adata: labels='{labels}' is not a column of obs")
        labels = np.asarray(adata.obs[labels], dtype=object)
    return matrix, np.asarray(genes, dtype=str), labels


def _matrix_problem(matrix, what):
    """Why an AnnData's matrix is not raw counts (datasets.count_problem), or None."""
    if matrix is None or not (sp.issparse(matrix) or hasattr(matrix, "shape")):
        return f"{what} is not a matrix"
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    if values.dtype.kind not in "biuf":
        return f"{what} holds {values.dtype} values, not counts"
    return datasets.count_problem(values, what)


# ---------------------------------------------------------------- writing a count matrix

def write_xy(path, dataset):
    """A Dataset as an HDF5 file of the X/Y layout load reads first: X the counts (a CSR group
    data, indices, indptr, shape when the counts are sparse, so that a million cells are never
    dense; else a dense matrix), Y the labels and cell_types their names, genes, gzip-compressed
    (the many-cells command of the README)."""
    counts = dataset.counts
    with h5py.File(path, "w") as f:
        if sp.issparse(counts):
            counts = sp.csr_matrix(counts)
            group = f.create_group("X")
            group.create_dataset("data", data=counts.data.astype(np.int32), compression="gzip")
            group.create_dataset("indices", data=counts.indices, compression="gzip")
            group.create_dataset("indptr", data=counts.indptr)
            group.create_dataset("shape", data=np.array(counts.shape))
        else:
            f.create_dataset("X", data=np.asarray(counts).astype(np.int32), compression="gzip")
        if dataset.labels is not None:
            f.create_dataset("Y", data=dataset.labels)
            f.create_dataset("cell_types", data=np.asarray(dataset.label_names, dtype="S"))
        if dataset.gene_names is not None:
            f.create_dataset("genes", data=np.asarray(dataset.gene_names, dtype="S"))


# ---------------------------------------------------------------- a run's output folder


def check_out(out, overwrite):
    """Refuse, in one line, an output folder out that is not empty (unless overwrite) or cannot
    be created: checked before any work, so a bad --out costs nothing."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (use --overwrite)")
    base = next(p for p in out.absolute().parents if p.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot create the output folder ({base} is not a writable "
                         "folder)")


def scratch_folder(out):
    """A new hidden folder beside out, where a run writes its files before publish moves them;
    with the permissions of any folder the user creates (mkdtemp's are 0700: colleagues could
    not read the results)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder


def write_run(folder, tables, history, summary):
    """A run's files into folder: each of tables ({file name: {column: values}}) as a CSV file,
    history.csv (one row per history dict, the union of their keys as columns; none without
    history) and summary.json. A value None or NaN is written as an empty field."""
    for name, columns in tables.items():
        _write_csv(folder / name, list(columns), zip(*[map(_field, values)
                                                       for values in columns.values()]))
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        _write_csv(folder / "history.csv", keys,
                   ([row.get(k, "") for k in keys] for row in history))
    write_summary(folder, summary)


def write_summary(folder, summary):
    """summary.json of a run into folder (a dict of numbers, strings, lists and dicts)."""
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _field(value):
    """A CSV field: a value as csv writes it, "" for None or NaN, true/false for a boolean."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return value


def _write_csv(path, header, rows):
    """A CSV file of a header row and rows."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# -- a run's .h5ad: the AnnData on-disk format (anndata >= 0.8), written with h5py

def read_obs(path):
    """The obs of an .h5ad file as (cell names, {column: values}), the columns in obs's
    column-order: a categorical as its category names (None where one is missing), any other
    column as its values. Reads back a run's results.h5ad without anndata."""
    with _reading(path), h5py.File(path, "r") as f:
        obs, columns = f["obs"], {}
        order = [v.decode() if isinstance(v, bytes) else str(v)
                 for v in np.atleast_1d(obs.attrs.get("column-order", []))]
        for key in order:
            values, categories = _obs_labels(obs, path, key, ())
            columns[key] = values if categories is None else np.array(
                [categories[c] if c >= 0 else None for c in values], dtype=object)
        return _frame_index(obs, path), columns


def write_h5ad(path, cell_names, obs, obsm, uns, categorical=()):
    """An .h5ad file that anndata.read_h5ad reads, without X: obs, a dataframe of the columns
    obs ({name: values}; the integer columns named in categorical become categories, -1
    missing) indexed by cell_names; obsm ({name: (n, d) array}); uns, a nested dict of
    strings, numbers, lists and dicts (None left out). Every element carries its encoding-type and
    encoding-version attributes, as the format specifies; var is an empty dataframe."""
    with h5py.File(path, "w") as f:
        _encoding(f, "anndata", "0.1.0")
        _write_dataframe(f.create_group("obs"), cell_names, obs, categorical)
        _write_dataframe(f.create_group("var"), [], {}, ())
        group = _encoding(f.create_group("obsm"), "dict", "0.1.0")
        for name, values in obsm.items():
            _encoding(group.create_dataset(name, data=values), "array", "0.2.0")
        _write_element(f, "uns", uns)
        for name in ("layers", "obsp", "varm", "varp"):
            _encoding(f.create_group(name), "dict", "0.1.0")


def _write_dataframe(group, index, columns, categorical):
    """A dataframe element: _index (the row names), then each column as an array, a string
    array or, for the names in categorical, a categorical of its whole numbers."""
    names = list(columns)
    _encoding(group, "dataframe", "0.2.0")
    group.attrs["_index"] = "_index"
    group.attrs.create("column-order", np.array(names, dtype=object), dtype=STRING)
    _write_strings(group, "_index", index)
    for name in names:
        values = np.asarray(columns[name])
        if name in categorical:
            _write_categorical(group.create_group(name), values)
        elif values.dtype.kind in "OUS":
            _write_strings(group, name, values)
        else:
            _encoding(group.create_dataset(name, data=values), "array", "0.2.0")


def _write_categorical(group, values):
    """A categorical element of whole numbers: categories "0", "1", ... and their codes, -1
    where a value is missing (negative)."""
    categories = np.unique(values[values >= 0])
    codes = np.where(values >= 0, np.searchsorted(categories, values), -1)
    _encoding(group, "categorical", "0.2.0")
    group.attrs["ordered"] = False
    _write_strings(group, "categories", categories.astype(str))
    _encoding(group.create_dataset("codes", data=codes.astype(np.int32)), "array", "0.2.0")


def _write_element(parent, name, value):
    """One element of uns: a dict (a group of elements), a string, a number, or a list (an
    array, or a dict of its items when they are dicts or mixed)."""
    if isinstance(value, dict):
        group = _encoding(parent.create_group(name), "dict", "0.1.0")
        for key, item in value.items():
            if item is not None:
                _write_element(group, str(key), item)
    elif isinstance(value, str):
        _encoding(parent.create_dataset(name, data=value, dtype=STRING), "string", "0.2.0")
    elif isinstance(value, (bool, int, float, np.number, np.bool_)):
        _encoding(parent.create_dataset(name, data=value), "numeric-scalar", "0.2.0")
    elif all(isinstance(item, str) for item in value) and value:
        _write_strings(parent, name, value)
    elif all(isinstance(item, (bool, int, float)) for item in value) and value:
        _encoding(parent.create_dataset(name, data=np.asarray(value)), "array", "0.2.0")
    else:
        _write_element(parent, name, {str(i): item for i, item in enumerate(value)})


STRING = h5py.string_dtype()  # variable-length UTF-8, as anndata writes strings


def _write_strings(group, name, values):
    """A string-array element of the values written as text."""
    values = np.array([str(v) for v in values], dtype=object)
    _encoding(group.create_dataset(name, data=values, dtype=STRING), "string-array", "0.2.0")


def _encoding(element, kind, version):
    """element with the encoding-type and encoding-version attributes of the format."""
    element.attrs["encoding-type"], element.attrs["encoding-version"] = kind, version
    return element


def publish(tmp, out, overwrite):
    """Move the finished folder tmp to out (replacing it with overwrite): out never holds half a
    run, and a run that fails leaves out as it was."""
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def peak_memory_mb():
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
