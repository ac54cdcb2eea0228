"""Data in and out: read a count matrix, preprocess it by hand, build the kNN cell graph, make
demo data, and write a run's output folder (check_out, scratch_folder, write_run, publish).

    file -> load() -> Dataset -> preprocess() -> Prepared -> knn_graph(Prepared.x) -> A (sctcm.fit)

load() detects seven layouts:
  (a) HDF5 with X (counts, dense or a CSR group) and Y (labels): the scDeepCluster/scDCC files;
  (b) HDF5 with exprs (dense or CSR group), obs/cell_type1, obs_names, var_names: the files of the
      scTCM paper (scziDesk's layout);
  (c) AnnData .h5ad: X dense or a CSR/CSC group (encoding-type csr_matrix / csc_matrix, shape
      attribute), labels from an obs column, names from the _index of obs and var. The raw counts
      may sit elsewhere: layers/NAME (a matrix of X's shape), or raw/X with raw/var's names (raw/X
      may hold more genes than X); without a layer asked for, X when it holds counts, else
      layers/counts when that does (in a note);
  (d) a 10x folder: matrix.mtx[.gz] (genes x cells), barcodes.tsv[.gz], features.tsv[.gz]/genes.tsv;
  (e) CSV/TSV[.gz]: a header of names, then one row per cell (or per gene, as R's write.csv
      writes), its name first;
  (f) Cell Ranger's HDF5 feature-barcode matrix (filtered_feature_bc_matrix.h5), strings as
      fixed-length bytes. v3 and later: group matrix with data, indices, indptr, shape = (genes,
      cells) (stored by cell: indptr has cells + 1 entries, indices are gene rows), barcodes (cell
      names), features/name (gene names) and features/feature_type: only "Gene Expression" rows
      are kept (Antibody Capture, CRISPR Guide Capture, ... are counted in a note); features/id
      and genome are not read. v2 (filtered_gene_bc_matrices_h5.h5): one group per genome
      (/mm10) with the same matrix datasets, barcodes, genes (ids, not read) and gene_names;
  (g) loom (loom 3 spec, .loom): matrix, genes x cells, dense (chunked, gzip: read in blocks),
      or layers/NAME of its shape when asked for; row_attrs/Gene (else Accession) gene names,
      col_attrs/CellID cell names, labels from a col_attrs column (LOOM_LABEL_KEYS);
      attrs/LOOM_SPEC_VERSION, col_graphs and row_graphs are not read.
AnnData, loom, Cell Ranger and 10x fix which axis holds the cells. CSV/TSV tables and X/Y or exprs
matrices may lie either way (R writes genes x cells): --transpose says which; else labels or
names whose number matches one axis decide, else what can be seen (_guess_orientation), and a
note says which way the file was read. A label file (CSV/TSV of cell name, label; any layout)
replaces a file's labels, matched by cell name.

References:
  Mrabah, Amar, Bouguessa, Diallo, "Toward Convex Manifolds: A Geometric Perspective for Deep Graph
    Clustering of Single-cell RNA-seq Data" (scTCM), IJCAI 2023: the kNN cell graph A; the authors'
    code uses 1500 HVGs and k=15 on 50 PCs;
  Satija et al., Nat. Biotechnol. 2015 (Seurat highly variable genes by normalised dispersion), as
    in scanpy's highly_variable_genes(flavor="seurat") and scale() (Wolf et al., Genome Biol. 2018);
  Eraslan et al., Nat. Commun. 2019 (DCA: size factors and ZINB counts, the target of Eq. 3).
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
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial import cKDTree

from clustering import squared_distances

LABEL_KEYS = ("cell_type", "celltype", "cell_type1", "CellType", "cell_types", "labels", "label")
LOOM_LABEL_KEYS = LABEL_KEYS + ("ClusterName",)  # loompy's (and the Linnarsson lab atlases') cluster names
BLOCK_ENTRIES = 1 << 22  # a dense matrix is read this many entries at a time and kept as CSR
MISSING_LABELS = ("", "na", "nan", "n/a", "none")  # label strings that mean "no label", in any case
FILE_SUFFIXES = (".h5", ".h5ad", ".hdf5", ".loom", ".mtx", ".csv", ".tsv", ".txt", ".gz")
READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)  # what reading a bad file raises


@dataclass
class Dataset:
    """A labelled (or unlabelled) count matrix, cells x genes, as read from a file."""
    counts: np.ndarray | sp.csr_matrix       # (n, g) raw counts >= 0, whole numbers; CSR float32 from load()
    labels: np.ndarray | None = None         # (n,) int64 in 0..K-1, -1: missing; None: no labels
    label_names: np.ndarray | None = None    # (K,) str, the name of each label (missing is not one)
    gene_names: np.ndarray | None = None     # (g,) str
    cell_names: np.ndarray | None = None     # (n,) str
    name: str = ""                           # short name, the file name without its suffixes
    notes: list[str] = field(default_factory=list)  # one-line remarks on how the file was read


@dataclass
class Prepared:
    """The output of preprocess(): the encoder input and the ZINB target of the same cells and genes."""
    x: np.ndarray               # (n, g) float32: normalised, log1p, HVGs, scaled, clipped (encoder input)
    counts: np.ndarray          # (n, g) float32: raw counts of the same cells and genes (ZINB target, Eq. 3)
    size_factors: np.ndarray    # (n,) float32: s_i = library size / median library size
    genes: np.ndarray           # (g,) int64: kept gene indices into Dataset.counts columns
    cells: np.ndarray           # (n,) int64: kept cell indices into Dataset.counts rows
    labels: np.ndarray | None   # (n,) labels of the kept cells (-1: missing), for scoring only
    label_names: np.ndarray | None  # (K,) str
    gene_names: np.ndarray      # (g,) str, names of the kept genes
    cell_names: np.ndarray      # (n,) str, names of the kept cells
    name: str = ""
    notes: list[str] = field(default_factory=list)  # Dataset.notes + one line on what was dropped


@dataclass
class _Parts:
    """What a reader found in a file, before _assemble orients, checks and encodes it."""
    x: sp.csr_matrix                    # the counts as stored
    what: str                           # their name in messages: X, exprs, matrix, ...
    labels: np.ndarray | None = None    # raw label values (codes or strings), one per cell
    names: np.ndarray | None = None     # the names of integer label codes
    genes: np.ndarray | None = None     # gene names
    cells: np.ndarray | None = None     # cell names
    fixed: bool = False                 # the reader made x cells x genes (the layout says which is which)
    table: bool = False                 # CSV/TSV: genes and cells are the column and row names, as stored
    notes: list[str] = field(default_factory=list)  # one-line remarks of the reader


# ---------------------------------------------------------------- load


def load(path, label_key=None, layer=None, transpose=None, labels=None):
    """Read a count matrix and its labels from any of the seven layouts -> Dataset (cells x genes).

    label_key: the obs column (h5ad, paper layout), col_attrs column (loom) or dataset (X/Y
    layout) holding the labels; by default Y, cell_type1, or the first of LABEL_KEYS (loom:
    LOOM_LABEL_KEYS) present. layer (AnnData, loom): where the raw counts are, a key of layers
    or "raw" (AnnData's raw/X); by default X (loom: matrix), or layers/counts when only that
    holds counts (see _pick_counts). Counts are checked (numeric, finite, non-negative, whole
    numbers) and kept as CSR float32. transpose (CSV/TSV, X/Y, exprs): True, the file lies genes
    x cells; False, cells x genes; None: decided (_orientation), and Dataset.notes says so in
    one line unless labels or names made it certain. labels: a label file (_read_label_file),
    matched to the cells by name, in place of the file's own labels; then label_key names its
    label column.
    Missing labels (see _encode_labels) become -1. A file that cannot be read (empty, truncated,
    corrupt, not permitted, ...) raises a one-line ValueError naming it, as does any bad content."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if path.is_dir() and path.name.lower().endswith(FILE_SUFFIXES):
        raise ValueError(f"{path}: a folder where a file is expected")
    hdf5 = path.is_file() and _is_hdf5(path)
    if label_key is not None and not hdf5 and labels is None:
        raise ValueError(f"{path}: a label key ({label_key}) is for HDF5 files; this one has no labels")
    if layer is not None and not hdf5:
        raise ValueError(f"{path}: a layer ({layer}) is for AnnData and loom files; this one has none")
    file_key = label_key if labels is None else None  # with a label file, label_key is its column
    if path.is_dir() or path.name.endswith((".mtx", ".mtx.gz")):
        parts = _read_10x(path)
    elif hdf5:
        parts = _read_hdf5(path, file_key, layer)
    elif path.suffix.lower() in (".h5", ".h5ad", ".hdf5", ".loom"):
        raise ValueError(f"{path}: not an HDF5 file (damaged, or another format under an HDF5 name)")
    elif path.name.lower().removesuffix(".gz").endswith((".csv", ".tsv", ".txt")):
        parts = _read_text(path)
    else:
        raise ValueError(f"{path}: unknown layout (expected .h5/.h5ad/.loom, a 10x folder, or .csv/.tsv)")
    return _assemble(path, parts, transpose, None if labels is None else Path(labels), label_key)


def from_counts(counts, labels=None, name="counts"):
    """A Dataset from counts in memory (sctcm.cluster's input): counts (n, g) raw counts, cells x
    genes, a numpy array or scipy sparse matrix; labels: optional (n,) labels of the rows
    (missing: -1, NaN, "", "NA"), encoded as load() encodes a file's. The counts themselves are
    checked by preprocess(). Bad input raises a one-line ValueError."""
    x = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a numeric matrix, cells x genes, got {x.dtype} "
                         f"of shape {x.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"{name}: {len(labels)} labels for {x.shape[0]} cells x "
                             f"{x.shape[1]} genes")
        if labels.dtype.kind == "O":  # a pandas column: strings, NaN where a label is missing
            labels = labels.astype(str)
    codes, names = _encode_labels(labels, None)
    return Dataset(counts=x, labels=codes, label_names=names, name=name)


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
        return f"holds text that is not UTF-8 (byte {err.object[err.start]:#04x}); save it as UTF-8"
    detail = getattr(err, "strerror", None) or str(err.args[0] if err.args else err)
    detail = detail.partition("\n")[0]
    size = re.search(r"truncated file: eof = (\d+), .*stored_eof = (\d+)", detail)
    if size:  # HDF5 knows its own length
        return (f"truncated: {int(size[1]):,} of its {int(size[2]):,} bytes "
                "(a download that stopped early?)")
    if isinstance(err, zlib.error):
        return f"corrupt compressed data ({detail})"
    return f"cannot be read ({detail})"


