"""Tests of model.py: each of Eqs. (1)-(13) against an independent computation (a dense formula,
a loop, autograd, a closed form).

Run: python -m pytest -q (README, "Tests").
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import model
import report
import training
from model import (Adversary, Batch, Config, Discriminators, Encoder, FeatureHead, Model, Propagate,
                   auto_threshold, convex_combinations, discriminator_loss, draw_combinations,
                   feature_loss, generator_loss, kl_divergence, log_mean, normalized_adjacency,
                   optimise, self_supervision, soft_assign, standardise, structure_loss,
                   target_distribution)
from testkit import loss_and_grad, random_graph, structure_problem, tiny_config, tiny_problem
from zinb import zinb_nll


def test_normalized_adjacency_matches_dense_formula():
    a = random_graph(30, 0.2, 0)
    a_tilde = a.toarray() + np.eye(30)
    d = a_tilde.sum(1) ** -0.5
    expected = d[:, None] * a_tilde * d[None, :]
    assert np.allclose(normalized_adjacency(a).to_dense().numpy(), expected, atol=1e-6)


def test_encoder_is_two_gcn_layers_without_dropout_in_eval_mode():
    a = random_graph(25, 0.2, 3)
    a_tilde = a.toarray() + np.eye(25)
    d = a_tilde.sum(1) ** -0.5
    a_n = torch.as_tensor(d[:, None] * a_tilde * d[None, :], dtype=torch.float32)
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    encoder = Encoder(6, hidden=5, latent=3, dropout=0.5).eval()
    w1, b1, w2, b2 = encoder.w1.weight.T, encoder.w1.bias, encoder.w2.weight.T, encoder.w2.bias
    # Eq. (1), ReLU on the hidden layer, linear output; each bias is propagated with its layer
    expected = a_n @ (torch.relu(a_n @ (x @ w1 + b1)) @ w2 + b2)
    a_norm = normalized_adjacency(a)
    assert torch.allclose(encoder(x, a_norm), expected, atol=1e-6)
    assert not torch.allclose(encoder.train()(x, a_norm), expected)  # dropout when training


def test_structure_loss_matches_dense_weighted_bce():
    a = random_graph(50, 0.1, 1)
    coo = a.tocoo()
    edges = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    z = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    target = torch.as_tensor(a.toarray(), dtype=torch.float64)
    n, e = 50, a.nnz
    pos_weight = torch.tensor((n * n - e) / e, dtype=torch.float64)
    norm = n * n / (2 * (n * n - e))
    expected = norm * F.binary_cross_entropy_with_logits(z1 @ z1.T, target, pos_weight=pos_weight)
    got = structure_loss(z2, edges, block=7)  # blocks that do not divide n
    expected.backward()
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-10)
    assert torch.allclose(z2.grad, z1.grad, rtol=1e-8, atol=1e-12)


def test_structure_loss_over_every_pair_once_is_the_exact_loss():
    z, edges = structure_problem()
    every = torch.cartesian_prod(torch.arange(60), torch.arange(60)).T
    exact, exact_grad = loss_and_grad(z, edges)
    listed, listed_grad = loss_and_grad(z, edges, every)
    assert listed == pytest.approx(exact, rel=1e-12)
    assert torch.allclose(listed_grad, exact_grad, rtol=1e-9, atol=1e-12)


def test_sampled_epoch_scores_zinb_on_its_batch_only():
    n, g = 30, 5
    rng = np.random.default_rng(0)
    data = {"x": torch.randn(n, g), "counts": torch.as_tensor(rng.poisson(2.0, (n, g)),
                                                              dtype=torch.float32),
            "size_factors": torch.as_tensor(rng.uniform(0.5, 2, (n, 1)), dtype=torch.float32),
            "a_norm": normalized_adjacency(random_graph(n, 0.2, 0))}
    data["lgamma_x1"] = torch.lgamma(data["counts"] + 1)
    coo = random_graph(n, 0.2, 0).tocoo()
    data["edges"] = torch.as_tensor(np.vstack([coo.row, coo.col]), dtype=torch.long)
    config = Config(hidden=8, latent=3, decoder=(8,), dropout=0.0)
    model = Model(g, config)
    cells = torch.tensor([4, 17, 2, 29])
    out = self_supervision(model, data, Batch(cells))
    z, rate, l_x = out.z, out.rate, out.l_x
    pi, mu, theta = model.features(model.encoder(data["x"], data["a_norm"])[cells])
    expected = zinb_nll(data["counts"][cells], mu * data["size_factors"][cells], theta, pi)
    assert z.shape == (n, 3) and rate.shape == (4, g)
    assert l_x.item() == pytest.approx(expected.item(), rel=1e-6)


def test_encoder_gradient_is_the_dense_transpose_product():
    a = random_graph(25, 0.2, 5)
    a_norm = normalized_adjacency(a)
    dense = a_norm.to_dense()
    h = torch.randn(25, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(25, 4, generator=torch.Generator().manual_seed(2))
    (Propagate.apply(a_norm, h) * weights).sum().backward()
    assert torch.allclose(h.grad, dense.T @ weights, atol=1e-6)


def test_soft_assign_matches_student_t_loop():
    rng = np.random.default_rng(2)
    z, centers = rng.normal(size=(20, 3)), rng.normal(size=(4, 3))
    expected = np.empty((20, 4))
    for i in range(20):
        kernel = [1 / (1 + np.sum((z[i] - c) ** 2)) for c in centers]
        expected[i] = np.array(kernel) / sum(kernel)
    got = soft_assign(torch.as_tensor(z), torch.as_tensor(centers)).numpy()
    assert np.allclose(got, expected, rtol=1e-12)


def test_target_distribution_one_hot_only_for_reliable_cells():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    q, reliable = target_distribution(p, beta=0.3)
    for i, row in enumerate(p.tolist()):
        top1, top2 = sorted(row, reverse=True)[:2]
        assert bool(reliable[i]) == (top1 - top2 >= 0.3)
        if reliable[i]:
            assert q[i].tolist() == [float(j == int(np.argmax(row))) for j in range(3)]
        else:
            assert torch.equal(q[i], p[i])
    assert reliable.tolist() == [True, False, True, False]


def test_kl_divergence_matches_loop_with_zero_targets():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(5), size=8)
    q = rng.dirichlet(np.ones(5), size=8)
    q[0] = [0, 1, 0, 0, 0]
    expected = sum(q[i, j] * np.log(q[i, j] / p[i, j])
                   for i in range(8) for j in range(5) if q[i, j] > 0)
    q_t, p_t = torch.as_tensor(q), torch.as_tensor(p)
    assert np.isclose(kl_divergence(q_t, p_t, reduction="sum").item(), expected, rtol=1e-12)
    assert np.isclose(kl_divergence(q_t, p_t).item(), expected / 8, rtol=1e-12)
    assert kl_divergence(p_t, p_t).item() == pytest.approx(0, abs=1e-12)


def test_auto_threshold_makes_the_requested_share_reliable():
    p = torch.softmax(torch.randn(1000, 6, generator=torch.Generator().manual_seed(4)), 1)
    beta = auto_threshold(p, 0.15)
    _, reliable = target_distribution(p, beta)
    assert abs(reliable.float().mean().item() - 0.15) <= 0.002


def test_per_cluster_auto_thresholds_make_each_cluster_start_with_its_share_reliable():
    """reliable_rule "per-cluster": beta_k is the (1 - frac) quantile of the margins of the
    cells whose argmax is k, so that each cluster has frac of its cells reliable; a cluster
    with no cell takes the global quantile; target_distribution reads beta at each argmax."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(900, 4, generator=g)
    logits[:600, 0] += 3  # cluster 0 is the confident one: a global quantile fills it first
    logits[:, 3] -= 20    # no cell's argmax is 3
    p = torch.softmax(logits, 1)
    beta = auto_threshold(p, 0.15, per_cluster=True)
    top = p.sort(1, descending=True).values
    margins, argmax = (top[:, 0] - top[:, 1]).numpy(), p.argmax(1).numpy()
    for k in range(3):
        assert beta[k].item() == pytest.approx(np.quantile(margins[argmax == k], 0.85), rel=1e-5)
    assert beta[3].item() == pytest.approx(np.quantile(margins, 0.85), rel=1e-5)
    _, reliable = target_distribution(p, beta)
    for k in range(3):
        share = reliable.numpy()[argmax == k].mean()
        assert abs(share - 0.15) <= 1 / (argmax == k).sum() + 1e-9
    _, global_reliable = target_distribution(p, auto_threshold(p, 0.15))
    assert global_reliable.numpy()[argmax != 0].mean() < 0.05  # what the global rule does


