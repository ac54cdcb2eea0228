"""A run's history rows and progress lines: what fit prints, never what it acts on.

Report turns the numbers training hands it (losses, reliable sets, the clusters' mean ID and
LID) into one history row and one aligned log line each, and adds diagnostics that read the
labels or a k-means of Z (ARI(kmeans Z), ARI(true centres Z), ID/LID under k-means): remove a
line here and the run is the same.
"""
import time

import numpy as np
import torch

import geometry
from clustering import ari, centroid_ari, kept, kmeans, scores


LOG_KEYS = {  # history key -> its part of a log line, in the line's order
    "start": "start ({start}, its mean codes keep {kept:.1%} of it)",
    "beta_c": "beta_c {beta_c:.4f}",
    "beta_c_range": "(per cluster {beta_c_range})",
    "beta_o": "beta_o {beta_o:.4f}",
    "beta_o_range": "(per overcluster {beta_o_range})",
    "L_X": "L_X {L_X:.4f}",
    "L_A": "L_A {L_A:.4f}",
    "L_c": "L_c {L_c:.4f}",
    "L_o": "L_o {L_o:.4f}",
    "L_g": "L_g {L_g:.4f}",
    "L_d": "L_d {L_d:.4f} (chance {L_d_chance:.4f})",
    "idle": "fewer than m reliable cells in cluster {idle} (too small a cluster, or its cells "
            "fell below beta since phase 2 began): no pull, no L_d",
    "reliable_c": "reliable {reliable_c}/{n}",
    "reliable_k": "by cluster {reliable_k}",
    "ID": "ID {ID:.2f}",
    "LID": "LID {LID:.2f}",
    "kmeans_ari": "ARI(kmeans Z) {kmeans_ari:.3f}",
    "acc": "ACC {acc:.3f}",
    "nmi": "NMI {nmi:.3f}",
    "ari": "ARI {ari:.3f}",
    "centroid_ari": "ARI(true centres Z) {centroid_ari:.3f}",
}


def _beta_fields(key, beta):
    """A history row's threshold fields: beta_<key> (the number; per cluster, their mean) and,
    per cluster, beta_<key>_range (the lowest and highest)."""
    if not torch.is_tensor(beta):
        return {f"beta_{key}": beta}
    return {f"beta_{key}": beta.mean().item(),
            f"beta_{key}_range": f"{beta.min().item():.4f}-{beta.max().item():.4f}"}


