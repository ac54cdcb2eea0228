"""Training scTCM (Sec. 3.2 of Mrabah et al., IJCAI 2023): phase 1, the start, phase 2, the stop.

Phase 1 minimises L_SS (Eq. 4) and knows no K. The start gives the centres phi^c (the mean
codes of a partition of the cells) and phi^o (k-means on Z). Phase 2 alternates the paper's
three steps, L_SS + gamma_c L_c, L_SS + gamma_o L_o and L_SS + gamma_g L_g, each followed by an
update of the discriminators (Eq. 12), recomputes the targets q every update_every epochs, and
stops when the clusters' mean intrinsic dimension reaches their mean linear intrinsic dimension
(Fig. 2). The model and its losses are in model.py; what is printed is in report.py, which never
decides anything.
"""
import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import geometry
import settings
from clustering import (agreement_groups, check_partition, kmeans, kmeans_restarts,
                        lowest_inertia, merge_overclusters, merges, most_central, most_kept,
                        scores, spectral_clustering, squared_distances)
from model import (Adversary, Batch, Config, Model, Pass, Samples, SparseCounts, SparseInput,
                   SparsePattern, auto_threshold, clustering_loss, log_mean, margins,
                   normalized_adjacency, optimise, self_supervised_loss, self_supervision,
                   soft_assign, target_distribution)
from report import Report


@dataclass
class Result:
    """What fit returns: final labels (argmax of Eq. 5), codes Z, one history row per log, and
    what Eqs. (5)-(6) say of each cell at the end."""
    labels: np.ndarray
    embedding: np.ndarray
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # scores, start, clusters, warnings, ...
    pretrained: np.ndarray | None = None  # the codes Z at the end of phase 1
    start: np.ndarray | None = None       # the partition whose mean codes started phi^c
    centres: np.ndarray | None = None     # phi^c at the end, (K, d): Eq. (5) from embedding
    confidence: np.ndarray | None = None  # p of Eq. (5) for each cell's cluster
    margin: np.ndarray | None = None      # top-1 minus top-2 of p, what Eq. (6) thresholds
    reliable: np.ndarray | None = None    # margin >= beta_c at the end: the final Omega_c
    beta_c: np.ndarray | None = None      # (K,) the threshold of Eq. (6) at each cluster
    reliable_start: np.ndarray | None = None  # Omega_c of the first targets (the start's codes)
    stability: np.ndarray | None = None   # with several seeds: share of runs that agree
    baseline: np.ndarray | None = None    # k-means on the principal components (fit_seeds)
    every_k: dict | None = None           # K -> labels of a phase 2 at every K (fit_ks)
    model: Model | None = None            # f_E and f_D^(2) at the end (reuse.save)
    phi_o: np.ndarray | None = None       # phi^o at the end, (n_o, d)
    phase1: dict | None = None            # Pretrained.state() after phase 1 (--resume)


# ---------------------------------------------------------------- what every epoch reads

def tensors(prepared, adjacency, device):
    """What every epoch reads, as tensors on the device: encoder input x, counts, lgamma(counts
    + 1) (computed once), size factors, and the graph (graph_tensors). For many cells
    (datasets.ScaledCounts) x is a SparseInput and the counts SparseCounts, on one SparsePattern,
    and lgamma(counts + 1) is made per batch."""
    size_factors = torch.as_tensor(prepared.size_factors, dtype=torch.float32, device=device)
    common = {"size_factors": size_factors[:, None], **graph_tensors(adjacency, device)}
    if isinstance(prepared.x, datasets.ScaledCounts):
        pattern = SparsePattern(prepared.counts, device)
        as_values = lambda data: torch.as_tensor(data, dtype=torch.float32, device=device)
        return {"x": SparseInput(pattern, as_values(prepared.x.s.data), as_values(prepared.x.v)),
                "counts": SparseCounts(pattern, as_values(prepared.counts.data)), **common}
    counts = torch.as_tensor(prepared.counts, dtype=torch.float32, device=device)
    return {"x": torch.as_tensor(prepared.x, dtype=torch.float32, device=device),
            "counts": counts, "lgamma_x1": torch.lgamma(counts + 1), **common}


