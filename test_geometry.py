"""Tests of geometry.py: TwoNN ID and PCA LID on manifolds whose dimension is known.

Run: python -m pytest -q (README, "Tests").
"""

import numpy as np
import pytest

import geometry
from geometry import cluster_geometry, pca_lid, twonn_id


def _swiss_roll(n, rng):
    """A 2-d swiss roll in R^3 (ID 2, LID 3)."""
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, n)
    return np.column_stack([t * np.cos(t), rng.uniform(0, 21, n), t * np.sin(t)])


@pytest.mark.parametrize("d", [2, 5, 8])
def test_twonn_uniform_cube(d):
    # boundary effects bias TwoNN low in a cube (about 8% at d = 8): 20,000 points keep it in 10%
    z = np.random.default_rng(0).uniform(size=(20_000, d))
    assert abs(twonn_id(z) - d) < 0.1 * d


@pytest.mark.parametrize("d", [2, 5, 8])
def test_twonn_sphere_without_boundary(d):
    g = np.random.default_rng(1).normal(size=(5000, d + 1))
    assert abs(twonn_id(g / np.linalg.norm(g, axis=1, keepdims=True)) - d) < 0.06 * d


def test_swiss_roll_in_r15_has_id_2_and_lid_3():
    rng = np.random.default_rng(2)
    z = _swiss_roll(5000, rng) @ rng.normal(size=(3, 15))
    assert abs(twonn_id(z) - 2) < 0.2
    assert pca_lid(z) == 3


def test_twonn_merges_duplicate_points():
    z = np.random.default_rng(3).uniform(size=(3000, 2))
    with_copies = np.concatenate([z, z[:500], z[:100]])
    assert twonn_id(with_copies) == twonn_id(z)
    assert np.isnan(twonn_id(np.ones((50, 4))))
    assert np.isnan(twonn_id(np.repeat(np.eye(2), 10, axis=0)))   # two distinct points


def test_pca_lid_linear_subspace_and_gaussian():
    rng = np.random.default_rng(4)
    plane3 = rng.normal(size=(3000, 3)) @ rng.normal(size=(3, 15))
    assert pca_lid(plane3 + 1e-6 * rng.normal(size=plane3.shape)) == 3
    assert pca_lid(rng.normal(size=(3000, 15))) == 15  # 14 components explain 14/15 < 0.99


def test_pca_lid_is_a_count_and_drops_constant_coordinates():
    # four points on the axes: after standardisation two equal, uncorrelated variances
    z = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert pca_lid(z, variance=0.4) == 1
    assert pca_lid(z, variance=0.6) == 2
    assert pca_lid(np.column_stack([z, np.full(4, 0.1)]), variance=0.6) == 2
    assert pca_lid(np.full((10, 3), 0.1)) == 0


def test_cluster_geometry_measures_a_large_cluster_on_a_random_subset():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6000, 3)) @ rng.normal(size=(3, 8))  # a 3-d Gaussian in R^8
    labels = np.zeros(6000, dtype=int)
    subset = np.sort(np.random.default_rng(0).choice(6000, 1000, replace=False))
    capped = cluster_geometry(z, labels, max_size=1000)
    assert capped == (twonn_id(z[subset]), pca_lid(z[subset]))
    assert capped != cluster_geometry(z, labels, max_size=6000)
    assert cluster_geometry(z, labels, max_size=6000) == (twonn_id(z), pca_lid(z))
    assert abs(capped[0] - 3) < 0.3 and capped[1] == 3


def test_cluster_geometry_averages_the_large_clusters():
    rng = np.random.default_rng(5)
    plane = np.zeros((800, 15))
    plane[:, :2] = rng.uniform(size=(800, 2))
    roll = _swiss_roll(1500, rng) @ rng.normal(size=(3, 15))
    small = rng.normal(size=(15, 15))                              # under min_size: ignored
    z = np.concatenate([plane, roll, small])
    labels = np.repeat([7, 2, 4], [800, 1500, 15])
    mean_id, mean_lid = cluster_geometry(z, labels, min_size=20)
    by_hand = [(twonn_id(c), pca_lid(c)) for c in (plane, roll)]
    assert mean_id == pytest.approx(np.mean([i for i, _ in by_hand]))
    assert mean_lid == pytest.approx(np.mean([lid for _, lid in by_hand]))
    assert mean_lid == pytest.approx(2.5)                          # LIDs 2 and 3
    assert np.isnan(cluster_geometry(z, labels, min_size=2000)).all()


def test_twonn_drops_the_largest_ratios_as_facco_et_al():
    """The fit through the origin of -log(1 - i/N) on log mu_(i) over the smallest 90% of the
    ratios r2/r1 (brute-force distances): with the tail kept the slope is another number."""
    z = np.random.default_rng(4).normal(size=(400, 3))
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(2))
    np.fill_diagonal(d, np.inf)
    r = np.sort(d, axis=1)
    mu = np.sort(r[:, 1] / r[:, 0])

    def slope(keep):
        x, y = np.log(mu[:keep]), -np.log1p(-np.arange(1, keep + 1) / len(mu))
        return x @ y / (x @ x)

    assert twonn_id(z) == pytest.approx(slope(360), rel=1e-10)
    assert abs(slope(360) - slope(399)) > 0.05  # dropping the tail matters


def test_pca_lid_standardises_each_coordinate_before_the_pca():
    """Three independent coordinates, one 100 times wider: standardised, each needs its own
    component (LID 3); on the raw coordinates one component would hold 99.98% of the variance."""
    z = np.random.default_rng(5).normal(size=(2000, 3)) * [100.0, 1.0, 1.0]
    raw = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2
    assert raw[0] / raw.sum() > 0.99
    assert pca_lid(z) == 3


def test_geometry_does_not_import_torch():
    source = open(geometry.__file__).read()
    assert "import torch" not in source and "from torch" not in source


def test_two_gaussians_find_two_humps_and_not_one():
    """EM's two Gaussians: on two humps 6 sds apart (30% and 70%) D about 6, the upper hump's
    values in the upper component; on one Gaussian, or one skewed hump, D below 2."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 300), rng.normal(6, 1, 700)])
    upper, separation, smaller = geometry.two_gaussians(values)
    assert separation == pytest.approx(6, rel=0.1) and smaller == pytest.approx(0.3, abs=0.03)
    assert upper[300:].mean() > 0.99 and upper[:300].mean() < 0.01
    for one in (rng.normal(0, 1, 1000), rng.gamma(2.0, 1.0, 1000)):
        assert geometry.two_gaussians(one)[1] < 2


def test_humps_on_first_axis_see_two_clouds_along_their_widest_direction_and_not_one():
    """Two round clouds 8 sds apart along a diagonal of 5 dimensions: D about 8 and each
    cloud on its own side; one elongated cloud (sd 3 along an axis, 1 across): D below 2."""
    rng = np.random.default_rng(4)
    direction = np.ones(5) / np.sqrt(5)
    points = np.vstack([rng.normal(0, 1, (400, 5)), rng.normal(0, 1, (600, 5)) + 8 * direction])
    upper, separation, smaller = geometry.humps_on_first_axis(points)
    assert separation == pytest.approx(8, rel=0.1) and smaller == pytest.approx(0.4, abs=0.03)
    assert len({upper[:400].mean().round(), upper[400:].mean().round()}) == 2
    assert min(upper[:400].mean(), 1 - upper[:400].mean()) < 0.01
    one = rng.normal(0, 1, (1000, 5)) * np.array([3, 1, 1, 1, 1])
    assert geometry.humps_on_first_axis(one)[1] < 2
