"""Import MLflow's client as mlflow-skinny would run it: without the data-science stack it imports only in case.

``import mlflow`` (3.x) loads pandas, pyarrow and scipy at start (for datasets, model signatures
and evaluation, none of which sync uses); every one of those imports is optional in MLflow (it runs
as mlflow-skinny without them). Measured here: 176 MB resident after ``import mlflow`` with them,
106 MB without. Two libraries MLflow's own imports load are optional the same way: requests
imports a character-set detector (charset_normalizer, 2.7 MB) only to guess the encoding of a
response that declares none (MLflow's answers are JSON, which requests reads as UTF-8; without a
detector it falls back to UTF-8), and OpenTelemetry's resource detector imports psutil (0.9 MB)
only to name the process owner in trace resources (sync sends no traces; MLflow imports psutil
itself only inside the gateway's functions). While MLflow is first imported, those packages are
reported missing, so MLflow and its libraries take their paths for a missing optional dependency;
afterwards nothing is hidden: code that needs pandas or psutil later imports it as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

from har_edge.common import telemetry

log = logging.getLogger(__name__)

#: top-level packages MLflow imports only in case (datasets, signatures, evaluation), hidden while it starts
OPTIONAL = ("pandas", "pyarrow", "scipy", "sklearn", "matplotlib", "PIL")
#: optional imports of the libraries MLflow loads: requests' charset detectors, OpenTelemetry's psutil
OPTIONAL_OF_LIBRARIES = ("charset_normalizer", "chardet", "psutil")


class _Hidden(importlib.abc.MetaPathFinder):
    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not needed by har-edge sync)", name=fullname)
        return None


def import_mlflow() -> ModuleType:
    """``mlflow.tracking``, imported without its optional heavy dependencies (unless they are already loaded)."""
    if "mlflow.tracking" in sys.modules:
        return sys.modules["mlflow.tracking"]
    telemetry.opt_out()  # read by MLflow's client when it is first imported
    hidden = [n for n in OPTIONAL + OPTIONAL_OF_LIBRARIES if n not in sys.modules]
    finder = _Hidden(hidden)
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            # requests warns once, at import, that it has no detector: the fallback above is the intent
            warnings.filterwarnings("ignore", message="Unable to find acceptable character detection dependency")
            module = importlib.import_module("mlflow.tracking")
            importlib.import_module("mlflow.entities")
            importlib.import_module("mlflow.exceptions")
    finally:
        sys.meta_path.remove(finder)
    log.debug("mlflow imported without %s", ", ".join(hidden))
    return module
