"""The participant commands of ``har-edge``: ``participants`` (the list) and ``forget PARTICIPANT`` (erasure).

``forget`` deletes MLflow runs through the ``server_eraser`` default that :mod:`har_edge.cli` sets
when the sync extra is installed (the agent never imports sync); without it only the device is erased
and the report says so.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from har_edge.agent.settings import Settings
from har_edge.common.cli import Exit, add_command


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def cmd_participants(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.agent.outbox import Outbox
    from har_edge.agent.participants import list_participants

    with Outbox(settings.outbox_path) as ob:
        listed = list_participants(ob)
    if args.json:
        print(json.dumps(listed, indent=2))
        return Exit.OK
    if not listed:
        print("no files yet")
        return Exit.OK
    print(
        f"{'participant':<22} {'source':<9} {'files':>5} {'failed':>6} {'windows':>8} {'last seen (UTC)':<16}  delivery"
    )
    for p in listed:
        if p["participant"] is None:
            print(f"{'(none)':<22} {'':<9} {p['files']:>5}  {p['note']}")
            continue
        print(
            f"{p['participant']:<22} {p['source'] or '':<9} {p['files']:>5} {p['failed']:>6} {p['windows']:>8} "
            f"{_when(p['last_seen_ms']):<16}  {p['delivery']} ({p['delivered_files']} delivered, "
            f"{p['pending_files']} pending)"
        )
    return Exit.OK


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.agent.forget import forget
    from har_edge.agent.outbox import Outbox

    eraser = getattr(args, "server_eraser", None)
    server: Any = None
    if eraser is not None and not args.local_only:

        def server(participant: str, sha256s: list[str]) -> dict[str, Any]:
            result: dict[str, Any] = eraser(settings, participant, sha256s)
            return result

    with Outbox(settings.outbox_path) as ob:
        report = forget(settings, ob, args.participant, server=server, wait_s=args.wait)
    if server is None:
        report.server = {
            "skipped": "MLflow runs not deleted ("
            + ("--local-only" if args.local_only else "the sync extra is not installed")
            + "): delete them on the server by the tag har.participant"
        }
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return Exit.FAILED if report.request_open or report.server.get("error") else Exit.OK


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``participants`` and ``forget``; returns the ``forget`` parser (for the server hook)."""
    lst = add_command(
        subparsers,
        "participants",
        cmd_participants,
        "participants with their files, windows, last seen and delivery state",
        parents,
    )
    lst.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    fg = add_command(
        subparsers,
        "forget",
        cmd_forget,
        "erase a participant: outbox rows, raw exports in archive/quarantine/inbox, MLflow runs (docs/privacy.md)",
        parents,
    )
    fg.add_argument("participant", help="the participant id, as `har-edge participants` lists it")
    fg.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="S",
        help="wait this long for files in flight to be finished and erased (default 120)",
    )
    fg.add_argument("--local-only", action="store_true", help="erase on this device only, not the MLflow runs")
    fg.add_argument("--json", action="store_true", help="the report as JSON")
    return fg
