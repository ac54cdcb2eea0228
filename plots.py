"""The pictures of a run: the paper's Fig. 2 (ID and LID per logged epoch), the latent space and
the losses. matplotlib is an optional extra (not in requirements.txt): it is imported inside the
functions, which raise ImportError where it is not installed. Each function reads a run's
history rows (sctcm.fit's, or history.csv's strings) and arrays, never the model.
"""
import numpy as np

import clustering
import datasets


def draw(folder, history, embedding, clusters, labels=None, label_names=None, name="run",
         pretrained=None):
    """fig2.png, embedding.png and losses.png of one run into folder -> their file names.
    history: fit's rows; embedding: (n, d) codes Z; clusters: (n,) the run's labels; labels,
    label_names: the file's (scoring) labels, or None; pretrained: Z after phase 1, or None.
    ImportError without matplotlib."""
    plot_fig2(folder / "fig2.png", {name: history})
    plot_embedding(folder / "embedding.png", embedding, clusters, labels, label_names, pretrained)
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


def plot_embedding(path, embedding, clusters, labels=None, label_names=None, pretrained=None):
    """Codes Z on their first two principal components: after phase 1 (pretrained, when given)
    and at the end, coloured by the run's clusters and, beside them, by the file's labels when it
    has them (cells without a label in grey). A cluster takes the colour of the type ACC matches
    it to (clustering.matching), so a cluster and its type look alike."""
    k = clusters.max() + 1
    colour = cluster_colours(clusters, labels, len(label_names) if labels is not None else 0)
    names = [f"cluster {j}" for j in range(k)]
    panels = [("scTCM clusters, end", embedding, clusters, names, colour)]
    if labels is not None:
        panels.append(("labels of the file, end", embedding, labels, label_names, None))
    if pretrained is not None:
        panels.insert(0, ("end of phase 1 (start of phase 2)", pretrained, *panels[-1][2:]))
    fig = _figure(6.5 * len(panels), 4.5)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _scatter(ax, *panel)
    fig.savefig(path, dpi=150)


def cluster_colours(clusters, labels=None, n_types=0):
    """{cluster: colour index}: type t has colour t, and each cluster the colour of the type ACC
    matches it to (clustering.matching); clusters left over, or all without labels, take the
    colours after the types' in order."""
    spare = iter(range(n_types, n_types + clusters.max() + 1))
    matched = clustering.matching(labels, clusters) if labels is not None else {}
    return {j: matched[j] if j in matched else next(spare) for j in range(clusters.max() + 1)}


def _scatter(ax, title, codes, groups, names, colour):
    """One panel of plot_embedding: codes on their top 2 PCs, group j in tab20 colour colour[j]."""
    from matplotlib import colormaps
    pcs = datasets.pca(codes.astype(np.float64), 2)
    if np.any(groups < 0):
        ax.scatter(*pcs[groups < 0].T, s=4, color="lightgrey", label="no label")
    for j, name in enumerate(names):
        shade = colormaps["tab20"]((j if colour is None else colour[j]) % 20)
        ax.scatter(*pcs[groups == j].T, s=4, color=shade, label=name)
    ax.set(title=title, xlabel="PC 1 of Z", ylabel="PC 2 of Z")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3,
              ncols=1 + len(names) // 15)


LOSSES = {  # loss -> (panel title, y label)
    "L_X": ("$L_X$, ZINB (Eq. 3)", "NLL per count"), "L_A": ("$L_A$, structure (Eq. 2)",
                                                             "weighted BCE per cell pair"),
    "L_c": ("$L_c$, clusters (Eq. 7)", "KL per cell"), "L_o": ("$L_o$, overclusters (Eq. 10)",
                                                               "KL per cell"),
    "L_g": ("$L_g$, generator (Eq. 13)", "sum over clusters"),
    "L_d": ("$L_d$, discriminators (Eq. 12)", "sum over discriminators")}
WHY = ("L_c and L_o may rise in phase 2: their targets q are recomputed every update_every epochs, "
       "and sharper targets cost more. L_g and L_d zig-zag: each logged epoch ends a different "
       "step (c, o or g), and L_d sums over the discriminators that had inputs.")


def plot_losses(path, history):
    """Each loss of the history at every logged epoch, one panel per loss, L_d with its chance
    level (2 log 2 per discriminator), and a line under the figure on why some curves rise or
    alternate (WHY)."""
    keys = [key for key in LOSSES if any(key in row for row in history)]
    n_rows = -(-len(keys) // 3)
    fig = _figure(12, 1.5 + 3 * n_rows)
    fig.suptitle("losses at each logged epoch (dashed: end of phase 1)")
    fig.supxlabel("epoch (phase 1, then phase 2)\n" + WHY, fontsize="small", wrap=True)
    axes = fig.subplots(n_rows, 3, sharex=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        x = np.array(_through_phases(ax, history))
        has = np.array([key in row for row in history])
        ax.plot(x[has], [row[key] for row in history if key in row], marker="o", ms=3)
        if key == "L_d":
            chance = [row["L_d_chance"] for row in history if key in row]
            ax.plot(x[has], chance, color="black", lw=1, ls=":", label="chance")
            ax.legend()
        ax.set(title=LOSSES[key][0], ylabel=LOSSES[key][1])
        ax.tick_params(labelbottom=True)  # sharex hides them above a panel that may be hidden
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=150)


K_CRITERIA = {  # k_selection row key -> (panel title, what a higher value means)
    "merge_modularity": ("merge modularity (the rule)", "the graph A keeps the clusters apart"),
    "agreement": ("agreement of the ten restarts", "a partition into K is reproducible"),
    "kept": ("kept by the centres", "K centres describe the start"),
}


def plot_k_selection(path, rows, recommended):
    """The label-free criteria of choosing K (sctcm.choose_k's rows) against K, one panel each,
    the recommended K marked, and beside them the start's ARI at each K when the cells are
    labelled (what the criteria try to see without the labels)."""
    keys = list(K_CRITERIA) + (["ari"] if "ari" in rows[0] else [])
    fig = _figure(3.2 * len(keys), 3.2)
    ks = [row["k"] for row in rows]
    for ax, key in zip(fig.subplots(1, len(keys), sharex=True), keys):
        title, meaning = K_CRITERIA.get(key, ("ARI of the start (labels)", "nearer the labels"))
        ax.plot(ks, [row[key] for row in rows], marker="o", ms=4)
        ax.axvline(recommended, color="grey", ls="--", lw=1, label=f"recommended K = {recommended}")
        ax.set(title=title, xlabel="K", ylabel=f"higher: {meaning}")
        ax.yaxis.label.set_size(8)
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=150)