class Report:
    """A run's history rows and progress lines. Each row carries the numbers training hands it
    and diagnostics of its own: with labels, the scores of the row's partition and ARI(true
    centres Z) (clustering.centroid_ari); in phase 2 also ID/LID and ARI under k-means of Z, the
    partition phase 1's rows are measured by (Fig. 2 draws both across the boundary). The last
    value of each loss in phase 2 is kept between log lines (losses), with the discriminators'
    fields of the last step (adversary). n_clusters sizes those k-means only."""

    def __init__(self, labels, n_clusters, config, log, rows=()):
        self.labels, self.k, self.config, self.log = labels, n_clusters, config, log
        self.rows, self.losses, self.adversary = list(rows), {}, {}
        self.began = {1: (time.time(), 0)}  # phase -> (time, epoch) it began: for time_left

    def phase1(self, epoch, out, z):
        """A phase-1 row: the losses of the epoch's pass out, and ID/LID (a diagnostic here: phase
        1 has no clusters and no stop) and ARI(kmeans Z) under k-means of the codes z (n, d)."""
        partition = self._kmeans(z)
        scored = {} if self.labels is None else {"kmeans_ari": ari(self.labels, partition)}
        head = {"phase": 1, "epoch": epoch, "of": self.config.pretrain_epochs,
                "L_X": out.l_x.item(), "L_A": out.l_a.item()}
        return self._add(head, z, partition, geometry.cluster_geometry(z, partition), scored)

    def start(self, origin, beta, z, start, dims):
        """Phase 2's epoch 0: the start partition, the share its mean codes z (n, d) keep, beta,
        and dims = (mean ID, mean LID) of the start's clusters."""
        head = {"phase": 2, "epoch": 0, "of": self.config.max_epochs, "start": origin}
        for key in ("c", "o"):
            head.update(_beta_fields(key, beta[key]))
        scored = {**scores(self.labels, start), "kept": kept(z, start)}
        return self._add(head, z, start, dims, scored, kmeans_too=True)

    def discriminators(self, per, active):
        """Keep the fields of the step's discriminator update for the next row (per: (k',) L_d^(k)
        of the clusters `active`, or None when none had inputs): see discriminator_fields."""
        self.adversary = discriminator_fields(per, active, self.k)

    def phase2(self, state, z, pred, dims):
        """A phase-2 row: the losses, the discriminators, the reliable sets, the argmax of
        Eq. (5) as the partition pred of the codes z (n, d) and dims = (mean ID, mean LID) of its
        clusters, which fit stops on."""
        head = {"phase": 2, "epoch": state.epoch, "of": self.config.max_epochs, **self.losses,
                **self.adversary, "reliable_c": int(state.reliable["c"].sum()),
                "reliable_k": " ".join(str(len(cells)) for cells in state.members),
                "reliable_o": int(state.reliable["o"].sum())}
        return self._add(head, z, pred, dims, scores(self.labels, pred), kmeans_too=True)

    def _kmeans(self, z):
        """k-means of the codes z, an (n, d) array, with n_clusters and 3 restarts."""
        return kmeans(z, self.k, seed=self.config.seed, n_init=3)[0]

    def _add(self, row, z, partition, dims, scored, kmeans_too=False):
        """Add a row: ID and LID (dims) under partition and, with kmeans_too (phase 2), also
        under k-means of z, phase 1's partition, so that Fig. 2 can show both rules across the
        boundary (ID_kmeans, LID_kmeans); print its line. z: (n, d) array, the codes."""
        row["ID"], row["LID"] = dims
        if kmeans_too:
            same_rule = self._kmeans(z)
            row["ID_kmeans"], row["LID_kmeans"] = geometry.cluster_geometry(z, same_rule)
            if self.labels is not None:
                scored = {**scored, "kmeans_ari": ari(self.labels, same_rule)}
        row.update(scored, n=len(z))
        if self.labels is not None:
            row["centroid_ari"] = centroid_ari(self.labels, z)
        self.rows.append(row)
        parts = [f"phase {row['phase']}", f"epoch {row['epoch']:4d}/{row['of']}"]
        self.log(" | ".join(parts + [text.format(**row) for key, text in LOG_KEYS.items()
                                     if row.get(key, "") != ""] + self.time_left(row)))
        return row

    def time_left(self, row):
        """A rough time left in the row's phase, from its epochs done so far ([] when under half
        a minute): phase 2 may stop sooner, at ID = LID."""
        began_at, first = self.began.setdefault(row["phase"], (time.time(), row["epoch"]))
        done = row["epoch"] - first
        if done <= 0:
            return []
        seconds = (time.time() - began_at) / done * (row["of"] - row["epoch"])
        if seconds < 30:
            return []
        rough = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
        return [f"~{rough} left" + (" at most" if row["phase"] == 2 else "")]


def discriminator_fields(per, active, n_clusters):
    """A history row's fields of the discriminators: "L_d" (their sum), "L_d_chance" (its value at
    chance, 2 log 2 each), "L_d<k>" per discriminator k with inputs, and "idle": the clusters
    (space-separated) with fewer than m reliable cells, so no discriminator update.
    per: (k',) L_d^(k) of the clusters `active`, or None when none had inputs."""
    active = [] if per is None else active.tolist()
    idle = {"idle": " ".join(str(k) for k in range(n_clusters) if k not in active)}
    if per is None:
        return idle
    return {"L_d": per.sum().item(), "L_d_chance": 2 * np.log(2) * len(per),
            **{f"L_d{k}": v for k, v in zip(active, per.tolist())}, **idle}
