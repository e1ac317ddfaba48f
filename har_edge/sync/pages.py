"""What a person reads in MLflow about a file and a day: activity summaries, tables, descriptions (pure).

A file's :class:`FileSummary` is computed once from its windows (then kept in ``files.summary_json``, so
it outlives the reclaimed windows): per activity the minutes (windows x step), the share of windows and
the mean confidence; minutes per activity per *local* day (days end at the wearer's midnight, not at
UTC's); the recording's span. Daily summaries add file summaries up by a grouping ``key`` (``device``
today). Tables follow MLflow's table artifact format (what ``MlflowClient.log_table`` writes: pandas'
``orient="split"`` JSON without index, and the run tag ``mlflow.loggedArtifacts`` naming it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from har_edge.sync.localtime import LocalTime, format_offset

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

SUMMARY_VERSION = 1
TIMELINE_ARTIFACT = "timeline.png"
TABLE_ARTIFACT = "activity_summary.json"
DAILY_PLOT_ARTIFACT = "daily_activity.png"
DAILY_TABLE_ARTIFACT = "daily_minutes.json"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"
#: a pause between window starts longer than this many steps is a gap in the recording
GAP_STEPS = 1.5
MAX_DESCRIPTION = 5000
DAILY_DESCRIPTION_DAYS = 31


def _distinct(values: I64) -> list[int]:
    """``np.unique(values).tolist()`` without the import of numpy.ma numpy 2 makes for it (1 MB resident in sync)."""
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))].tolist() if len(s) else []


@dataclass(frozen=True)
class Activity:
    activity: str
    minutes: float
    share: float
    mean_confidence: float


@dataclass
class FileSummary:
    """One file's activities, days and span (times in UTC ms; ``days`` keyed by local date)."""

    labels: list[str]
    activities: list[Activity]
    days: dict[str, dict[str, float]]
    start_ms: int
    end_ms: int
    windows: int
    gaps: int
    step_ms: int
    window_ms: int
    #: local time minus UTC (s) at the start, and the rule (``LocalTime.source``) and zone that gave it
    utc_offset_s: int
    local_source: str
    zone: str
    fixed_offset_s: int | None = None
    version: int = SUMMARY_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> LocalTime:
        return LocalTime(self.fixed_offset_s, self.zone, self.local_source)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> FileSummary:
        d = json.loads(text)
        d["activities"] = [Activity(**a) for a in d["activities"]]
        return FileSummary(**d)


def steps_ms(start_ms: I64, step_ms: int | None) -> int:
    """The step between windows: the model's, else the median spacing of the window starts (else 1 s)."""
    if step_ms:
        return int(step_ms)
    if len(start_ms) > 1:
        return max(1, int(np.median(np.diff(start_ms))))
    return 1000


def gap_after(start_ms: I64, step_ms: int) -> npt.NDArray[np.bool_]:
    """True at window i when a gap follows it (the next window starts over GAP_STEPS steps later)."""
    if len(start_ms) < 2:
        return np.zeros(len(start_ms), bool)
    return np.append(np.diff(start_ms) > GAP_STEPS * step_ms, False)


