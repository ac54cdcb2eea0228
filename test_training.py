"""Tests of training.py (Sec. 3.2): the sampler, phase 1, the start rules, phase 2's steps seen
through fit's watch hook, the stop, and end-to-end training on small synthetic data.

Run: python -m pytest -q (README, "Tests").
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clustering
import datasets
import evidence
import geometry
import report
import training
from model import (Batch, Config, self_supervision, soft_assign, structure_loss,
                   target_distribution)
from testkit import (inertia_by_loop, kept_by_loop, loss_and_grad, pairs_ari, random_graph,
                     structure_problem, tiny_config, tiny_problem)


def _sampled_structure(z, edges, pairs_per_cell, draws):
    """Loss and gradient of `draws` independent pair samples from the sampler fit uses."""
    n = len(z)
    config = Config(losses="sampled", batch_size=n)
    sample = training.Sampler(n, pairs_per_cell * n, config, "cpu")
    results = [loss_and_grad(z, edges, sample().pairs) for _ in range(draws)]
    return np.array([r[0] for r in results]), torch.stack([r[1] for r in results])


def test_sampled_structure_loss_is_unbiased_and_its_spread_shrinks_with_the_sample():
    z, edges = structure_problem()
    exact, exact_grad = loss_and_grad(z, edges)
    small, small_grads = _sampled_structure(z, edges, 2, 2000)
    large, _ = _sampled_structure(z, edges, 8, 500)
    assert small.std() > 0
    # equal in expectation: the mean of the draws within 4 standard errors of the exact value
    assert abs(small.mean() - exact) < 4 * small.std() / np.sqrt(len(small))
    assert abs(large.mean() - exact) < 4 * large.std() / np.sqrt(len(large))
    mean_grad, se_grad = small_grads.mean(0), small_grads.std(0) / np.sqrt(len(small_grads))
    assert ((mean_grad - exact_grad).abs() <= 4 * se_grad + 1e-12).float().mean() > 0.99
    # 4 times the pairs: half the standard deviation
    assert 1.6 < small.std() / large.std() < 2.4


def test_sampler_draws_a_batch_of_distinct_cells_and_every_cell_as_often_as_a_first_end():
    config = Config(losses="auto", batch_size=40, seed=3)
    batch = training.Sampler(100, 700, config, "cpu")()
    cells, pairs = batch.cells, batch.pairs
    assert len(cells) == 40 and len(set(cells.tolist())) == 40 and cells.max() < 100
    assert np.bincount(pairs[0].numpy()).tolist() == [7] * 100
    assert pairs[1].min() >= 0 and pairs[1].max() < 100 and len(set(pairs[1].tolist())) > 80
    assert training.Sampler(40, 700, config, "cpu")() == Batch()  # n <= batch_size: exact
    forced = dataclasses.replace(config, losses="exact")
    assert training.Sampler(100, 700, forced, "cpu")() == Batch()
    assert training.Sampler(40, 700, dataclasses.replace(config, losses="sampled"), "cpu").sampled


def _fit(watch=None, **changes):
    prepared, adjacency = tiny_problem()
    return training.fit(prepared, adjacency, 3, tiny_config(**changes), log=lambda line: None,
                     watch=watch)


@pytest.mark.parametrize("changes", [dict(lr_pretrain=1e4),
                                     dict(w_x=0.0, w_a=0.0, lr_cluster=1e3)])
@pytest.mark.slow
def test_fit_stops_with_a_clear_error_when_training_diverges(changes):
    with pytest.raises(FloatingPointError, match="training diverged"):
        _fit(**changes)


@pytest.mark.slow
def test_ablation_flags_remove_their_losses():
    history = _fit().history
    full = {k for row in history for k in row}
    assert {"L_c", "L_o", "L_g", "L_d"} <= full
    for row in history[-2:]:  # L_d is logged per discriminator too, and is their sum
        per = [row[f"L_d{k}"] for k in range(3) if f"L_d{k}" in row]
        assert per and np.isclose(row["L_d"], sum(per), rtol=1e-6)
    no_adv = {k for row in _fit(adversarial=False).history for k in row}
    assert "L_c" in no_adv and "L_o" in no_adv and not {"L_g", "L_d"} & no_adv
    no_over = {k for row in _fit(overclustering=False).history for k in row}
    assert "L_o" not in no_over and "reliable_c" in no_over


@pytest.mark.parametrize("dims, epoch, min_epochs, stops", [
    ((3.0, 2.0), 2, 6, False),   # ID >= LID before min_epochs is too early
    ((2.5, 2.0), 6, 6, True),    # at min_epochs itself
    ((2.0, 2.0), 8, 6, True),    # ID reaching LID is enough
    ((1.9, 2.0), 10, 6, False),  # not yet
])
def test_id_reaches_lid_is_phase_2s_stop_after_min_epochs(dims, epoch, min_epochs, stops):
    assert training.id_reaches_lid(*dims, epoch, tiny_config(min_epochs=min_epochs)) is stops


@pytest.mark.parametrize("latent, min_epochs, stopped_early", [(2, 5, True), (15, 0, False)])
@pytest.mark.slow
def test_phase2_stops_at_the_first_logged_epoch_where_id_reaches_lid(latent, min_epochs,
                                                                     stopped_early):
    """fit ends phase 2 at the first logged row where id_reaches_lid holds, else at max_epochs:
    2-d codes have ID about 2 = LID (the stop fires at the first row after min_epochs); 15-d
    codes of three curved clusters keep ID below LID (it never fires)."""
    result = _fit(latent=latent, pretrain_epochs=2, eval_every=2, min_epochs=min_epochs,
                  max_epochs=12)
    rows = [row for row in result.history if row["phase"] == 2]
    assert [row["epoch"] for row in rows] == list(range(0, result.metrics["phase2_epochs"] + 1, 2))
    config = tiny_config(min_epochs=min_epochs)
    first = next((row["epoch"] for row in rows[1:]
                  if training.id_reaches_lid(row["ID"], row["LID"], row["epoch"], config)), 12)
    assert result.metrics["phase2_epochs"] == first
    assert (first < 12) is stopped_early


def _events(**changes):
    """The events of phase 2, in order, as fit's watch hook sees them, with each one's epoch."""
    events = []
    _fit(watch=lambda event, state: events.append((event, state.epoch)), **changes)
    return events


@pytest.mark.parametrize("adversarial, overclustering, cycle", [
    (True, True, "cdodgd"), (True, False, "cdgd"), (False, True, "co"), (False, False, "c")])
@pytest.mark.slow
def test_phase2_alternates_its_steps_with_one_discriminator_update_after_each(
        adversarial, overclustering, cycle):
    """Steps in order: clustering (c), overclustering (o), generator (g), one per epoch, each
    followed by one discriminator update (d); an ablation drops its own steps; targets are
    recomputed every update_every = 4 epochs, before the epoch's step."""
    events = _events(pretrain_epochs=2, max_epochs=12, min_epochs=12, eval_every=12,
                     update_every=4, adversarial=adversarial, overclustering=overclustering)
    assert events[0] == ("start", 0)
    assert [epoch for event, epoch in events if event == "targets"] == [1, 5, 9]
    steps = "".join(event for event, _ in events if event not in ("start", "targets"))
    assert steps == cycle * (12 // len(cycle.replace("d", "")))


@pytest.mark.parametrize("adversarial, overclustering", [(True, True), (False, True),
                                                       (True, False)])
@pytest.mark.slow
def test_the_authors_schedule_alternates_c_and_o_and_adds_g_on_5_epochs_of_20(adversarial,
                                                                            overclustering):
    """schedule="authors": c on epochs 1, 3, 5, ... (their 0, 2, 4, ...), o on the others (none
    without overclustering), g as well on epochs 16-20, 36-40 (their 15-19 of every 20), and a
    discriminator update after every step, by a loop over the epochs."""
    events = _events(pretrain_epochs=2, max_epochs=40, min_epochs=40, eval_every=40,
                     update_every=40, schedule="authors", adversarial=adversarial,
                     overclustering=overclustering)
    expected = []
    for epoch in range(1, 41):
        expected += [("c" if epoch % 2 == 1 else "o", epoch)] if (
            epoch % 2 == 1 or overclustering) else []
        if adversarial and (epoch - 1) % 20 >= 15:
            expected.append(("g", epoch))
    seen = [(event, epoch) for event, epoch in events if event in ("c", "o", "g")]
    assert seen == expected
    updates = [epoch for event, epoch in events if event == "d"]
    assert len(updates) == (len(expected) if adversarial else 0)


@pytest.mark.slow
def test_start_targets_are_the_start_itself_then_eq_6():
    """start_targets = 4: the targets of epochs 1-4 are the start partition, one-hot at each
    cell's start cluster (C_k the start's, Omega_c still Eq. 6's margins); from epoch 5 on,
    Eq. (6) of p again (one-hot where reliable, p elsewhere)."""
    prepared, adjacency = tiny_problem()
    start = (prepared.labels + 1) % 3
    seen = {}

    def watch(event, state):
        if event == "targets":
            seen[state.epoch] = (state.q["c"].clone(), state.clusters.copy(),
                                 [cells.copy() for cells in state.members],
                                 state.reliable["c"].clone())

    training.fit(prepared, adjacency, 3, tiny_config(start_targets=4, update_every=4),
                 log=lambda line: None, start=start, watch=watch)
    q, clusters, members, reliable = seen[1]
    assert torch.equal(q, torch.eye(3)[start])
    assert np.array_equal(clusters, start)
    for k in range(3):
        assert np.array_equal(members[k], np.flatnonzero(reliable.numpy() & (start == k)))
    q, clusters, _, reliable = seen[5]  # Eq. (6): one-hot at the argmax where reliable, else p
    assert np.array_equal(clusters, q.argmax(1).numpy())
    assert torch.equal(q[reliable], torch.eye(3)[clusters[reliable.numpy()]])
    assert bool((q[~reliable].max(1).values < 1).all()) and not torch.equal(q, torch.eye(3)[start])


def test_split_merge_joins_one_hump_and_splits_two_by_their_means():
    """Type 0 (a round cloud) cut in two clusters at x = 0, types 1 and 2 (two tight clouds 4
    apart) in one cluster: the pair 0-1 is one hump along its centre line, cluster 2 two humps
    along its first axis; the move puts cluster 0 at type 0's mean and clusters 1, 2 at the two
    clouds' means. A right partition is left alone."""
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal((0, 0), 1, (400, 2)), rng.normal((8, 0), 0.5, (200, 2)),
                        rng.normal((8, 4), 0.5, (200, 2))])
    labels = np.concatenate([(z[:400, 0] > 0).astype(int), np.full(400, 2)])
    centres = np.stack([z[labels == k].mean(0) for k in range(3)])
    new, (a, b, c) = training.split_merge(z, centres, labels, m=3)
    assert (a, b, c) == (0, 1, 2)
    np.testing.assert_allclose(new[0], z[:400].mean(0))
    clouds = sorted([z[400:600].mean(0).tolist(), z[600:].mean(0).tolist()])
    np.testing.assert_allclose(sorted([new[1].tolist(), new[2].tolist()]), clouds, atol=1e-9)
    right = np.repeat([0, 1, 2], [400, 200, 200])
    assert training.split_merge(z, np.stack([z[right == k].mean(0) for k in range(3)]), right,
                                m=3) is None


