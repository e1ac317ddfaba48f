"""Running the plot child (:mod:`har_edge.sync.render`): one short-lived process per push pass that has plots.

matplotlib costs tens of MB once imported; in a child it is gone when the child exits, and a crash or a
hang of it (killed after :data:`TIMEOUT_S`) costs the plots only: :func:`render` never raises for them,
it reports what was drawn. ``MPLCONFIGDIR`` is a folder under the data dir, so matplotlib's font cache
is built once, not on every run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT_S = 180.0
MODULE = "har_edge.sync.render"


@dataclass
class RenderResult:
    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    #: the child's peak resident set (kB, from its own getrusage); None when it did not report
    peak_rss_kb: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def render(
    folder: Path, jobs: list[dict[str, Any]], mpl_config_dir: Path, timeout_s: float = TIMEOUT_S
) -> RenderResult:
    """Draw ``jobs`` (data files already in ``folder``) in a child process; failures are in the result."""
    folder = Path(folder)
    (folder / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    mpl_config_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(mpl_config_dir)}
    t0 = time.perf_counter()
    every = {str(j["out"]) for j in jobs}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", MODULE, str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return RenderResult(failed=dict.fromkeys(every, f"the plot process took over {timeout_s:.0f} s"))
    except OSError as exc:
        return RenderResult(failed=dict.fromkeys(every, f"the plot process did not start: {exc}"))
    seconds = time.perf_counter() - t0
    try:
        got = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        why = f"the plot process exited {proc.returncode}: {' / '.join(tail) or 'no output'}"
        return RenderResult(failed=dict.fromkeys(every, why), seconds=seconds)
    done = {d for d in got.get("done", []) if (folder / d).is_file()}
    failed = {str(k): str(v) for k, v in got.get("failed", {}).items()}
    failed.update({o: "not drawn" for o in every - done - set(failed)})
    return RenderResult(done, failed, got.get("peak_rss_kb"), seconds)