def summarize(
    label_names: list[str],
    start_ms: I64,
    probs: F32,
    local: LocalTime,
    *,
    step_ms: int | None = None,
    window_ms: int | None = None,
) -> FileSummary:
    """The summary of one file's windows (``start_ms`` sorted, UTC)."""
    start_ms = np.asarray(start_ms, dtype=np.int64)
    step = steps_ms(start_ms, step_ms)
    window = int(window_ms or step)
    n = len(start_ms)
    labels = probs.argmax(axis=1) if n else np.empty(0, np.int64)
    conf = probs.max(axis=1) if n else np.empty(0, np.float32)
    acts = []
    for i, name in enumerate(label_names):
        mine = labels == i
        k = int(mine.sum())
        acts.append(
            Activity(
                name,
                round(k * step / 60_000, 3),
                round(k / n, 4) if n else 0.0,
                round(float(conf[mine].mean()), 4) if k else 0.0,
            )
        )
    days: dict[str, dict[str, float]] = {}
    if n:
        local_day = (local.to_local_ms(start_ms) // 86_400_000).astype(np.int64)
        for day in _distinct(local_day):
            on_day = local_day == day
            counts = np.bincount(labels[on_day], minlength=len(label_names))
            date = (datetime(1970, 1, 1) + timedelta(days=int(day))).date().isoformat()
            days[date] = {
                name: round(int(c) * step / 60_000, 3)
                for name, c in zip(label_names, counts.tolist(), strict=True)
                if c
            }
    first = int(start_ms[0]) if n else 0
    last = int(start_ms[-1]) + window if n else 0
    return FileSummary(
        labels=list(label_names),
        activities=acts,
        days=days,
        start_ms=first,
        end_ms=last,
        windows=n,
        gaps=int(gap_after(start_ms, step).sum()),
        step_ms=step,
        window_ms=window,
        utc_offset_s=local.offset_at(first),
        local_source=local.source,
        zone=local.zone,
        fixed_offset_s=local.offset_s,
    )


# -- tables ------------------------------------------------------------------------------------------


def table_json(columns: list[str], rows: list[list[Any]]) -> str:
    """A table artifact as ``MlflowClient.log_table`` writes it (``{"columns": [...], "data": [[...]]}``)."""
    return json.dumps({"columns": columns, "data": rows})


def logged_tables_tag(paths: Iterable[str]) -> str:
    """The value of ``mlflow.loggedArtifacts`` naming these table artifacts (set whole: idempotent)."""
    return json.dumps([{"path": p, "type": "table"} for p in paths])


def activity_table(s: FileSummary) -> str:
    rows = [[a.activity, a.minutes, a.share, a.mean_confidence] for a in s.activities]
    return table_json(["activity", "minutes", "share", "mean_confidence"], rows)


# -- descriptions -------------------------------------------------------------------------------------


def _duration(minutes: float) -> str:
    h, m = divmod(round(minutes), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def _span_text(s: FileSummary) -> str:
    if not s.windows:
        return "no windows"
    local = s.local
    start = local.local_text(s.start_ms)
    end_fmt = "%H:%M" if local.local_text(s.end_ms, "%Y-%m-%d") == local.local_text(s.start_ms, "%Y-%m-%d") else None
    end = local.local_text(s.end_ms, end_fmt or "%Y-%m-%d %H:%M")
    return f"{start} to {end}"


def verdict_text(status: str | None, monitor_json: str | None) -> tuple[str, list[str]]:
    if not status:
        return "not monitored", []
    try:
        reasons = [str(r) for r in json.loads(monitor_json or "{}").get("reasons", [])]
    except (ValueError, AttributeError):
        reasons = []
    return status, reasons


def file_description(
    s: FileSummary,
    *,
    file_name: str,
    device: str,
    file_format: str | None,
    model: str,
    monitor_status: str | None,
    monitor_json: str | None,
) -> str:
    """The run's markdown description (``mlflow.note.content``)."""
    verdict, reasons = verdict_text(monitor_status, monitor_json)
    utc = (
        f"{_utc(s.start_ms)} to {_utc(s.end_ms)} UTC" if s.windows else "-"  # a file without windows has no span
    )
    total = sum(a.minutes for a in s.activities)
    lines = [
        f"### {file_name}",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{file_name}` ({file_format or 'unknown format'}) |",
        f"| device | `{device}` |",
        f"| recording | {_span_text(s)} local time |",
        f"| local time | {s.local.describe(s.start_ms) if s.windows else s.local_source} |",
        f"| in UTC | {utc} |",
        f"| covered | {_duration(total)} in {s.windows} windows, {s.gaps} gap(s) |",
        f"| model | {model} |",
        f"| monitor | **{verdict}** |",
        "",
        "| activity | minutes | share | mean confidence |",
        "|---|---:|---:|---:|",
    ]
    for a in sorted(s.activities, key=lambda a: -a.minutes):
        lines.append(f"| {a.activity} | {a.minutes:.1f} | {a.share:.0%} | {a.mean_confidence:.2f} |")
    if reasons:
        lines += ["", "Monitor reasons:", *(f"- {r}" for r in reasons)]
    lines += ["", f"Artifacts: `{TIMELINE_ARTIFACT}` (timeline), `{TABLE_ARTIFACT}` (this table), `predictions.csv`."]
    return _cut("\n".join(lines))


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 2] + " …"


def file_tags(s: FileSummary) -> dict[str, str]:
    """Readable tags: the recording's span in local time and UTC, and which local-time rule applied."""
    if not s.windows:
        return {}
    return {
        "har.recording.start_local": s.local.local_text(s.start_ms),
        "har.recording.end_local": s.local.local_text(s.end_ms),
        "har.recording.start_utc": _utc(s.start_ms),
        "har.utc_offset": format_offset(s.utc_offset_s),
        "har.local_time_source": s.local_source,
    }


# -- daily summaries -----------------------------------------------------------------------------------


@dataclass
class Daily:
    """Minutes per activity per local day of one group (one value of the grouping key)."""

    key: str
    value: str
    labels: list[str] = field(default_factory=list)
    days: dict[str, dict[str, float]] = field(default_factory=dict)
    files: int = 0
    start_ms: int | None = None
    end_ms: int | None = None
    sources: set[str] = field(default_factory=set)

    def add(self, s: FileSummary) -> None:
        for name in s.labels:
            if name not in self.labels:
                self.labels.append(name)
        for day, minutes in s.days.items():
            into = self.days.setdefault(day, {})
            for name, m in minutes.items():
                into[name] = round(into.get(name, 0.0) + m, 3)
        self.files += 1
        if s.windows:
            self.start_ms = s.start_ms if self.start_ms is None else min(self.start_ms, s.start_ms)
            self.end_ms = s.end_ms if self.end_ms is None else max(self.end_ms, s.end_ms)
        self.sources.add(s.local_source)

    def rows(self) -> list[list[Any]]:
        out = []
        for day in sorted(self.days):
            minutes = [round(self.days[day].get(name, 0.0), 1) for name in self.labels]
            out.append([day, *minutes, round(sum(minutes), 1)])
        return out

    def table(self) -> str:
        return table_json(["day", *self.labels, "total"], self.rows())

    def description(self) -> str:
        rows = self.rows()
        shown = rows[-DAILY_DESCRIPTION_DAYS:]
        lines = [
            f"### Daily activity of {self.key} `{self.value}`",
            "",
            f"Minutes per activity per local day, from {self.files} file(s); days end at local midnight "
            f"({', '.join(sorted(self.sources))}).",
            "",
            "| day | " + " | ".join(self.labels) + " | total |",
            "|---|" + "---:|" * (len(self.labels) + 1),
            *("| " + " | ".join(str(x) for x in r) + " |" for r in reversed(shown)),
        ]
        if len(rows) > len(shown):
            lines += ["", f"(the last {len(shown)} of {len(rows)} days; all of them in `{DAILY_TABLE_ARTIFACT}`)"]
        lines += ["", f"Artifacts: `{DAILY_PLOT_ARTIFACT}` (stacked bars), `{DAILY_TABLE_ARTIFACT}`."]
        return _cut("\n".join(lines))


def daily_summaries(items: Iterable[tuple[Mapping[str, str], FileSummary]], key: str = "device") -> dict[str, Daily]:
    """File summaries added up per value of ``key`` (each item: the file's grouping attributes, its summary)."""
    out: dict[str, Daily] = {}
    for attrs, s in items:
        value = attrs.get(key)
        if not value:
            continue
        out.setdefault(value, Daily(key, value)).add(s)
    return out