def _rewired_by_loop(adjacency, z, centres, reliable, clusters):
    """The authors' update_graph written out: for each reliable cell, the reliable cell nearest
    its cluster's centre, linked to it (both ways) when that cell shares its cluster."""
    a = adjacency.toarray() > 0
    cells = [i for i in range(len(z)) if reliable[i]]
    for i in cells:
        k = clusters[i]
        hub = min(cells, key=lambda j: ((z[j] - centres[k]) ** 2).sum())
        if clusters[hub] == k and hub != i:
            a[i, hub] = a[hub, i] = True
    return a


def test_rewired_graph_links_reliable_cells_to_their_clusters_hub_by_a_loop():
    rng = np.random.default_rng(0)
    adjacency = random_graph(40, 0.1, seed=2)
    z, centres = rng.normal(size=(40, 3)), rng.normal(size=(4, 3))
    reliable, clusters = rng.random(40) < 0.5, rng.integers(0, 4, 40)
    a = training.rewired(adjacency, z, centres, reliable, clusters)
    expected = _rewired_by_loop(adjacency, z, centres, reliable, clusters)
    assert np.array_equal(a.toarray() > 0, expected)
    assert (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    assert (a.toarray() > 0).sum() > (adjacency.toarray() > 0).sum()  # it added edges


@pytest.mark.slow
def test_rewire_trains_on_the_graph_rewired_at_each_target_update():
    """rewire: at each target update, A rewired (by the loop) from the codes of that update, phi^c,
    Omega_c and the clusters; each step until the next update scores L_A (Eq. 2) on its edges."""
    prepared, adjacency = tiny_problem()
    graphs, steps = {}, []

    def watch(event, state):
        if event == "start":
            graphs["now"] = adjacency
        if event == "targets":
            z = training.codes(state.model, training.tensors(prepared, graphs["now"], "cpu"))
            expected = _rewired_by_loop(adjacency, z.numpy(), state.phi["c"].detach().numpy(),
                                        state.reliable["c"].numpy(), state.clusters)
            assert np.array_equal(state.graph.toarray() > 0, expected)
            graphs["now"] = state.graph
        if event in ("c", "o", "g"):
            edges = torch.as_tensor(np.vstack(state.graph.nonzero()), dtype=torch.long)
            assert state.out.l_a.item() == pytest.approx(
                structure_loss(state.out.z, edges).item(), rel=1e-6)
            steps.append(state.epoch)

    training.fit(prepared, adjacency, 3, tiny_config(rewire=True, update_every=4),
                 log=lambda line: None, watch=watch)
    assert len(steps) == 12
    assert (graphs["now"] != adjacency).nnz > 0


@pytest.mark.slow
def test_phase2_targets_are_fixed_within_each_update_window():
    """q of Eq. (6) is recomputed at epochs 1, 5, 9 (update_every = 4) and held fixed in between:
    every clustering step of a window sees the same targets, the next window others."""
    targets = {}

    def watch(event, state):
        if event == "c":
            targets[state.epoch] = state.q["c"].clone()

    _fit(pretrain_epochs=2, max_epochs=12, min_epochs=12, eval_every=12, update_every=4,
         adversarial=False, overclustering=False, watch=watch)  # a clustering step every epoch
    assert sorted(targets) == list(range(1, 13))
    for start in (1, 5, 9):
        assert all(torch.equal(targets[epoch], targets[start]) for epoch in range(start, start + 4))
    assert not torch.equal(targets[4], targets[5]) and not torch.equal(targets[8], targets[9])


@pytest.mark.slow
def test_sampled_losses_train_on_batches_and_cluster_as_well():
    """losses="sampled" on 300 cells in batches of 100: every phase-2 step reads 100 distinct
    cells (its ZINB term decodes those alone), and the run clusters as the exact one does."""
    prepared, adjacency = tiny_problem()
    batches = []

    def watch(event, state):
        if event in ("c", "o", "g"):
            batches.append((state.batch.cells, state.out.rate.shape[0]))

    config = tiny_config(pretrain_epochs=40, eval_every=10, max_epochs=6, min_epochs=6,
                          losses="sampled", batch_size=100)
    sampled = training.fit(prepared, adjacency, 3, config, log=lambda line: None, watch=watch)
    assert len(batches) == 6
    assert all(len(set(cells.tolist())) == 100 and decoded == 100 for cells, decoded in batches)
    assert not torch.equal(batches[0][0], batches[1][0])  # a new batch every epoch
    assert sampled.metrics["ari"] > 0.95


@pytest.mark.slow
def test_the_sparse_path_trains_and_clusters_as_the_dense_one():
    """Above preprocess's dense_limit nothing n x g is dense (a SparseInput and SparseCounts on
    the device); the run clusters the tiny problem as the dense run does."""
    data = datasets.synthetic(n_cells=300, n_genes=200, n_clusters=3, seed=0)
    runs = []
    for limit in (datasets.DENSE_LIMIT, 0):
        prepared = datasets.preprocess(data, n_top_genes=150, dense_limit=limit)
        adjacency = datasets.knn_graph(prepared.x, k=10, n_pcs=20)
        runs.append(training.fit(prepared, adjacency, 3, tiny_config(pretrain_epochs=40),
                                 log=lambda line: None))
    assert isinstance(prepared.x, datasets.ScaledCounts)
    assert runs[1].metrics["ari"] >= runs[0].metrics["ari"] - 0.05 >= 0.85
    assert clustering.ari(runs[0].labels, runs[1].labels) > 0.9


@pytest.mark.slow
def test_training_lowers_the_losses_and_improves_the_codes():
    """Against the same model untrained (lr 1e-30: its loss and k-means ARI are the untrained ones;
    its mean head starts at each gene's mean, so its L_X is the intercept-only model's): phase 1
    lowers L_X and L_A together, makes k-means on Z better, and the whole run clusters well.
    L_A is also checked trained alone."""
    prepared, adjacency = tiny_problem()
    run = lambda **changes: training.fit(prepared, adjacency, 3, tiny_config(**changes),
                                      log=lambda line: None)
    untrained = run(pretrain_epochs=1, lr_pretrain=1e-30, max_epochs=1, min_epochs=1).history[0]
    trained = run(pretrain_epochs=40, eval_every=10, max_epochs=6, min_epochs=6)
    end_of_phase1 = [row for row in trained.history if row["phase"] == 1][-1]
    assert end_of_phase1["L_X"] < 0.98 * untrained["L_X"]
    assert end_of_phase1["L_A"] < 0.75 * untrained["L_A"]
    assert end_of_phase1["kmeans_ari"] > untrained["kmeans_ari"] + 0.2
    assert trained.metrics["ari"] > 0.95
    structure_only = run(pretrain_epochs=20, eval_every=20, w_x=0.0, max_epochs=1, min_epochs=1)
    assert structure_only.history[0]["L_A"] < 0.75 * untrained["L_A"]


@pytest.mark.slow
def test_the_same_cells_cluster_alike_at_umi_and_smart_seq2_depth():
    """Issue 24: 300 cells x 1000 genes drawn at 3000 and at 3e6 counts per cell (UMI and
    Smart-seq2 read depth). Before the mean head's intercept, the 3e6 run ended phase 1 with
    L_A 21 (codes of median norm 5.3, against 1.7 at 3000), its reliable set emptied and its
    ARI was 0.75 (1.0 at 3000). Both runs must end phase 1 with L_A below log 2, keep reliable
    cells, reach ARIs within 0.05 of each other and warn of nothing. The start is pinned to
    init="merge", the one this test was written with: it is about depth, and on these 300
    cells the default start gives 0.85 at 3000 counts (the closing note of issue 25)."""
    runs = []
    for depth in (3000.0, 3e6):
        data = datasets.synthetic(n_cells=300, n_genes=1000, n_clusters=3, seed=0, depth=depth)
        prepared = datasets.preprocess(data)
        adjacency = datasets.knn_graph(prepared.x, k=10, n_pcs=20)
        config = Config(pretrain_epochs=100, max_epochs=30, min_epochs=30, eval_every=10,
                              update_every=10, n_over=12, hidden=32, disc_hidden=8, n_cvx=8,
                              init="merge")
        runs.append(training.fit(prepared, adjacency, 3, config, log=lambda line: None))
    for run in runs:
        assert [row for row in run.history if row["phase"] == 1][-1]["L_A"] < np.log(2)
        assert run.history[-1]["reliable_c"] > 0
    umi, deep = (run.metrics["ari"] for run in runs)
    assert umi > 0.9 and abs(deep - umi) <= 0.05
    assert all(evidence.run_warnings(run.history) == [] for run in runs)


@pytest.mark.slow
def test_umi_counts_times_50000_train_as_the_counts_do():
    """Counts up to ~3e8 per entry (the tiny problem x 50,000): phase 1 ends with L_A below
    log 2 and the run clusters (before the intercept and the exact float32 ZINB terms, L_A
    reached 6.6 here, and the demo data x 50,000 diverged)."""
    data = datasets.synthetic(n_cells=300, n_genes=200, n_clusters=3, seed=0)
    prepared = datasets.preprocess(dataclasses.replace(data, counts=data.counts * 50_000),
                                   n_top_genes=150)
    adjacency = datasets.knn_graph(prepared.x, k=10, n_pcs=20)
    config = tiny_config(pretrain_epochs=100, eval_every=10, max_epochs=10, min_epochs=10)
    run = training.fit(prepared, adjacency, 3, config, log=lambda line: None)
    assert [row for row in run.history if row["phase"] == 1][-1]["L_A"] < np.log(2)
    assert evidence.run_warnings(run.history) == [] and run.metrics["ari"] > 0.9


@pytest.mark.slow
def test_the_start_is_a_history_row_with_its_scores_and_kept_share():
    """Phase 2's row 0: the start partition's ACC/NMI/ARI, the share its mean codes keep, beta
    and ID/LID on the codes after phase 1; metrics["start"] holds the same scores."""
    prepared, adjacency = tiny_problem()
    y, lines = prepared.labels, []
    result = training.fit(prepared, adjacency, 3, tiny_config(), log=lines.append,
                          start=(y + 1) % 3)
    row = next(r for r in result.history if r["phase"] == 2)
    assert row["epoch"] == 0 and row["start"] == "given"
    assert row["ari"] == 1.0 and row["acc"] == 1.0  # the labels renamed: a perfect start
    assert row["kept"] == pytest.approx(kept_by_loop(result.pretrained, y))
    assert (row["ID"], row["LID"]) == geometry.cluster_geometry(result.pretrained, y)
    assert 0 <= row["beta_c"] < 1 and 0 <= row["beta_o"] < 1
    assert result.metrics["start"] == {k: row[k] for k in ("acc", "nmi", "ari", "kept")}
    line = next(line for line in lines if "start (given" in line)
    assert f"keep {row['kept']:.1%}" in line and "ARI 1.000" in line


@pytest.mark.slow
def test_fit_starts_phase_2_from_a_given_partition():
    prepared, adjacency = tiny_problem()
    y = prepared.labels
    config = tiny_config(adversarial=False)  # the convex combinations draw per cluster
    run = lambda start: training.fit(prepared, adjacency, 3, config, log=lambda line: None,
                                  start=start).labels
    from_truth, from_shifted = run(y), run((y + 1) % 3)
    assert clustering.ari(y, from_truth) > 0.9
    assert np.array_equal(from_shifted, (from_truth + 1) % 3)  # phi^c follow the start's order
    for bad in [y[:-1], np.minimum(y, 1), y + 1]:
        with pytest.raises(ValueError, match="start must give each"):
            training.fit(prepared, adjacency, 3, config, start=bad)


@pytest.mark.slow
def test_history_logs_the_true_centre_ari_of_the_codes_in_both_phases():
    prepared, adjacency = tiny_problem()
    result = training.fit(prepared, adjacency, 3, tiny_config(), log=lambda line: None)
    assert {row["phase"] for row in result.history if "centroid_ari" in row} == {1, 2}
    last = result.history[-1]
    assert last["epoch"] == result.metrics["phase2_epochs"]  # logged on the final codes
    assert last["centroid_ari"] == clustering.centroid_ari(prepared.labels, result.embedding)


def _student_t(z, centres):
    """Eq. (5) written out: (1 + ||z_i - phi_j||^2)^-1, each row normalised."""
    kernel = 1 / (1 + ((z[:, None, :] - centres[None, :, :]) ** 2).sum(2))
    return kernel / kernel.sum(1, keepdim=True)


def _margins(p):
    top = np.sort(np.asarray(p), axis=1)
    return top[:, -1] - top[:, -2]


def _watched_fit(prepared, adjacency, check, **changes):
    """fit with a watch hook that calls check(event, state, before) at each event of phase 2,
    `before` holding copies of the model, phi^c, phi^o and the discriminators as they were just
    before the event (after the previous one; empty at "start")."""
    before = {}

    def watch(event, state):
        check(event, state, before)
        before.update(model=copy.deepcopy(state.model), disc=copy.deepcopy(state.adversary.disc),
                      phi={key: phi.detach().clone() for key, phi in state.phi.items()})

    config = tiny_config(**changes)
    return training.fit(prepared, adjacency, 3, config, log=lambda line: None, watch=watch), config


def _by_hand_logits(disc, x, k):
    """Discriminator k of Eq. (12) written out: one ReLU hidden layer, one logit per row of x."""
    return (torch.relu(x @ disc.w1[k] + disc.b1[k]) @ disc.w2[k] + disc.b2[k]).squeeze(-1)


def _step_loss(event, state, before, data, config):
    """The loss the step `event` minimises, built from the paper's formulas on copies of the
    parameters as they were before the step, on the step's own cells, pairs, targets and
    samples -> (loss, the parameters it should move, in the optimiser's order)."""
    model = before["model"]
    out = self_supervision(model, data, state.batch, config.block)
    loss, params = config.w_x * out.l_x + config.w_a * out.l_a, list(model.parameters())
    cells = state.batch.cells
    if event in ("c", "o"):  # Eqs. (7), (10): KL(q || p), the targets of the same cells
        phi = before["phi"][event].clone().requires_grad_()
        z = out.z if cells is None else out.z[cells]
        q = state.q[event] if cells is None else state.q[event][cells]
        p, kept = _student_t(z, phi), q > 0
        kl = (q[kept] * (torch.log(q[kept]) - torch.log(p[kept]))).sum() / len(q)
        gamma = config.gamma_c if event == "c" else config.gamma_o
        return loss + gamma * kl, params + [phi]
    samples, disc = state.samples, before["disc"]  # Eq. (13): decoded convex combinations
    theta = torch.as_tensor(samples.theta, dtype=out.z.dtype)
    z_cvx = (theta[..., None] * out.z[torch.as_tensor(samples.cvx_picks)]).sum(2)
    fake = torch.log1p(model.features(z_cvx)[1])
    real = torch.log1p(model.features(out.z[torch.as_tensor(samples.real_picks)])[1]).detach()
    fake = (fake - real.mean(1, keepdim=True)) / (real.std(1, keepdim=True) + 1e-2)
    l_g = sum(torch.log(1 - torch.sigmoid(_by_hand_logits(disc, fake[row], k))).mean()
              for row, k in enumerate(samples.active.tolist()))
    return loss + config.gamma_g * l_g, params


def _assert_gradients(loss, params, live):
    """The live parameters' .grad after the step are the gradient of loss (the copies')."""
    for expected, p in zip(torch.autograd.grad(loss, params), live):
        scale = expected.abs().max().item()
        assert torch.allclose(p.grad, expected, rtol=1e-3, atol=1e-4 * scale + 1e-9)


def _unchanged(module_or_tensors, copies):
    pairs = zip(module_or_tensors, copies)
    return all(torch.equal(a.detach(), b.detach()) for a, b in pairs)


def _check_step(prepared, adjacency, seen):
    """A check for _watched_fit: each optimiser step of phase 2 holds the gradient of its own loss
    (L_SS + gamma_c L_c, + gamma_o L_o, + gamma_g L_g with Eq. 13 on the decoded convex
    combinations, or L_d for the discriminators) and moves only its own parameters."""
    data = training.tensors(prepared, adjacency, "cpu")

    def check(event, state, before):
        seen.append(event)
        config = state.adversary.config
        model, disc = state.model, state.adversary.disc
        if event in ("c", "o", "g"):
            loss, params = _step_loss(event, state, before, data, config)
            live = list(model.parameters()) + ([state.phi[event]] if event != "g" else [])
            _assert_gradients(loss, params, live)
            assert _unchanged(disc.parameters(), before["disc"].parameters())
            for key in {"c", "o"} - {event}:
                assert torch.equal(state.phi[key].detach(), before["phi"][key])
        if event == "d":  # Eq. (12): reconstructions real, decoded convex combinations fake
            samples, copy_ = state.samples, before["disc"]
            loss = sum(F.softplus(-_by_hand_logits(copy_, samples.real[row], k)).mean()
                       + F.softplus(_by_hand_logits(copy_, samples.fake[row], k)).mean()
                       for row, k in enumerate(samples.active.tolist()))
            _assert_gradients(loss, list(copy_.parameters()), list(disc.parameters()))
            assert _unchanged(model.parameters(), before["model"].parameters())
            assert all(torch.equal(state.phi[key].detach(), before["phi"][key]) for key in "co")
    return check


@pytest.mark.slow
@pytest.mark.parametrize("losses", ["exact", "sampled"])
def test_each_phase2_step_minimises_its_own_loss_on_its_own_cells(losses):
    """Through fit's watch hook, with dropout 0 so that a step can be recomputed: the gradient of
    each step is that of L_SS + gamma_c L_c (resp. gamma_o L_o) with the targets q of the same
    cells the step's soft assignments p are of (on the sampled path, 100 of 300 cells a step),
    or of L_SS + gamma_g L_g with L_g of Eq. (13) scored on the decoded convex combinations
    (so the generator step lowers L_g: it fools the discriminators), for the encoder and
    feature head only; the discriminators' update is the gradient of L_d and moves nothing else."""
    prepared, adjacency = tiny_problem()
    seen = []
    _watched_fit(prepared, adjacency, _check_step(prepared, adjacency, seen), dropout=0.0,
                 losses=losses, batch_size=100, max_epochs=6, min_epochs=6, eval_every=6)
    assert seen == ["start"] + ["targets", "c", "d", "o", "d", "g", "d"] * 2


def _reliable_by_hand(z, centres, beta):
    """Eqs. (5)-(6) by hand: the cells whose top-1 minus top-2 soft assignment reaches beta
    (one number, or one per cluster read at the cell's argmax), and each cell's argmax."""
    p = _student_t(torch.as_tensor(z, dtype=torch.float64), torch.as_tensor(centres).double())
    argmax = p.argmax(1).numpy()
    threshold = np.asarray(beta)[argmax] if np.ndim(beta) else beta
    return _margins(p) >= threshold, argmax, p


def _check_auto_start(beta, p, omega, rule):
    """"auto" at the start: reliable_frac (0.15) of the cells reliable, each beta the quantile
    of the margins of all cells (global) or of the cells whose argmax is its cluster."""
    margins, argmax = _margins(p), p.argmax(1).numpy()
    groups = [np.ones(len(p), bool)] if rule == "global" else [argmax == k for k in
                                                               range(p.shape[1])]
    for k, cells in enumerate(groups):
        expected = np.quantile(margins[cells], 1 - 0.15)
        assert np.atleast_1d(np.asarray(beta))[k] == pytest.approx(expected, abs=1e-6)
        assert abs(omega[cells].mean() - 0.15) <= 2 / cells.sum()


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["per-cluster", "global"])
def test_targets_reliable_sets_and_convex_combinations_follow_eqs_6_9_and_11(rule):
    """At each target update, Omega_c and Omega_o are the cells whose margins reach beta_c and
    beta_o respectively (each threshold set by "auto" so that reliable_frac of the cells, or of
    each (over)cluster's cells, are reliable when phase 2 starts), q is one-hot on Omega and p
    elsewhere; every convex combination and every real sample of discriminator k is drawn from
    the reliable cells that cluster k holds (C_k intersected with Omega_c)."""
    prepared, adjacency = tiny_problem()
    reliable, updates = {}, []

    def check(event, state, before):
        if event == "start":
            return
        if event == "targets":
            z = training.codes(state.model, training.tensors(prepared, adjacency, "cpu")).numpy()
            for key in ("c", "o"):
                phi = state.phi[key].detach().numpy()
                beta = state.beta[key]
                beta = beta.cpu().numpy() if torch.is_tensor(beta) else beta
                omega, argmax, p = _reliable_by_hand(z, phi, beta)
                if not updates:
                    _check_auto_start(beta, p, omega, rule)
                np.testing.assert_array_equal(state.reliable[key].numpy(), omega)
                onehot = np.eye(p.shape[1])[argmax]
                expected = np.where(omega[:, None], onehot, p.numpy())
                assert np.allclose(state.q[key].numpy(), expected, atol=1e-5)
                reliable[key] = (omega, argmax)
            updates.append(state.epoch)
        if event in ("g", "d"):
            omega, argmax = reliable["c"]
            samples = state.samples
            for row, k in enumerate(samples.active.tolist()):
                for cells in (samples.cvx_picks[row].ravel(), samples.real_picks[row]):
                    assert omega[cells].all() and (argmax[cells] == k).all()

    _watched_fit(prepared, adjacency, check, max_epochs=9, min_epochs=9, eval_every=9,
                 update_every=3, reliable_rule=rule)
    assert updates == [1, 4, 7]
    assert sum(reliable["c"][0]) >= 3  # the check above did look at reliable cells


