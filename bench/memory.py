"""Section 4: memory of the real processes: ``har-edge agent run`` on the 24 h export, and ``har-edge sync once``.

The daemon runs as a subprocess with its default settings (settle 2 s); its
RSS is read from /proc every 20 ms. It gets the 1 h export first, then the
24 h one: steady RSS is the median while a file is processed (from the claim,
when the file leaves the inbox, to the archive), peak the largest sample (and
the kernel's high-water mark). Comparing the two files shows whether memory
grows with a file's length. ``sync once`` then delivers that outbox (both
files: ~10k points and two per-window CSVs) to the local MLflow server.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import MB, ROOT, SCRATCH, Report, RssSampler, imu_fixture, median
from bench.mlflow_server import MlflowServer, free_port

log = logging.getLogger(__name__)

TARGET_MB = 80.0
IDLE_TARGET_MB = 70.0
SYNC_TARGET_MB = 120.0
ROOT_DIR = "memory"
#: what is byte-compiled before the measured processes start (relative to the repository root)
COMPILED = ("har_edge",)


def _har_edge() -> str:
    return str(Path(sys.executable).with_name("har-edge"))


def _wait_for(
    cond: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def _env(**extra: str) -> dict[str, str]:
    """The environment of the measured processes, with har-edge's bytecode compiled (``__pycache__``, git-ignored)
    as an installed package or the edge image has it: compiling the modules at every start would count."""
    drop = ("HAR_EDGE_", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _compile() -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", *COMPILED], cwd=ROOT, env=_env(), check=True)


def _process_file(root: Path, sampler: RssSampler, src: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    inbox = root / "inbox"
    dest = inbox / src.name
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    t_drop = time.perf_counter()
    _wait_for(lambda: not dest.exists(), 60, f"claiming {src.name}", proc)
    t_claim = time.perf_counter()
    _wait_for(lambda: any((root / "archive").rglob(src.name)), 600, f"processing {src.name}", proc)
    t_done = time.perf_counter()
    during = sampler.between(t_claim, t_done)
    return {
        "file": src.name, "drop_to_archive_s": t_done - t_drop, "claim_to_archive_s": t_done - t_claim,
        "steady_mb": median(during) / MB, "peak_mb": max(during) / MB, "samples": len(during),
    }  # fmt: skip


def run_agent(report: Report, *, model_dir: Path | None) -> None:
    S = "4 memory"
    root = SCRATCH / ROOT_DIR
    day, hour = imu_fixture(24), imu_fixture(1)
    m = measure_daemon(root, [hour, day], model_dir)
    idle, after, hwm, runs = m["idle_mb"], m["after_mb"], m["hwm_mb"], m["runs"]
    h, d = runs
    report.add(S, "agent daemon, idle (models loaded, watching)", f"{idle:.0f} MB RSS",
               target=f"<= {IDLE_TARGET_MB:.0f} MB", ok=idle <= IDLE_TARGET_MB,
               note="Python 11 + numpy 15 + pydantic and the settings 19 + SQLAlchemy 15 (with the asyncio, "
                    "email and ssl it imports) + LiteRT and the model 17 + watchdog, HTTP, Prometheus 3 MB "
                    "(imports measured one by one), before any file")  # fmt: skip
    report.add(S, "agent daemon, steady while processing the 24 h export", f"{d['steady_mb']:.0f} MB RSS",
               target=f"<= {TARGET_MB:.0f} MB", ok=d["steady_mb"] <= TARGET_MB,
               note=f"median of {d['samples']} samples over {d['claim_to_archive_s']:.1f} s (claim -> archive); "
                    f"idle + {d['steady_mb'] - idle:.0f} MB")  # fmt: skip
    report.add(S, "agent daemon, peak (24 h export)", f"{d['peak_mb']:.0f} MB RSS",
               note=f"VmHWM {hwm:.0f} MB; after the file {after:.0f} MB; "
                    f"drop -> archive {d['drop_to_archive_s']:.1f} s with the default settle of 2 s")  # fmt: skip
    report.add(S, "memory vs file length: 1 h vs 24 h export",
               f"{h['steady_mb']:.0f} vs {d['steady_mb']:.0f} MB steady",
               ratio=f"+{d['steady_mb'] - h['steady_mb']:.1f} MB for 24x the data",
               note=f"peak {h['peak_mb']:.0f} vs {d['peak_mb']:.0f} MB")  # fmt: skip
    report.raw["memory_agent"] = m


def measure_daemon(root: Path, files: list[Path], model_dir: Path | None) -> dict[str, Any]:
    """``har-edge agent run`` (default settings) on ``files`` in turn: idle, per-file steady and peak RSS (MB)."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "inbox").mkdir(parents=True)
    extra = {"HAR_EDGE_AGENT__MODEL_DIR": str(model_dir)} if model_dir else {}
    extra["HAR_EDGE_HTTP__ADDRESS"] = f"127.0.0.1:{free_port()}"  # the endpoints on, on a port of its own
    _compile()
    with open(root / "agent.log", "wb") as logf:  # the daemon writes to its own copy of the descriptor
        proc = subprocess.Popen([_har_edge(), "--data-dir", str(root), "agent", "run"], env=_env(**extra),
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        with RssSampler(proc.pid) as sampler:
            _wait_for(lambda: b"watching" in (root / "agent.log").read_bytes(), 120, "agent start", proc)
            time.sleep(2.0)
            t = time.perf_counter()
            idle = median(sampler.between(t - 1.5, t)) / MB
            runs = [_process_file(root, sampler, f, proc) for f in files]
            time.sleep(2.0)
            t = time.perf_counter()
            after = median(sampler.between(t - 1.5, t)) / MB
            hwm = sampler.hwm / MB
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"idle_mb": idle, "after_mb": after, "hwm_mb": hwm, "runs": runs}


