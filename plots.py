"""The pictures of a run: the paper's Fig. 2 (ID and LID per logged epoch), the latent space and
the losses. matplotlib is an optional extra (not in requirements.txt): it is imported inside the
functions, which raise ImportError where it is not installed. Each function reads a run's
history rows (training.fit's, or history.csv's strings) and arrays, never the model.
"""
import numpy as np

import clustering
import datasets


def draw(folder, history, embedding, clusters, labels=None, label_names=None, name="run",
         pretrained=None, start=None, convexity=None):
    """fig2.png, embedding.png, losses.png (and convexity.png when given) of one run into
    folder -> their file names. history: fit's rows; embedding: (n, d) codes Z; clusters: (n,)
    the run's labels; labels, label_names: the file's (scoring) labels, or None; pretrained: Z
    after phase 1 and start: the partition phase 2 started from, or None; convexity: the
    panels of plot_convexity, or None. ImportError without matplotlib."""
    plot_fig2(folder / "fig2.png", {name: history})
    plot_embedding(folder / "embedding.png", embedding, clusters, labels, label_names, pretrained,
                   start)
    plot_losses(folder / "losses.png", history)
    if convexity is None:
        return ["fig2.png", "embedding.png", "losses.png"]
    plot_convexity(folder / "convexity.png", convexity)
    return ["fig2.png", "embedding.png", "losses.png", "convexity.png"]


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
    epoch of both phases. panels: {title: history rows}, one panel each, side by side. Solid:
    the clusters the run has at that epoch (k-means of Z in phase 1, which has no clusters of
    its own; the start, then the argmax of Eq. 5 in phase 2); dotted: k-means of Z throughout,
    where the rows have it, so that a jump at the boundary that is only the change of partition
    can be told from one in the geometry."""
    fig = _figure(1 + 5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items()):
        x = np.array(_through_phases(ax, rows))
        for key, name, colour in (("ID", "ID", "C0"), ("LID", "LID", "C1")):
            ax.plot(x, [float(r[key]) for r in rows], marker="o", ms=3, color=colour,
                    label=f"{name}, the run's clusters")
            kmeans_of_z = [r.get(f"{key}_kmeans", "") for r in rows]  # phase 1: ID itself
            kmeans_of_z = [r[key] if int(r["phase"]) == 1 else v for r, v in zip(rows, kmeans_of_z)]
            has = np.array([v != "" for v in kmeans_of_z])
            if has[np.array([int(r["phase"]) == 2 for r in rows])].any():
                ax.plot(x[has], [float(v) for v in kmeans_of_z if v != ""], ls=":",
                        color=colour, label=f"{name}, k-means of Z")
        ax.set(title=title, xlabel="epoch (phase 1, then phase 2)")
    axes[0].set_ylabel("mean per-cluster dimension\n(ID: TwoNN; LID: PCA, 99% variance)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize="small")
    fig.savefig(path, dpi=150)


def plot_embedding(path, embedding, clusters, labels=None, label_names=None, pretrained=None,
                   start=None):
    """Codes Z on their first two principal components, one panel each: after phase 1 by the
    file's types and by the start of phase 2 (when pretrained and start are given), at the end
    by scTCM's clusters and by the types. Types keep their names; clusters are "cluster j", in
    the colour of the type ACC matches them to (clustering.matching), and a cell whose cluster
    is matched to another type than its own is crossed in black (an error)."""
    n_types = len(label_names) if labels is not None else 0
    names = lambda groups: [f"cluster {j}" for j in range(groups.max() + 1)]
    panels = []
    if pretrained is not None and labels is not None:
        panels.append(("types (the file's labels), after phase 1", pretrained, labels,
                       label_names, None))
    if pretrained is not None and start is not None:
        panels.append(("start of phase 2 (its partition), after phase 1", pretrained, start,
                       names(start), cluster_colours(start, labels, n_types)))
    panels.append(("scTCM's clusters, end", embedding, clusters, names(clusters),
                   cluster_colours(clusters, labels, n_types)))
    if labels is not None:
        panels.append(("types (the file's labels), end", embedding, labels, label_names, None))
    columns = 2 if len(panels) == 4 else len(panels)  # after phase 1 above, the end below
    fig = _figure(6.2 * columns, 4.6 * (len(panels) // columns))
    for ax, panel in zip(fig.subplots(len(panels) // columns, columns, squeeze=False).ravel(),
                         panels):
        _scatter(ax, *panel, labels=labels)
    fig.savefig(path, dpi=150)


def cluster_colours(clusters, labels=None, n_types=0):
    """{cluster: colour index}: type t has colour t, and each cluster the colour of the type ACC
    matches it to (clustering.matching); clusters left over, or all without labels, take the
    colours after the types' in order."""
    spare = iter(range(n_types, n_types + clusters.max() + 1))
    matched = clustering.matching(labels, clusters) if labels is not None else {}
    return {j: matched[j] if j in matched else next(spare) for j in range(clusters.max() + 1)}


