"""Both cores: ``agent.threads = auto`` and the decode thread (``agent.decode_ahead``) change nothing but the time.

The same export is processed with the decode thread off and on, and every window start, probability,
metric point, quality figure and crash-loop stage entry must be equal; an error raised while decoding
comes out at the same stage; a caller that stops early leaves no thread behind. The cgroup quota parser
reads v1 and v2 files written in a tmp dir (the real /sys/fs/cgroup of this machine has no quota to test).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fitgen import write_imu_fit

from har_edge.agent import cpus
from har_edge.agent.decode.fit import decode_fit
from har_edge.agent.decode.types import Recording
from har_edge.agent.errors import ConfigError, CorruptFile
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Processor, _decoded_ahead, _StageClock, _window_sets
from har_edge.agent.preprocess import StreamWindower
from har_edge.agent.settings import load_settings

START = datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC)


def _timing(key: str) -> bool:
    """Timing figures differ between any two runs; every other point must not."""
    return key.endswith("_time_s") or "_time_p" in key or key.endswith(("seconds", "cost_share"))


@pytest.fixture(scope="module")
def long_fit(tmp_path_factory) -> Path:
    """40 min at 50 Hz: about 12 chunks of 8,192 samples, so the thread really runs ahead."""
    p = tmp_path_factory.mktemp("ahead") / "long.fit"
    write_imu_fit(p, rate_hz=50, seconds=2400, start=START, gaps=[(600.0, 5.0)])
    return p


def _process(tmp: Path, fit: Path, ahead: int, threads: int | str = 1):
    s = load_settings(env={}, data_dir=tmp, agent={"decode_ahead": ahead, "threads": threads})
    entries: list[tuple[str, int]] = []
    ob = Outbox(tmp / "outbox.sqlite")
    p = Processor(s.agent, ob, tmp / "scratch", on_stage=lambda st, n: entries.append((st, n)), monitor=s.monitor)
    model = load_model(BUNDLED_MODEL_DIR, threads=s.agent.threads, batch=s.agent.batch)
    out = p.process([fit], model)
    assert out.status == "processed", out.error
    names, starts, probs = ob.file_windows(out.file_id)
    # (summary points carry the processing time as their timestamp: values and steps are compared)
    points = [(m.key, m.value, m.step) for m in ob.file_metrics(out.file_id) if not _timing(m.key)]
    row = ob.file(out.file_id)
    ob.close()
    return {
        "windows": out.windows, "names": names, "starts": starts, "probs": probs, "points": points,
        "entries": entries, "monitor": row.monitor_status, "stages": p.last_stages,
    }  # fmt: skip


def test_decode_thread_gives_the_same_outbox_as_decoding_in_turn(tmp_path, long_fit):
    off = _process(tmp_path / "off", long_fit, ahead=0)
    on = _process(tmp_path / "on", long_fit, ahead=2, threads="auto")
    deep = _process(tmp_path / "deep", long_fit, ahead=8)
    assert off["windows"] > 1000 and len(off["points"]) > 200
    for other in (on, deep):
        assert other["windows"] == off["windows"] and other["names"] == off["names"]
        np.testing.assert_array_equal(other["starts"], off["starts"])
        np.testing.assert_array_equal(other["probs"], off["probs"])  # bit for bit, threads=auto included
        assert other["points"] == off["points"]
        assert other["monitor"] == off["monitor"]
        # crash-loop progress: the same stage entries, in the same order, written from the calling thread
        assert other["entries"] == off["entries"]
    decode_entries = sum(1 for st, _ in off["entries"] if st == "decode")
    assert decode_entries > 8  # many chunks: the queue filled and emptied
    assert on["stages"]["cpu_s"]["decode"] > 0 and on["stages"]["cpu_s"]["preprocess"] > 0  # the thread's clock


def _recording_failing_after(fit: Path, good_chunks: int) -> Recording:
    rec = decode_fit(fit)
    inner = rec.chunks

    def chunks():
        for i, chunk in enumerate(inner()):
            if i == good_chunks:
                raise CorruptFile(f"{fit.name}: a damaged record after chunk {i}")
            yield chunk

    rec.chunks = chunks
    return rec


def _windower(rec: Recording) -> StreamWindower:
    return StreamWindower(rate_hz=50.0, window=200, step=100, max_gap_s=1.0, has_gyro=rec.has_gyro,
                          accel_unit=rec.accel_unit, name=rec.name)  # fmt: skip


@pytest.mark.parametrize("ahead", [1, 3])
def test_an_error_while_decoding_comes_out_at_the_same_point(long_fit, ahead):
    def run(use_thread: bool):
        rec = _recording_failing_after(long_fit, 4)
        entries: list[str] = []
        clock = _StageClock(lambda st, _n: entries.append(st))
        sw = _windower(rec)
        got = []
        sets = _decoded_ahead(rec, sw, clock, ahead) if use_thread else _window_sets(rec, sw, clock)
        with pytest.raises(CorruptFile, match="after chunk 4") as err:
            for ws in sets:
                got.append(ws.start_ms.copy())
        return got, entries, clock.current, err.value

    base, base_entries, base_stage, _ = run(False)
    got, entries, stage, exc = run(True)
    assert len(got) == len(base) >= 3
    for a, b in zip(got, base, strict=True):
        np.testing.assert_array_equal(a, b)
    assert entries == base_entries and stage == base_stage == "decode"
    assert exc.__traceback__ is not None


def test_a_caller_that_stops_early_leaves_no_decode_thread(long_fit):
    before = {t.ident for t in threading.enumerate()}
    rec = decode_fit(long_fit)
    clock = _StageClock()
    sets = _decoded_ahead(rec, _windower(rec), clock, 2)
    next(sets)
    sets.close()  # what an exception in inference does to the generator
    left = [t for t in threading.enumerate() if t.ident not in before and t.name == "har-edge-decode"]
    assert left == []
    assert clock.cpu["decode"] > 0  # its seconds were still counted


# -- threads = auto -------------------------------------------------------------------------------------


def test_threads_default_is_auto_and_resolves_to_the_cores_available():
    s = load_settings(env={})
    assert s.agent.threads == "auto" and s.agent.decode_ahead == 2
    cores = cpus.available_cores()
    import os

    assert 1 <= cores <= len(os.sched_getaffinity(0))
    runner = load_model(BUNDLED_MODEL_DIR, threads=s.agent.threads).runner
    assert runner.threads == cores == cpus.resolve_threads("auto")
    assert load_model(BUNDLED_MODEL_DIR, threads=1).runner.threads == 1


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("AUTO", "auto"), ("2", 2), (3, 3), ("64", 64)])
def test_threads_setting_takes_auto_or_a_count(value, expected):
    assert load_settings(env={"HAR_EDGE_AGENT__THREADS": str(value)}).agent.threads == expected


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5", "true"])
def test_threads_setting_refuses_anything_else(value):
    with pytest.raises(ConfigError, match=r"agent\.threads: .*auto or a whole number of threads from 1 to 64"):
        load_settings(env={"HAR_EDGE_AGENT__THREADS": value})


def test_decode_ahead_is_bounded():
    with pytest.raises(ConfigError, match=r"agent\.decode_ahead"):
        load_settings(env={"HAR_EDGE_AGENT__DECODE_AHEAD": "17"})
    assert load_settings(env={"HAR_EDGE_AGENT__DECODE_AHEAD": "0"}).agent.decode_ahead == 0


def _cgroup(tmp: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp / "proc-self-cgroup"
    proc.write_text(lines)
    return root, proc


def test_cgroup_v2_quota_is_read_from_the_process_group_and_its_parents(tmp_path):
    root, proc = _cgroup(
        tmp_path, "0::/pod/app\n", {"pod/app/cpu.max": "max 100000\n", "pod/cpu.max": "150000 100000\n"}
    )
    assert cpus.cgroup_quota(root, proc) == pytest.approx(1.5)
    root, proc = _cgroup(tmp_path / "none", "0::/app\n", {"app/cpu.max": "max 100000\n"})
    assert cpus.cgroup_quota(root, proc) is None


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    root, proc = _cgroup(
        tmp_path, "4:memory:/x\n1:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )  # fmt: skip
    assert cpus.cgroup_quota(root, proc) == pytest.approx(0.5)
    root, proc = _cgroup(
        tmp_path / "u", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert cpus.cgroup_quota(root, proc) is None


def test_available_cores_is_capped_by_the_quota_rounded_up(monkeypatch):
    monkeypatch.setattr(cpus, "_affinity", lambda: 8)
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 1.5)
    assert cpus.available_cores() == 2
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 0.2)
    assert cpus.available_cores() == 1
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    assert cpus.available_cores() == 8