def test_latent_adversary_compares_codes_not_decoded_profiles():
    """adversary "latent" (the text's f_adv: R^d -> [0, 1]): the real samples are the codes of
    reliable cells, the fake ones their convex combinations, undecoded, standardised alike."""
    prepared, adjacency = tiny_problem()
    config = tiny_config(adversary="latent")
    torch.manual_seed(0)
    model = Model(prepared.x.shape[1], config)
    adversary = Adversary(model, 3, prepared.x.shape[1], config, np.random.default_rng(0))
    assert adversary.disc.w1.shape[1] == config.latent
    out = self_supervision(model, _tiny_data(prepared, adjacency), Batch())
    members = [np.arange(k, 300, 3)[:20] for k in range(3)]
    with torch.no_grad():
        samples = adversary.inputs(out, members)
    real = out.z[torch.as_tensor(samples.real_picks)]
    theta = torch.as_tensor(samples.theta, dtype=torch.float32)
    fake = (theta[..., None] * out.z[torch.as_tensor(samples.cvx_picks)]).sum(2)
    mean, sd = real.mean(1, keepdim=True), real.std(1, keepdim=True) + 1e-2
    assert torch.allclose(samples.real, (real - mean) / sd, atol=1e-5)
    assert torch.allclose(samples.fake, (fake - mean) / sd, atol=1e-5)


