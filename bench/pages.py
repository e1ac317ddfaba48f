"""The pages' plot child: its peak RSS and time for a day-long file, and what matplotlib adds to a venv.

``python -m bench.pages``: draws the timeline of a 24 h file (43,200 windows of 2 s with activity runs
and gaps) and of a 1 h file, plus a 30-day daily plot, each in its own child process, the way sync does
(:func:`har_edge.sync.renderer.render`); then sums the installed files of matplotlib and of the
distributions only it pulls in (those no other edge dependency requires).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from har_edge.sync.renderer import render

LABELS = ["walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying"]


def windows(hours: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start ms, label, confidence) of a day with activity bouts of minutes and a few gaps."""
    rng = np.random.default_rng(seed)
    n = int(hours * 1800)
    label = np.empty(n, np.int16)
    i = 0
    while i < n:
        k = int(rng.integers(15, 600))  # 30 s ... 20 min bouts
        label[i : i + k] = rng.choice(len(LABELS), p=[0.2, 0.05, 0.05, 0.35, 0.15, 0.2])
        i += k
    starts = np.arange(n, dtype=np.int64) * 2000
    for at in rng.integers(0, n, max(1, int(hours // 4))):  # gaps: the watch was off or charging
        starts[at:] += int(rng.integers(10, 60)) * 60_000
    conf = np.clip(rng.normal(0.85, 0.1, n), 0.2, 1.0).astype(np.float32)
    return starts + 1_742_802_739_000, label, conf


def timeline_job(folder: Path, hours: float) -> dict[str, object]:
    starts, label, conf = windows(hours)
    np.savez(
        folder / "t.npz",
        local_ms=starts + 3_600_000,
        label=label,
        confidence=conf,
        labels=np.array(LABELS),
        step_ms=np.int64(2000),
    )
    return {"kind": "timeline", "data": "t.npz", "out": "t.png", "title": f"bench {hours:g} h", "subtitle": ""}


def daily_job(folder: Path, days: int) -> dict[str, object]:
    rng = np.random.default_rng(1)
    rows = [[f"2025-03-{d + 1:02d}", *rng.uniform(10, 200, len(LABELS)).round(1).tolist()] for d in range(days)]
    (folder / "d.json").write_text(json.dumps({"labels": LABELS, "rows": rows}), encoding="utf-8")
    return {"kind": "daily", "data": "d.json", "out": "d.png", "title": f"bench {days} days"}


def _requires(dist: str) -> set[str]:
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return set()
    out = set()
    for r in reqs:
        if "extra ==" in r:
            continue
        m = re.match(r"[A-Za-z0-9._-]+", r)
        if m:
            out.add(_norm(m.group(0)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = [_norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(_requires(n) - seen)
    return seen


def installed_mb(dist: str) -> float:
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return 0.0
    total = 0
    for f in d.files or []:
        p = Path(str(d.locate_file(f)))
        if p.is_file():
            total += p.stat().st_size
    return total / 1e6


def edge_requirements() -> set[str]:
    import tomllib

    py = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    deps = list(py["project"]["dependencies"]) + list(py["project"]["optional-dependencies"]["edge"])
    return {_norm(m.group(0)) for d in deps if (m := re.match(r"[A-Za-z0-9._-]+", d))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    print("| plot | child peak RSS | child wall time |")
    print("|---|---:|---:|")
    for name, make in (
        ("timeline 24 h (43,200 windows)", lambda f: timeline_job(f, 24)),
        ("timeline 1 h (1,800 windows)", lambda f: timeline_job(f, 1)),
        ("daily 30 days", lambda f: daily_job(f, 30)),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            result = render(folder, [make(folder)], folder / "mpl")
            if not result.ok:
                print(f"{name}: failed {result.failed}", file=sys.stderr)
                return 1
            # a second child: the font cache is built now, as on every later pass of sync
            result = render(folder, [make(folder)], folder / "mpl")
            rss = (result.peak_rss_kb or 0) / 1024
            print(f"| {name} | {rss:.0f} MB | {result.seconds:.1f} s |")
    edge = edge_requirements()
    others = closure(edge - {"matplotlib"})
    only_mpl = sorted(closure({"matplotlib"}) - others)
    sizes = {d: installed_mb(d) for d in only_mpl}
    print()
    print("matplotlib and what only it pulls into the edge venv (installed files):")
    for d, mb in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {d:<20} {mb:7.1f} MB")
    print(f"  {'total':<20} {sum(sizes.values()):7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
