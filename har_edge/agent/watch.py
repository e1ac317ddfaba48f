"""The source watch of an export: manufacturer, product, serial and firmware, from its recordings' metadata.

FIT files name the watch in ``file_id`` (manufacturer, product, serial) and ``device_info``
(the same, plus ``software_version``: the firmware); the decoders keep both in
``Recording.meta["device"]`` and ``meta["devices"]``, FitCSVTool CSVs of the ``-b`` layout too.
Study tables carry no watch: they get none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from har_edge.agent.decode.types import Recording


@dataclass(frozen=True)
class Watch:
    """The watch that recorded an export; every part may be unknown (None)."""

    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None
    firmware: str | None = None


def _text(value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _product(d: Mapping[str, Any]) -> str | None:
    return _text(d.get("product_name")) or _text(d.get("product"))


def watch_of_meta(meta: Mapping[str, Any]) -> Watch | None:
    """The watch a recording's meta names (file_id first, device_info for what it lacks), or None."""
    found = meta.get("device")
    device: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    infos: list[Mapping[str, Any]] = [d for d in meta.get("devices") or [] if isinstance(d, Mapping)]
    serial = _text(device.get("serial_number"))
    # the device_info of the watch itself: the one with the file's serial, else the first
    mine = [d for d in infos if serial is not None and _text(d.get("serial_number")) == serial]
    info: Mapping[str, Any] = (mine or infos or [{}])[0]
    watch = Watch(
        manufacturer=_text(device.get("manufacturer")) or _text(info.get("manufacturer")),
        product=_product(device) or _product(info),
        serial=serial or _text(info.get("serial_number")),
        firmware=_text(info.get("software_version")),
    )
    return None if watch == Watch() else watch


def watch_of(recordings: Iterable[Recording]) -> Watch | None:
    """The watch of an export: that of its first recording that names one (a zip of several watches: the first)."""
    for rec in recordings:
        found = watch_of_meta(rec.meta)
        if found is not None:
            return found
    return None