def _merge(adjacency, over, config):
    return clustering.merge_overclusters(adjacency, over, 3, config.resolution)


def _consensus_by_pairs(adjacency, merged, config):
    """--init consensus by brute force: two cells share a group when every merge puts them
    together; the groups are then merged again."""
    together = np.all([m[:, None] == m[None, :] for m in merged], axis=0)
    _, groups = np.unique(together, axis=0, return_inverse=True)
    return _merge(adjacency, groups.ravel(), config)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["consistent", "merge", "consensus", "medoid", "spectral",
                                  "kmeans"])
def test_each_start_rule_is_its_brute_force_choice_over_the_same_restarts(init):
    """On a problem whose ten k-means restarts of the n_o overclusters merge into different
    partitions with different kept shares, each start rule picks what a brute-force choice over
    the same restarts picks: the merge whose mean codes keep most of it (consistent), the merge
    of the lowest-inertia restart (merge), the merge of the groups that every merge agrees on
    (consensus), the merge with the highest summed ARI to all merges, by pair counts (medoid);
    spectral and kmeans as their functions give them. phi^c starts at the mean
    code of each cluster of that partition."""
    prepared, adjacency = tiny_problem(seed=1)
    starts = []

    def watch(event, state):  # phase 2's first step will move phi^c: copy it now
        if event == "start":
            starts.append((state.pretrained, state.start, state.phi["c"].detach().clone()))

    config = tiny_config(init=init, max_epochs=1, min_epochs=1)
    training.fit(prepared, adjacency, 3, config, log=lambda line: None, watch=watch)
    (z, start, phi_c), = starts
    restarts = clustering.kmeans_restarts(z, config.n_over, seed=0)
    merged = [_merge(adjacency, over, config) for _, over, _ in restarts]
    shares = [kept_by_loop(z, m) for m in merged]
    assert len({tuple(m) for m in merged}) > 1 and shares.count(max(shares)) == 1
    expected = {
        "consistent": lambda: merged[int(np.argmax(shares))],
        "merge": lambda: merged[int(np.argmin([inertia_by_loop(z, over, centres)
                                               for _, over, centres in restarts]))],
        "consensus": lambda: _consensus_by_pairs(adjacency, merged, config),
        "medoid": lambda: merged[int(np.argmax([sum(pairs_ari(m, other) for other in merged)
                                                for m in merged]))],
        "spectral": lambda: clustering.spectral_clustering(adjacency, 3, seed=0),
        "kmeans": lambda: clustering.kmeans(datasets.pca(prepared.x, 50), 3, seed=0)[0],
    }[init]()
    pairs = set(zip(start, expected))  # the same partition: a one-to-one map of names
    assert len(pairs) == len(set(start)) == len(set(expected)) == 3
    if init != "consensus":  # the same names too (the brute-force groups are numbered apart)
        np.testing.assert_array_equal(start, expected)
    means = np.stack([z[start == k].mean(0) for k in range(3)])
    assert np.allclose(phi_c.numpy(), means, atol=1e-5)


