"""The quality gate: figures of the int8 model on held-out subjects against ``params.yaml`` thresholds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from har_edge.trainer.errors import GateFailed
from har_edge.trainer.settings import GateSettings

#: (metric key, threshold attribute, description, lower bound?)
_CHECKS = (
    ("int8_accuracy", "min_int8_accuracy", "int8 held-out accuracy", True),
    ("agreement", "min_agreement", "int8/float argmax agreement", True),
    ("int8_macro_f1", "min_macro_f1", "int8 held-out macro F1", True),
    ("size_kb", "max_size_kb", "model.tflite size (KB)", False),
)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    thresholds: dict[str, float]
    figures: dict[str, float]
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "thresholds": self.thresholds,
            "figures": self.figures,
            "failures": list(self.failures),
        }

    def raise_if_failed(self, what: str) -> None:
        if not self.passed:
            raise GateFailed(
                f"{what} failed the gate: "
                + "; ".join(self.failures)
                + ": improve the model (data, epochs) or, knowingly, the thresholds in params.yaml (gate.*)"
            )


def check_gate(metrics: Mapping[str, float], gate: GateSettings | Mapping[str, float]) -> GateResult:
    """Compare the figures with the thresholds; a missing figure fails its check."""
    limits = gate.model_dump() if isinstance(gate, GateSettings) else dict(gate)
    failures: list[str] = []
    figures: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    for key, attr, text, lower in _CHECKS:
        if attr not in limits:
            continue
        limit = float(limits[attr])
        thresholds[attr] = limit
        value = metrics.get(key)
        if value is None:
            failures.append(f"{text} was not measured")
            continue
        figures[key] = float(value)
        if lower and value < limit:
            failures.append(f"{text} {value:.4f} < {limit:.4f} ({attr})")
        elif not lower and value > limit:
            failures.append(f"{text} {value:.1f} > {limit:.1f} ({attr})")
    return GateResult(not failures, thresholds, figures, failures)
