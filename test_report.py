"""Tests of report.py: the rough time left it prints, and that it decides nothing.

Run: python -m pytest -q (README, "Tests").
"""
import time

import report
from model import Config


def test_the_time_left_is_the_phase_so_far_per_epoch_times_the_epochs_to_go():
    """100 s for epochs 0-10 of 100: ~15 min left in phase 2 (at most: it may stop at ID =
    LID); under half a minute to go says nothing; a phase's first row says nothing either."""
    rows = report.Report(None, 3, Config(), log=lambda line: None)
    rows.began[2] = (time.time() - 100, 0)
    assert rows.time_left({"phase": 2, "epoch": 10, "of": 100}) == ["~15 min left at most"]
    rows.began[1] = (time.time() - 10, 0)
    assert rows.time_left({"phase": 1, "epoch": 20, "of": 100}) == ["~40 s left"]
    assert rows.time_left({"phase": 1, "epoch": 99, "of": 100}) == []
    assert rows.time_left({"phase": 3, "epoch": 0, "of": 100}) == []