def graph_tensors(adjacency, device):
    """The graph A as every epoch reads it: A_n of Eq. (1) ("a_norm") and the edges of A, both
    directions, for Eq. (2) ("edges")."""
    coo = sp.coo_matrix(adjacency)
    return {"a_norm": normalized_adjacency(adjacency).to(device),
            "edges": torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long,
                                     device=device)}


class Sampler:
    """The Batch of each epoch (Config.losses: "sampled", or "auto" above batch_size cells).
    Sampled path: batch_size cells without replacement (the cells of Eqs. 3, 7, 10) and, for
    every cell i, |E| / n partners j drawn uniformly (the pairs of Eq. 2: as many as edges, each
    cell equally often a first end, which keeps the estimate unbiased and lowers its variance).
    Exact path: Batch(), every cell and every pair."""

    def __init__(self, n, n_edges, config, device):
        self.n, self.size = n, config.batch_size
        self.sampled = config.losses == "sampled" or (config.losses == "auto" and n > self.size)
        if self.sampled:
            self.generator = torch.Generator(device).manual_seed(config.seed)
            self.first = torch.arange(n, device=device).repeat_interleave(max(1, n_edges // n))

    def __call__(self):
        if not self.sampled:
            return Batch()
        g, first = self.generator, self.first
        cells = torch.randperm(self.n, generator=g, device=first.device)[:self.size]
        partners = torch.randint(self.n, first.shape, generator=g, device=first.device)
        return Batch(cells, torch.stack([first, partners]))


def setup(prepared, adjacency, config):
    """What fit and reproduce.benchmark start from: torch seeded, tensors, Sampler, a new Model."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    data = tensors(prepared, adjacency, device)
    sampler = Sampler(len(prepared.x), data["edges"].shape[1], config, device)
    return data, sampler, Model(prepared.x.shape[1], config, log_mean(data)).to(device)


@torch.no_grad()
def codes(model, data):
    """Z without dropout, for targets, geometry and the final labels."""
    model.eval()
    z = model.encoder(data["x"], data["a_norm"])
    model.train()
    return _check_finite(z)


def _check_finite(z):
    """z, or a one-line FloatingPointError (the command line exits 2) when training diverged.
    Every use of the codes goes through codes(), and a non-finite loss makes them non-finite."""
    if not torch.isfinite(z).all():
        raise FloatingPointError("training diverged (the latent codes became infinite or NaN); "
                                 "lower the learning rates")
    return z


# ---------------------------------------------------------------- phase 1: L_SS (Eq. 4)

@dataclass
class Pretrained:
    """What phase 1 leaves for phase 2. Eq. (4) does not know K, so one phase 1 can serve every
    K (choose_k): each phase 2 resumes from a copy of the model with the random generators as
    phase 1 left them, and so gives what a run at that K alone gives."""
    model: Model
    data: dict          # the tensors of `tensors`
    sampler: Sampler
    rows: list          # phase 1's history rows
    random_state: dict  # torch's generator (and the device's, and the sampler's) after phase 1

    def resume(self):
        """A copy of the model after phase 1, with every generator put back as it was then."""
        torch.set_rng_state(self.random_state["torch"])
        if "cuda" in self.random_state:
            torch.cuda.set_rng_state(self.random_state["cuda"], self.model_device)
        if "sampler" in self.random_state:
            self.sampler.generator.set_state(self.random_state["sampler"])
        return copy.deepcopy(self.model)

    @property
    def model_device(self):
        return next(self.model.parameters()).device

    def state(self):
        """Phase 1 as plain data: a copy of the model's weights after it, its history rows and
        the generators (tensors, numbers and strings: torch.load reads them with
        weights_only=True, so a file of them can run no code)."""
        weights = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        return {"model": weights, "rows": self.rows, "random_state": self.random_state}

    def save(self, path):
        """state() into one file, with its format."""
        torch.save({"format": PHASE1_FORMAT, **self.state()}, path)

    @classmethod
    def restore(cls, state, prepared, adjacency, config):
        """Phase 1 from state(), for the same data and config (the tensors and Sampler are made
        again, as pretrain makes them)."""
        data, sampler, model = setup(prepared, adjacency, config)
        model.load_state_dict(state["model"])
        random_state = {key: value.cpu() for key, value in state["random_state"].items()}
        return cls(model, data, sampler, state["rows"], random_state)

    @classmethod
    def load(cls, path, prepared, adjacency, config):
        """Phase 1 as save left it (restore); ValueError for a file of another format."""
        saved = torch.load(path, weights_only=True, map_location=config.device)
        if saved.get("format") != PHASE1_FORMAT:
            raise ValueError(f"{path}: a phase 1 of another format ({saved.get('format')!r}, "
                             f"this code reads {PHASE1_FORMAT})")
        return cls.restore(saved, prepared, adjacency, config)


PHASE1_FORMAT = 1  # raised whenever what Pretrained.save writes changes
PHASE1_FIELDS = ("n_top_genes", "n_neighbors", "n_pcs", "hidden", "latent", "decoder", "dropout",
                 "w_x", "w_a", "pretrain_epochs", "lr_pretrain", "eval_every", "block", "losses",
                 "batch_size", "seed", "device")  # the Config fields phase 1 depends on


def pretrain(prepared, adjacency, config, report):
    """Phase 1 (Sec. 3.2): pretrain_epochs steps on L_SS (Eq. 4) -> Pretrained. Every
    eval_every epochs the report prints a row (its diagnostics, such as k-means of Z, are the
    report's: phase 1 itself knows no K)."""
    data, sampler, model = setup(prepared, adjacency, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_pretrain)
    for epoch in range(1, config.pretrain_epochs + 1):
        out = self_supervision(model, data, sampler(), config.block)
        optimise(optimizer, self_supervised_loss(out, config))
        if epoch % config.eval_every == 0 or epoch == config.pretrain_epochs:
            report.phase1(epoch, out, codes(model, data).cpu().numpy())
    state = {"torch": torch.get_rng_state()}
    if data["size_factors"].is_cuda:
        state["cuda"] = torch.cuda.get_rng_state(data["size_factors"].device)
    if sampler.sampled:
        state["sampler"] = sampler.generator.get_state()
    return Pretrained(model, data, sampler, list(report.rows), state)


# ---------------------------------------------------------------- the start: phi^c and phi^o

def initial_partition(prepared, adjacency, n_clusters, config, restarts, z):
    """The partition whose mean codes become phi^c: the paper's spectral clustering of A
    (init="spectral"), or, not in the paper (README), each restart's K_o overclusters of Z
    (restarts: clustering.kmeans_restarts on z) merged on A and the merge its mean codes keep
    best (init="consistent", clustering.most_kept), or the merge that agrees best with the
    others (init="medoid", clustering.most_central: stable when Z moves a little, as between
    thread counts), or the groups all merges agree on merged again (init="consensus"), or the
    lowest-inertia restart merged (init="merge"); k-means on n_pcs principal components of x
    (init="kmeans", kmeans_on_pcs)."""
    if config.init == "spectral":
        return spectral_clustering(adjacency, n_clusters, seed=config.seed)
    if config.init == "kmeans":
        return kmeans_on_pcs(prepared, n_clusters, config)
    if config.init == "merge":
        return merge_overclusters(adjacency, lowest_inertia(restarts)[1], n_clusters,
                                  config.resolution)
    merged = merges(adjacency, restarts, n_clusters, config.resolution)
    if config.init == "consistent":
        return most_kept(z, merged)
    if config.init == "medoid":
        return merged[most_central(merged)]
    return merge_overclusters(adjacency, agreement_groups(merged), n_clusters, config.resolution)


def kmeans_on_pcs(prepared, n_clusters, config):
    """k-means on the n_pcs principal components of the encoder input x: the start of
    init="kmeans" and the baseline every run is compared with."""
    return kmeans(datasets.pca(prepared.x, config.n_pcs), n_clusters, seed=config.seed)[0]


def thresholds(p, config):
    """beta_c and beta_o of Eqs. (6) and (9) from the soft assignments p = {"c": p (n, K),
    "o": p (n, n_o)} (or one of them) when phase 2 starts: a number as given, or "auto"
    (auto_threshold)."""
    given = {"c": config.beta_c, "o": config.beta_o}
    per_cluster = config.reliable_rule == "per-cluster"
    return {key: float(given[key]) if given[key] != "auto" else
            auto_threshold(p[key], config.reliable_frac, per_cluster) for key in p}


# ---------------------------------------------------------------- phase 2

@dataclass
class Phase2:
    """Phase 2's state: what fit updates at each of its events and shows its `watch` hook after
    each, so that tests and a class can look inside a run. The events: "start" (phi^c, phi^o and
    the thresholds set), "targets" (q and Omega recomputed, Eqs. 6 and 9), "c", "o", "g" (one
    optimiser step on L_SS + gamma L_c, L_o or L_g done: each parameter's .grad holds that
    loss's gradient) and "d" (the discriminators' update of Eq. 12 done)."""
    model: Model
    adversary: Adversary
    pretrained: np.ndarray  # Z at the end of phase 1
    start: np.ndarray       # the partition whose mean codes became phi^c
    phi: dict               # "c": phi^c (K, d), "o": phi^o (n_o, d), trainable
    beta: dict              # "c": beta_c, "o": beta_o, the thresholds of Eqs. (6) and (9)
    epoch: int = 0
    q: dict = field(default_factory=dict)         # "c", "o": the targets of every cell
    reliable: dict = field(default_factory=dict)  # "c", "o": Omega_c, Omega_o, (n,) bool
    graph: object = None                          # A (scipy), rewired at each update by rewire
    clusters: np.ndarray | None = None            # C_k: each cell's cluster at the last update
    members: list = field(default_factory=list)   # C_k intersected with Omega_c, for each k
    batch: Batch | None = None       # the cells and pairs of the epoch's step
    out: Pass | None = None          # the epoch's forward pass
    loss: torch.Tensor | None = None  # the step's own term (L_c, L_o, L_g or L_d), before it
    samples: Samples | None = None    # the discriminators' inputs of a "g" or "d" step


@torch.no_grad()
def update_targets(state, z, start=None):
    """Eqs. (5)-(6) and (8)-(9) on the codes z of every cell: the targets q and reliable sets
    Omega of the clusters and of the overclusters, each cell's cluster C_k (the argmax of p) and
    C_k intersected with Omega_c. With start, a partition (n,) (Config.start_targets, not in the
    paper): the clusters' targets are the start itself, one-hot at each cell's start cluster,
    and C_k is the start's cluster k."""
    p = {key: soft_assign(z, state.phi[key]) for key in ("c", "o")}
    for key in ("c", "o"):
        state.q[key], state.reliable[key] = target_distribution(p[key], state.beta[key])
    n_clusters = p["c"].shape[1]
    state.clusters = p["c"].argmax(1).cpu().numpy() if start is None else start
    if start is not None:
        state.q["c"] = F.one_hot(torch.as_tensor(start, device=z.device), n_clusters).to(z.dtype)
    keep = state.reliable["c"].cpu().numpy()
    state.members = [np.flatnonzero(keep & (state.clusters == k)) for k in range(n_clusters)]


def rewired(adjacency, z, centres, reliable, clusters):
    """The authors' update_graph, not in the paper: A plus, for every reliable cell i of cluster
    k, an edge to h_k, the reliable cell nearest k's centre, where h_k is in cluster k itself
    (both directions, so that A stays symmetric; each rewiring starts from A itself).
    adjacency: (n, n) scipy sparse A; z: (n, d) codes; centres: (K, d) phi^c; reliable: (n,)
    bool Omega_c; clusters: (n,) cluster of each cell -> (n, n) scipy CSR, 0/1, no self loops."""
    cells = np.flatnonzero(reliable)
    if len(cells) == 0:
        return adjacency
    hubs = cells[squared_distances(centres, z[cells]).argmin(1)]  # (K,) h_k
    hub = hubs[clusters[cells]]
    linked = (clusters[hub] == clusters[cells]) & (hub != cells)
    extra = sp.csr_matrix((np.ones(linked.sum(), np.float32), (cells[linked], hub[linked])),
                          shape=adjacency.shape)
    return ((adjacency + extra + extra.T) > 0).astype(np.float32).tocsr()


def split_merge(z, centres, labels, m, sample=2000, seed=0):
    """One split-merge move of the clusters of codes z (n, d) (--repair, not in the paper): a
    convex cluster is one hump of codes. Of each cluster and its nearest (by centre), the pair
    whose cells, along the line between the two centres, fit two Gaussians least apart (Ashman's
    D, geometry.two_gaussians) is one hump if D < 2: one population split in two. Of each
    cluster, the one whose cells along their first principal axis fit two Gaussians most apart,
    each with 10% of them and m cells, is two humps if D > 2: two populations joined. When both
    exist (and differ), the pair becomes one cluster at their mean and the other two at their
    humps' means, K kept. At most `sample` cells of a cluster are read (seeded).
    -> (new centres (K, d), (a, b, c): the pair merged into a, c split into b and c) or None."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == k) for k in range(len(centres))]
    members = [cells if len(cells) <= sample else np.sort(rng.choice(cells, sample, False))
               for cells in members]
    distances = squared_distances(centres, centres)
    np.fill_diagonal(distances, np.inf)
    merge = split = None
    for a in range(len(centres)):
        b = int(np.argmin(distances[a]))
        cells = np.concatenate([members[a], members[b]])
        axis = (centres[b] - centres[a]) / max(np.linalg.norm(centres[b] - centres[a]), 1e-12)
        if len(members[a]) and len(members[b]):
            separation = geometry.two_gaussians(z[cells] @ axis)[1]
            if separation < 2 and (merge is None or separation < merge[0]):
                merge = (separation, min(a, b), max(a, b))
        if len(members[a]) < 2 * max(m, 10):
            continue
        upper, separation, smaller = geometry.humps_on_first_axis(z[members[a]])
        enough = smaller >= 0.1 and min(upper.sum(), (~upper).sum()) >= m
        if enough and separation > 2 and (split is None or separation > split[0]):
            split = (separation, a, upper)
    if merge is None or split is None or split[1] in merge[1:]:
        return None
    (_, a, b), (_, c, upper) = merge, split
    new = np.array(centres, dtype=np.float64)
    new[a] = z[np.concatenate([members[a], members[b]])].mean(0)
    new[b], new[c] = z[members[c][upper]].mean(0), z[members[c][~upper]].mean(0)
    return new, (a, b, c)


@torch.no_grad()
def repair(state, z, config, log):
    """--repair at a target update: split_merge on the codes z and Eq. (5)'s argmax; a move
    sets phi^c anew and beta_c again by its rule (the clusters changed), and is logged."""
    pred = soft_assign(z, state.phi["c"]).argmax(1).cpu().numpy()
    moved = split_merge(z.cpu().numpy(), state.phi["c"].cpu().numpy(), pred, config.m_cvx,
                        seed=config.seed + state.epoch)
    if moved is None:
        return
    centres, (a, b, c) = moved
    state.phi["c"].copy_(torch.as_tensor(centres, dtype=z.dtype))
    state.beta["c"] = thresholds({"c": soft_assign(z, state.phi["c"])}, config)["c"]
    log(f"phase 2 | epoch {state.epoch:4d} | repair: clusters {a} and {b} were one hump along "
        f"the line between their centres, now cluster {a}; cluster {c} was two humps, now "
        f"clusters {b} and {c}")


def phase2_schedule(epoch, config):
    """The steps of phase 2 at an epoch (1, 2, ...), each followed by an update of the
    discriminators: "c" (L_c, Eq. 7), "o" (L_o, Eq. 10; not with overclustering off), "g" (L_g,
    Eq. 13; not with adversarial off). schedule "paper": one step an epoch, c, o, g in turn;
    "authors" (their code): c on even epochs counted from 0, o on odd ones, and also g on the
    last 5 epochs of every 20."""
    if config.schedule == "paper":
        cycle = [step for step, on in (("c", True), ("o", config.overclustering),
                                       ("g", config.adversarial)) if on]
        return [cycle[(epoch - 1) % len(cycle)]]
    steps = ["c"] if (epoch - 1) % 2 == 0 else ["o"] if config.overclustering else []
    if config.adversarial and (epoch - 1) % 20 >= 15:
        steps.append("g")
    return steps


def id_reaches_lid(mean_id, mean_lid, epoch, config):
    """Phase 2's stop (Sec. 3.2, Fig. 2): the clusters' mean intrinsic dimension has reached
    their mean linear intrinsic dimension, once phase 2 has run min_epochs."""
    return epoch >= config.min_epochs and mean_id >= mean_lid


def fit(prepared, adjacency, n_clusters, config=None, log=print, start=None, watch=None,
        pretrained=None, lap=None):
    """Train scTCM on a preprocessed dataset: phase 1 (Eq. 4), centres, phase 2 (Sec. 3.2).

    prepared: datasets.Prepared (x = encoder input, counts + size_factors = ZINB target,
    labels used for scoring only); adjacency: (n, n) scipy sparse A; n_clusters: K.
    start: optional (n,) partition into clusters 0..K-1 whose mean codes become phi^c instead
    of config.init's (e.g. the true labels, to see what phase 2 does from the right start).
    Phase 2 alternates the paper's three steps, L_SS + gamma_c L_c, L_SS + gamma_o L_o and
    L_SS + gamma_g L_g (an ablation drops its step), one an epoch in turn (phase2_schedule: or
    as the authors' code takes them), each followed by a discriminator update (Eq. 12). Every
    eval_every epochs it measures the clusters' mean ID and LID and stops when ID >= LID
    (after min_epochs), or at max_epochs.
    An epoch is one optimiser step on one Batch (Sampler: every cell and pair, or above
    batch_size cells unbiased estimates from a batch and sampled pairs; the steps do not grow
    with n). Codes, targets, reliable sets and ID/LID are always of every cell.
    watch: optional watch(event, Phase2), called after each event of phase 2 (see Phase2); it
    must not change what it is shown. pretrained: phase 1 already run with this config
    (pretrain), resumed from a copy (the run is then the one phase 1 and K would give).
    lap: optional lap(stage), called as phase 1, the start and phase 2 end (sctcm.Stopwatch).
    Result.history: a row per log line (phase 2's epoch 0: the start). Result.metrics: the
    scores (labels known), the start's, phase2_epochs."""
    config = config or Config()
    settings.check(config)
    origin = config.init if start is None else "given"
    if start is not None:
        start = check_partition(start, adjacency.shape[0], n_clusters)
    watch = watch or (lambda event, state: None)
    lap = lap or (lambda stage: None)
    rng = np.random.default_rng(config.seed)

    # --- phase 1: self-supervision (L_SS, Eq. 4)
    if pretrained is None:
        pretrained = pretrain(prepared, adjacency, config,
                              Report(prepared.labels, n_clusters, config, log))
        model = pretrained.model
    else:
        model = pretrained.resume()
    data = dict(pretrained.data)  # this run's own: rewire replaces its graph
    sampler = pretrained.sampler
    report = Report(prepared.labels, n_clusters, config, log, pretrained.rows)
    phase1 = pretrained.state()  # before phase 2 trains its model
    lap("phase 1")

    # --- the start: phi^o = k-means on Z, phi^c = mean codes of a partition of the cells
    z = codes(model, data)
    z_phase1 = z.cpu().numpy()
    restarts = kmeans_restarts(z_phase1, config.n_over, seed=config.seed)
    if start is None:
        start = initial_partition(prepared, adjacency, n_clusters, config, restarts, z_phase1)
    phi = {"c": nn.Parameter(torch.stack([z[start == k].mean(0) for k in range(n_clusters)])),
           "o": nn.Parameter(torch.as_tensor(lowest_inertia(restarts)[2], dtype=torch.float32,
                                             device=z.device))}
    adversary = Adversary(model, n_clusters, prepared.x.shape[1], config, rng)
    generator = list(model.parameters())  # f_E and f_D^(2): the encoder and the feature head
    optimizers = {"c": torch.optim.Adam(generator + [phi["c"]], lr=config.lr_cluster),
                  "o": torch.optim.Adam(generator + [phi["o"]], lr=config.lr_cluster),
                  "g": torch.optim.Adam(generator, lr=config.lr_adv)}
    gamma = {"c": config.gamma_c, "o": config.gamma_o, "g": config.gamma_g}
    with torch.no_grad():
        beta = thresholds({key: soft_assign(z, phi[key]) for key in ("c", "o")}, config)
    start_row = report.start(origin, beta, z_phase1, start,
                             geometry.cluster_geometry(z_phase1, start))
    state = Phase2(model, adversary, z_phase1, start, phi, beta, graph=adjacency)
    watch("start", state)
    lap("start")

    # --- phase 2: alternating steps (Sec. 3.2), as phase2_schedule takes them
    for epoch in range(1, config.max_epochs + 1):
        state.epoch = epoch
        if (epoch - 1) % config.update_every == 0:
            # q is a target: recomputed here, held fixed in between, Eqs. (6) and (9)
            z = codes(model, data)
            if config.repair:
                repair(state, z, config, log)
            update_targets(state, z, start if epoch <= config.start_targets else None)
            if config.rewire:
                state.graph = rewired(adjacency, z.cpu().numpy(), phi["c"].detach().cpu().numpy(),
                                      state.reliable["c"].cpu().numpy(), state.clusters)
                data.update(graph_tensors(state.graph, z.device))
            if epoch == 1:
                reliable_start = state.reliable["c"].cpu().numpy()
            watch("targets", state)
        for step in phase2_schedule(epoch, config):
            state.batch = sampler()
            state.out = self_supervision(model, data, state.batch, config.block)
            if step == "g":  # Eq. (13), for the encoder and feature head only
                state.samples = adversary.inputs(state.out, state.members)
                state.loss = (adversary.generator_loss(state.samples) if state.samples
                              else state.out.z.new_zeros(()))
            else:  # Eq. (7) or Eq. (10)
                state.samples = None
                state.loss = clustering_loss(state.q[step], state.out.z, phi[step], state.batch)
            optimise(optimizers[step],
                     self_supervised_loss(state.out, config) + gamma[step] * state.loss)
            report.losses.update({"L_X": state.out.l_x.item(), "L_A": state.out.l_a.item(),
                                  f"L_{step}": state.loss.item()})
            watch(step, state)
            if config.adversarial:  # Eq. (12), on inputs without gradient
                with torch.no_grad():
                    state.samples = adversary.inputs(state.out, state.members)
                per = adversary.step(state.samples) if state.samples else None
                report.discriminators(per, state.samples.active if state.samples else None)
                if per is not None:
                    state.loss = per.sum()
                    watch("d", state)

        # --- the stop: the clusters' mean ID reaches their mean LID (Fig. 2)
        if epoch % config.eval_every == 0 or epoch == config.max_epochs:
            z = codes(model, data)
            pred = soft_assign(z, phi["c"]).argmax(1).cpu().numpy()
            z = z.cpu().numpy()
            mean_id, mean_lid = geometry.cluster_geometry(z, pred)
            report.phase2(state, z, pred, (mean_id, mean_lid))
            if id_reaches_lid(mean_id, mean_lid, epoch, config):
                log(f"phase 2 | stop at epoch {epoch}: mean ID {mean_id:.2f} >= "
                    f"mean LID {mean_lid:.2f}")
                break

    lap("phase 2")

    # --- final labels: argmax of Eq. (5), and how sure each cell is of it (Eq. 6's margin)
    final = assignment(codes(model, data), phi["c"], beta["c"])
    start_scores = {key: start_row[key] for key in ("acc", "nmi", "ari", "kept")
                    if key in start_row}
    metrics = {**scores(prepared.labels, final.labels), "start": start_scores,
               "phase2_epochs": state.epoch}
    return dataclasses.replace(final, history=report.rows, metrics=metrics, pretrained=z_phase1,
                               start=start, reliable_start=reliable_start, model=model,
                               phi_o=phi["o"].detach().cpu().numpy(), phase1=phase1)


@torch.no_grad()
def assignment(z, centres, beta_c):
    """The partition of codes z (n, d) at centres phi^c (K, d), Eq. (5)'s argmax, and how sure
    each cell is of it: p of its cluster (confidence), the margin that Eq. (6) thresholds and
    whether it reaches beta_c (reliable) -> Result (labels, embedding, centres, confidence,
    margin, reliable, beta_c: (K,) the threshold of each cluster)."""
    centres = torch.as_tensor(centres, dtype=z.dtype, device=z.device)
    p = soft_assign(z, centres)
    beta = torch.as_tensor(beta_c, dtype=z.dtype, device=z.device).expand(len(centres))
    return Result(labels=p.argmax(1).cpu().numpy(), embedding=z.cpu().numpy(),
                  centres=centres.cpu().numpy(), confidence=p.max(1).values.cpu().numpy(),
                  margin=margins(p).cpu().numpy(),
                  reliable=target_distribution(p, beta)[1].cpu().numpy(),
                  beta_c=beta.cpu().numpy())