def _assemble(path, parts, transpose=None, label_file=None, label_key=None):
    """Orient (transpose: see _orient), check and encode what a reader returned (_Parts), with
    the labels of label_file (a Path, or None; label_key: its label column) -> Dataset."""
    known = set(parts.cells if parts.cells is not None else []) | set(parts.genes if parts.table else [])
    if label_file is not None and not known:
        raise ValueError(f"{label_file}: the count matrix has no cell names to match this label file's with")
    table = None if label_file is None else _read_label_file(label_file, label_key, known)
    x, genes, cells, notes = _orient(path, parts, transpose, None if table is None else table[0])
    what, raw_labels, names = parts.what, parts.labels, parts.names
    notes = parts.notes + notes
    n, g = x.shape
    for kind, values, size in (("labels", raw_labels, n), ("cell names", cells, n), ("gene names", genes, g)):
        if values is not None and len(values) != size:
            raise ValueError(f"{path}: {len(values)} {kind} for {n} cells x {g} genes in {what}")
    if table is not None:
        raw_labels, note = _labels_by_name(table, cells, label_file, raw_labels is not None)
        names = None
        notes.append(note)
    _check_counts(x.data, path, what)
    x.sum_duplicates()
    labels, label_names = _encode_labels(raw_labels, names)
    return Dataset(
        counts=x.astype(np.float32),
        labels=labels,
        label_names=label_names,
        gene_names=np.asarray(genes) if genes is not None else np.array([f"gene{j}" for j in range(g)]),
        cell_names=np.asarray(cells) if cells is not None else np.array([f"cell{i}" for i in range(n)]),
        name=_stem(path),
        notes=notes,
    )


def _orient(path, parts, transpose, labelled):
    """Which axis of parts.x holds the cells -> (x cells x genes, gene names, cell names, notes).

    A layout that fixes it (parts.fixed) is read as its reader made it. Otherwise transpose=True
    says x is genes x cells, False cells x genes; None: _orientation decides (labelled: the cell
    names of a label file, or None)."""
    x, genes, cells = parts.x, parts.genes, parts.cells
    if parts.fixed:
        if transpose:
            raise ValueError(f"{path}: transpose is for CSV/TSV tables and X/Y or exprs matrices; "
                             "this layout fixes which axis holds the cells")
        return x, genes, cells, []
    flip, note = (transpose, None) if transpose is not None else _orientation(path, parts, labelled)
    if flip:
        x = x.T.tocsr()
        genes, cells = (cells, genes) if parts.table else (genes, cells)
    return x, genes, cells, [note] if note else []


