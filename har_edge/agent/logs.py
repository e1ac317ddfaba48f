"""Logging set-up for the command line: plain or JSON lines, noisy libraries turned down."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path

NOISY = (
    "watchdog",
    "urllib3",
    "mlflow",
    "alembic",
    "git",
    "dvc",
    "fsspec",
    "asyncio",
    "filelock",
    "apscheduler.executors",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


#: the long-running commands that also log to ``log_file`` (one-shot commands stay on stderr, so only one
#: process ever writes, and rotates, each file)
FILE_LOGGING_COMMANDS = ("agent", "sync")


def log_file_path(log_file: Path | None, logs_dir: Path, command: str | None) -> Path | None:
    """Where ``command`` (agent or sync) logs: ``log_file`` under ``logs_dir`` with ``{command}`` filled in."""
    if log_file is None or command not in FILE_LOGGING_COMMANDS:
        return None
    path = log_file if log_file.is_absolute() else logs_dir / log_file
    if "{command}" in path.name:
        return path.with_name(path.name.replace("{command}", command))
    return path if command == "agent" else path.with_name(f"{path.stem}-{command}{path.suffix}")


def setup_logging(
    level: str = "INFO",
    json_lines: bool = False,
    *,
    log_file: Path | None = None,
    max_mb: float = 10.0,
    backups: int = 5,
) -> None:
    """Log to stderr and, with ``log_file``, also to that file, rotated at ``max_mb`` keeping ``backups`` old ones."""
    fmt: logging.Formatter = (
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=max(1, int(max_mb * 1e6)), backupCount=backups, encoding="utf-8"
            )
        )
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
