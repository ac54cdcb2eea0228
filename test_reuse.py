"""Tests of reuse.py: the model a run saves, loading it without running code, new cells assigned
with it, and phase 2 again from its phase 1.

Run: python -m pytest -q (README, "Tests").
"""
import pickle
import zipfile

import numpy as np
import pytest
import torch

import datasets
import formats
import reuse
import sctcm
import training
from model import Config
from testkit import refused


QUICK_RUN = ["--pretrain-epochs", "6", "--max-epochs", "4", "--min-epochs", "4", "--eval-every",
             "2", "--hidden", "16", "--latent", "4", "--decoder", "16", "--n-over", "6",
             "--disc-hidden", "4", "--n-cvx", "4"]


def _cells(n_cells=240, seed=0, genes=None):
    """Synthetic cells with gene names (gene0, ...), optionally only the given genes."""
    data = datasets.synthetic(n_cells=n_cells, n_genes=120, n_clusters=3, seed=seed)
    if genes is not None:
        data.counts, data.gene_names = data.counts[:, genes], data.gene_names[genes]
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run of the command line on _cells() written as an X/Y file -> (folder, path)."""
    folder = tmp_path_factory.mktemp("run")
    formats.write_xy(folder / "cells.h5", _cells())
    assert sctcm.main([str(folder / "cells.h5"), "--clusters", "3", "--out",
                       str(folder / "run"), *QUICK_RUN]) == 0
    return folder / "run", folder / "cells.h5"


@pytest.mark.parametrize("dense_limit", [datasets.DENSE_LIMIT, 0])
def test_the_saved_preprocessing_gives_the_training_cells_prepared_back_exactly(dense_limit):
    data = _cells()
    prepared = datasets.preprocess(data, n_top_genes=80, dense_limit=dense_limit)
    again = datasets.prepare_like(data, prepared.scaling, dense_limit=dense_limit)
    if dense_limit:
        assert np.array_equal(again.x, prepared.x) and np.array_equal(again.counts,
                                                                       prepared.counts)
    else:
        assert np.array_equal(again.x.s.toarray(), prepared.x.s.toarray())
        assert np.array_equal(again.x.v, prepared.x.v)
        assert (again.counts != prepared.counts).nnz == 0
    assert np.array_equal(again.size_factors, prepared.size_factors)
    assert np.array_equal(again.cells, prepared.cells)
    assert np.array_equal(again.genes, prepared.genes)
    assert list(again.gene_names) == list(prepared.gene_names)


def test_prepare_like_matches_genes_by_name_and_reads_a_missing_gene_as_no_counts():
    data = _cells()
    prepared = datasets.preprocess(data, n_top_genes=80)
    order = np.random.default_rng(0).permutation(120)
    shuffled = _cells(genes=order)  # the same cells, the genes in another order
    again = datasets.prepare_like(shuffled, prepared.scaling)
    assert np.array_equal(again.x, prepared.x)
    lacking = np.setdiff1d(np.arange(120), [int(g[4:]) for g in prepared.gene_names[:5]])
    fewer = datasets.prepare_like(_cells(genes=lacking), prepared.scaling)
    assert "75 of the model's 80 genes found, the other 5 read as zero counts" in fewer.notes[-1]
    assert np.all(fewer.counts[:, :5] == 0) and np.all(fewer.genes[:5] == -1)
    zero = np.clip(-prepared.scaling.mean[:5] / prepared.scaling.sd[:5], -10, 10)
    np.testing.assert_allclose(fewer.x[:, :5], np.broadcast_to(zero, (len(fewer.x), 5)),
                               rtol=1e-6)
    renamed = _cells()
    renamed.gene_names = np.array([f"ENSG{j:011d}" for j in range(120)])
    with pytest.raises(ValueError, match="none of the model's 80 genes.*another gene naming"):
        datasets.prepare_like(renamed, prepared.scaling)


def test_a_run_writes_its_model_and_loading_it_gives_the_codes_the_run_wrote(run):
    folder, path = run
    trained = reuse.load(folder)
    assert trained.n_clusters == 3 and trained.config.latent == 4
    assert (folder / "model.pt").stat().st_size < 5e6
    prepared, result = reuse.assign(trained, formats.load(path), log=lambda line: None)
    written = np.loadtxt(folder / "embedding.csv", delimiter=",", skiprows=1,
                         usecols=range(1, 5))
    np.testing.assert_allclose(result.embedding, written, rtol=1e-6, atol=1e-7)
    labels = np.genfromtxt(folder / "labels.csv", delimiter=",", skip_header=1, usecols=1)
    assert np.array_equal(result.labels, labels)
    p = training.soft_assign(torch.as_tensor(result.embedding), torch.as_tensor(trained.centres))
    np.testing.assert_allclose(result.confidence, p.max(1).values.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_model_assigns_new_cells_and_writes_their_evidence(run, tmp_path, capsys):
    folder, _ = run
    formats.write_xy(tmp_path / "new.h5", _cells(n_cells=150, seed=0))
    assert sctcm.main([str(tmp_path / "new.h5"), "--model", str(folder), "--out",
                       str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "150 cells assigned to the 3 clusters" in out
    header = (tmp_path / "new" / "labels.csv").read_text().splitlines()[0]
    assert header == "cell,cluster,confidence,margin,reliable,note"
    assert not (tmp_path / "new" / "model.pt").exists()  # it trained nothing


@pytest.mark.slow
@pytest.mark.parametrize("k", [3, 4])
def test_resume_gives_a_run_at_k_from_the_same_phase_1_byte_for_byte(run, tmp_path, k):
    """--resume RUN --clusters K: the labels, codes and history of fit at K resumed from RUN's
    own phase 1 (as choose_k resumes one phase 1 at every K); at RUN's K, RUN's own files."""
    folder, path = run
    assert sctcm.main([str(path), "--resume", str(folder), "--clusters", str(k), "--out",
                       str(tmp_path / "again"), *QUICK_RUN]) == 0
    config = reuse.load(folder).config
    prepared, adjacency = sctcm.prepare(formats.load(path), [k], config)
    phase1 = training.Pretrained.restore(reuse.load(folder).phase1, prepared, adjacency, config)
    expected = training.fit(prepared, adjacency, k, config, log=lambda line: None,
                            pretrained=phase1)
    written = np.loadtxt(tmp_path / "again" / "embedding.csv", delimiter=",", skiprows=1,
                         usecols=range(1, 5))
    np.testing.assert_array_equal(written.astype(np.float32), expected.embedding)
    for name in ("labels.csv", "embedding.csv", "history.csv") if k == 3 else ():
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()


def test_a_model_file_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path):
    """A model.pt edited to carry a pickled object whose unpickling runs code: load refuses it
    in one line, and the code never ran."""
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    (tmp_path / "evil").mkdir()
    torch.save({"format": reuse.MODEL_FORMAT, "config": Payload()}, tmp_path / "evil" / "model.pt")
    with pytest.raises(ValueError, match="not a model file this code reads without running"):
        reuse.load(tmp_path / "evil")
    assert not ran.exists()
    with zipfile.ZipFile(tmp_path / "evil" / "model.pt") as archive:  # it was a real pickle
        assert any(name.endswith("data.pkl") for name in archive.namelist())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil" / "model.pt", weights_only=True)


def test_a_model_of_another_format_or_no_model_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    torch.save({"format": reuse.MODEL_FORMAT + 1}, tmp_path / "old" / "model.pt")
    with pytest.raises(ValueError, match="a model of format 2; this code reads format 1"):
        reuse.load(tmp_path / "old")
    with pytest.raises(ValueError, match="no model.pt"):
        reuse.load(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--model", "{run}", "--clusters", "3"], "--clusters sets how a run trains; --model"),
    (["--model", "{run}", "--gamma-c", "2"], "--gamma-c sets how a run trains"),
    (["--model", "{run}", "--seeds", "2"], "--seeds sets how a run trains"),
    (["--model", "{empty}"], "no model.pt"),
    (["--resume", "{run}", "--clusters", "3", "--latent", "8"],
     "--latent 8: --resume runs phase 2 from the phase 1 of"),
    (["--resume", "{run}", "--clusters", "3", "--seeds", "2"], "--seeds runs phase 1 again"),
    (["--resume", "{run}", "--clusters", "3", "--n-top-genes", "50"], "--n-top-genes 50"),
])
def test_model_and_resume_refuse_what_cannot_apply_in_one_line(run, tmp_path, capsys, args,
                                                                message):
    folder, path = run
    (tmp_path / "empty").mkdir()
    args = [a.format(run=folder, empty=tmp_path / "empty") for a in args]
    assert message in refused(capsys, tmp_path, path, *args)


def test_resume_refuses_other_cells(run, tmp_path, capsys):
    folder, _ = run
    formats.write_xy(tmp_path / "other.h5", _cells(seed=1))
    err = refused(capsys, tmp_path, tmp_path / "other.h5", "--resume", folder, "--clusters", "3")
    assert "these are not the cells (or the graph) its phase 1 was trained on" in err


def test_new_cells_of_another_gene_naming_are_refused(run, tmp_path, capsys):
    folder, _ = run
    renamed = _cells()
    renamed.gene_names = np.array([f"ENSG{j:011d}" for j in range(120)])
    formats.write_xy(tmp_path / "renamed.h5", renamed)
    err = refused(capsys, tmp_path, tmp_path / "renamed.h5", "--model", folder)
    assert "none of the model's" in err and "another gene naming" in err


def test_sctcm_load_and_assign_in_python_line_up_with_the_input_rows(run):
    folder, _ = run
    trained = sctcm.load(folder)
    data = _cells(n_cells=60, seed=0)
    counts = np.vstack([np.zeros((1, 120)), data.counts])  # a first row without counts
    result = sctcm.assign(trained, counts, data.gene_names, log=lambda line: None)
    assert result.labels.shape == (61,) and result.labels[0] == -1
    assert np.isnan(result.embedding[0]).all() and (result.labels[1:] >= 0).all()
    assert isinstance(trained.config, Config)