def _orientation(path, parts, labelled):
    """Whether parts.x lies genes x cells -> (flip, a note or None).

    Certain: labels, or the cell or gene names of an HDF5 file, whose number matches one axis
    only; the first of these decides (matrices written from R, rhdf5 or writeMM of a genes x
    cells object, arrive transposed: a note says so; a number matching neither axis fails in
    _assemble). For a table, a label file's names (labelled) that name more of its rows than of
    its columns, or the reverse. Else _guess_orientation, in a note that says how to read it
    the other way."""
    evidence = [("labels", parts.labels, 0)]
    if not parts.table:  # a table's row and column names say nothing of which is which
        evidence += [("cell names", parts.cells, 0), ("gene names", parts.genes, 1)]
    shape = parts.x.shape
    for kind, values, axis in evidence:
        if values is None or len(values) == shape[0] == shape[1]:
            continue
        if len(values) != shape[axis] and len(values) == shape[1 - axis]:
            return True, (f"{path}: transposed {parts.what} to {shape[1]} cells x {shape[0]} genes: the "
                          f"{len(values)} {kind} match its other axis (R writes matrices genes x cells)")
        return False, None
    if parts.table and labelled is not None:
        in_rows, in_cols = (np.count_nonzero(np.isin(axis, labelled)) for axis in (parts.cells, parts.genes))
        if in_cols > in_rows:
            return True, (f"{path}: transposed the table to {shape[1]} cells x {shape[0]} genes: the label "
                          "file names its columns")
        if in_rows > in_cols:
            return False, None
    flip, reason = _guess_orientation(parts.x, parts.cells if parts.table else None,
                                      parts.genes if parts.table else None)
    rows, cols, flag = ("genes", "cells", "--no-transpose") if flip else ("cells", "genes", "--transpose")
    return flip, (f"{path}: read the rows of {parts.what} as {rows} and its columns as {cols} "
                  f"({reason}); {flag} reads them the other way")


GENE_NAME = re.compile(r"(ENS[A-Z]*G\d{11}(\.\d+)?|MT-(CO[1-3]|ND[1-6]|ND4L|ATP[68]|CYTB?))$", re.I)
BARCODE = re.compile(r".*[ACGT]{10}")  # 10 bases in a row: a cell barcode (10x: 16, Drop-seq: 12)
DETECTION_SPREAD = 2.0  # the gene axis's detection rates spread at least this many times wider


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
        sign, looks = ((by_genes, "gene ids or mitochondrial genes") if abs(by_genes) >= abs(by_barcodes)
                       else (-by_barcodes, "cell barcodes"))
        return by_genes + by_barcodes > 0, f"its {'row' if sign > 0 else 'column'} names look like {looks}"
    if min(x.shape) > 0:
        rows_spread = _detection_spread(x.getnnz(axis=1), x.shape[1])
        cols_spread = _detection_spread(x.getnnz(axis=0), x.shape[0])
        for flip, wide, narrow in ((True, rows_spread, cols_spread), (False, cols_spread, rows_spread)):
            if wide >= DETECTION_SPREAD * narrow:
                return flip, (f"the detection rates of its {'rows' if flip else 'columns'} spread "
                              f"{wide / narrow:.1f} times wider, as genes' do")
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


def _read_label_file(path, key, cells):
    """A label file: CSV/TSV[.gz] rows of (cell name, label) -> (names, labels), str arrays.

    The label is the second column, or with key the column of that name in the header (more
    columns than two need key). The first row is a header when key is given or when its first
    field names none of cells (a set). A name listed twice keeps its last label."""
    if not path.exists():
        raise ValueError(f"{path}: no such label file")
    delimiter = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    with _reading(path), _open_text(path) as fh:
        rows = [row for row in csv.reader(fh, delimiter=delimiter) if row]
    if not rows:
        raise ValueError(f"{path}: empty label file (expected rows of cell name, label)")
    width = len(rows[0])
    if width < 2:
        raise ValueError(f"{path}: one column; a label file has two, cell name and label (a .csv is "
                         "split at commas, a .tsv or .txt at tabs)")
    if key is None and width > 2:
        raise ValueError(f"{path}: {width} columns ({', '.join(rows[0][:4])}, ...); name the one with "
                         "the labels by its header (--label-key)")
    if key is not None and key not in rows[0]:
        raise ValueError(f"{path}: no column '{key}' in its header ({', '.join(rows[0][:8])})")
    column = 1 if key is None else rows[0].index(key)
    body = rows[1:] if key is not None or rows[0][0] not in cells else rows
    short = next((row for row in body if len(row) <= column), None)
    if short is not None or not body:
        raise ValueError(f"{path}: no labels below its header" if not body else
                         f"{path}: the row of {short[0]!r} has no field {column + 1} (the labels)")
    return np.array([row[0] for row in body]), np.array([row[column] for row in body])


def _labels_by_name(table, cells, path, replaced):
    """The label of each cell from a label file's (names, labels) -> (labels, a note); a cell it
    does not name gets "" (no label). replaced: the count file had labels of its own."""
    names, values = table
    named = np.isin(names, cells)
    if not named.any():
        raise ValueError(f"{path}: none of its {len(names)} names is a cell of the count matrix (its "
                         f"first: {str(names[0])!r}; the first cell: {str(cells[0])!r})")
    lookup = dict(zip(names, values))
    labels = np.array([lookup.get(cell, "") for cell in cells])
    found = sum(cell in lookup for cell in cells)
    note = f"{path}: labels for {found} of {len(cells)} cells" + (" (not the file's own)" if replaced else "")
    if not named.all():
        note += (f"; {np.count_nonzero(~named)} of its {len(names)} names match no cell "
                 f"(e.g. {str(names[~named][0])!r})")
    return labels, note


def _check_counts(values, path, what):
    """Raise a one-line ValueError unless values are finite, non-negative whole numbers."""
    problem = _count_problem(values, what)
    if problem:
        raise ValueError(f"{path}: {problem}")


def _count_problem(values, what):
    """Why values are not raw counts (finite, non-negative whole numbers), in a few words, or None."""
    if values.dtype.kind not in "biuf":
        return f"{what} holds non-numeric values ({values.dtype})"
    if values.dtype.kind == "f":
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            return f"{bad} non-finite counts (NaN or inf) in {what}"
    bad = np.count_nonzero(values < 0)
    if bad:
        return f"{bad} negative counts in {what}"
    if values.dtype.kind == "f":
        bad = np.count_nonzero(values != np.round(values))
        if bad:
            return f"{bad} non-integer counts in {what} (raw counts expected, not normalised or log data)"
    return None


