"""What every section needs: fixtures, clocks, medians, the RSS sampler, the result rows, the machine."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
#: long FIT fixtures are shared with the tests (tests/fitgen.py writes them once)
FIXTURES = ROOT / ".cache" / "tests"
#: the bench's own scratch (data folders, windows handed to workers); emptied per run
SCRATCH = ROOT / ".cache" / "bench"

_T = TypeVar("_T")


@contextmanager
def restored_environ(names: Iterable[str]) -> Iterator[None]:
    """These environment variables as they were (set or unset) again when the block ends."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- fixtures ----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def fitgen() -> ModuleType:
    """tests/fitgen.py (the FIT fixture writer the tests use), loaded by path."""
    path = ROOT / "tests" / "fitgen.py"
    spec = importlib.util.spec_from_file_location("har_edge_fitgen", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a module: is the tests folder there?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def imu_fixture(hours: float, seed: int = 0) -> Path:
    """A 50 Hz accel + gyro FIT recording of ``hours`` (written once, ~30 s for 24 h, then cached)."""
    path: Path = fitgen().cached_fit(FIXTURES, hours=hours, seed=seed)
    return path


# -- clocks and statistics -----------------------------------------------------------------------------


@dataclass
class Sample:
    wall: float
    cpu: float  # process CPU seconds (all threads)


def timed(fn: Callable[[], _T]) -> tuple[_T, Sample]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, Sample(time.perf_counter() - w, time.process_time() - c)


def median(xs: Iterable[float | None]) -> float:
    present = [x for x in xs if x is not None]
    return statistics.median(present) if present else float("nan")


def spread(xs: Iterable[float | None]) -> str:
    """``min-max`` (an en dash between) of a list, for the notes."""
    present = [x for x in xs if x is not None]
    if not present:
        return ""
    return f"{min(present):.3g}\N{EN DASH}{max(present):.3g}"


# -- the table -----------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target or not measurable
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # every number measured, for results.json
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        section: str,
        figure: str,
        value: str,
        baseline: str = "",
        ratio: str = "",
        target: str = "",
        ok: bool | None = None,
        note: str = "",
    ) -> Row:
        row = Row(section, figure, value, baseline, ratio, target, ok, note)
        self.rows.append(row)
        return row

    def table(self) -> str:
        """The figures as a Markdown table; notes are numbered below it."""
        head = ("section", "figure", "value", "baseline (same run)", "ratio", "target", "met")
        body: list[tuple[str, ...]] = []
        notes: list[str] = []
        for r in self.rows:
            figure = r.figure
            if r.note:
                notes.append(r.note)
                figure += f" [{len(notes)}]"
            body.append(
                (r.section, figure, r.value, r.baseline, r.ratio, r.target, {True: "yes", False: "NO", None: ""}[r.ok])
            )
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(b) for b in body]
        if notes:
            out += [""] + [f"- [{i}] {n}" for i, n in enumerate(notes, 1)]
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps(
            {"rows": [asdict(r) for r in self.rows], "raw": self.raw, "notes": self.notes}, indent=2, default=str
        )


def fmt(x: float, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits and thousands separators."""
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:,.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}g}"


# -- memory of another process ----------------------------------------------------------------------


def proc_rss(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile of a process in bytes, from /proc (cheap enough to poll every few ms)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out or None


class RssSampler:
    """Polls a process's RSS from a thread; ``mark(name)`` notes when something happened."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int, int]] = []  # (time, rss, anon)
        self.marks: dict[str, float] = {}
        self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = proc_rss(self.pid)
            if m is None:
                return
            self.hwm = max(self.hwm, m.get("VmHWM", 0))
            self.samples.append((time.perf_counter(), m["VmRSS"], m.get("RssAnon", 0)))
            self._stop.wait(self.interval_s)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss, _ in self.samples if start <= t <= end]


MB = 1024 * 1024


# -- processes -------------------------------------------------------------------------------------


def python_worker(
    module: str, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` (a worker printing one JSON object last) and return that object."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env or dict(os.environ),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- the machine -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    import numpy

    try:
        from ai_edge_litert import __version__ as litert
    except Exception:
        litert = "?"
    return {
        "cpu": cpu,
        "isa": ",".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory": mem,
        "load_avg_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "numpy": numpy.__version__,
        "ai_edge_litert": litert,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
    }
