"""``make run``, as a person starts and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_to_make_run_stops_both_daemons(tmp_path):
    """kill -TERM of make's own process (not its group) stops the agent and the sync daemon within 10 s."""
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "HAR_EDGE_DATA_DIR": str(tmp_path / "data"),
        "MLFLOW_TRACKING_URI": "",
    }
    # -o: the venv is already there (CI built it); don't let make reinstall it
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), f"BIN={venv_bin}", "-o", f"{venv_bin}/.edge", "run"]
    log = open(tmp_path / "make.log", "wb")  # noqa: SIM115 - the child's output, closed in finally
    make = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        daemons: list[psutil.Process] = []
        while time.monotonic() < deadline:
            kids = psutil.Process(make.pid).children(recursive=True)
            daemons = [p for p in kids if any("har-edge" in part for part in _cmdline(p))]
            if len(daemons) >= 2 and (tmp_path / "data" / "inbox").is_dir():
                break
            assert make.poll() is None, (tmp_path / "make.log").read_text()
            time.sleep(0.5)
        assert len(daemons) >= 2, f"agent and sync did not both start: {(tmp_path / 'make.log').read_text()}"
        time.sleep(2)  # past start-up: both are in their loops
        t0 = time.monotonic()
        os.kill(make.pid, signal.SIGTERM)
        _gone, alive = psutil.wait_procs(daemons, timeout=10)
        took = time.monotonic() - t0
        assert not alive, f"still running {took:.1f} s after SIGTERM: {[_cmdline(p) for p in alive]}"
        make.wait(timeout=10)
    finally:
        for p in psutil.Process(make.pid).children(recursive=True) if make.poll() is None else []:
            p.kill()
        if make.poll() is None:
            make.kill()
        log.close()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
