"""The predictions CSV's numbers are exactly what ``"%.6f"`` prints, on the fast path and off it."""

from __future__ import annotations

import csv

import numpy as np

from har_edge.sync.predictions import fixed6, write_predictions_csv


def _reference(values: np.ndarray) -> list[str]:
    return [f"{float(v):.6f}" for v in values.ravel()]  # what savetxt and % print too


def test_fixed6_prints_what_percent_formatting_prints_for_float32_in_0_1():
    rng = np.random.default_rng(7)
    k = np.arange(0, 1_000_001, dtype=np.float64)
    cases = [
        rng.random(300_000, dtype=np.float32),
        (np.arange(257) / 256).astype(np.float32),  # every value an int8 output dequantizes to
        (k / 1e6).astype(np.float32),  # near every 6-decimal boundary
        ((k + 0.5) / 1e6).astype(np.float32),  # near every tie
        np.array([0.0, 1.0, 2**-24, 2**-7, 3 * 2**-7, 1 - 2**-24, np.nextafter(np.float32(1), 0)], np.float32),
        rng.random(50_000, dtype=np.float32) ** 8,  # many tiny values
    ]
    for values in cases:
        got = [bytes(row).decode() for row in fixed6(values).reshape(-1, 8)]
        assert got == _reference(values)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_the_csv_is_the_same_on_the_fast_path_and_numpys_own_formatting(tmp_path):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(6), size=5000).astype(np.float32)
    starts = 1_742_802_739_120 + 4000 * np.arange(len(probs), dtype=np.int64)
    labels = ["walk", "run, fast", 'say "hi"', "sit", "stand", "lie"]
    fast = tmp_path / "fast.csv"
    slow = tmp_path / "slow.csv"  # float64: the savetxt path
    assert write_predictions_csv(fast, labels, starts, probs) == len(probs)
    assert write_predictions_csv(slow, labels, starts, probs.astype(np.float64)) == len(probs)
    assert fast.read_bytes() == slow.read_bytes()
    rows = _rows(fast)
    assert rows[0][:4] == ["start_time", "start_ms", "label", "confidence"]
    assert rows[1][0] == "2025-03-24T07:52:19.120Z" and rows[1][1] == str(starts[0])
    assert {r[2] for r in rows[1:]} <= set(labels)
    assert rows[1][3] == f"{float(probs[0].max()):.6f}"


def test_values_outside_0_1_take_numpys_formatting(tmp_path):
    probs = np.array([[1.5, -0.25], [0.5, 0.5]], np.float32)  # not probabilities: printed as they are
    path = tmp_path / "odd.csv"
    write_predictions_csv(path, ["a", "b"], np.array([0, 4000], np.int64), probs)
    rows = _rows(path)
    assert rows[1][3:] == ["1.500000", "1.500000", "-0.250000"]
    assert rows[2][3:] == ["0.500000", "0.500000", "0.500000"]