def run_sync_once(report: Report, server: MlflowServer) -> None:
    S = "4 memory"
    root = SCRATCH / ROOT_DIR
    if not (root / "outbox.sqlite").exists():
        report.notes.append("memory: sync once skipped (the agent part did not run)")
        return
    env = _env(HAR_EDGE_SYNC__TRACKING_URI=server.url, HAR_EDGE_SYNC__EXPERIMENT="bench-memory",
               HAR_EDGE_SYNC__REQUEST_TIMEOUT_S="60")  # fmt: skip
    t0 = time.perf_counter()
    with open(root / "sync.log", "wb") as logf:
        proc = subprocess.Popen([_har_edge(), "--data-dir", str(root), "sync", "once"], env=env,
                                stdout=logf, stderr=subprocess.STDOUT)  # fmt: skip
        with RssSampler(proc.pid) as sampler:
            code = proc.wait(timeout=900)
    wall = time.perf_counter() - t0
    rss = [r for _, r, _ in sampler.samples]
    out = [line for line in (root / "sync.log").read_text(errors="replace").splitlines() if line.startswith("pushed")]
    report.add(S, "sync once (the memory section's outbox: 2 files)", f"{max(rss) / MB:.0f} MB peak RSS",
               target=f"<= {SYNC_TARGET_MB:.0f} MB", ok=max(rss) / MB <= SYNC_TARGET_MB,
               note="mlflow imported without pandas/pyarrow/scipy (176 -> 106 MB) and without requests' "
                    "charset detector and OpenTelemetry's psutil (-3.6 MB), predictions CSV streamed; "
                    + f"VmHWM {sampler.hwm / MB:.0f} MB; median {median(rss) / MB:.0f} MB over {wall:.1f} s; "
                    f"exit {code}; "
                    f"{out[0][:120] if out else ''}")  # fmt: skip
    report.raw["memory_sync_once"] = {"peak_mb": max(rss) / MB, "median_mb": median(rss) / MB,
                                      "hwm_mb": sampler.hwm / MB, "wall_s": wall, "exit": code,
                                      "output": out[-5:]}  # fmt: skip
