"""``har-edge``: the command line of the edge device (agent, status, and the sync commands).

Errors become exit codes here only: 0 success, 1 some input was quarantined or
a check failed, 2 bad settings or usage, 3 a server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from har_edge.agent import __version__
from har_edge.agent.errors import ConfigError, HarEdgeError
from har_edge.agent.logs import log_file_path, setup_logging
from har_edge.agent.settings import Settings, load_settings

log = logging.getLogger("har_edge")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


def stop_event() -> threading.Event:
    """An event set by SIGTERM/SIGINT, so ``docker stop`` and Ctrl-C drain cleanly."""
    ev = threading.Event()

    def _handler(signum, _frame):
        log.info("received %s: finishing the current work, then stopping", signal.Signals(signum).name)
        ev.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return ev


# -- agent ---------------------------------------------------------------------


def cmd_agent_run(settings: Settings, args) -> int:
    from har_edge.agent.daemon import Agent

    agent = Agent(settings)
    if args.check_config:
        model = agent.models.refresh()
        print(f"settings OK; data in {settings.data_dir}; model {model.label} ({model.runner.runtime})")
        return EXIT_OK
    agent.run(stop_event())
    return EXIT_OK


def _progress_bar(total_hint: str):
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=total_hint, unit=" windows", leave=False)
    return bar, bar.update


def cmd_agent_process(settings: Settings, args) -> int:
    import shutil
    import tempfile

    from har_edge.agent.daemon import Agent

    agent = Agent(settings)
    failed = 0
    for name in args.files:
        src = Path(name)
        if not src.is_file():
            print(f"{name}: no such file", file=sys.stderr)
            failed += 1
            continue
        # work on a copy claimed into work/, so the same quarantine/archive rules apply
        with tempfile.TemporaryDirectory(dir=settings.work) as tmp:
            staged = Path(tmp) / src.name
            shutil.copy2(src, staged)
            claimed = agent.folder.claim([staged])
            bar, update = _progress_bar(src.name)
            try:
                outcome = agent.handle(claimed, progress=update)
            finally:
                if bar is not None:
                    bar.close()
        if outcome.status == "failed":
            failed += 1
            print(f"{src.name}: quarantined: {outcome.error}")
        elif outcome.status == "duplicate":
            print(f"{src.name}: duplicate of an already processed file")
        else:
            print(f"{src.name}: {outcome.windows} windows in {outcome.seconds:.2f} s")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_agent_replay(settings: Settings, args) -> int:
    from har_edge.agent.watcher import DropFolder

    moved = DropFolder(settings.data_dir).replay(args.names or None)
    for p in moved:
        print(f"back in the inbox: {p.name}")
    if not moved:
        print("nothing in quarantine" + (" matching those names" if args.names else ""))
    return EXIT_OK


def cmd_status(settings: Settings, args) -> int:
    from har_edge.agent.modelstore import ActiveModel
    from har_edge.agent.outbox import Outbox
    from har_edge.agent.retention import data_dir_usage

    with Outbox(settings.outbox_path) as ob:
        st = ob.status_counts()
    try:
        m = ActiveModel(settings.models_dir, explicit=settings.agent.model_dir).refresh()
        st["model"] = {
            "name": m.manifest.name,
            "version": m.manifest.version,
            "sha256": m.manifest.sha256,
            "folder": str(m.folder),
        }
    except HarEdgeError as exc:
        st["model"] = {"error": str(exc)}
    st["data_dir"] = str(settings.data_dir)
    st["disk"] = data_dir_usage(settings)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    files = ", ".join(f"{k} {v}" for k, v in sorted(st["files"].items())) or "none yet"
    print(f"data dir:  {settings.data_dir}")
    print(f"files:     {files}")
    print(f"pending:   {st['windows_pending_delivery']} windows, {st['metric_points_pending']} metric points")
    mdl = st["model"]
    print(
        "model:     "
        + (f"{mdl['name']} {mdl['version']} (sha256 {mdl['sha256'][:12]}…)" if "sha256" in mdl else mdl["error"])
    )
    disk = st["disk"]
    parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in disk.items() if k not in ("total", "free"))
    print(f"disk MB:   {parts}; total {disk['total'] / 1e6:.1f}, free {disk['free'] / 1e6:.0f}")
    last = st["last_file"]
    if last:
        detail = f"{last['windows']} windows" if last["status"] == "processed" else (last["error"] or "")
        print(f"last file: {last['name']} ({last['status']}; {detail})")
    return EXIT_OK


def cmd_health(settings: Settings, args) -> int:
    """Exit 0 when the outbox takes writes and the active model verifies; 1 otherwise (container HEALTHCHECK)."""
    from sqlalchemy import text

    from har_edge.agent.modelstore import ActiveModel
    from har_edge.agent.outbox import Outbox

    problems = []
    try:
        with Outbox(settings.outbox_path, busy_timeout_s=10) as ob, ob.transaction() as conn:
            conn.execute(text("DELETE FROM schema_version WHERE 0"))  # takes the write lock, changes nothing
    except (HarEdgeError, OSError) as exc:
        problems.append(f"outbox: {exc}")
    try:
        m = ActiveModel(settings.models_dir, explicit=settings.agent.model_dir).refresh()
        if read_pointer_failed(settings, m):
            problems.append(f"model: models/current is not loadable; running {m.label}")
    except HarEdgeError as exc:
        problems.append(f"model: {exc}")
    if problems:
        print("unhealthy: " + "; ".join(problems))
        return EXIT_FAILED
    print(f"healthy: outbox writable, model {m.label}")
    return EXIT_OK


def read_pointer_failed(settings: Settings, model) -> bool:
    """True when models/current names a version other than the one that loaded."""
    from har_edge.agent.modelstore import read_pointer

    pointer = read_pointer(settings.models_dir)
    return settings.agent.model_dir is None and pointer is not None and model.folder.name != pointer


# -- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="har-edge", description="Edge human-activity recognition on Garmin IMU exports.")
    p.add_argument("--version", action="version", version=f"har-edge {__version__}")
    p.add_argument(
        "--config", type=Path, help="TOML settings file (default: HAR_EDGE_CONFIG or <data dir>/har-edge.toml)"
    )
    p.add_argument("--data-dir", type=Path, help="the data folder (default: HAR_EDGE_DATA_DIR or ./var)")
    sub = p.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="the inference agent").add_subparsers(dest="agent_command", required=True)
    run = agent.add_parser("run", help="watch the inbox and process every export dropped there")
    run.add_argument("--check-config", action="store_true", help="validate settings and the model, then exit 0 (or 2)")
    run.set_defaults(func=cmd_agent_run)
    proc = agent.add_parser("process", help="process files once, in the foreground; exit 1 if any was quarantined")
    proc.add_argument("files", nargs="+")
    proc.set_defaults(func=cmd_agent_process)
    rep = agent.add_parser("replay", help="put quarantined files back into the inbox")
    rep.add_argument("names", nargs="*", help="only these files (default: all)")
    rep.set_defaults(func=cmd_agent_replay)

    status = sub.add_parser("status", help="files per state, pending delivery, active model, last file")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    health = sub.add_parser("health", help="exit 0 if the outbox is writable and the active model verifies")
    health.set_defaults(func=cmd_health)

    try:
        from har_edge.sync.cli import register as register_sync
    except ImportError:  # the sync package is optional for the bare agent
        register_sync = None
    if register_sync is not None:
        register_sync(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    daemon = args.command if getattr(args, "agent_command", getattr(args, "sync_command", None)) == "run" else None
    log_file = log_file_path(settings.log_file, settings.logs_dir, daemon)
    setup_logging(
        settings.log_level,
        settings.log_json,
        log_file=log_file,
        max_mb=settings.log_max_mb,
        backups=settings.log_backups,
    )
    try:
        return args.func(settings, args)
    except ConfigError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except HarEdgeError as exc:
        print(f"har-edge: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
