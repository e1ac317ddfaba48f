"""The agent's commands of ``har-edge``: ``agent run|process|replay``, ``status`` and ``health``.

Each command is ``(settings, args) -> exit code`` (the table is in
:mod:`har_edge.common.cli`); :mod:`har_edge.cli` assembles the parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Never

from har_edge.agent.errors import HarEdgeError
from har_edge.agent.settings import Settings
from har_edge.common.cli import Exit, add_command, stop_event
from har_edge.common.states import FileStatus

if TYPE_CHECKING:
    from tqdm import tqdm


log = logging.getLogger(__name__)


# -- agent ---------------------------------------------------------------------


def cmd_agent_run(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.agent.daemon import Agent

    agent = Agent(settings)
    if args.check_config:
        model = agent.models.refresh()
        print(f"settings OK; data in {settings.data_dir}; model {model.label} ({model.runner.runtime})")
        return Exit.OK
    agent.run(stop_event())
    return Exit.OK


def _progress_bar(total_hint: str) -> tuple[tqdm[Never] | None, Callable[[int], None] | None]:
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=total_hint, unit=" windows", leave=False)

    def update(n: int) -> None:
        bar.update(n)

    return bar, update


def _process_groups(files: list[str]) -> list[list[Path]]:
    """The files given to ``agent process``, study tables paired as the drop folder pairs them (by pair_key).

    An accelerometer and a gyroscope table of one prefix become one export (accelerometer first);
    everything else is processed alone, in the order given.
    """
    from har_edge.agent.decode import pair_key

    groups: list[dict[str, Path]] = []  # sensor (or "file") -> path
    open_pair: dict[str, dict[str, Path]] = {}  # prefix -> the group still missing a sensor
    for name in files:
        p = Path(name)
        key = pair_key(p) if p.suffix.lower() in (".csv", ".xlsx") else None
        if key is None:
            groups.append({"file": p})
            continue
        prefix, sensor = key
        group = open_pair.get(prefix)
        if group is None or sensor in group:
            group = open_pair[prefix] = {}
            groups.append(group)
        group[sensor] = p
    return [[g[k] for k in ("file", "accelerometer", "gyroscope") if k in g] for g in groups]


def cmd_agent_process(settings: Settings, args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from har_edge.agent.daemon import Agent

    groups = _process_groups(args.files)
    missing = [p for group in groups for p in group if not p.is_file()]
    if missing:  # a usage error: nothing is processed
        for p in missing:
            print(f"{p}: no such file", file=sys.stderr)
        return Exit.USAGE
    agent = Agent(settings)
    failed = 0
    for group in groups:
        label = " + ".join(p.name for p in group)
        # work on copies claimed into work/, so the same quarantine/archive rules apply
        with tempfile.TemporaryDirectory(dir=settings.work) as tmp:
            staged = [Path(tmp) / p.name for p in group]
            for p, s in zip(group, staged, strict=True):
                shutil.copy2(p, s)
            claimed = agent.folder.claim(staged)
            if claimed is None:  # the staged copy vanished before it was moved into work/
                print(f"{label}: its staged copy vanished before it could be claimed; not processed", file=sys.stderr)
                failed += 1
                continue
            bar, update = _progress_bar(label)
            try:
                outcome = agent.handle(claimed, progress=update)
            finally:
                if bar is not None:
                    bar.close()
        if outcome.status == FileStatus.FAILED:
            failed += 1
            print(f"{label}: quarantined: {outcome.error}")
        elif outcome.status == FileStatus.DUPLICATE:
            print(f"{label}: duplicate of an already processed file")
        else:
            print(f"{label}: {outcome.windows} windows in {outcome.seconds:.2f} s")
    return Exit.FAILED if failed else Exit.OK


def cmd_agent_replay(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.agent.watcher import DropFolder

    moved = DropFolder(settings.data_dir).replay(args.names or None)
    for p in moved:
        print(f"back in the inbox: {p.name}")
    if not moved:
        print("nothing in quarantine" + (" matching those names" if args.names else ""))
        return Exit.FAILED if args.names else Exit.OK  # names that match nothing: a check that failed
    return Exit.OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.modelstore import choose_model
    from har_edge.agent.outbox import Outbox
    from har_edge.agent.retention import data_dir_usage

    with Outbox(settings.outbox_path) as ob:
        st = ob.status_counts()
        st["recent_files"] = ob.recent_files(args.recent)
        if args.participant:  # the counts, pending items and files of one participant
            from har_edge.agent.participants import participant_status

            st.update(participant_status(ob, args.participant, args.recent))
        if settings.sync.raw_store:
            from har_edge.agent.acknowledged import custody_backlog

            cb = custody_backlog(ob, settings.archive_dir, settings.sync.raw_store)
            st["custody"] = {"store": settings.sync.raw_store, **asdict(cb)}
    try:  # the manifest only: status never loads TFLite (`models verify` and `health` check the bytes)
        choice = choose_model(settings.models_dir, settings.agent.model_dir)
        mf = read_manifest(choice.folder)
        st["model"] = {"name": mf.name, "version": mf.version, "sha256": mf.sha256, "folder": str(choice.folder)}
    except HarEdgeError as exc:
        st["model"] = {"error": str(exc)}
    st["data_dir"] = str(settings.data_dir)
    st["disk"] = data_dir_usage(settings)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return Exit.OK
    files = ", ".join(f"{k} {v}" for k, v in sorted(st["files"].items())) or "none yet"
    print(f"data dir:  {settings.data_dir}")
    if args.participant:
        print(f"participant: {args.participant}")
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
    if "custody" in st:
        c = st["custody"]
        print(
            f"custody:   {c['files']} file(s), {c['bytes'] / 1e6:.1f} MB not yet verified in {c['store']} "
            f"({c['uploading']} part-way); {c['delivered']} archived file(s) in the store"
        )
    last = st["last_file"]
    if last:
        detail = f"{last['windows']} windows" if last["status"] == FileStatus.PROCESSED else (last["error"] or "")
        print(f"last file: {last['name']} ({last['status']}; {detail})")
    if st["recent_files"]:
        print("recent files (newest first):")
    for f in st["recent_files"]:
        mon = f["monitor"]
        verdict = (
            f"monitor {mon['status']}" + (": " + "; ".join(mon["reasons"]) if mon["reasons"] else "") if mon else ""
        )
        state = f["status"] + (f" ({f['error_kind']})" if f["error_kind"] else "")
        sent = "delivered" if f["delivered"] else "not delivered"
        print(
            f"  {f['name']}  sha256 {f['sha256'][:12]}…  {state}, {f['windows']} windows, {sent}; {verdict}".rstrip(
                "; "
            )
        )
    return Exit.OK


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the outbox takes writes and the active model verifies; 1 otherwise (container HEALTHCHECK)."""
    from sqlalchemy import text

    from har_edge.agent.modelstore import ActiveModel, running_other_than_chosen
    from har_edge.agent.outbox import Outbox

    problems = []
    try:
        with Outbox(settings.outbox_path, busy_timeout_s=10) as ob, ob.transaction() as conn:
            conn.execute(text("DELETE FROM schema_version WHERE 0"))  # takes the write lock, changes nothing
    except (HarEdgeError, OSError) as exc:
        problems.append(f"outbox: {exc}")
    try:
        m = ActiveModel(settings.models_dir, explicit=settings.agent.model_dir).refresh()
        if running_other_than_chosen(settings.models_dir, settings.agent.model_dir, m):
            problems.append(f"model: models/current is not loadable; running {m.label}")
    except HarEdgeError as exc:
        problems.append(f"model: {exc}")
    if problems:
        print("unhealthy: " + "; ".join(problems))
        return Exit.FAILED
    print(f"healthy: outbox writable, model {m.label}")
    return Exit.OK


