"""External commands (git, dvc) with a hard time-out, killed with their whole process group.

A hung HTTP remote keeps ``dvc get`` busy for more than 10 minutes, and
``subprocess.run(timeout=...)`` kills only the direct child, not the helpers it
started: each command runs in its own session and the whole group is killed.
The one environment for every git/dvc call (no prompts, no analytics, DVC's site
cache in a folder of ours, never /var/tmp) is :func:`tool_env`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove user:password@ from every URL in a text (registry URLs may carry a token)."""
    return _USERINFO.sub(r"\1***@", text)


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, n: int = 600) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).replace("\n", " | ")
        return redact(text[-n:])


class CommandTimeout(Exception):
    def __init__(self, args: Sequence[str], timeout_s: float) -> None:
        super().__init__(f"{' '.join(args[:2])} did not finish within {timeout_s:.0f} s")
        self.timeout_s = timeout_s


def tool_env(site_cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every git/dvc call: no prompts, no analytics, DVC's site cache in ``site_cache``."""
    env = dict(os.environ)
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",  # a registry asking for a password fails instead of hanging
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(Path(site_cache).resolve()),
            "DVC_STUDIO_OFFLINE": "1",
        }
    )
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    if extra:
        env.update(extra)
    return env


def dvc_command() -> list[str]:
    """dvc of this interpreter's environment (the venv), whatever PATH says."""
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def run(
    args: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Result:
    """Run a command to completion or kill its process group after ``timeout_s``; never raises on exit status."""
    args = tuple(str(a) for a in args)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CommandTimeout(args, timeout_s) from None
    seconds = time.monotonic() - t0
    log.debug("%s exited %d after %.2f s", " ".join(args[:2]), proc.returncode, seconds)
    return Result(args, proc.returncode, out, err, seconds)
