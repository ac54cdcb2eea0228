"""Tests of settings.py: every Config field states its range, and refuses values outside it.

Run: python -m pytest -q (README, "Tests").
"""
import dataclasses
import re

import settings
from model import Config
from testkit import refused

BAD_SETTINGS = [  # one value outside the stated range of each Config field that has one
    ("n_top_genes", "0"), ("n_neighbors", "0"), ("n_pcs", "0"), ("hidden", "0"), ("latent", "0"),
    ("decoder", "0"), ("disc_hidden", "0"), ("dropout", "1"), ("w_x", "-1"), ("w_a", "nan"),
    ("pretrain_epochs", "0"), ("lr_pretrain", "0"), ("lr_cluster", "-1e-3"), ("lr_adv", "inf"),
    ("gamma_c", "-0.5"), ("gamma_o", "nan"), ("gamma_g", "-1"), ("n_over", "1"), ("init", "random"),
    ("resolution", "0"), ("beta_c", "1.5"), ("beta_o", "-0.1"), ("reliable_frac", "0"),
    ("update_every", "0"), ("m_cvx", "1"), ("n_cvx", "0"), ("min_epochs", "-1"),
    ("max_epochs", "0"), ("eval_every", "0"), ("block", "0"), ("losses", "all"),
    ("batch_size", "0"), ("seed", "-1"), ("device", "gpu"), ("reliable_rule", "local"),
    ("adversary", "pixels"), ("start_targets", "-1"), ("schedule", "dcgan"),
]


def test_every_setting_states_its_range_in_its_help():
    helps = settings.helps(Config)
    ranged = {f.name for f in dataclasses.fields(Config) if not isinstance(f.default, bool)}
    assert {name for name, _ in BAD_SETTINGS} == ranged
    for name in ranged:
        assert re.search(r"[<>]=? \d|in [\[(]\d|\"\w+\"", helps[name]), (name, helps[name])


def test_settings_outside_their_range_are_refused_before_any_work(capsys, tmp_path):
    for name, value in BAD_SETTINGS:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} must be " in refused(capsys, tmp_path, "--demo", f"{flag}={value}"), name


def test_settings_at_the_ends_of_their_ranges_are_accepted():
    settings.check(Config(beta_c=0.0, beta_o=0.999, reliable_frac=1.0, dropout=0.0,
                                     w_x=0.0, w_a=0.0, gamma_c=0.0, gamma_o=0.0, gamma_g=0.0,
                                     n_over=2, m_cvx=2, min_epochs=0, seed=2**32 - 1))
