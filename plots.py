"""The pictures of a run: the paper's Fig. 2 (ID and LID per logged epoch), the latent space and
the losses. matplotlib is an optional extra (not in requirements.txt): it is imported inside the
functions, which raise ImportError where it is not installed. Each function reads a run's
history rows (sctcm.fit's, or history.csv's strings) and arrays, never the model.
"""
import numpy as np

import datasets


def draw(folder, history, embedding, clusters, labels=None, label_names=None, name="run"):
    """fig2.png, embedding.png and losses.png of one run into folder -> their file names.
    history: fit's rows; embedding: (n, d) codes Z; clusters: (n,) the run's labels; labels,
    label_names: the file's (scoring) labels, or None. ImportError without matplotlib."""
    plot_fig2(folder / "fig2.png", {name: history})
    plot_embedding(folder / "embedding.png", embedding, clusters, labels, label_names)
    plot_losses(folder / "losses.png", history)
    return ["fig2.png", "embedding.png", "losses.png"]


def _figure(width, height):
    """An empty matplotlib Figure on the Agg canvas: PNG files, no display, no pyplot state.
    Raises ImportError where matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _through_phases(ax, rows):
    """The x of each history row (fit's, or history.csv's strings): its epoch counted through
    both phases, phase-2 epoch e at T1 + e; marks T1, the end of phase 1, on ax."""
    t1 = next(int(r["of"]) for r in rows if int(r["phase"]) == 1)
    ax.axvline(t1, color="grey", ls="--", lw=1, label="end of phase 1")
    return [int(r["epoch"]) + t1 * (int(r["phase"]) == 2) for r in rows]


def plot_fig2(path, panels):
    """The paper's Fig. 2 as a PNG: mean per-cluster ID (TwoNN) and LID (PCA) at every logged
    epoch of both phases. panels: {title: history rows}, one panel each, side by side."""
    fig = _figure(1 + 5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items()):
        x = _through_phases(ax, rows)
        for key, name in (("ID", "ID (TwoNN)"), ("LID", "LID (PCA, 99% variance)")):
            ax.plot(x, [float(r[key]) for r in rows], marker="o", ms=3, label=name)
        ax.set(title=title, xlabel="epoch (phase 1, then phase 2)")
    axes[0].set_ylabel("mean per-cluster dimension")
    axes[0].legend()
    fig.savefig(path, dpi=150)


def plot_embedding(path, embedding, clusters, labels=None, label_names=None):
    """Codes Z on their first two principal components, coloured by cluster, and beside it by
    the file's labels when it has them (cells without a label in grey)."""
    from matplotlib import colormaps
    pcs = datasets.pca(embedding.astype(np.float64), 2)
    k = clusters.max() + 1
    panels = [("scTCM clusters", clusters, [f"cluster {j}" for j in range(k)])]
    if labels is not None:
        panels.append(("labels of the file", labels, label_names))
    fig = _figure(7 * len(panels), 4.5)
    for ax, (title, groups, names) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        if np.any(groups < 0):
            ax.scatter(*pcs[groups < 0].T, s=4, color="lightgrey", label="no label")
        for j, name in enumerate(names):
            ax.scatter(*pcs[groups == j].T, s=4, color=colormaps["tab20"](j % 20), label=name)
        ax.set(title=title, xlabel="PC 1 of Z", ylabel="PC 2 of Z")
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3,
                  ncols=1 + len(names) // 15)
    fig.savefig(path, dpi=150)


LOSSES = {"L_X": "$L_X$, ZINB (Eq. 3)", "L_A": "$L_A$, structure (Eq. 2)",
          "L_c": "$L_c$, clusters (Eq. 7)", "L_o": "$L_o$, overclusters (Eq. 10)",
          "L_g": "$L_g$, generator (Eq. 13)", "L_d": "$L_d$, discriminators (Eq. 12)"}


def plot_losses(path, history):
    """Each loss of the history at every logged epoch, one panel per loss, L_d with its chance
    level (2 log 2 per discriminator)."""
    keys = [key for key in LOSSES if any(key in row for row in history)]
    n_rows = -(-len(keys) // 3)
    fig = _figure(12, 1 + 3 * n_rows)
    fig.suptitle("losses at each logged epoch (dashed: end of phase 1)")
    fig.supxlabel("epoch (phase 1, then phase 2)")
    axes = fig.subplots(n_rows, 3, sharex=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        x = np.array(_through_phases(ax, history))
        has = np.array([key in row for row in history])
        ax.plot(x[has], [row[key] for row in history if key in row], marker="o", ms=3)
        if key == "L_d":
            chance = [row["L_d_chance"] for row in history if key in row]
            ax.plot(x[has], chance, color="black", lw=1, ls=":", label="chance")
            ax.legend()
        ax.set_title(LOSSES[key])
        ax.tick_params(labelbottom=True)  # sharex hides them above a panel that may be hidden
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=150)
