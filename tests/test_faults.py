"""Fault injection on a seeded schedule against the real agent, sync daemon and MLflow server (black box).

The short deck runs in the normal test run (>= 40 faults); ``make chaos`` runs the long one
(bench/chaos.py). ``FAULTS_SEED`` and ``FAULTS_PAUSE_S`` (seconds a paused
copy waits before its first byte) change the schedule; the seed is printed with the counts.
"""

from __future__ import annotations

import os
import random

import pytest
from faults_helpers import SHORT_DECK, Chaos, check_invariants, make_corpus
from sync_helpers import restore_mlflow_env  # noqa: F401 - autouse fixture


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_fault_schedule_keeps_every_invariant(mlflow_server, fixture_cache, tmp_path, capsys):
    seed = int(os.environ.get("FAULTS_SEED", "20261201"))
    pause = os.environ.get("FAULTS_PAUSE_S")
    corpus = make_corpus(fixture_cache / "faults", n_good=40, n_bad=3, rng=random.Random(seed))
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    chaos = Chaos(
        data_dir, mlflow_server, corpus, seed=seed, settle_s=0.3, pause_s=float(pause) if pause else None,
        log_dir=tmp_path,
    )  # fmt: skip
    report = chaos.run(SHORT_DECK, drop_every=2)
    problems = check_invariants(chaos, tmp_path / "downloads")
    with capsys.disabled():  # the counts show in every run, passing or not
        print(f"\n[measure] seed {seed}: {report.summary()}")
        for p in problems:
            print("PROBLEM:", p)
    assert sum(report.faults.values()) >= 40
    assert report.faults == SHORT_DECK
    assert report.mid_work["kill9_agent"] >= 1 and report.mid_work["kill9_sync"] >= 1  # the kills hit work
    assert problems == [], "\n".join(problems) + f"\nlogs in {tmp_path}"
    assert report.runs == sum(e.good for e in report.dropped)
