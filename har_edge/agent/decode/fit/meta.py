"""A FIT recording's meta dict (engine, message counts, sources, device, times), the same from both engines.

Local time: ``utc_offset_s`` (local time minus UTC, seconds) and ``utc_offset_source`` say where the file
states it, first found of ``activity.local_timestamp`` minus ``activity.timestamp``,
``device_settings.time_offset`` (of the active time zone) and ``device_settings.time_zone_offset``. Files
that state none leave both out; stored times stay UTC either way.
"""

from __future__ import annotations

from typing import Any

from har_edge.agent.decode.fit.profile import mesg_name, type_name
from har_edge.agent.decode.fit.samples import SYSTEM_TIME_MAX, Source
from har_edge.agent.decode.types import FIT_EPOCH_S

#: field number -> values, as both engines hand over file_id and device_info messages
Fields = dict[int, list[Any]]


def _first(values: Fields, num: int) -> object:
    vals = values.get(num) or [None]
    return vals[0]


def _device(
    values: Fields, manufacturer_field: int, product_field: int, serial_field: int, software_field: int | None = None
) -> dict[str, object]:
    manufacturer = _first(values, manufacturer_field)
    named = type_name("manufacturer", manufacturer) if manufacturer is not None else None
    out: dict[str, object] = {
        "manufacturer": named if named is not None else manufacturer,
        "product": _first(values, product_field),
        "serial_number": _first(values, serial_field),
    }
    if software_field is not None:
        out["software_version"] = _software_version(_first(values, software_field))
    if manufacturer == 1 and out["product"] is not None:  # garmin: product names are known
        out["product_name"] = type_name("garmin_product", out["product"])
    return {k: v for k, v in out.items() if v is not None}


def _software_version(raw: object) -> float | None:
    """device_info.software_version as the watch shows it: the field holds hundredths (1250 is 12.50)."""
    if not isinstance(raw, (int, float)) or isinstance(raw, bool):
        return None
    return round(float(raw) / 100, 2) if isinstance(raw, int) else round(float(raw), 2)


def _time_created_ms(created: object, correlation: int | None) -> int | None:
    """file_id.time_created in Unix ms; device time (below 0x10000000) only through the correlation."""
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        return None
    ms = (int(created) + FIT_EPOCH_S) * 1000
    if created < SYSTEM_TIME_MAX:
        return ms + correlation if correlation is not None else None
    return ms


#: offsets beyond these are not a time zone (UTC-12 ... UTC+14)
_OFFSET_MIN_S, _OFFSET_MAX_S = -12 * 3600, 14 * 3600


def _signed32(value: object) -> int | None:
    """A uint32 field holding a signed offset (two's complement), as int; None when not a number."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value - (1 << 32) if value >= 1 << 31 else value


def _zone(offset_s: int | None) -> int | None:
    if offset_s is None or not _OFFSET_MIN_S <= offset_s <= _OFFSET_MAX_S:
        return None
    return offset_s


def local_offset(
    device_settings: list[Fields], activities: list[Fields], correlation: int | None
) -> tuple[int, str] | None:
    """(local time minus UTC in seconds, where the file says so), or None when it does not."""
    for values in activities:
        local, stamp = _first(values, 5), _first(values, 253)
        utc_ms = _time_created_ms(stamp, correlation)
        if isinstance(local, int) and not isinstance(local, bool) and utc_ms is not None:
            offset = _zone(round(((local + FIT_EPOCH_S) * 1000 - utc_ms) / 60_000) * 60)
            if offset is not None:
                return offset, "activity.local_timestamp"
    for values in device_settings:
        active = _first(values, 0)
        offsets = values.get(2) or []
        index = active if isinstance(active, int) and 0 <= active < len(offsets) else 0
        offset = _zone(_signed32(offsets[index])) if offsets else None
        if offset is not None:
            return offset, "device_settings.time_offset"
        zones = values.get(5) or []
        quarter_hours = zones[index] if index < len(zones) else (zones[0] if zones else None)
        if isinstance(quarter_hours, int) and not isinstance(quarter_hours, bool):
            offset = _zone(quarter_hours * 900)  # sint8, scale 4: quarter hours
            if offset is not None:
                return offset, "device_settings.time_zone_offset"
    return None


def recording_meta(
    engine: str,
    counts: dict[int, int],
    file_ids: list[Fields],
    device_infos: list[Fields],
    accel: Source,
    gyro: Source | None,
    correlation: int | None,
    notes: list[str],
    *,
    device_settings: list[Fields] | None = None,
    activities: list[Fields] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "engine": engine,
        "message_counts": {mesg_name(g): n for g, n in sorted(counts.items())},
        "accel_source": f"{mesg_name(accel.mesg)}.{accel.name}",
        "gyro_source": f"{mesg_name(gyro.mesg)}.{gyro.name}" if gyro else None,
    }
    if file_ids:
        meta["device"] = _device(file_ids[0], 1, 2, 3)
        created = _time_created_ms(_first(file_ids[0], 4), correlation)
        if created is not None:
            meta["time_created_ms"] = created
    devices = [_device(v, 2, 4, 3, 5) for v in device_infos]
    if devices:
        meta["devices"] = [d for d in devices if d][:8]
    if correlation is not None:
        meta["timestamp_correlation_ms"] = correlation
    local = local_offset(device_settings or [], activities or [], correlation)
    if local is not None:
        meta["utc_offset_s"], meta["utc_offset_source"] = local
    if notes:
        meta["notes"] = notes
    return meta