PALETTE = (  # Okabe & Ito's seven colours (told apart with any colour vision), then Tol's muted
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
    "#AA4499")


def colour(index):
    """The colour of type (or colour index) `index`: Okabe-Ito's seven safe colours first,
    then Tol's; past 16 they repeat."""
    return PALETTE[index % len(PALETTE)]


def _scatter(ax, title, codes, groups, names, colours, labels=None):
    """One panel of plot_embedding: codes on their top 2 PCs, group j in colour(colours[j])
    (colours None: group j is type j); in a panel of clusters with labels known, the cells
    whose cluster's matched type is not their own crossed in black."""
    pcs = datasets.pca(codes.astype(np.float64), 2)
    if np.any(groups < 0):
        ax.scatter(*pcs[groups < 0].T, s=4, color="lightgrey", label="no label")
    for j, name in enumerate(names):
        ax.scatter(*pcs[groups == j].T, s=4, label=name,
                   color=colour(j if colours is None else colours[j]))
    if colours is not None and labels is not None:
        wrong = (labels >= 0) & (clustering.renamed(labels, groups) != labels)
        ax.scatter(*pcs[wrong].T, s=10, marker="x", lw=0.6, color="black",
                   label=f"error ({wrong.mean():.1%})")
    ax.set(title=title, xlabel="PC 1 of Z", ylabel="PC 2 of Z")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3, fontsize="small",
              title="type" if colours is None else "cluster (its type's colour)",
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
    """The label-free criteria of choosing K (sctcm.choose_k's rows) against K, one panel each
    on the whole of [0, 1], the recommended K marked, and beside them the start's ARI at each K
    when the cells are labelled (what the criteria try to see without the labels; --blind
    reads no labels)."""
    keys = list(K_CRITERIA) + (["ari"] if "ari" in rows[0] else [])
    fig = _figure(3.2 * len(keys), 3.2)
    ks = [row["k"] for row in rows]
    for ax, key in zip(fig.subplots(1, len(keys), sharex=True), keys):
        title, meaning = K_CRITERIA.get(key, ("ARI of the start (labels)", "nearer the labels"))
        ax.plot(ks, [row[key] for row in rows], marker="o", ms=4)
        ax.axvline(recommended, color="grey", ls="--", lw=1, label=f"recommended K = {recommended}")
        ax.set(title=title, xlabel="K", ylabel=f"higher: {meaning}", ylim=(0, 1))  # all in [0, 1]:
        # a full axis, so that a peak 0.001 above its neighbours looks as flat as it is
        ax.yaxis.label.set_size(8)
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=150)


def plot_convexity(path, panels):
    """Eq. (11) made visible, one panel each (the start and the end of phase 2): Z on its top
    two principal components in grey, one cluster's reliable cells (the real samples of its
    discriminator) in its colour with their convex hull, and convex combinations of them (what
    is decoded into the fake samples) as black dots. panels: [(title, codes, clusters,
    reliable, k, combinations (N, d))]. The projection is linear, so combinations stay inside
    the hull here; what decides convexity is where they fall in all d dimensions and, decoded,
    in gene space, which a picture of two components cannot show."""
    from scipy.spatial import ConvexHull
    fig = _figure(6 * len(panels), 4.8)
    for ax, (title, codes, clusters, reliable, k, combos) in zip(
            fig.subplots(1, len(panels), squeeze=False)[0], panels):
        centre = codes.mean(0)
        basis = np.linalg.svd(codes - centre, full_matrices=False)[2][:2]
        project = lambda points: (points - centre) @ basis.T
        ax.scatter(*project(codes).T, s=3, color="lightgrey", label="other cells")
        members = reliable & (clusters == k)
        ax.scatter(*project(codes[(clusters == k) & ~members]).T, s=4, color=colour(k),
                   alpha=0.3, label=f"cluster {k}, not reliable")
        points = project(codes[members])
        ax.scatter(*points.T, s=8, color=colour(k), label=f"cluster {k}, reliable "
                   f"({members.sum()})")
        if len(points) >= 3:
            hull = ConvexHull(points)
            for a, b in hull.simplices:
                ax.plot(*points[[a, b]].T, color=colour(k), lw=0.8)
        ax.scatter(*project(combos).T, s=4, color="black", label="convex combinations (Eq. 11)")
        ax.set(title=title, xlabel="PC 1 of Z", ylabel="PC 2 of Z")
        ax.legend(fontsize="small", loc="best")
    fig.savefig(path, dpi=150)