@pytest.mark.slow
def test_phase2_steps_move_the_centres_as_trainable_parameters():
    """phi^c (K = 3 rows) and phi^o (n_o = 6 rows) are leaves that the steps of Eqs. (7) and
    (10) give a gradient and move: the centres after the last step differ from the start's."""
    seen = {"c": [], "o": []}

    def watch(event, state):
        if event == "start":
            for key, rows in (("c", 3), ("o", 6)):
                phi = state.phi[key]
                assert phi.is_leaf and phi.requires_grad and phi.shape[0] == rows
                seen[key].append(phi.detach().clone())
        if event in ("c", "o"):
            assert state.phi[event].grad.abs().sum() > 0
            seen[event].append(state.phi[event].detach().clone())

    _fit(pretrain_epochs=2, max_epochs=8, min_epochs=8, eval_every=8, adversarial=False,
         watch=watch)
    for key in ("c", "o"):
        assert len(seen[key]) == 1 + 4
        assert not torch.allclose(seen[key][0], seen[key][-1], rtol=0, atol=1e-6)


def _eval_codes(model, data):
    """The encoder's output without dropout, by hand (eval mode, then back to training)."""
    model.eval()
    with torch.no_grad():
        z = model.encoder(data["x"], data["a_norm"])
    model.train()
    return z


