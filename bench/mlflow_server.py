"""A local ``mlflow server`` on 127.0.0.1, for the bench's sync and memory sections and the tests (tests/conftest.py).

It needs 30-50 s before ``/health`` answers on a small machine, so the bench
starts it in the background early and waits for it only when it is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from har_edge.common import telemetry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MlflowServer:
    def __init__(self, root: Path, workers: int = 1) -> None:
        self.root = Path(root)
        self.workers = workers
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s: float | None = None
        self._ready = threading.Event()
        self._error: str | None = None

    def start_background(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        # job execution starts worker processes nobody here uses (tests/conftest.py: 62 s -> 26 s to /health)
        env = dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROXY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        telemetry.opt_out(env)  # a bench run is no CI run to MLflow: it would report usage
        self._ready.clear()  # a restart (tests stop and start the same server) waits again
        self._error = None
        self._t0 = time.perf_counter()
        with open(self.log, "ab") as log:  # the server writes to its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.root
            )
        threading.Thread(target=self._poll, args=(self.proc,), name="mlflow-health", daemon=True).start()

    def _poll(self, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._error = f"mlflow server exited: {self.log.read_text()[-2000:]}"
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.started_s = time.perf_counter() - self._t0
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self._error = f"mlflow server did not answer /health within {timeout:.0f} s"
        self._ready.set()

    def wait(self) -> None:
        """Wait for ``/health``; a server that never answered is stopped, so no orphan outlives the caller."""
        self._ready.wait()
        if self._error:
            self.stop()
            raise RuntimeError(self._error)

    def start(self) -> None:
        """Start and wait until ``/health`` answers (what the tests do)."""
        self.start_background()
        self.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
