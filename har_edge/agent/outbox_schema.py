"""The outbox's tables, all of them: the agent's results, sync's delivery state and refusals, the agent's
bookkeeping of files in flight. The newest schema; :mod:`har_edge.agent.outbox_migrations` brings an older
file up to it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    # processed | failed | duplicate
    Column("status", String(16), nullable=False),
    Column("format", String(32)),
    Column("received_ms", BigInteger, nullable=False),
    Column("processed_ms", BigInteger, nullable=False),
    Column("decode_s", Float),
    Column("preprocess_s", Float),
    Column("inference_s", Float),
    Column("store_s", Float),
    Column("total_s", Float),
    Column("windows", Integer, nullable=False, default=0),
    Column("first_window_ms", BigInteger),
    Column("last_window_ms", BigInteger),
    Column("model_name", Text),
    Column("model_version", Text),
    Column("model_sha256", String(64)),
    Column("agent_version", Text, nullable=False),
    Column("error_kind", String(32)),
    Column("error_message", Text),
    Column("duplicate_of", Integer, ForeignKey("files.id")),
    # delivery (written by sync)
    Column("run_id", String(64)),
    Column("artifact_delivered_ms", BigInteger),
    Column("finished_ms", BigInteger),
    # v2: the stage an internal failure happened in (decode | preprocess | inference | store)
    Column("error_stage", String(16)),
    # v2: filled by the monitor
    Column("monitor_status", String(16)),
    Column("monitor_json", Text),
    # v3: local time minus UTC (s) where the export states it, and which field said so (NULL: it does not)
    Column("utc_offset_s", Integer),
    Column("utc_offset_source", String(40)),
    # v3: sync's pages (har_edge.sync.pages): the file's activity summary (JSON), when its table and timeline
    # reached the server (or were given up), when the daily page that counts it did
    Column("summary_json", Text),
    Column("pages_ms", BigInteger),
    Column("daily_ms", BigInteger),
    # v5: the source watch (FIT file_id/device_info, a table's metadata) and the participant (docs/privacy.md);
    # the raw serial stays on the device unless participants.share_serial
    Column("watch_manufacturer", Text),
    Column("watch_product", Text),
    Column("watch_serial", Text),
    Column("watch_firmware", Text),
    Column("watch_pseudonym", String(32)),
    Column("participant", Text),
    # folder | mapping | pseudonym
    Column("participant_source", String(16)),
)
Index("files_participant", files.c.participant)
Index("files_sha_processed", files.c.sha256, unique=True, sqlite_where=text("status = 'processed'"))
Index("files_undelivered", files.c.finished_ms, files.c.status)

windows = Table(
    "windows",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("start_ms", BigInteger, nullable=False),
    Column("label", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("probs", LargeBinary, nullable=False),  # float32 little-endian, one per label
)

labels = Table(
    "labels",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("label", Text, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE")),  # NULL: device-level
    Column("key", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("step", BigInteger, nullable=False, default=0),
    Column("delivered_ms", BigInteger),
)
Index("metrics_pending", metrics.c.delivered_ms, metrics.c.file_id)

deployments = Table(
    "deployments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    Column("from_version", Text),
    Column("to_version", Text),
    # activated | refused | rolled_back | load_failed | pinned | healthy (passed the health gate: criteria in reason)
    Column("outcome", String(32), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("delivered_ms", BigInteger),
)

#: items the server refused for good (a 4xx), written by sync; created by sync itself before v2
sync_refusals = Table(
    "sync_refusals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    # file | params | metrics | artifact | finish | deployment | device
    Column("kind", String(16), nullable=False),
    Column("file_id", Integer),  # NULL for device-level items
    Column("object", Text, nullable=False),
    Column("error", Text, nullable=False),
)

#: v2: one row per processing attempt of a file claimed into work/; deleted once the file left work/
attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    # the file in work/: name, size and mtime name it across restarts without hashing it
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    # last stage reached: claimed | decode | preprocess | inference | store
    Column("stage", String(16), nullable=False),
    # stage entries so far (grows with every chunk decoded and batch inferred)
    Column("progress", BigInteger, nullable=False, default=0),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("attempts_file", attempts.c.name, attempts.c.size, attempts.c.mtime_ns)

#: v2: when an inbox file was first seen settled but incomplete (the stale timer survives restarts)
inbox_seen = Table(
    "inbox_seen",
    metadata,
    Column("name", Text, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("first_seen_ms", BigInteger, nullable=False),
)

#: v2: how the sync daemon's passes went (push, pull, health), read by the agent's /metrics: one row per task
sync_passes = Table(
    "sync_passes",
    metadata,
    Column("task", Text, primary_key=True),
    Column("last_success_ms", BigInteger),
    Column("last_failure_ms", BigInteger),
    Column("last_error", Text),
)

#: v2: failed sync passes counted by task and error kind
sync_failures = Table(
    "sync_failures",
    metadata,
    Column("task", Text, primary_key=True),
    Column("kind", Text, primary_key=True),
    Column("count", BigInteger, nullable=False, default=0),
)

#: v2: scaled windows of a file kept for a retraining request (npz bytes: ``idx``, ``windows``)
flagged_windows = Table(
    "flagged_windows",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("npz", LargeBinary, nullable=False),
)

#: v2: device-level retraining requests raised by the monitor trigger (K of the last N files alerted)
retrain_requests = Table(
    "retrain_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    Column("files_json", Text, nullable=False),  # [{file_id, name, sha256, status, reasons}]
    Column("delivered_ms", BigInteger),
)

#: v4: raw custody, one row per file in archive/ (har_edge.sync.custody): its checksum and its upload to
#: ``sync.raw_store``; retention deletes a file only once its row is ``delivered`` to the configured store
raw_custody = Table(
    "raw_custody",
    metadata,
    # the file, relative to archive/ (posix); size and mtime say it is still the file that was hashed
    Column("path", Text, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("found_ms", BigInteger, nullable=False),
    # pending | uploading (a multipart upload or a partial copy is under way) | delivered
    Column("state", String(16), nullable=False),
    Column("store", Text),  # the raw_store URL the upload went (or goes) to
    Column("object_key", Text),  # the object's key (S3) or path (folder) inside the store
    Column("upload_id", Text),  # S3 multipart upload id
    Column("part_size", BigInteger),
    # parts the store acknowledged: [[number, etag, sha256 (base64)], ...]
    Column("parts_json", Text),
    Column("bytes_done", BigInteger, nullable=False, default=0),
    Column("delivered_ms", BigInteger),
    Column("checksum", Text),  # what the store reported and was compared (etag / sha256) at delivery
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
)
Index("raw_custody_state", raw_custody.c.state, raw_custody.c.store)
Index("raw_custody_sha", raw_custody.c.sha256)
#: v5: erasures asked for (`har-edge forget`) and not closed yet: the agent erases files of the participant that
#: were in flight when it was asked (received_ms <= requested_ms), sync never pushes them; the row is deleted
#: once nothing of the participant from before the request is left
forget_requests = Table(
    "forget_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("participant", Text, nullable=False),
    Column("requested_ms", BigInteger, nullable=False),
)
