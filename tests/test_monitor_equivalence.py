"""The monitor's fast code gives the figures, verdicts and reasons of its slow definition, on real windows.

tests/monitor_legacy.py is the monitor as it was before its cost was cut (a verbatim copy). Real FIT
exports (the synthetic generator's recordings, their shifts, an export of two recordings)
go through the real pipeline with the bundled model and a reference; every call the pipeline makes on
its accumulator is recorded and replayed on the legacy accumulator; stats, reports (as stored with the
file, timing aside) and the kept windows must be equal, not close. A second test feeds both odd
batches (single windows, ragged sizes, strided and float64 input, empty batches) directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import monitor_legacy as legacy
import numpy as np
import pytest
import shifts

from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.monitor import accumulate
from har_edge.agent.monitor.verdict import judge
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Processor
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.settings import AgentSettings, MonitorSettings
from har_edge.trainer.data import LabelledWindows, synthetic
from har_edge.trainer.reference import attach_reference, build_reference

LABELS = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying")
#: report figures that are timings (they differ run to run)
TIMINGS = ("seconds", "cost_share")


@pytest.fixture(scope="module")
def recordings():
    return synthetic.generate(LABELS, subjects=16, seconds_per_activity=40, seed=5)


@pytest.fixture(scope="module")
def model_dir(recordings, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("equiv-model") / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    model = load_model(dest)
    m = model.manifest
    train = LabelledWindows.concat([r.windows(m.window, m.step) for r in recordings[:10]], m.window)
    held = LabelledWindows.concat([r.windows(m.window, m.step) for r in recordings[6:10]], m.window)
    x_held = apply_scaler(held.windows, m.scaler.mean, m.scaler.scale)
    ref = build_reference(
        x_held,
        model.runner.predict(x_held),
        held.labels.astype(np.int64),
        "labelled",
        input_windows=apply_scaler(train.windows, m.scaler.mean, m.scaler.scale),
        input_range=model.runner.input_range,
        groups=held.subjects,
    )
    attach_reference(dest, ref)
    return dest


@pytest.fixture(scope="module")
def exports(recordings, tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("equiv-fits")
    out: dict[str, list[Path]] = {}
    long = np.concatenate([r.samples for r in recordings[10:14]])  # 16 min: 480 windows, flushed twice
    out["in_long"] = [shifts.write_samples_fit(d / "long.fit", long, start=shifts.start_of(1))]
    base = recordings[14].samples
    for i, (kind, fn) in enumerate(shifts.RECORDING_SHIFTS.items()):
        out[kind] = [shifts.write_samples_fit(d / f"{kind}.fit", fn(base), start=shifts.start_of(3 + i))]
    out["vibrating_mount"] = [shifts.write_samples_fit(d / "vib.fit", shifts.vibrating_mount(300, 2))]
    out["lying_still"] = [shifts.write_samples_fit(d / "still.fit", shifts.lying_still(1300, 2))]
    out["too_short"] = [shifts.write_samples_fit(d / "short.fit", base[: 50 * 90], start=shifts.start_of(9))]
    # one export of two recordings (no flip counted across them)
    a = shifts.write_samples_fit(d / "two-a.fit", recordings[15].samples, start=shifts.start_of(10))
    b = shifts.write_samples_fit(d / "two-b.fit", shifts.gyro_10x(recordings[15].samples), start=shifts.start_of(11))
    out["two_recordings"] = [a, b]
    return out


class _Spy:
    """Records what the pipeline asks of its accumulators (constructor arguments, adds, recording ends)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.stats: list[accumulate.MonitorStats] = []
        cls = accumulate.MonitorAccumulator
        init, add, end, stats = cls.__init__, cls.add, cls.end_recording, cls.stats
        spy = self

        def s_init(acc: Any, reference: Any, **kw: Any) -> None:
            spy.calls.append(("init", reference, kw))
            init(acc, reference, **kw)

        def s_add(acc: Any, scaled: np.ndarray, probs: np.ndarray) -> None:
            spy.calls.append(("add", np.array(scaled), np.array(probs)))
            add(acc, scaled, probs)

        def s_end(acc: Any) -> None:
            spy.calls.append(("end",))
            end(acc)

        def s_stats(acc: Any) -> accumulate.MonitorStats:
            out = stats(acc)
            spy.stats.append(out)
            return out

        monkeypatch.setattr(cls, "__init__", s_init)
        monkeypatch.setattr(cls, "add", s_add)
        monkeypatch.setattr(cls, "end_recording", s_end)
        monkeypatch.setattr(cls, "stats", s_stats)

    def replay(self) -> legacy.MonitorAccumulator:
        acc = None
        for call in self.calls:
            if call[0] == "init":
                acc = legacy.MonitorAccumulator(call[1], **call[2])
            elif call[0] == "add":
                acc.add(call[1], call[2])
            else:
                acc.end_recording()
        assert acc is not None
        return acc


def _without_timings(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "metrics": {k: v for k, v in doc["metrics"].items() if k not in TIMINGS}}


