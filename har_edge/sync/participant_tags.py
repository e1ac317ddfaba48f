"""What a file run says about who wore the watch: ``har.participant``, ``har.watch`` (a pseudonym), never the serial.

The raw serial is sent (``har.watch_serial``) only with ``participants.share_serial = true``.
Manufacturer, product and firmware describe the model of watch, not the person, and are sent
as ``har.watch_manufacturer|product|firmware``.

Per-participant summaries (a daily run per participant, built elsewhere) are keyed by
:func:`summary_key` and must carry :func:`summary_tags`, so ``har-edge forget`` finds and deletes
them with the participant's file runs (it searches by ``har.participant``).
"""

from __future__ import annotations

from typing import Any

PARTICIPANT = "har.participant"
WATCH = "har.watch"
WATCH_SERIAL = "har.watch_serial"
WATCH_MANUFACTURER = "har.watch_manufacturer"
WATCH_PRODUCT = "har.watch_product"
WATCH_FIRMWARE = "har.watch_firmware"
PARTICIPANT_SOURCE = "har.participant_source"


def file_run_tags(row: Any, *, share_serial: bool) -> dict[str, str]:
    """The identity tags of a file's run, from its ``files`` row (empty values left out)."""
    tags = {
        PARTICIPANT: getattr(row, "participant", None),
        PARTICIPANT_SOURCE: getattr(row, "participant_source", None),
        WATCH: getattr(row, "watch_pseudonym", None),
        WATCH_MANUFACTURER: getattr(row, "watch_manufacturer", None),
        WATCH_PRODUCT: getattr(row, "watch_product", None),
        WATCH_FIRMWARE: getattr(row, "watch_firmware", None),
    }
    if share_serial:
        tags[WATCH_SERIAL] = getattr(row, "watch_serial", None)
    return {k: str(v) for k, v in tags.items() if v}


def summary_key(row: Any) -> str | None:
    """The key of a file's per-participant summary: its participant id (None: the file has none).

    The hook for per-participant daily summaries: group files by this key (and the day), and tag
    each summary run with :func:`summary_tags` of the key.
    """
    value = getattr(row, "participant", None)
    return str(value) if value else None


def summary_tags(key: str) -> dict[str, str]:
    """Tags a per-participant summary run must carry (``har-edge forget`` deletes runs by them)."""
    return {PARTICIPANT: key}
