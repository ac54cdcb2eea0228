"""Train once, use again: the model a run saves (model.pt), loading it without running code,
new cells of the same tissue assigned with it, and phase 2 again from its phase 1.

model.pt holds plain data only (tensors, numbers, strings, lists and dicts), so that
torch.load(..., weights_only=True) reads it and a file from a stranger cannot run anything:
- the Config, K, f_E and f_D^(2) at the end (their weights), phi^c, beta_c and phi^o;
- phase 1 as training.Pretrained.state() leaves it (weights, history rows, generators), for
  --resume, with a digest of the data it was trained on;
- what preprocessing learned (datasets.Scaling: the kept genes by name, the median library
  size, each gene's mean and sd) and the principal components the graph was built on.

    python sctcm.py data.h5 --clusters 8 --out run        # writes run/model.pt
    python sctcm.py new.h5 --model run --out new_run      # new cells: no training
    python sctcm.py data.h5 --resume run --clusters 9     # phase 2 at K = 9 from run's phase 1
    trained = sctcm.load("run"); result = sctcm.assign(trained, counts, gene_names)
"""
import dataclasses
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import datasets
import training
from clustering import scores
from model import Config, Model

MODEL_FILE = "model.pt"
MODEL_FORMAT = 1  # raised whenever what save writes changes; load refuses any other


@dataclass
class Trained:
    """A saved run, as load reads it."""
    config: Config
    model: Model              # f_E and f_D^(2) at the end of phase 2
    centres: np.ndarray       # phi^c, (K, d)
    beta_c: np.ndarray        # (K,) Eq. (6)'s threshold of each cluster
    phi_o: np.ndarray         # (n_o, d)
    phase1: dict              # training.Pretrained.state() after phase 1
    data_digest: str          # datasets.digest of the cells and graph it was trained on
    scaling: datasets.Scaling
    components: tuple         # (mean (g,), axes (g, m)): the PCs of its graph
    folder: Path

    @property
    def n_clusters(self):
        return len(self.centres)


def save(path, result, config, prepared, adjacency):
    """result's model (training.fit's Result, model and phase1 set), with config and what
    preparing the cells learned (prepared.scaling, prepared.components), into path."""
    scaling = prepared.scaling
    tensor = lambda values: torch.as_tensor(np.asarray(values, dtype=np.float32))
    weights = {key: value.detach().cpu() for key, value in result.model.state_dict().items()}
    torch.save({
        "format": MODEL_FORMAT,
        "config": dataclasses.asdict(config),
        "model": weights, "phi_c": tensor(result.centres), "beta_c": tensor(result.beta_c),
        "phi_o": tensor(result.phi_o),
        "phase1": _on_cpu(result.phase1), "data_digest": datasets.digest(prepared, adjacency),
        "scaling": {"genes": [str(gene) for gene in scaling.genes],
                    "median_library": scaling.median_library, "mean": tensor(scaling.mean),
                    "sd": tensor(scaling.sd), "clip": scaling.clip},
        "components": {"mean": torch.as_tensor(np.ascontiguousarray(prepared.components[0])),
                       "axes": torch.as_tensor(np.ascontiguousarray(prepared.components[1]))},
    }, path)


def _on_cpu(value):
    """value with every tensor in it moved to the CPU (dicts and lists walked)."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_cpu(item) for item in value]
    return value


def load(folder):
    """The run saved in folder (its model.pt) -> Trained; a one-line ValueError for a folder
    without one, a file of another format, or one that holds anything but plain data (torch.load
    with weights_only=True stops before running it)."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {MODEL_FILE} (a run's output folder holds one)")
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a model file this code reads without running code "
                         f"({first[:120]})") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else None
        raise ValueError(f"{path}: a model of format {found!r}; this code reads format "
                         f"{MODEL_FORMAT} (train again with this version)")
    config = Config(**{**saved["config"], "decoder": tuple(saved["config"]["decoder"])})
    scaling = saved["scaling"]
    model = Model(len(scaling["genes"]), config)
    model.load_state_dict(saved["model"])
    numpy = lambda key: saved[key].numpy()
    return Trained(
        config=config, model=model.eval(), centres=numpy("phi_c"), beta_c=numpy("beta_c"),
        phi_o=numpy("phi_o"), phase1=saved["phase1"], data_digest=saved["data_digest"],
        scaling=datasets.Scaling(np.array(scaling["genes"]), scaling["median_library"],
                                 scaling["mean"].numpy(), scaling["sd"].numpy(),
                                 scaling["clip"]),
        components=(saved["components"]["mean"].numpy(), saved["components"]["axes"].numpy()),
        folder=Path(folder))


def assign(trained, dataset, log=print, device="cpu"):
    """New cells of dataset assigned by a trained model, without training: preprocessed as its
    own cells were (datasets.prepare_like: the same genes by name, size factors, scaling), their
    own kNN graph on its principal components (datasets.project), its encoder, then Eq. (5) at
    its centres (training.assignment) -> (prepared, Result: labels, embedding, confidence,
    margin, reliable, centres, beta_c; metrics: the scores when the cells are labelled)."""
    prepared = datasets.prepare_like(dataset, trained.scaling)
    for note in prepared.notes:
        log(note)
    points = datasets.project(prepared.x, trained.components)
    adjacency = datasets.neighbour_graph(points, trained.config.n_neighbors)
    data = training.tensors(prepared, adjacency, device)
    z = training.codes(trained.model.to(device), data)
    result = training.assignment(z, trained.centres, trained.beta_c)
    result.metrics = scores(prepared.labels, result.labels)
    log(f"{prepared.name}: {len(z)} cells assigned to the {trained.n_clusters} clusters of "
        f"{trained.folder} (its encoder on their graph of {adjacency.nnz // 2} edges, Eq. 5 at "
        "its centres)")
    return prepared, result


def resumed(trained, prepared, adjacency, config):
    """Phase 1 of a saved run, to run phase 2 again (training.fit's pretrained) on the same
    cells and graph (datasets.digest: else a one-line ValueError) with config, whose phase-1
    settings must be the run's."""
    if datasets.digest(prepared, adjacency) != trained.data_digest:
        raise ValueError(f"--resume {trained.folder}: these are not the cells (or the graph) its "
                         "phase 1 was trained on; give the same file and preprocessing")
    return training.Pretrained.restore(trained.phase1, prepared, adjacency, config)
