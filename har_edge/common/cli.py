"""What both command lines (``har-edge`` and ``har-train``) share: one exit-code table, one dispatch style.

Exit codes (the README has the same table):

====  ===========  =========================================================
code  name         meaning
====  ===========  =========================================================
0     OK           done
1     FAILED       a file was quarantined, a check failed, an item was refused
2     USAGE        bad settings or usage (every problem named on stderr)
3     UNREACHABLE  a configured server or registry could not be reached
4     GATE         a model was refused by its gate (export, import, release)
5     SIGNATURE    a model was refused for its signature
====  ===========  =========================================================

Every command is a function ``(settings, args) -> int`` set on its parser with
``set_defaults(func=...)``; errors become exit codes only in the ``main`` of
each tool.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from enum import IntEnum
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    GATE = 4
    SIGNATURE = 5


#: a command: ``(settings, parsed arguments) -> exit code``
Command = Callable[[Any, argparse.Namespace], int]


def stop_event() -> threading.Event:
    """An event set by SIGTERM/SIGINT, so ``docker stop`` and Ctrl-C drain cleanly."""
    ev = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current work, then stopping", signal.Signals(signum).name)
        ev.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return ev


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Command | None,
    help: str,
    parents: list[argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    """A sub-command whose description is its help line; ``func`` is what runs it (None for a group)."""
    p = subparsers.add_parser(name, help=help, description=help, parents=parents or [])
    if func is not None:
        p.set_defaults(func=func)
    return p
