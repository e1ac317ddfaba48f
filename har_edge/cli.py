"""``har-edge``: the command line of the edge device.

A thin entry point: arguments -> settings -> logging -> the command. It
assembles the agent's commands (:mod:`har_edge.agent.cli`) and the sync
daemon's (:mod:`har_edge.sync.cli`); errors become exit codes here only (the
table is in :mod:`har_edge.common.cli`). The global options ``--config`` and
``--data-dir`` are accepted before or after the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from har_edge import __version__, doctor
from har_edge.agent import cli as agent_cli
from har_edge.agent.errors import ConfigError, HarEdgeError
from har_edge.agent.logs import log_file_path, setup_logging
from har_edge.agent.settings import load_settings
from har_edge.common import telemetry
from har_edge.common.cli import Exit


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """``--config`` and ``--data-dir``; after a command they must not reset what was given before it."""
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--config",
        type=Path,
        default=default,
        help="TOML settings file (default: HAR_EDGE_CONFIG or <data dir>/har-edge.toml)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=default, help="the data folder (default: HAR_EDGE_DATA_DIR or ./var)"
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="har-edge",
        description="Edge human-activity recognition on Garmin IMU exports.",
        parents=[_global_options(suppress=False)],
    )
    p.add_argument("--version", action="version", version=f"har-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [_global_options(suppress=True)]
    agent_cli.register(sub, parents)
    try:
        from har_edge.sync import cli as sync_cli
        from har_edge.sync.forget import erase_participant_remote
    except ImportError:  # the bare agent runs without the sync extra's packages
        pass
    else:
        sync_cli.register(sub, parents)
        sub.choices["forget"].set_defaults(server_eraser=erase_participant_remote)  # runs, raw custody
        from har_edge.sync import fleet

        fleet.register(sub, parents)
    doctor.register(sub, parents)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    telemetry.opt_out()
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return Exit.USAGE
    daemon = args.command if getattr(args, "agent_command", getattr(args, "sync_command", None)) == "run" else None
    setup_logging(
        settings.log_level,
        settings.log_json,
        log_file=log_file_path(settings.log_file, settings.logs_dir, daemon),
        max_mb=settings.log_max_mb,
        backups=settings.log_backups,
    )
    try:
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return Exit.USAGE
    except HarEdgeError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return Exit.FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
