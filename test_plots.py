"""Tests of plots.py: the colours of clusters and the PNGs of --plot (skip without matplotlib).

Run: python -m pytest -q (README, "Tests").
"""

import numpy as np
import pytest

from testkit import plot_run


def test_cluster_colours_give_each_cluster_the_colour_of_its_matched_type():
    import plots
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([2, 2, 0, 0, 1, 1, 3])  # 2 -> type 0, 0 -> 1, 1 -> 2; 3 is left over
    assert plots.cluster_colours(clusters, labels, 3) == {2: 0, 0: 1, 1: 2, 3: 3}
    assert plots.cluster_colours(clusters) == {0: 0, 1: 1, 2: 2, 3: 3}


@pytest.mark.slow
def test_plot_draws_its_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out = plot_run(tmp_path)
    assert code == 0
    pictures = ["convexity.png", "embedding.png", "fig2.png", "losses.png"]
    assert sorted(p.name for p in out.glob("*.png")) == pictures
    for name in pictures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "fig2.png embedding.png losses.png convexity.png")