def test_convex_combinations_lie_on_the_simplex_of_their_cluster():
    # codes of cluster 0 are the unit vectors e_0..e_2, so a combination's coordinates ARE theta
    z = torch.cat([torch.eye(6), torch.ones(1, 6)])
    members = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6])]
    active, picks, theta = draw_combinations(members, m=3, n_cvx=3000,
                                                   rng=np.random.default_rng(5))
    assert active.tolist() == [0, 1]  # cluster 2 has fewer than m members
    assert all(len(set(row)) == 3 for row in picks.reshape(-1, 3))  # m distinct cells
    z_cvx = convex_combinations(z, picks, theta)
    loop = [[sum(w * z[i] for w, i in zip(theta[k, j], picks[k, j])) for j in range(3000)]
            for k in range(2)]
    assert torch.allclose(z_cvx, torch.stack([torch.stack(rows) for rows in loop]))
    assert z_cvx.shape == (2, 3000, 6)
    assert torch.all(z_cvx[0, :, 3:] == 0) and torch.all(z_cvx[1, :, :3] == 0)
    assert torch.all(z_cvx >= 0)
    assert torch.allclose(z_cvx.sum(2), torch.ones(2, 3000))
    # theta ~ Dirichlet(1, 1, 1): each weight has mean 1/3 and variance 1 * 2 / (3^2 * 4) = 1/18
    theta = torch.cat([z_cvx[0, :, :3], z_cvx[1, :, 3:]]).double()  # 6000 draws
    assert torch.allclose(theta.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)
    assert torch.allclose(theta.var(0), torch.full((3,), 1 / 18, dtype=torch.float64), atol=0.005)
    assert draw_combinations([np.array([0])], 3, 5, np.random.default_rng(0)) is None


def test_adversarial_losses_match_log_sigmoid_formulas():
    real = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -2.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, -0.5, 0.2], [-3.0, 0.1, 4.0]], dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected_d = sum(-torch.log(d_real[k]).mean() - torch.log(1 - d_fake[k]).mean()
                     for k in range(2))
    expected_g = sum(torch.log(1 - d_fake[k]).mean() for k in range(2))
    assert torch.isclose(discriminator_loss(real, fake), expected_d, rtol=1e-12)
    per = discriminator_loss(real, fake, reduction="none")
    assert torch.allclose(per, torch.stack([-torch.log(d_real[k]).mean()
                                            - torch.log(1 - d_fake[k]).mean() for k in range(2)]))
    assert torch.isclose(generator_loss(fake), expected_g, rtol=1e-12)
    assert torch.isfinite(generator_loss(torch.tensor([[200.0]])))


