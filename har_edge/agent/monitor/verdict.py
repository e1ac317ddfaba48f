"""A file's monitor verdict: ok, warn or alert with reasons a person can read (pure functions).

Statuses: ``ok``, ``warn``, ``alert``; ``too_short`` below ``monitor.min_windows``
windows (a divergence over a dozen windows is noise); ``no_reference`` when the
model's manifest has no reference (confidence and flip figures are still given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from har_edge.agent.monitor.accumulate import MonitorStats
from har_edge.agent.monitor.reference import Reference
from har_edge.agent.outbox import MetricPoint
from har_edge.agent.settings import MonitorSettings

STATUSES = ("ok", "warn", "alert", "too_short", "no_reference")
_RANK = {"ok": 0, "warn": 1, "alert": 2}


@dataclass
class MonitorReport:
    status: str
    reasons: list[str]
    windows: int
    metrics: dict[str, float] = field(default_factory=dict)
    channel_psi: dict[str, float] = field(default_factory=dict)
    feature_psi: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reasons": self.reasons,
            "windows": self.windows,
            "metrics": self.metrics,
            "channel_psi": self.channel_psi,
            "feature_psi": self.feature_psi,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def metric_points(self, timestamp_ms: int) -> list[MetricPoint]:
        """``monitor.*`` points of the file's run (the status as a code: ok 0, warn 1, alert 2)."""
        pts = [MetricPoint(f"monitor.{k}", float(v), timestamp_ms) for k, v in sorted(self.metrics.items())]
        pts += [MetricPoint(f"monitor.psi.{k}", v, timestamp_ms) for k, v in sorted(self.channel_psi.items())]
        if self.status in _RANK:
            pts.append(MetricPoint("monitor.status_code", float(_RANK[self.status]), timestamp_ms))
        return pts


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def judge(stats: MonitorStats, reference: Reference | None, cfg: MonitorSettings, labels: list[str]) -> MonitorReport:
    """The verdict of one file's stats against the reference, under the ``monitor`` settings."""
    m: dict[str, float] = {
        "windows": float(stats.windows),
        "confidence_mean": stats.confidence_mean,
        "low_confidence_share": stats.low_confidence_share,
        "entropy_mean": stats.entropy_mean,
        "flip_rate": stats.flip_rate,
        "mean_dwell_windows": stats.mean_dwell_windows,
        "saturation_share": stats.saturation_share,
        "temperature": stats.temperature,
        "top_class_share": max(stats.class_share) if stats.class_share else 0.0,
    }
    report = MonitorReport("ok", [], stats.windows, m)
    if reference is None:
        report.status = "no_reference"
        report.reasons = ["no reference: the model's manifest carries no training reference"]
        return report
    ch_psi = stats.channel_psi
    ft_psi = stats.feature_psi
    report.channel_psi = {k: round(v, 4) for k, v in ch_psi.items()}
    report.feature_psi = {k: round(v, 4) for k, v in ft_psi.items()}
    ch_typ = {k: reference.input.channels[k].typical_psi for k in ch_psi}
    ft_typ = {k: reference.features.features[k].typical_psi for k in ft_psi}
    floor = cfg.typical_psi_floor

    def rel(v: float, typical: float | None) -> float:
        return v / max(typical if typical is not None else cfg.typical_psi_default, floor)

    rels = [rel(v, ch_typ[k]) for k, v in ch_psi.items()] + [rel(v, ft_typ[k]) for k, v in ft_psi.items()]
    drift = sum(rels) / len(rels) if rels else 0.0
    m["drift_score"] = drift
    m["psi_max"] = max(ch_psi.values(), default=0.0)
    m["feature_psi_max"] = max(ft_psi.values(), default=0.0)
    m["psi_rel_max"] = max((rel(v, ch_typ[k]) for k, v in ch_psi.items()), default=0.0)
    if stats.windows < cfg.min_windows:
        report.status = "too_short"
        report.reasons = [f"too short to judge: {stats.windows} windows (monitor.min_windows = {cfg.min_windows})"]
        return report
    found: list[tuple[str, str]] = []  # (level, reason)
    # -- drift ------------------------------------------------------------------------------------

    def typical_note(t: float | None) -> str:
        return f"; held-out recordings reach {t:.2f}" if t is not None else ""

    if reference.gives_drift_verdicts:
        for name, v in sorted(ch_psi.items(), key=lambda kv: -kv[1]):
            r = rel(v, ch_typ[name])
            if r >= cfg.psi_alert_ratio and v >= cfg.psi_alert:
                found.append(("alert", f"{name} far from training (PSI {v:.1f}{typical_note(ch_typ[name])})"))
            elif r >= cfg.psi_warn_ratio and v >= cfg.psi_warn:
                found.append(("warn", f"{name} unlike training (PSI {v:.2f}{typical_note(ch_typ[name])})"))
        worst = sorted(((rel(v, ft_typ[k]), v, k) for k, v in ft_psi.items()), reverse=True)[:3]
        for r, v, name in worst:
            if r >= cfg.psi_alert_ratio and v >= cfg.feature_psi_alert:
                found.append(("alert", f"window {name} far from training (PSI {v:.1f}{typical_note(ft_typ[name])})"))
            elif r >= cfg.psi_warn_ratio and v >= cfg.feature_psi_warn:
                found.append(("warn", f"window {name} unlike training (PSI {v:.2f}{typical_note(ft_typ[name])})"))
        if drift >= cfg.drift_alert:
            found.append(("alert", f"combined drift score {drift:.2f} (alert at {cfg.drift_alert:g})"))
        elif drift >= cfg.drift_warn:
            found.append(("warn", f"combined drift score {drift:.2f} (warn at {cfg.drift_warn:g})"))
        sat = stats.saturation_share - reference.input.saturation_share
        if sat >= cfg.saturation_alert:
            found.append(("alert", f"{_pct(stats.saturation_share)} of input values beyond the model's int8 range"))
        elif sat >= cfg.saturation_warn:
            found.append(("warn", f"{_pct(stats.saturation_share)} of input values beyond the model's int8 range"))
    # -- confidence -------------------------------------------------------------------------------
    ref_c = reference.confidence
    if stats.confidence_mean < ref_c.mean - cfg.confidence_drop_warn:
        found.append(
            ("warn", f"mean confidence {stats.confidence_mean:.2f}, {ref_c.mean:.2f} on held-out training data")
        )
    if stats.low_confidence_share > ref_c.low_share + cfg.low_confidence_rise_warn:
        found.append(
            (
                "warn",
                f"{_pct(stats.low_confidence_share)} of windows low-confidence, "
                f"{_pct(ref_c.low_share)} on held-out data",
            )
        )
    top = max(range(len(stats.class_share)), key=stats.class_share.__getitem__) if stats.class_share else 0
    share = stats.class_share[top] if stats.class_share else 0.0
    prior = reference.prior.share[top] if top < len(reference.prior.share) else 0.0
    if (
        share >= cfg.one_class_share
        and stats.confidence_mean >= cfg.one_class_confidence
        and prior < cfg.one_class_prior_max
    ):
        name = labels[top] if top < len(labels) else str(top)
        found.append(
            (
                "warn",
                f"{_pct(share)} of windows one class ({name}) at {stats.confidence_mean:.2f}; "
                f"training prior {_pct(prior)} ({reference.prior.kind})",
            )
        )
    # -- temporal ---------------------------------------------------------------------------------
    ref_flip = reference.temporal.flip_rate
    limit = max(ref_flip * cfg.flip_rate_factor, ref_flip + cfg.flip_rate_margin)
    if stats.flip_rate > limit:
        found.append(("warn", f"label flips in {_pct(stats.flip_rate)} of windows, {_pct(ref_flip)} on held-out data"))
    if not reference.gives_drift_verdicts:
        found.append(("ok", "no drift verdict: the reference was drawn from synthetic windows"))
    level = max((lv for lv, _ in found), key=lambda lv: _RANK[lv], default="ok")
    report.status = level
    report.reasons = [r for lv, r in sorted(found, key=lambda f: -_RANK[f[0]])]
    return report
