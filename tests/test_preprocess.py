"""Preprocessing: units, fusion, resampling, gaps and windows, streamed or whole."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from har_edge.agent.decode.types import Chunk, Recording, SensorBlock
from har_edge.agent.errors import InputError
from har_edge.agent.preprocess import (
    ACCEL_MS2_PER_G,
    StreamWindower,
    accel_to_ms2,
    apply_scaler,
    detect_accel_unit,
    recording_windows,
    sliding_windows,
)

T0 = 1_700_000_000_000


def _signal(n: int, rate: float, unit_g: float = 1000.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = T0 + np.round(np.arange(n) * 1000.0 / rate).astype(np.int64)
    s = np.arange(n) / rate
    acc = np.stack([0.3 * np.sin(2 * np.pi * 2 * s), 0.1 * np.cos(2 * np.pi * 2 * s), np.ones(n)], 1) * unit_g
    acc += rng.normal(0, 0.01 * unit_g, acc.shape)
    gyr = np.stack([30 * np.sin(2 * np.pi * 2 * s), np.zeros(n), 5 * np.cos(2 * np.pi * s)], 1)
    return t, acc.astype(np.float32), gyr.astype(np.float32)


def _recording(t, acc, gyr, chunk=None, gyro_shift_ms=0):
    n = len(t)
    step = chunk or n

    def chunks():
        for i in range(0, n, step):
            g = None if gyr is None else SensorBlock(t[i : i + step] + gyro_shift_ms, gyr[i : i + step])
            yield Chunk(SensorBlock(t[i : i + step], acc[i : i + step]), g)

    return Recording("test", "test", chunks, has_gyro=gyr is not None)


@pytest.mark.parametrize("unit, g", [("mg", 1000.0), ("g", 1.0), ("m/s^2", ACCEL_MS2_PER_G)])
def test_units_are_detected_from_gravity(unit, g):
    _, acc, _ = _signal(500, 50, unit_g=g)
    assert detect_accel_unit(acc) == unit
    np.testing.assert_allclose(np.median(np.linalg.norm(accel_to_ms2(acc, unit), axis=1)), 9.8, rtol=0.08)


def test_an_impossible_magnitude_is_refused():
    with pytest.raises(InputError, match="known unit"):
        detect_accel_unit(np.full((100, 3), 100.0, np.float32))


def test_sliding_windows_shape_and_content():
    x = np.arange(1000 * 6, dtype=np.float32).reshape(1000, 6)
    w = sliding_windows(x, 200, 100)
    assert w.shape == (9, 200, 6)
    np.testing.assert_array_equal(w[3], x[300:500])
    assert sliding_windows(x[:150], 200, 100).shape == (0, 200, 6)


def test_scaler_standardises_per_channel():
    x = np.ones((2, 200, 6), np.float32) * np.arange(6)
    y = apply_scaler(x, mean=np.arange(6), scale=[2.0] * 6)
    assert y.dtype == np.float32 and np.all(y == 0)


@pytest.mark.parametrize("rate", [25.0, 50.0, 100.0])
def test_resampling_to_50hz_keeps_the_signal(rate):
    t, acc, gyr = _signal(int(rate * 60), rate)
    ws = recording_windows(_recording(t, acc, gyr), rate_hz=50, window=200, step=100)
    grid = (t[-1] - t[0]) // 20 + 1  # 50 Hz points inside the recording
    expected = (grid - 200) // 100 + 1
    assert expected == (28 if rate == 25 else 29)
    assert ws.windows.shape == (expected, 200, 6)
    np.testing.assert_array_equal(np.diff(ws.start_ms), 2000)
    # resampled samples follow the analytic signal (linear interpolation error is small)
    s = (ws.start_ms[5] - T0) / 1000.0 + np.arange(200) / 50.0
    expected_z = np.ones(200) * ACCEL_MS2_PER_G
    np.testing.assert_allclose(ws.windows[5, :, 2], expected_z, atol=0.5)
    expected_gx = 30 * np.sin(2 * np.pi * 2 * s)
    tol = 2.0 if rate >= 50 else 8.0  # 25 Hz sampling of a 2 Hz sine: linear interpolation loses a little
    np.testing.assert_allclose(ws.windows[5, :, 3], expected_gx, atol=tol)
    assert ws.quality["native_rate_hz"] == pytest.approx(rate, rel=0.02)


def test_a_gap_splits_the_recording_and_no_window_spans_it():
    t, acc, gyr = _signal(50 * 60, 50)
    t = np.where(np.arange(len(t)) >= 1500, t + 10_000, t)  # 10 s gap after 30 s
    ws = recording_windows(_recording(t, acc, gyr), rate_hz=50, window=200, step=100, max_gap_s=1.0)
    gap_start, gap_end = t[1499], t[1500]
    ends = ws.start_ms + 199 * 20
    assert not np.any((ws.start_ms < gap_end) & (ends > gap_start))
    assert ws.quality["gaps"] == 1 and ws.quality["segments"] == 2
    assert ws.quality["gap_s"] == pytest.approx(10.02, abs=0.05)
    assert len(ws) == 28  # 14 windows in each 30 s segment


def test_without_gyroscope_the_gyro_channels_are_zero():
    t, acc, _ = _signal(50 * 20, 50)
    ws = recording_windows(_recording(t, acc, None), rate_hz=50, window=200, step=100)
    assert len(ws) == 9 and ws.quality["gyro_present"] == 0.0
    assert np.all(ws.windows[..., 3:] == 0)


def test_saturation_is_counted():
    t, acc, gyr = _signal(50 * 10, 50)
    acc[:50, 0] = 8000.0  # 8 g on a +-8 g sensor
    ws = recording_windows(_recording(t, acc, gyr), rate_hz=50, window=200, step=100)
    assert ws.quality["saturated_share"] == pytest.approx(50 / 500)


def test_out_of_order_and_repeated_samples_are_sorted():
    t, acc, gyr = _signal(50 * 10, 50)
    order = np.arange(len(t))
    order[100], order[101] = 101, 100
    order = np.insert(order, 200, 200)  # one sample twice
    whole = recording_windows(_recording(t, acc, gyr), rate_hz=50, window=200, step=100)
    shuffled = recording_windows(_recording(t[order], acc[order], gyr[order]), rate_hz=50, window=200, step=100)
    np.testing.assert_array_equal(whole.windows, shuffled.windows)
    assert shuffled.quality["out_of_order"] == 2  # one swap in each sensor's stream


@settings(max_examples=30, deadline=None)
@given(
    chunk=st.integers(min_value=1, max_value=4000),
    rate=st.sampled_from([25.0, 50.0, 100.0]),
    shift=st.integers(min_value=-15, max_value=15),
    gap_at=st.integers(min_value=0, max_value=3999),
    gap_ms=st.sampled_from([0, 500, 3000]),
)
def test_streaming_equals_whole(chunk, rate, shift, gap_at, gap_ms):
    """Any chunking of the stream gives exactly the windows of the whole recording."""
    n = 4000
    t, acc, gyr = _signal(n, rate, seed=chunk)
    t = np.where(np.arange(n) >= gap_at, t + gap_ms, t)
    whole = recording_windows(_recording(t, acc, gyr, gyro_shift_ms=shift), rate_hz=50, window=200, step=100)
    parts = recording_windows(
        _recording(t, acc, gyr, chunk=chunk, gyro_shift_ms=shift), rate_hz=50, window=200, step=100
    )
    np.testing.assert_array_equal(whole.start_ms, parts.start_ms)
    np.testing.assert_array_equal(whole.windows, parts.windows)


def test_stream_holds_back_only_a_bounded_tail():
    t, acc, gyr = _signal(50 * 600, 50)
    sw = StreamWindower(rate_hz=50, window=200, step=100, has_gyro=True)
    for i in range(0, len(t), 1000):
        sw.feed(Chunk(SensorBlock(t[i : i + 1000], acc[i : i + 1000]), SensorBlock(t[i : i + 1000], gyr[i : i + 1000])))
        assert len(sw._acc.t) <= 2 and len(sw._run) < 200