def _encode_labels(values, names):
    """Labels (numbers or strings) -> (int64 codes 0..K-1 and -1 where missing, K names), or
    (None, None) when no cell has a label. Missing: a negative or non-finite number (-1 is how
    anndata codes NaN), or a label named in MISSING_LABELS. Whole numbers index names if given."""
    if values is None:
        return None, None
    values = np.asarray(values).ravel()
    labelled = np.ones(len(values), dtype=bool)
    if values.dtype.kind in "biuf":
        labelled = np.isfinite(values) & (values >= 0)
        if np.all(values[labelled] == np.round(values[labelled])):
            values = np.where(labelled, values, 0).astype(np.int64)
    uniq, codes = np.unique(values[labelled], return_inverse=True)
    label_names = uniq.astype(str)
    if names is not None and uniq.dtype.kind == "i" and uniq.max(initial=-1) < len(names):
        label_names = np.asarray(names, dtype=str)[uniq]
    real = ~np.isin(np.char.lower(np.char.strip(label_names)), MISSING_LABELS)
    if not real.any():
        return None, None
    labels = np.full(len(values), -1, dtype=np.int64)
    labels[labelled] = np.where(real, np.cumsum(real) - 1, -1)[codes.ravel()]
    return labels, label_names[real]


def _stem(path):
    """The data set's short name: the folder of a 10x matrix, else the file name without suffixes."""
    if path.is_dir() or path.name.endswith((".mtx", ".mtx.gz")):
        return (path if path.is_dir() else path.parent).resolve().name
    return Path(path.name.removesuffix(".gz")).stem


def _strings(values):
    """An HDF5 string array (bytes or str) or a numeric array -> numpy str array."""
    values = np.asarray(values).ravel()
    if values.dtype.kind in "SO":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])
    return values.astype(str)


def _decoded(values):
    """Label values as stored: strings decoded from bytes, numbers left as numbers."""
    values = np.asarray(values).ravel()
    return _strings(values) if values.dtype.kind in "SO" else values


def _values(item, path):
    """The values of an HDF5 dataset of numbers or strings (labels, names, codes), as a 1-d array."""
    if not isinstance(item, h5py.Dataset) or item.dtype.kind not in "biufSO":
        raise ValueError(f"{path}: {item.name} is not an array of numbers or strings")
    return np.asarray(item[()]).ravel()


# -- HDF5 layouts (a), (b), (c)


def _is_hdf5(path):
    with _reading(path):
        return h5py.is_hdf5(path)


def _read_hdf5(path, label_key, layer):
    """Layouts (a)-(c), (f), (g). h5py reports damaged metadata as OSError, and some of it as
    RuntimeError or KeyError (an object whose header cannot be read)."""
    with _reading(path, READ_ERRORS + (RuntimeError, KeyError)), h5py.File(path, "r") as f:
        reader = _h5_reader(f, path)
        if reader in (_read_h5ad, _read_loom):
            return reader(f, path, label_key, layer)
        if layer is not None:
            raise ValueError(f"{path}: a layer ({layer}) is for AnnData and loom files; this one has none")
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
    raise ValueError(f"{path}: unknown HDF5 layout (keys: {keys}; expected X and Y, exprs, AnnData, "
                     "a Cell Ranger matrix or loom)")


def _read_xy(f, path, label_key):
    """Layout (a): X counts, Y labels, optional cell_types (names of the label codes) and genes."""
    x = _read_matrix(f["X"], path, "X")
    key = label_key or "Y"
    if label_key and key not in f:
        raise ValueError(f"{path}: no dataset '{key}' for the labels")
    labels = _decoded(_values(f[key], path)) if key in f else None
    names = _strings(_values(f["cell_types"], path)) if "cell_types" in f else None
    genes = _first_strings(f, ("genes", "gene_names", "var_names"), path)
    cells = _first_strings(f, ("cells", "cell_names", "obs_names", "barcodes"), path)
    return _Parts(x, "X", labels, names, genes, cells)


def _read_exprs(f, path, label_key):
    """Layout (b), the scTCM paper's files: exprs, obs/cell_type1, obs_names, var_names."""
    x = _read_matrix(f["exprs"], path, "exprs")
    labels, names = None, None
    if "obs" in f:
        labels, names = _obs_labels(f["obs"], path, label_key, ("cell_type1",) + LABEL_KEYS)
    genes, cells = _first_strings(f, ("var_names",), path), _first_strings(f, ("obs_names",), path)
    return _Parts(x, "exprs", labels, names, genes, cells)


def _read_h5ad(f, path, label_key, layer):
    """Layout (c), AnnData: X or a layer (_pick_counts), obs (index + columns), var (index = gene
    names; raw/var for raw/X, which may hold more genes than X)."""
    if not isinstance(f["obs"], h5py.Group):
        raise ValueError(f"{path}: obs is a compound table (anndata < 0.7); save the file again with anndata")
    x, key, notes = _pick_counts(f, path, "X", layer, {"raw": "raw/X"})
    labels, names = _obs_labels(f["obs"], path, label_key, LABEL_KEYS)
    var = f.get("raw/var") if key == "raw/X" else f.get("var")
    return _Parts(x, key, labels, names, _frame_index(var, path), _frame_index(f["obs"], path), fixed=True,
                  notes=notes)


def _read_loom(f, path, label_key, layer):
    """Layout (g), loom: matrix or a layer (_pick_counts), genes x cells; gene names in
    row_attrs/Gene (else Accession), cell names in col_attrs/CellID, labels in a col_attrs column."""
    _require(f, ("matrix", "row_attrs", "col_attrs"), path)
    x, key, notes = _pick_counts(f, path, "matrix", layer, {})
    labels, names = _obs_labels(f["col_attrs"], path, label_key, LOOM_LABEL_KEYS)
    genes = _first_strings(f["row_attrs"], ("Gene", "Accession"), path)
    cells = _first_strings(f["col_attrs"], ("CellID",), path)
    return _Parts(x.T.tocsr(), key, labels, names, genes, cells, fixed=True, notes=notes)