@pytest.mark.parametrize(
    "kind",
    [
        "in_long",
        "axes_swapped",
        "gyro_rad_as_deg",
        "gyro_10x",
        "vibrating_mount",
        "lying_still",
        "too_short",
        "two_recordings",
    ],
)
def test_pipeline_monitor_equals_the_legacy_definition(model_dir, exports, tmp_path, monkeypatch, kind):
    model = load_model(model_dir)
    cfg = MonitorSettings()
    spy = _Spy(monkeypatch)
    with Outbox(tmp_path / "outbox.sqlite") as ob:
        proc = Processor(AgentSettings(), ob, tmp_path / "scratch", monitor=cfg, share_flagged_windows=True)
        outcome = proc.process(exports[kind], model)
        assert outcome.status == "processed", outcome
        row = ob.file(outcome.file_id)
    rep = proc.last_monitor
    assert rep is not None and len(spy.stats) == 1
    assert sum(c[0] == "add" for c in spy.calls) >= 1
    old = spy.replay()
    old_stats = old.stats()
    assert vars(spy.stats[0]) == vars(old_stats)  # every figure, exactly
    labels = list(model.manifest.labels)
    old_rep = legacy.judge(old_stats, model.manifest.reference, cfg, labels)
    assert _without_timings(json.loads(row.monitor_json)) == _without_timings(json.loads(old_rep.to_json()))
    assert row.monitor_status == old_rep.status
    assert rep.metric_points(1)[:-1] != [] and [
        (p.key, p.value) for p in rep.metric_points(1) if p.key.split(".")[1] not in TIMINGS
    ] == [(p.key, p.value) for p in old_rep.metric_points(1) if p.key.split(".")[1] not in TIMINGS]
    # the kept windows (shared for an alert) are the same windows
    new_acc_idx, new_win = _kept(spy)
    old_idx, old_win = old.kept_windows()
    np.testing.assert_array_equal(new_acc_idx, old_idx)
    np.testing.assert_array_equal(new_win, old_win)


def _kept(spy: _Spy) -> tuple[np.ndarray, np.ndarray]:
    """The fast accumulator's kept windows, from a second replay of the recorded calls on it."""
    acc = None
    for call in list(spy.calls):  # a snapshot: the spied methods record this replay's calls too
        if call[0] == "init":
            acc = accumulate.MonitorAccumulator(call[1], **call[2])
        elif call[0] == "add":
            acc.add(call[1], call[2])
        else:
            acc.end_recording()
    assert acc is not None
    assert acc.stats() == spy.stats[0]  # the replay itself reproduces the pipeline's figures
    return acc.kept_windows()


def test_odd_batches_give_the_legacy_figures(model_dir, recordings):
    """Single windows, ragged batches, empty ones, strided and float64 input, recordings ending mid-flush."""
    model = load_model(model_dir)
    m = model.manifest
    ref = m.reference
    windows = LabelledWindows.concat([r.windows(m.window, m.step) for r in recordings[10:16]], m.window).windows
    x = apply_scaler(windows, m.scaler.mean, m.scaler.scale)
    x[::97] *= 9.0  # some saturated windows
    probs = model.runner.predict(x)
    kw = {
        "classes": len(m.labels),
        "channels": [c.name for c in m.channels],
        "low_confidence": AgentSettings().low_confidence,
        "input_range": model.input_range(),
        "keep_windows": 50,
        "seed": 7,
    }
    new, old = accumulate.MonitorAccumulator(ref, **kw), legacy.MonitorAccumulator(ref, **kw)
    rng = np.random.default_rng(0)
    i, k = 0, 0
    sizes = [1, 1, 3, 0, 64, 64, 7, 500, 1, 700, 2, 64, 33]
    while i < len(x):
        n = sizes[k % len(sizes)] if i < 3000 else int(rng.integers(1, 130))
        k += 1
        xs, ps = x[i : i + n], probs[i : i + n]
        if n % 3 == 1:
            xs = np.asfortranarray(xs)  # not C-contiguous
        elif n % 3 == 2:
            xs = xs.astype(np.float64)
        new.add(xs, ps)
        old.add(xs, ps)
        if rng.random() < 0.05:
            new.end_recording()
            old.end_recording()
        i += n
    a, b = new.stats(), old.stats()
    assert vars(a) == vars(b)
    assert a.windows == len(x) and a.channel_psi and a.feature_psi
    ra, rb = judge(a, ref, MonitorSettings(), list(m.labels)), legacy.judge(b, ref, MonitorSettings(), list(m.labels))
    assert ra.to_json() == rb.to_json()
    for p, q in zip(new.kept_windows(), old.kept_windows(), strict=True):
        np.testing.assert_array_equal(p, q)
    # a monitor without a reference: confidence figures only, the same
    n2, o2 = accumulate.MonitorAccumulator(None, **kw), legacy.MonitorAccumulator(None, **kw)
    for j in range(0, 900, 64):
        n2.add(x[j : j + 64], probs[j : j + 64])
        o2.add(x[j : j + 64], probs[j : j + 64])
    assert vars(n2.stats()) == vars(o2.stats())