def test_discriminators_are_separate_networks():
    disc = Discriminators(3, 5, 4)
    x = torch.randn(2, 6, 5)
    out = disc(x, torch.tensor([2, 0]))
    for row, k in enumerate([2, 0]):
        h = torch.relu(x[row] @ disc.w1[k] + disc.b1[k])
        assert torch.allclose(out[row], (h @ disc.w2[k] + disc.b2[k]).squeeze(-1))
    out.sum().backward()
    assert disc.w1.grad[1].abs().sum() == 0  # discriminator 1 was not used


def test_standardise_uses_the_real_batch_statistics_without_gradient():
    real = torch.randn(2, 50, 7, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(2, 50, 7, dtype=torch.float64, requires_grad=True)
    s_real, s_fake = standardise(real, fake, eps=1e-2)
    for k in range(2):
        mean, sd = real[k].detach().numpy().mean(0), real[k].detach().numpy().std(0, ddof=1)
        assert np.allclose(s_fake[k].detach().numpy(), (fake[k].detach().numpy() - mean)
                           / (sd + 1e-2))
    s_real.sum().backward()  # through the statistics the sum would have a zero gradient
    assert torch.allclose(real.grad, 1 / (real.detach().std(1, keepdim=True) + 1e-2)
                          .expand_as(real))


@pytest.mark.slow
def test_a_discriminator_learns_two_shifted_clouds_of_1500_genes():
    """Eq. (12) at the default rate: real ~ N(1, 0.5^2), fake shifted by 0.1 in every gene.
    Without `standardise` the loss stays at chance (2 log 2 = 1.386) for all 300 steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    disc, which = Discriminators(1, 1500, 64), torch.tensor([0])
    optimizer = torch.optim.Adam(disc.parameters(), lr=Config().lr_adv)

    def loss():
        real = 1.0 + 0.5 * torch.randn(1, 64, 1500, generator=g)
        fake = 1.1 + 0.5 * torch.randn(1, 64, 1500, generator=g)
        real, fake = standardise(real, fake)
        return discriminator_loss(disc(real, which), disc(fake, which))

    for _ in range(300):
        optimise(optimizer, loss())
    with torch.no_grad():
        assert loss() < 0.5 * 2 * np.log(2)


def _tiny_data(prepared, adjacency):
    """The tensors fit hands to self_supervision (training.tensors without a device)."""
    counts = torch.as_tensor(prepared.counts)
    return {"x": torch.as_tensor(prepared.x), "counts": counts,
            "lgamma_x1": torch.lgamma(counts + 1),
            "size_factors": torch.as_tensor(prepared.size_factors)[:, None],
            "a_norm": normalized_adjacency(adjacency),
            "edges": torch.as_tensor(np.vstack(adjacency.nonzero()), dtype=torch.long)}


def _phase2_parts(seed=0):
    """A model, its adversary, one forward pass and reliable members, as fit builds them."""
    prepared, adjacency = tiny_problem()
    config = tiny_config()
    torch.manual_seed(seed)
    model = Model(prepared.x.shape[1], config)
    adversary = Adversary(model, 3, prepared.x.shape[1], config, np.random.default_rng(0))
    out = self_supervision(model, _tiny_data(prepared, adjacency), Batch())
    members = [np.arange(k, 300, 3)[:20] for k in range(3)]
    return model, adversary, config, out, members


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return [not torch.equal(p, q) for p, q in zip(module.parameters(), before)]


def test_log_mean_is_the_log_of_each_genes_mean_normalised_count_by_hand():
    counts = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    s = torch.tensor([[0.5], [1.0], [2.0]])
    # gene 0: (1/0.5 + 3/1 + 5/2) / 3 = 2.5; gene 1: 6/2 / 3 = 1; gene 2: no counts, the floor
    expected = torch.log(torch.tensor([2.5, 1.0, 1e-6]))
    torch.testing.assert_close(log_mean({"counts": counts, "size_factors": s}), expected)


def test_feature_head_starts_at_each_genes_mean_and_caps_the_rate_at_1e6_times_it():
    """The GLM intercept of the mean head: with W_mu = 0 the rate is exp(b) = the gene's mean for
    every cell; the ceiling is 1e6 times that mean (1e6 without log_mean, DCA's)."""
    log_mean = torch.log(torch.tensor([1e-3, 1.0, 3e3, 1e7]))
    z = torch.randn(5, 3)
    for start, ceiling in ((log_mean, 1e6 * log_mean.exp()), (None, torch.full((4,), 1e6))):
        head = FeatureHead(3, (8,), 4, start)
        with torch.no_grad():
            head.mu.weight.zero_()
        if start is not None:
            torch.testing.assert_close(head(z)[1], start.exp().expand(5, 4))
        with torch.no_grad():
            head.mu.bias.fill_(100.0)                        # exp(100) overflows float32
        torch.testing.assert_close(head(z)[1], ceiling.expand(5, 4))


def test_initial_feature_gradient_on_the_codes_does_not_grow_with_depth():
    """The cause of the deep-count failure, measured at the first step: without the intercept
    the mean head starts at rate 1, and at 3e6 counts per cell the gradient of L_X on Z is
    ~1000 times the one at 3000 (it then drives the codes far out of the scale of Eq. 2 and 5).
    Started at the genes' means it is the same at both depths, within a factor 2."""
    norms = []
    for depth in (3000.0, 3e6):
        prepared, adjacency = tiny_problem(depth=depth)
        data, config = _tiny_data(prepared, adjacency), tiny_config()
        torch.manual_seed(0)
        model = Model(prepared.x.shape[1], config, log_mean(data)).eval()
        z = model.encoder(data["x"], data["a_norm"])
        _, l_x = feature_loss(model, data, z, Batch())
        norms.append(torch.autograd.grad(l_x, z)[0].norm().item())
    assert 0.5 < norms[1] / norms[0] < 2


def test_self_supervision_scores_raw_counts_with_mu_equal_to_size_factor_times_rate():
    prepared, adjacency = tiny_problem()
    data, config = _tiny_data(prepared, adjacency), tiny_config()
    torch.manual_seed(0)
    model = Model(prepared.x.shape[1], config).eval()  # no dropout: z depends on x alone
    out = self_supervision(model, data, Batch())
    z, rate, l_x, l_a = out.z, out.rate, out.l_x, out.l_a
    pi, rate_of_z, theta = model.features(z)
    s = torch.as_tensor(prepared.size_factors)[:, None]
    assert s.min() < 0.8 and s.max() > 1.25  # size factors that matter
    assert torch.equal(rate, rate_of_z)
    counts = torch.as_tensor(prepared.counts)
    assert torch.isclose(l_x, zinb_nll(counts, s * rate_of_z, theta, pi), rtol=1e-5)
    assert torch.isclose(l_a, structure_loss(z, data["edges"]), rtol=1e-5)


def test_discriminators_see_reconstructions_of_reliable_cells_of_their_own_cluster():
    """Discriminator k's real samples are the decoded codes of members[k] (reliable cells of
    cluster k), decoded by the feature head as it is (the same head as the fake samples'), and
    of no other cell: changing the codes of any other cells leaves them as they were."""
    model, adversary, _, out, members = _phase2_parts()
    members[1] = members[1][:2]  # fewer than m cells: discriminator 1 gets no samples
    z = out.z

    def samples_with(scaled):
        changed = z.detach().clone()
        changed[scaled] *= 3
        adversary.rng = np.random.default_rng(0)
        with torch.no_grad():
            samples = adversary.inputs(dataclasses.replace(out, z=changed), members)
        assert samples.active.tolist() == [0, 2]
        return samples

    before = samples_with([])
    unreliable = np.setdiff1d(np.arange(len(z)), np.concatenate(members))
    assert torch.equal(samples_with(unreliable).real, before.real)
    for row, k in enumerate([0, 2]):
        after = samples_with(members[k]).real
        assert not torch.equal(after[row], before.real[row])
        assert torch.equal(after[1 - row], before.real[1 - row])
    with torch.no_grad():  # the real samples are the head's decoding of their cells' codes
        real = torch.log1p(model.features(z[torch.as_tensor(before.real_picks)])[1])
    expected = (real - real.mean(1, keepdim=True)) / (real.std(1, keepdim=True) + 1e-2)
    assert torch.allclose(before.real, expected, atol=1e-5)


def test_discriminator_step_changes_only_discriminator_parameters():
    model, adversary, _, out, members = _phase2_parts()
    disc = adversary.disc
    before_model, before_disc = _snapshot(model), _snapshot(disc)
    adversary.optimizer = torch.optim.Adam(disc.parameters(), lr=1e-2)
    with torch.no_grad():
        samples = adversary.inputs(out, members)
    per = adversary.step(samples)
    losses = report.discriminator_fields(per, samples.active, 3)
    assert set(losses) == {"L_d", "L_d_chance", "L_d0", "L_d1", "L_d2", "idle"}
    assert losses["idle"] == "" and losses["L_d"] == pytest.approx(per.sum().item())
    assert report.discriminator_fields(per[:1], torch.tensor([0]), 3)["idle"] == "1 2"
    assert report.discriminator_fields(None, None, 3) == {"idle": "0 1 2"}
    assert losses["L_d_chance"] == pytest.approx(3 * 2 * np.log(2))
    assert not any(_changed(model, before_model))
    assert all(_changed(disc, before_disc))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_generator_step_moves_the_generator_by_l_g_and_never_the_discriminators():
    """L_SS weighted 0: L_g alone must move the encoder and the feature head, and gamma_g = 0
    moves neither (so it is L_g that moves them); no discriminator parameter ever moves."""
    for gamma_g in (1.0, 0.0):
        model, adversary, _, out, members = _phase2_parts()
        disc = adversary.disc
        encoder, features = _snapshot(model.encoder), _snapshot(model.features)
        before_disc = _snapshot(disc)
        opt_g = torch.optim.Adam(model.parameters(), lr=1e-2)
        l_g = adversary.generator_loss(adversary.inputs(out, members))
        optimise(opt_g, 0 * (out.l_x + out.l_a) + gamma_g * l_g)
        assert not any(_changed(disc, before_disc))
        if gamma_g:
            assert all(_changed(model.encoder, encoder)) and any(_changed(model.features, features))
        else:
            assert not any(_changed(model.encoder, encoder) + _changed(model.features, features))


@pytest.mark.slow
def test_gradients_through_repeated_rows_are_bitwise_reproducible():
    # Repeated rows of z (every cell has many edges, a cell sits in many convex combinations)
    # must be summed in a fixed order; advanced indexing's backward varies from call to call.
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2000, 15, generator=g)
    edges = torch.randint(0, 2000, (2, 60000), generator=g)
    members = [np.arange(0, 1000), np.arange(1000, 2000)]

    def gradients():
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        structure_loss(z1, edges).backward()
        _, picks, theta = draw_combinations(members, 3, 3000, np.random.default_rng(0))
        z_cvx = convex_combinations(z2, picks, theta)
        z_cvx.square().sum().backward()
        return torch.cat([z1.grad, z2.grad])

    first = gradients()
    assert all(torch.equal(gradients(), first) for _ in range(5))


# ---------------------------------------------------------------- many cells: the sparse path

def _sparse_and_dense(n=120, g=40, seed=0):
    """One dataset preprocessed on both paths, and its tensors on each (training.tensors)."""
    data = datasets.synthetic(n_cells=n, n_genes=g, n_clusters=3, seed=seed)
    dense = datasets.preprocess(data)
    sparse = datasets.preprocess(data, dense_limit=0)
    graph = datasets.knn_graph(dense.x, k=5, n_pcs=10)
    return (dense, training.tensors(dense, graph, "cpu"),
            sparse, training.tensors(sparse, graph, "cpu"))


@pytest.mark.parametrize("block", [model.TRANSPOSE_BLOCK, 37])
def test_the_first_layer_from_sparse_counts_is_x_w_with_means_and_scales_folded_in(
        block, monkeypatch):
    """X W^T + b = S W^T - 1 (v W^T) + b: the sparse input's first layer equals the dense
    layer on the dense X, and so does the gradient of any loss on it w.r.t. W and b (its
    S^T G summed over blocks of cells: one block, and 37 cells a block with a short last)."""
    monkeypatch.setattr(model, "TRANSPOSE_BLOCK", block)
    _, dense_data, _, sparse_data = _sparse_and_dense()
    assert len(sparse_data["x"].pattern.blocks) == -(-120 // block)
    torch.manual_seed(0)
    layer = torch.nn.Linear(sparse_data["x"].shape[1], 7)
    out = sparse_data["x"].linear(layer)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    grad_w, grad_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    expected = layer(dense_data["x"])
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_w, layer.weight.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grad_b, layer.bias.grad)


def test_sparse_input_dropout_falls_on_the_stored_entries_scaled_by_one_over_keep():
    _, _, _, sparse_data = _sparse_and_dense()
    x = sparse_data["x"]
    layer = torch.nn.Linear(x.shape[1], 3)
    torch.manual_seed(5)
    out = x.linear(layer, dropout=0.4)
    torch.manual_seed(5)
    kept = F.dropout(torch.ones_like(x.values), 0.4)  # the same draws: 0 or 1 / 0.6
    drawn = kept.unique().tolist()
    assert len(drawn) == 2 and drawn[0] == 0 and drawn[1] == pytest.approx(1 / 0.6)
    s = x.pattern.matrix(x.values * kept).to_dense()
    by_hand = s @ layer.weight.T - x.v @ layer.weight.T + layer.bias
    torch.testing.assert_close(out, by_hand, atol=1e-4, rtol=1e-4)


def test_sparse_counts_give_the_dense_rows_the_zinb_term_and_the_intercept():
    dense, dense_data, sparse, sparse_data = _sparse_and_dense()
    cells = torch.tensor([5, 0, 77, 5, 119])  # any order, repeats
    batch = Batch(cells)
    assert torch.equal(batch.rows(sparse_data["counts"]), batch.rows(dense_data["counts"]))
    assert torch.equal(Batch().rows(sparse_data["counts"]), dense_data["counts"])
    torch.testing.assert_close(log_mean(sparse_data), log_mean(dense_data))
    torch.manual_seed(0)
    config = Config(hidden=8, latent=3, decoder=(8,))
    model_ = Model(dense.x.shape[1], config, log_mean(dense_data)).eval()
    z = model_.encoder(dense_data["x"], dense_data["a_norm"])
    z_sparse = model_.encoder(sparse_data["x"], sparse_data["a_norm"])
    torch.testing.assert_close(z_sparse, z, atol=1e-4, rtol=1e-4)
    for data in (dense_data, sparse_data):  # lgamma(x + 1): stored dense, per batch sparse
        assert ("lgamma_x1" in data) == (data is dense_data)
    rate, l_x = feature_loss(model_, dense_data, z, batch)
    rate_s, l_x_s = feature_loss(model_, sparse_data, z, batch)
    torch.testing.assert_close(rate_s, rate)
    torch.testing.assert_close(l_x_s, l_x)


def test_structure_loss_a_block_of_pairs_at_a_time_is_the_whole_sum(monkeypatch):
    """Above PAIR_BLOCK the edges and sampled pairs of Eq. (2) are summed in blocks, with a
    hand-written gradient: the same loss and gradient as the direct sum."""
    z, edges = structure_problem()
    pairs = torch.randint(0, 60, (2, 500), generator=torch.Generator().manual_seed(0))
    whole, whole_grad = loss_and_grad(z, edges, pairs)
    monkeypatch.setattr(model, "PAIR_BLOCK", 37)  # many blocks, a short last one
    blocks, blocks_grad = loss_and_grad(z, edges, pairs)
    assert blocks == pytest.approx(whole, rel=1e-12)
    torch.testing.assert_close(blocks_grad, whole_grad, rtol=1e-10, atol=1e-14)