# -- parser ----------------------------------------------------------------------


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    """Add ``agent run|process|replay``, ``status`` and ``health`` to the ``har-edge`` parser."""
    agent = add_command(subparsers, "agent", None, "the inference agent", parents)
    asub = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    run = add_command(asub, "run", cmd_agent_run, "watch the inbox and process every export dropped there", parents)
    run.add_argument("--check-config", action="store_true", help="validate settings and the model, then exit 0 (or 2)")
    proc = add_command(
        asub,
        "process",
        cmd_agent_process,
        "process files once, in the foreground; exit 1 if any was quarantined",
        parents,
    )
    proc.add_argument("files", nargs="+", help="exports to process (a study table pair: give both files)")
    rep = add_command(asub, "replay", cmd_agent_replay, "put quarantined files back into the inbox", parents)
    rep.add_argument("names", nargs="*", help="only these files (default: all)")

    status = add_command(
        subparsers, "status", cmd_status, "files per state, pending delivery, active model, last file", parents
    )
    status.add_argument("--json", action="store_true", help="one JSON document instead of the summary")
    status.add_argument("--recent", type=int, default=10, metavar="N", help="list the last N files (default 10)")
    status.add_argument(
        "--participant", metavar="P", help="only this participant's files (see `har-edge participants`)"
    )

    from har_edge.agent import participants_cli

    participants_cli.register(subparsers, parents)

    add_command(
        subparsers, "health", cmd_health, "exit 0 if the outbox is writable and the active model verifies", parents
    )


if __name__ == "__main__":  # pragma: no cover - the entry point is har_edge.cli
    sys.exit("har_edge.agent.cli only registers commands: run `har-edge` (python -m har_edge.cli)")
