"""What the test files share: toy count matrices and the files that hold them, tiny training
problems, the command line run in a subprocess, and brute-force references (modularity, ARI,
k-means inertia, the structure loss and its gradient) used by the tests of several modules.
"""
import itertools
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import torch

import datasets
import sctcm
from model import Config, structure_loss

REPO = Path(__file__).resolve().parent


def toy(seed=0, n=30, g=12):
    """A small count matrix (n cells x g genes, every cell and gene non-zero) with string labels."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n, g))
    x[:, 0] += 1
    x[0] += 1
    labels = np.array(["beta", "alpha", "delta"])[np.arange(n) % 3]
    return x, labels


def strings(values):
    return np.array(values, dtype="S")  # bytes, as the paper's and scDCC's files store them


def write_anndata_matrix(parent, key, x, fmt="csr"):
    """x as anndata writes a matrix: dense, or a group with encoding-type csr_matrix / csc_matrix
    and a shape attribute."""
    if fmt == "dense":
        parent.create_dataset(key, data=x.astype(np.float32))
        return
    m = sp.csr_matrix(x, dtype=np.float32) if fmt == "csr" else sp.csc_matrix(x, dtype=np.float32)
    g = parent.create_group(key)
    g.attrs["encoding-type"], g.attrs["encoding-version"] = f"{fmt}_matrix", "0.1.0"
    g.attrs["shape"] = m.shape
    for name in ("data", "indices", "indptr"):
        g.create_dataset(name, data=getattr(m, name))


def write_h5ad(path, x, labels, fmt="csr", categorical="codes"):
    """An AnnData-style file: X (dense / CSR / CSC group), obs with a categorical cell_type, var."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        write_anndata_matrix(f, "X", x, fmt)
        categories, codes = np.unique(labels, return_inverse=True)
        obs = f.create_group("obs")
        obs.attrs["_index"] = "_index"
        obs.create_dataset("_index", data=strings([f"c{i}" for i in range(len(x))]))
        if categorical == "codes":  # anndata >= 0.8
            col = obs.create_group("cell_type")
            col.attrs["encoding-type"] = "categorical"
            col.create_dataset("categories", data=strings(categories))
            col.create_dataset("codes", data=codes.astype(np.int8))
        else:  # older anndata: integer codes, categories in obs/__categories
            obs.create_dataset("cell_type", data=codes.astype(np.int8))
            obs.create_group("__categories").create_dataset("cell_type", data=strings(categories))
        var = f.create_group("var")
        var.attrs["_index"] = "_index"
        var.create_dataset("_index", data=strings([f"g{j}" for j in range(x.shape[1])]))


def write_arrays(path, **arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def pairwise_modularity(a, groups, resolution):
    """Q = (1 / 2m) sum_ij [A_ij - resolution d_i d_j / 2m] delta(c_i, c_j), pair by pair."""
    a = a.toarray()
    d, two_m, q = a.sum(1), a.sum(), 0.0
    for i, j in itertools.product(range(len(a)), repeat=2):
        if groups[i] == groups[j]:
            q += a[i, j] - resolution * d[i] * d[j] / two_m
    return q / two_m


def pairs_ari(y, pred):
    """ARI from its definition over all pairs of cells (Hubert & Arabie 1985)."""
    n = len(y)
    same_y = [y[i] == y[j] for i, j in itertools.combinations(range(n), 2)]
    same_p = [pred[i] == pred[j] for i, j in itertools.combinations(range(n), 2)]
    a = sum(s and t for s, t in zip(same_y, same_p))
    total = n * (n - 1) / 2
    expected = sum(same_y) * sum(same_p) / total
    top = (sum(same_y) + sum(same_p)) / 2
    return (a - expected) / (top - expected)


def random_graph(n, p, seed):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, 1)
    return sp.csr_matrix((upper | upper.T).astype(np.float32))


def structure_problem(n=60, p=0.1, d=4, seed=1):
    a = random_graph(n, p, seed)
    coo = a.tocoo()
    edges = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    z = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return z, edges


def loss_and_grad(z, edges, pairs=None):
    z = z.clone().requires_grad_()
    loss = structure_loss(z, edges, pairs=pairs)
    loss.backward()
    return loss.item(), z.grad


def tiny_problem(n_cells=300, seed=0, depth=3000.0):
    data = datasets.synthetic(n_cells=n_cells, n_genes=200, n_clusters=3, seed=seed, depth=depth)
    prepared = datasets.preprocess(data, n_top_genes=150)
    return prepared, datasets.knn_graph(prepared.x, k=10, n_pcs=20)


def tiny_config(**changes):
    base = dict(pretrain_epochs=10, max_epochs=12, min_epochs=12, eval_every=6, update_every=3,
                n_over=6, hidden=32, decoder=(32,), disc_hidden=8, n_cvx=8)
    return Config(**{**base, **changes})


def kept_by_loop(z, labels):
    """kept with a loop over the points: nearest cluster mean by explicit distances."""
    means = {c: np.mean([p for p, l in zip(z, labels) if l == c], axis=0) for c in set(labels)}
    nearest = [min(means, key=lambda c: float(np.sum((p - means[c]) ** 2))) for p in z]
    return np.mean(np.array(nearest) == labels)


def inertia_by_loop(z, labels, centres):
    return sum(float(np.sum((point - centres[c]) ** 2)) for point, c in zip(z, labels))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "sctcm.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def plot_run(tmp_path):
    """The command line with --plot on a small labelled file -> (exit code, stdout, out folder)."""
    data = datasets.synthetic(n_cells=240, n_genes=120, n_clusters=3, seed=0)
    write_arrays(tmp_path / "toy.h5", X=np.asarray(data.counts), Y=data.labels)
    out = tmp_path / "out"
    code = sctcm.main([str(tmp_path / "toy.h5"), "--clusters", "3", "--out", str(out), "--plot",
                       *QUICK.split()])
    return code, out


QUICK = ("--pretrain-epochs 3 --max-epochs 3 --min-epochs 1 --eval-every 1 --n-over 4 "
         "--hidden 16 --latent 4 --decoder 16 --disc-hidden 4 --n-cvx 4")


def refused(capsys, tmp_path, *args, out=None):
    """sctcm.main(args) must return 2, print exactly one line on stderr (returned) and write
    nothing: no output folder, no temporary one."""
    before = set(tmp_path.iterdir())
    assert sctcm.main([*map(str, args), "--out", str(out or tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sctcm: error: "), err
    assert set(tmp_path.iterdir()) == before
    return err


def toy_csv():
    x, _ = toy()
    rows = [f"c{i}," + ",".join(map(str, row)) for i, row in enumerate(x)]
    return "\n".join(["cell," + ",".join(f"g{j}" for j in range(x.shape[1]))] + rows) + "\n"
