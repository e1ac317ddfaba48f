"""``python -m har_edge.sync.render JOBDIR``: draw the pages' PNGs with matplotlib (Agg) in a child of sync.

Sync never imports matplotlib itself (it would stay in the daemon's memory): it writes the data of each
plot into JOBDIR with ``jobs.json`` listing them, runs this module as a short-lived child process
(:func:`har_edge.sync.renderer.render`) and uploads what it drew. ``result.json`` lists the PNGs drawn,
the jobs that failed with their error, and the child's peak RSS. A failed plot fails alone.

Jobs: ``{"kind": "timeline", "data": "<npz>", "out": "<png>", "title": ..., "subtitle": ...}`` with
arrays ``local_ms`` (window starts, local wall-clock ms), ``label`` (index into ``labels``),
``confidence``, ``labels``, ``step_ms``; ``{"kind": "daily", "data": "<json>", "out": ..., "title": ...}``
with ``labels`` and ``rows`` (``[day, minutes per label...]``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

#: a colour per activity, by its position in the model's labels (the same in every plot)
PALETTE = [
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
]
DAY_MS = 86_400_000
GAP_STEPS = 1.5


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _segments(local_ms: np.ndarray, label: np.ndarray, step_ms: int) -> list[tuple[int, int, int]]:
    """(label, start ms, end ms) of runs of one label without a gap (a window covers one step)."""
    if not len(local_ms):
        return []
    gap = np.diff(local_ms) > GAP_STEPS * step_ms
    change = np.flatnonzero((np.diff(label) != 0) | gap) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(local_ms)]])
    return [
        (int(label[s]), int(local_ms[s]), int(local_ms[e - 1]) + step_ms)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def _days(ms: np.ndarray | float) -> Any:
    """matplotlib date numbers (days since 1970-01-01) of local wall-clock ms."""
    return np.asarray(ms, dtype=np.float64) / DAY_MS


def draw_timeline(job: dict[str, Any], folder: Path) -> None:
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with np.load(folder / job["data"], allow_pickle=False) as z:
        local_ms, label, conf = z["local_ms"], z["label"], z["confidence"]
        labels = [str(x) for x in z["labels"].tolist()]
        step_ms = int(z["step_ms"])
    n = len(labels)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(14, 2.2 + 0.38 * n + 1.8), sharex=True, gridspec_kw={"height_ratios": [max(n, 2), 2.2]}
    )
    per_label: dict[int, list[tuple[float, float]]] = {}
    for i, t0, t1 in _segments(local_ms, label, step_ms):
        per_label.setdefault(i, []).append((float(_days(t0)), float(_days(t1 - t0))))
    for i, bars in per_label.items():  # one collection per activity: thousands of segments stay cheap
        top.broken_barh(bars, (n - 1 - i - 0.4, 0.8), facecolors=colour(i), linewidth=0)
    top.set_yticks(range(n), labels[::-1])
    top.set_ylim(-0.6, n - 0.4)
    top.grid(axis="x", color="#dddddd", linewidth=0.6)
    top.set_axisbelow(True)
    minutes = np.bincount(label, minlength=n) * step_ms / 60_000 if len(label) else np.zeros(n)
    top.legend(
        handles=[Patch(color=colour(i), label=f"{labels[i]} {minutes[i]:.0f} min") for i in range(n)],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        frameon=False,
        fontsize=9,
    )
    # confidence beneath; a gap breaks the line (NaN after each window that a gap follows)
    x = local_ms.astype(np.float64)
    y = conf.astype(np.float64)
    if len(x) > 1:
        gap_at = np.flatnonzero(np.diff(local_ms) > GAP_STEPS * step_ms) + 1
        x = np.insert(x, gap_at, x[gap_at - 1] + step_ms)
        y = np.insert(y, gap_at, np.nan)
    bottom.plot(_days(x), y, color="#333333", linewidth=0.6)
    bottom.fill_between(_days(x), y, 0, color="#999999", alpha=0.25, linewidth=0)
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("confidence")
    bottom.grid(color="#dddddd", linewidth=0.6)
    span = float(local_ms[-1] - local_ms[0]) if len(local_ms) else 0.0
    fmt = "%H:%M" if span < DAY_MS else "%a %d %H:%M"
    formatter: Any = mdates.DateFormatter  # untyped in matplotlib's stubs
    locator: Any = mdates.AutoDateLocator
    bottom.xaxis.set_major_formatter(formatter(fmt))
    bottom.xaxis.set_major_locator(locator(minticks=6, maxticks=14))
    if len(local_ms):
        pad = max(step_ms, span * 0.005)
        bottom.set_xlim(_days(local_ms[0] - pad), _days(local_ms[-1] + step_ms + pad))
    bottom.set_xlabel(job.get("xlabel", "local time"))
    fig.suptitle(job["title"], fontsize=13, x=0.01, ha="left", fontweight="bold")
    top.set_title(job.get("subtitle", ""), fontsize=9, loc="left", color="#444444")
    fig.tight_layout()
    fig.savefig(folder / job["out"], dpi=int(job.get("dpi", 100)))
    plt.close(fig)


def draw_daily(job: dict[str, Any], folder: Path) -> None:
    import matplotlib.pyplot as plt

    data = json.loads((folder / job["data"]).read_text(encoding="utf-8"))
    labels: list[str] = data["labels"]
    colours: list[int] = data.get("colours") or list(range(len(labels)))
    rows: list[list[Any]] = data["rows"]
    days = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 + 0.45 * len(days)), 5.0))
    bottom = np.zeros(len(days))
    for j, name in enumerate(labels):
        vals = np.array([float(r[1 + j]) for r in rows])
        ax.bar(days, vals, bottom=bottom, color=colour(colours[j]), label=name, width=0.75)
        bottom += vals
    ax.set_ylabel("minutes")
    ax.set_xlabel(job.get("xlabel", "local day"))
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=9)
    if len(days) > 10:
        ax.tick_params(axis="x", labelrotation=60)
    ax.set_title(job["title"], fontsize=13, loc="left", fontweight="bold")
    fig.tight_layout()
    fig.savefig(folder / job["out"], dpi=int(job.get("dpi", 100)))
    plt.close(fig)


DRAW = {"timeline": draw_timeline, "daily": draw_daily}


def peak_rss_kb() -> int:
    """This process's peak resident set in kB: ``VmHWM`` of its own memory map.

    Not ``getrusage``: Linux carries ``ru_maxrss`` over ``exec``, so a child that sync spawned (with vfork)
    would report sync's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m har_edge.sync.render JOBDIR\n")
        return 2
    t0 = time.perf_counter()
    folder = Path(argv[0])
    jobs: list[dict[str, Any]] = json.loads((folder / "jobs.json").read_text(encoding="utf-8"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    # titles carry file names: a name with two "$" in it must print as it is, not be parsed as TeX math
    # (which would also need the math fonts the edge image leaves out)
    matplotlib.rcParams["text.parse_math"] = False
    done: list[str] = []
    failed: dict[str, str] = {}
    for job in jobs:
        try:
            DRAW[job["kind"]](job, folder)
            done.append(job["out"])
        except Exception as exc:  # one bad plot must not cost the others
            failed[str(job.get("out"))] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    result = {
        "done": done,
        "failed": failed,
        "peak_rss_kb": peak_rss_kb(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