@pytest.mark.slow
def test_targets_geometry_and_labels_use_codes_without_dropout():
    """With dropout 0.5 on the encoder input: the training passes of phase 2 run with it (their
    codes are not the eval-mode ones), while the codes after phase 1, every target update, the
    logged ID/LID and the final labels and embedding are those of the encoder without dropout."""
    prepared, adjacency = tiny_problem()
    data, model = training.tensors(prepared, adjacency, "cpu"), []

    def check(event, state, before):
        model[:] = [state.model]
        if event == "start":
            assert np.array_equal(state.pretrained, _eval_codes(state.model, data).numpy())
        if event == "targets":
            z = _eval_codes(state.model, data)
            p = soft_assign(z, state.phi["c"].detach())
            assert torch.equal(state.q["c"], target_distribution(p, state.beta["c"])[0])
        if event in ("c", "o"):
            assert not torch.allclose(state.out.z, _eval_codes(before["model"], data))

    result, _ = _watched_fit(prepared, adjacency, check, dropout=0.5, pretrain_epochs=4,
                             eval_every=3, max_epochs=6, min_epochs=6, update_every=3,
                             adversarial=False)
    final = _eval_codes(model[0], data).numpy()
    assert np.array_equal(result.embedding, final)
    last = result.history[-1]
    assert last["epoch"] == 6
    assert (last["ID"], last["LID"]) == geometry.cluster_geometry(final, result.labels)


@pytest.mark.slow
@pytest.mark.parametrize("losses", ["exact", "sampled"])
def test_one_phase_1_serves_every_k_as_a_run_at_that_k_alone(losses):
    """Eq. (4) does not know K: phase 2 resumed from one pretrain gives, for each K, the labels
    and codes of a whole run at that K (the model copied, the generators put back)."""
    prepared, adjacency = tiny_problem()
    config = tiny_config(losses=losses, batch_size=100)
    quiet = lambda line: None
    once = training.pretrain(prepared, adjacency, config,
                             report.Report(prepared.labels, 3, config, quiet))
    for k in (4, 3, 2):
        alone = training.fit(prepared, adjacency, k, config, log=quiet)
        resumed = training.fit(prepared, adjacency, k, config, log=quiet, pretrained=once)
        assert np.array_equal(alone.labels, resumed.labels)
        assert np.array_equal(alone.embedding, resumed.embedding)
        assert np.array_equal(alone.pretrained, resumed.pretrained)


@pytest.mark.slow
def test_fit_is_deterministic_for_a_seed():
    first, second = _fit(seed=3), _fit(seed=3)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.embedding, second.embedding)