def _pick_counts(f, path, main, layer, extra):
    """The raw counts of an AnnData or loom file, as stored -> (CSR x, its key, notes).

    layer: a key of the group layers, or of extra (AnnData: {"raw": "raw/X"}). Without one: main
    (X, matrix) when it holds raw counts; else layers/counts when that does (where scvi-tools
    keeps them), and a note says so; else a one-line error that lists the layers to choose from."""
    layers = list(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
    choices = layers + [name for name, key in extra.items() if key in f]
    if layer is not None:
        if layer not in choices:
            raise ValueError(f"{path}: no layer '{layer}' (it has {', '.join(choices) or 'none'})")
        key = extra.get(layer, f"layers/{layer}")
        return _read_matrix(f[key], path, key), key, []
    if main in f:
        x = _read_matrix(f[main], path, main)
        problem = _count_problem(x.data, main)
        if problem is None:
            return x, main, []
        del x  # before the counts layer is read: the two may not fit in memory together
    else:
        problem = f"no {main}"
    if "counts" in layers:
        x = _read_matrix(f["layers/counts"], path, "layers/counts")
        if _count_problem(x.data, "layers/counts") is None:
            return x, "layers/counts", [f"{path}: {problem}; read the raw counts in layers/counts"]
    raise ValueError(f"{path}: {problem}; --layer NAME reads the raw counts from one of its layers "
                     f"({', '.join(choices) or 'it has none'})")


def _read_cellranger(f, path, label_key):
    """Layout (f), Cell Ranger's HDF5 feature-barcode matrix: the Gene Expression features of
    every cell (barcode). It holds no labels (they come from a label file)."""
    if label_key is not None:
        raise ValueError(f"{path}: a Cell Ranger matrix holds no labels ({label_key}); give them "
                         "in a label file")
    if isinstance(f.get("matrix"), h5py.Group):
        x, genes, cells, notes = _cellranger_v3(f["matrix"], path)
    else:
        x, genes, cells, notes = _cellranger_v2(f, path)
    return _Parts(x, "matrix", genes=genes, cells=cells, fixed=True, notes=notes)


def _cellranger_v3(group, path):
    """Cell Ranger >= 3: group matrix with barcodes and features/{id, name, feature_type, genome};
    features of other types (Antibody Capture, CRISPR Guide Capture, ...) are set aside, in one note.
    -> (x cells x genes, gene names, barcodes, notes)"""
    _require(group, ("barcodes", "features/name", "features/feature_type"), path)
    x = _cellranger_counts(group, path)
    names = _strings(_values(group["features/name"], path))
    types = _strings(_values(group["features/feature_type"], path))
    if len(types) != x.shape[1]:
        raise ValueError(f"{path}: {len(types)} features for the {x.shape[1]} rows of {group.name}")
    keep = types == "Gene Expression"
    if not keep.any():
        raise ValueError(f"{path}: no Gene Expression features (it holds {_tally(types)})")
    notes = []
    if not keep.all():
        notes.append(f"{path}: kept the {keep.sum()} Gene Expression features; set aside "
                     f"{_tally(types[~keep])}")
        x = x[:, np.flatnonzero(keep)]
    return x, names[keep], _strings(_values(group["barcodes"], path)), notes


def _cellranger_v2(f, path):
    """Cell Ranger 2: one group per genome (/mm10, /GRCh38) with barcodes, genes (ids) and
    gene_names; several genomes of the same cells are joined, gene after gene -> as _cellranger_v3."""
    parts = []
    for genome in f.values():
        _require(genome, ("barcodes", "gene_names"), path)
        parts.append((_cellranger_counts(genome, path), _strings(_values(genome["gene_names"], path)),
                      _strings(_values(genome["barcodes"], path))))
    cells = parts[0][2]
    if any(not np.array_equal(barcodes, cells) for _, _, barcodes in parts[1:]):
        raise ValueError(f"{path}: its genomes ({', '.join(f)}) hold different barcodes; expected one "
                         "genome, or several of the same cells")
    return (sp.hstack([x for x, _, _ in parts], format="csr"), np.concatenate([g for _, g, _ in parts]),
            cells, [])


def _cellranger_counts(group, path):
    """A Cell Ranger matrix group (data, indices, indptr, shape: genes x cells, stored by cell, so
    CSC) -> CSR cells x genes."""
    return _read_sparse_group(group, path, group.name.lstrip("/"), fmt="csc").T.tocsr()


def _tally(values):
    """How many of each value: '31 Antibody Capture, 5 CRISPR Guide Capture'."""
    kinds, counts = np.unique(values, return_counts=True)
    return ", ".join(f"{c} {k}" for k, c in zip(kinds, counts))


def _require(group, keys, path):
    """Raise a one-line ValueError naming the first of keys (paths inside group) that it lacks."""
    missing = next((key for key in keys if key not in group), None)
    if missing:
        raise ValueError(f"{path}: {group.name.rstrip('/')}/{missing} is missing")


def _first_strings(f, keys, path):
    for key in keys:
        if isinstance(f.get(key), h5py.Dataset):
            return _strings(_values(f[key], path))
    return None


def _frame_index(frame, path):
    """The index (obs or var names) of an AnnData dataframe group, or None."""
    if not isinstance(frame, h5py.Group):
        return None
    key = frame.attrs.get("_index", "_index")
    key = key.decode() if isinstance(key, bytes) else key
    return _strings(_values(frame[key], path)) if isinstance(frame.get(key), h5py.Dataset) else None


def _obs_labels(obs, path, label_key, default_keys):
    """Labels from an obs column (loom: a col_attrs column) -> (codes or strings, category names
    or None).

    Categoricals are a group with categories + codes (anndata >= 0.8), or integer codes with their
    categories in obs/__categories/<column> (older anndata)."""
    key = label_key or next((k for k in default_keys if k in obs), None)
    if key is None:
        return None, None
    if key not in obs:
        raise ValueError(f"{path}: no {obs.name.lstrip('/')} column '{key}' "
                         f"(columns: {', '.join(list(obs)[:12])})")
    column = obs[key]
    if isinstance(column, h5py.Group):
        if "codes" not in column or "categories" not in column:
            raise ValueError(f"{path}: {obs.name.lstrip('/')} column '{key}' is neither categorical "
                             "nor a plain array")
        return _values(column["codes"], path), _strings(_values(column["categories"], path))
    if "__categories" in obs and key in obs["__categories"]:
        return _values(column, path), _strings(_values(obs["__categories"][key], path))
    return _decoded(_values(column, path)), None


def _read_matrix(item, path, what):
    """A dense HDF5 dataset or a CSR/CSC group -> CSR, in the stored orientation."""
    if isinstance(item, h5py.Group):
        return _read_sparse_group(item, path, what).tocsr()
    if not isinstance(item, h5py.Dataset):
        raise ValueError(f"{path}: {what} is neither a matrix nor a sparse matrix group")
    if item.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {what} holds non-numeric values ({item.dtype})")
    if item.ndim != 2:
        raise ValueError(f"{path}: {what} has {item.ndim} dimensions, expected a 2-d matrix")
    rows = max(1, BLOCK_ENTRIES // max(1, item.shape[1]))
    if item.chunks:
        rows = max(item.chunks[0], rows // item.chunks[0] * item.chunks[0])  # whole chunks, unzipped once
    blocks = [sp.csr_matrix(item[i:i + rows]) for i in range(0, item.shape[0], rows)]
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(item.shape, dtype=item.dtype)


def _read_sparse_group(group, path, what, fmt=None):
    """A CSR or CSC group (data, indices, indptr, shape as attribute or dataset) -> checked
    scipy CSR or CSC matrix; fmt ("csc", "csr") when the group does not say."""
    if not all(k in group for k in ("data", "indices", "indptr")):
        raise ValueError(f"{path}: group {what} is not a sparse matrix (needs data, indices, indptr)")
    fmt = fmt or group.attrs.get("encoding-type", group.attrs.get("h5sparse_format", "csr"))
    fmt = (fmt.decode() if isinstance(fmt, bytes) else str(fmt))[:3].upper()
    shape = group.attrs.get("shape", group.attrs.get("h5sparse_shape"))
    if shape is None and "shape" in group:
        shape = _values(group["shape"], path)
    shape = np.asarray(shape if shape is not None else []).ravel()
    whole = shape.dtype.kind in "iuf" and np.all(shape == np.round(shape)) and np.all(shape >= 0)
    if len(shape) != 2 or not whole:
        raise ValueError(f"{path}: group {what} has no 2-d shape (two whole numbers)")
    shape = tuple(int(s) for s in shape)
    data, indices, indptr = (_values(group[k], path) for k in ("data", "indices", "indptr"))
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {what} holds non-numeric values ({data.dtype})")
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


# -- text layouts (d), (e)


def _open_text(path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _read_lines(path):
    with _reading(path), _open_text(path) as fh:
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def _read_10x(path):
    """Layout (d): matrix.mtx[.gz] (genes x cells), barcodes.tsv[.gz], features.tsv[.gz] or genes.tsv;
    path is the folder or the .mtx file in it.

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
    genes = np.array([r[1] if len(r) > 1 else r[0] for r in _read_lines(features)]) if features else None
    if cells is None or len(cells) != m.shape[0] or len(cells) == m.shape[1]:
        m = m.T.tocsr()  # 10x writes genes x cells; a cells x genes file is told apart by its barcodes
    return _Parts(m, mtx.name, genes=genes, cells=cells, fixed=True)


def _find(folder, names):
    return next((folder / n for n in names if (folder / n).exists()), None)


def _read_text(path):
    """Layout (e): CSV/TSV[.gz], a header of column names (with or without a corner cell), then
    rows that start with their name; which axis holds the cells is _orient's to say."""
    delimiter = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    cells, rows, blocks = [], [], []
    with _reading(path), _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
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
        raise ValueError(f"{path}: no data rows (expected a header of gene names, then one row per cell)")
    n_genes = blocks[0].shape[1]
    if any(b.shape[1] != n_genes for b in blocks) or len(header) not in (n_genes, n_genes + 1):
        raise ValueError(f"{path}: header has {len(header)} fields for {n_genes} genes per row")
    genes = np.array(header[-n_genes:])
    x = sp.vstack(blocks, format="csr")
    return _Parts(x, "the table", genes=genes, cells=np.array(cells), table=True)


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
                    raise ValueError(f"{path}: line {first_line + i}: non-numeric count {value!r}") from None
        raise


# ---------------------------------------------------------------- preprocess


def preprocess(dataset, n_top_genes=1500):
    """Filter, normalise, log1p, pick highly variable genes, scale -> Prepared (scanpy's recipe, by hand).

    1. drop cells and genes with zero counts (Prepared.notes ends with one line saying how many);
    2. size factors s_i = l_i / median(l), l_i = sum_j X_ij the library size;
    3. normalise each cell to the median library size, X_ij / s_i, and take log1p;
    4. keep the n_top_genes genes of highest Seurat normalised dispersion (all when fewer remain);
    5. scale each kept gene to zero mean and unit variance (ddof=1, as scanpy), clip to [-10, 10].
    Works on CSR counts: only the (n, n_top_genes) selected columns become dense.
    counts: (n0, g0) -> x, counts: (n, g) float32, size_factors (n,), cells (n,), genes (g,)."""
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}")
    name = dataset.name or "dataset"
    x = sp.csr_matrix(dataset.counts, dtype=np.float32)
    _check_counts(x.data, name, "counts")
    n0, g0 = x.shape
    cells = np.flatnonzero(np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() > 0)
    genes = np.flatnonzero(np.asarray(x.sum(axis=0, dtype=np.float64)).ravel() > 0)
    if len(cells) < 3 or len(genes) < 3:
        raise ValueError(f"{name}: only {len(cells)} cells and {len(genes)} genes with non-zero counts "
                         "(need at least 3 of each)")
    if len(cells) < n0:
        x = x[cells]
    if len(genes) < g0:
        x = x[:, genes]
    library = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    size_factors = library / np.median(library)
    mean, var = _normalised_mean_var(x, size_factors)
    hvg = _seurat_hvg(mean, var, n_top_genes)
    counts = x[:, hvg].toarray()
    logx = np.log1p(counts / size_factors[:, None].astype(np.float32))
    genes = genes[hvg]
    note = (f"{name}: dropped {n0 - len(cells)} of {n0} cells and {g0 - x.shape[1]} of {g0} genes with "
            f"zero counts; kept {len(genes)} highly variable genes")
    labels = None if dataset.labels is None else np.asarray(dataset.labels)[cells]
    return Prepared(
        x=_scale(logx),
        counts=counts,
        size_factors=size_factors.astype(np.float32),
        genes=genes,
        cells=cells,
        labels=labels if labels is not None and np.any(labels >= 0) else None,  # all missing: unlabelled
        label_names=dataset.label_names,
        gene_names=_names(dataset.gene_names, "gene", g0)[genes],
        cell_names=_names(dataset.cell_names, "cell", n0)[cells],
        name=dataset.name,
        notes=list(dataset.notes) + [note],
    )


def _names(names, prefix, size):
    return np.asarray(names) if names is not None else np.array([f"{prefix}{i}" for i in range(size)])


def _normalised_mean_var(x, size_factors):
    """Mean and variance (ddof=1, as scanpy) of each gene of the normalised counts X_ij / s_i.

    x: (n, g) CSR counts; computed as E[y] and E[y^2] - E[y]^2 without densifying x."""
    n = x.shape[0]
    inv = 1.0 / size_factors
    mean = (x.T @ inv) / n
    mean_sq = (x.multiply(x).T @ (inv * inv)) / n
    var = np.maximum(mean_sq - mean * mean, 0.0) * n / (n - 1)
    return np.asarray(mean).ravel(), np.asarray(var).ravel()


def _seurat_hvg(mean, var, n_top):
    """Indices (ascending) of the n_top genes of highest normalised dispersion; all when g <= n_top."""
    if n_top >= len(mean):
        return np.arange(len(mean))
    z = normalised_dispersion(mean, var)
    return np.sort(np.argsort(-z, kind="stable")[:n_top])


def normalised_dispersion(mean, var, n_bins=20):
    """Seurat's normalised dispersion (Satija et al. 2015; scanpy flavor="seurat").

    mean, var: (g,) of the normalised (not log) counts. Dispersion d = log(var / mean); genes are
    binned into n_bins equal-width bins of log1p(mean) and d is z-scored within its bin (ddof=1).
    A bin holding a single gene has no spread: as in scanpy, its gene gets 1 (one standard
    deviation, so it is kept only when few genes stand out more). A bin whose genes all have the
    same d gets 0. Genes with zero variance get -inf (ranked last). -> (g,)"""
    with np.errstate(divide="ignore"):
        disp = np.log(var / mean)
    log_mean = np.log1p(mean)
    lo, hi = log_mean.min(), log_mean.max()
    edges = np.linspace(lo - 0.001 * (hi - lo), hi, n_bins + 1)  # pandas.cut widens the range by 0.1%
    bins = np.digitize(log_mean, edges[1:-1], right=True)
    z = np.full(len(disp), -np.inf)
    for b in np.unique(bins):
        members = (bins == b) & np.isfinite(disp)
        d = disp[members]
        if len(d) == 1:
            z[members] = 1.0
        elif len(d) > 1:
            std = d.std(ddof=1)
            z[members] = (d - d.mean()) / std if std > 0 else 0.0
    return z


def _scale(x, clip=10.0):
    """Each column to zero mean, unit variance (ddof=1), clipped to [-clip, clip]; constant columns -> 0."""
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1)
    std[np.ptp(x, axis=0) == 0] = np.inf  # constant: their float32 std is round-off, not always 0
    return np.clip((x - mean) / std, -clip, clip).astype(np.float32)


# ---------------------------------------------------------------- kNN graph


EXACT_KNN_CELLS = 20_000  # knn_graph searches exactly up to this many cells, approximately above


def knn_graph(x, k=15, n_pcs=50, exact=None):
    """Symmetric 0/1 adjacency A of the paper: i ~ j iff one is among the other's k nearest neighbours.

    x: (n, g) cells; Euclidean distances on the top n_pcs principal components (all of them when
    n_pcs >= min(n, g)); union of the two directions; no self loops. Neighbours are exact (a k-d
    tree) when `exact`, approximate (approximate_neighbours) otherwise; None picks exact up to
    EXACT_KNN_CELLS cells: in 50 dimensions a k-d tree degrades to a near n^2 search (114 s for
    100,000 synthetic cells on 2 cores; the approximate search takes 32 s there and finds 94% of
    the true neighbours). -> (n, n) scipy.sparse.csr_matrix, float32."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 2 or k < 1:
        raise ValueError(f"knn_graph needs at least 2 cells and k >= 1 (got {n} cells, k={k})")
    k = min(k, n - 1)
    pcs = pca(x, n_pcs)
    if exact or (exact is None and n <= EXACT_KNN_CELLS):
        _, idx = cKDTree(pcs).query(pcs, k=k + 1, workers=-1)
    else:
        idx = approximate_neighbours(pcs, k + 1)
    keep = idx != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False  # duplicates of a cell can push it out of its own list
    cols = idx[keep].reshape(n, k)
    a = sp.csr_matrix((np.ones(n * k, np.float32), cols.ravel(), np.arange(0, n * k + 1, k)), (n, n))
    return a.maximum(a.T).tocsr()


def approximate_neighbours(x, k, n_trees=8, leaf_size=1024, seed=0):
    """The k nearest rows of x (itself included) of every row, approximately, at a cost near n.

    A random projection forest, then one round of NN-descent (Dasgupta & Freund 2008; Dong,
    Charikar & Li 2011): each of n_trees trees splits the points at the median of a random
    direction, level by level, into leaves of at most leaf_size points, searched exactly; every
    point keeps its k best over the trees, then also looks among its neighbours' neighbours
    (a neighbour of a neighbour is likely a neighbour). x: (n, d) -> (n, k) indices, nearest first."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    found = [_leaf_neighbours(x, leaf, k) for _ in range(n_trees) for leaf in _rp_leaves(x, leaf_size, rng)]
    rows = np.concatenate([leaf for leaf, _ in found])
    order = np.argsort(rows, kind="stable")
    candidates = np.concatenate([c for _, c in found])[order].reshape(n, -1)
    best = _nearest(x, candidates, k)
    return _nearest(x, np.hstack([best, best[best].reshape(n, -1)]), k)


def _rp_leaves(x, leaf_size, rng):
    """Index arrays of the leaves of one random projection tree of x (see approximate_neighbours)."""
    node = np.zeros(len(x), dtype=np.int64)
    while np.bincount(node).max() > leaf_size:
        projection = x @ rng.normal(size=x.shape[1]).astype(np.float32)
        order = np.lexsort((projection, node))
        start = np.searchsorted(node[order], node[order], side="left")
        size = np.bincount(node)[node[order]]
        upper = (np.arange(len(x)) - start) >= size // 2
        node[order] = 2 * node[order] + upper
    order = np.argsort(node, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(node[order])) + 1)


def _leaf_neighbours(x, leaf, k):
    """(leaf, (len(leaf), k) nearest members of the leaf of each member, padded by repeats)."""
    d = squared_distances(x[leaf], x[leaf])
    near = np.argsort(d, axis=1)[:, :k] if len(leaf) > k else np.argsort(d, axis=1)
    near = np.pad(near, ((0, 0), (0, k - near.shape[1])), mode="edge")
    return leaf, leaf[near]


def _nearest(x, candidates, k, block=4096):
    """The k nearest distinct candidates of each row of x; candidates: (n, c) indices, c >= k."""
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), block):
        cand = np.sort(candidates[start:start + block], axis=1)
        d = ((x[cand] - x[start:start + block, None]) ** 2).sum(2)
        d[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf  # a candidate listed twice counts once
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        out[start:start + block] = np.take_along_axis(cand, nearest, axis=1)
    return out


def pca(x, n_pcs=50):
    """Coordinates of x on its top n_pcs principal components, by an eigendecomposition of the
    smaller of X^T X (g x g) and X X^T (n x n), X = x centred. x: (n, g) -> (n, min(n_pcs, n, g)).
    When every component is asked for, X itself is returned (the rotation changes no distance)."""
    xc = x - x.mean(axis=0)
    n, g = xc.shape
    m = min(n_pcs, n, g)
    if m == g:
        return xc
    if g <= n:
        _, v = scipy.linalg.eigh(xc.T @ xc, subset_by_index=[g - m, g - 1])  # ascending eigenvalues
        return xc @ v[:, ::-1]
    w, u = scipy.linalg.eigh(xc @ xc.T, subset_by_index=[n - m, n - 1])
    return u[:, ::-1] * np.sqrt(np.maximum(w[::-1], 0.0))  # X = U S V^T: scores U S


# ---------------------------------------------------------------- a run's output folder

def describe(prepared, adjacency, k, log):
    """The lines a run starts with: what preprocessing kept, the graph, the cells scored."""
    n, g = prepared.x.shape
    for note in prepared.notes:
        log(note)
    log(f"{prepared.name}: {n} cells x {g} genes, K = {k}, graph {adjacency.nnz // 2} edges")
    if prepared.labels is not None and np.any(prepared.labels < 0):
        labelled = np.count_nonzero(prepared.labels >= 0)
        log(f"scored {labelled} of {n} cells with labels; the other {n - labelled} have none and "
            "are clustered, not scored")


def peak_memory_mb():
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_out(out, overwrite):
    """Refuse, in one line, an output folder out that is not empty (unless overwrite) or cannot
    be created: checked before any work, so a bad --out costs nothing."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty (use --overwrite)")
    base = next(p for p in out.absolute().parents if p.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot create the output folder ({base} is not a writable folder)")


def scratch_folder(out):
    """A new hidden folder beside out, where a run writes its files before publish moves them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def write_run(folder, cell_names, labels, embedding, history, summary):
    """labels.csv (cell, cluster), embedding.csv (cell, z1..zd), history.csv (one row per history
    dict, the union of their keys as columns) and summary.json into folder."""
    _write_csv(folder / "labels.csv", ["cell", "cluster"], zip(cell_names, labels.tolist()))
    header = ["cell"] + [f"z{j + 1}" for j in range(embedding.shape[1])]
    _write_csv(folder / "embedding.csv", header,
               ([c, *row] for c, row in zip(cell_names, embedding.tolist())))
    keys = list(dict.fromkeys(k for row in history for k in row))
    _write_csv(folder / "history.csv", keys, ([row.get(k, "") for k in keys] for row in history))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def publish(tmp, out, overwrite):
    """Move the finished folder tmp to out (replacing it with overwrite): out never holds half a
    run, and a run that fails leaves out as it was."""
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


# ---------------------------------------------------------------- synthetic data

# Shape of the demo data, tuned so that k-means on the top PCs of preprocess(synthetic()).x reaches
# an ARI of about 0.7-0.85 (it cuts each pair of interlocking arcs the wrong way) while spectral
# clustering of knn_graph() reaches 0.95-1.0.
SYN_SEPARATION = 4.0   # distance of each pair of arcs from the origin, along its own direction
SYN_RADIUS = 2.0       # radius of each arc
SYN_OFFSET = -0.25     # vertical offset of the second arc of a pair, in radii (two moons: 0.5)
SYN_WIDTH = 0.3        # half thickness of each sheet, along a third direction
SYN_NOISE = 0.1        # sd of the isotropic latent noise
SYN_GAIN = 2.5         # scale of the log fold changes made by the random decoder
SYN_INFORMATIVE = 0.7  # fraction of genes that depend on the latent position
SYN_DROPOUT = 0.6      # pi_ig = SYN_DROPOUT / (1 + mu_ig): dropout hits weakly expressed entries
DEMOS = {  # --demo PRESET -> synthetic()'s keywords
    "easy": {},
    "hard": {"noise": 0.3},  # three times the latent noise: the two arcs of each pair touch
}


def synthetic(n_cells=1500, n_genes=1000, n_clusters=6, seed=0, depth=3000.0, noise=SYN_NOISE):
    """Labelled ZINB counts whose clusters lie on curved manifolds (the demo and test data).

    Latent z: clusters 2p and 2p+1 are two interlocking arcs thickened into bent sheets (_bent_sheets).
    Genes: eta_ig = b_g + m_g (tanh(z_i W1 + c) W2)_g, a random one-hidden-layer map; m_g = 1 for a
    fraction SYN_INFORMATIVE of the genes, 0 for the rest. Counts: mu_ig = l_i softmax_g(eta_i)
    with library sizes l_i log-normal (median `depth` counts per cell, 3000 by default: UMI-like);
    X_ig ~ NB(mu_ig, theta_g) drawn as Poisson(Gamma(theta_g, mu_ig / theta_g)); then a dropout
    zero with probability pi_ig. noise: the latent noise's sd (DEMOS["hard"]: 0.3).
    Deterministic for a seed. -> Dataset: counts (n_cells, n_genes) int64 dense, labels 0..K-1."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_cells) % n_clusters)
    z = _bent_sheets(labels, n_clusters, rng, noise)
    eta = _random_decoder(z, n_genes, rng)
    library = rng.lognormal(np.log(depth), 0.35, n_cells)
    profile = np.exp(eta - eta.max(axis=1, keepdims=True))
    mu = library[:, None] * profile / profile.sum(axis=1, keepdims=True)
    theta = rng.lognormal(np.log(4.0), 0.5, n_genes)  # NB inverse dispersion, one per gene
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    counts[rng.random(counts.shape) < SYN_DROPOUT / (1.0 + mu)] = 0
    return Dataset(
        counts=counts,
        labels=labels.astype(np.int64),
        label_names=np.array([f"cluster{k}" for k in range(n_clusters)]),
        gene_names=np.array([f"gene{j}" for j in range(n_genes)]),
        cell_names=np.array([f"cell{i}" for i in range(n_cells)]),
        name="synthetic",
    )


def _bent_sheets(labels, n_clusters, rng, noise):
    """Latent codes (n, 4P), P = ceil(K / 2) pairs: pair p sits at SYN_SEPARATION * e_p; in its
    plane (f_p, g_p) cluster 2p is the upper arc R (cos t, sin t) and cluster 2p+1 the lower arc
    R (1 - cos t, SYN_OFFSET - sin t), t ~ U[0, pi] (two moons); a width s ~ U[-1, 1] along h_p
    bends the arcs into sheets; then isotropic noise of sd noise. e, f, g, h: a random
    orthonormal basis."""
    n, n_pairs = len(labels), (n_clusters + 1) // 2
    dim = 4 * n_pairs
    e, f, g, h = np.linalg.qr(rng.normal(size=(dim, dim)))[0].reshape(4, n_pairs, dim)
    pair, lower = labels // 2, (labels % 2).astype(bool)
    t = rng.uniform(0.0, np.pi, n)
    u = SYN_RADIUS * np.where(lower, 1 - np.cos(t), np.cos(t))
    v = SYN_RADIUS * np.where(lower, SYN_OFFSET - np.sin(t), np.sin(t))
    s = SYN_WIDTH * rng.uniform(-1.0, 1.0, n)
    z = SYN_SEPARATION * e[pair] + u[:, None] * f[pair] + v[:, None] * g[pair] + s[:, None] * h[pair]
    return z + rng.normal(0.0, noise, z.shape)


def _random_decoder(z, n_genes, rng, hidden=32):
    """A random nonlinear map from latent codes to log relative expression: (n, d) -> (n, g)."""
    w1 = rng.normal(0.0, 1.0 / np.sqrt(z.shape[1]), (z.shape[1], hidden))
    c = rng.normal(0.0, 0.5, hidden)
    w2 = rng.normal(0.0, SYN_GAIN / np.sqrt(hidden), (hidden, n_genes))
    base = rng.normal(0.0, 1.5, n_genes)  # b_g: log-normal spread of gene abundances
    informative = rng.random(n_genes) < SYN_INFORMATIVE
    return base + informative * (np.tanh(z @ w1 + c) @ w2)

