"""``har-edge doctor``: check this device end to end, one line per check, each with its fix.

Like ``iotedge check``: every check runs (a failure does not hide the next
one) and answers OK, WARN or FAIL; the command exits 1 when any check
FAILed (:class:`har_edge.common.cli.Exit`), ``--json`` prints the same as one
document. The checks read; none changes the data dir, except a probe file in
it and, when a registry is set, a temporary download of its newest release.

It sits at the top layer beside :mod:`har_edge.cli`: it checks the agent's
side (settings, data dir, outbox, model, clock, inotify) and sync's (MLflow,
the model registry and its DVC remote).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from har_edge.agent.errors import HarEdgeError, ModelError
from har_edge.agent.settings import Settings
from har_edge.common.cli import Exit, add_command

OK, WARN, FAIL = "OK", "WARN", "FAIL"

#: free space under which the data dir FAILs (the agent cannot store a day of windows)
MIN_FREE_BYTES = 100 * 1024 * 1024
#: the agent needs one inotify instance and one watch; a host with fewer spare ones than this WARNs
SPARE_INSTANCES = 2
INOTIFY_DIR = Path("/proc/sys/fs/inotify")


@dataclass(frozen=True)
class Result:
    check: str
    status: str  # OK | WARN | FAIL
    message: str
    fix: str = ""


# -- checks: each takes what it needs and returns one Result ------------------------------------


def check_settings(settings: Settings, config: Path | None = None) -> Result:
    where = f"from {config}" if config else "defaults and HAR_EDGE_* variables"
    if any(c in settings.device for c in "'\"\\"):
        return Result(
            "settings",
            FAIL,
            f"device id {settings.device!r} holds a quote or backslash: sync cannot name its runs",
            "set device_id (HAR_EDGE_DEVICE_ID) to letters, digits, '-', '_' or '.'",
        )
    http = settings.http.address or "off"
    return Result("settings", OK, f"valid ({where}); device {settings.device}; http.address {http}")


def check_data_dir(data_dir: Path, *, min_free: int = MIN_FREE_BYTES, budget_bytes: float | None = None) -> Result:
    d = Path(data_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".doctor-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Result(
            "data dir",
            FAIL,
            f"{d} is not writable: {exc.strerror or exc}",
            f"make {d} a writable folder for the agent's user, or set data_dir (HAR_EDGE_DATA_DIR)",
        )
    free = shutil.disk_usage(d).free
    msg = f"{d} writable, {free / 1e9:.1f} GB free"
    if free < min_free:
        return Result(
            "data dir",
            FAIL,
            msg + f" (under {min_free / 1e6:.0f} MB)",
            "free space on that file system or move data_dir",
        )
    if budget_bytes is not None and free < budget_bytes:
        return Result(
            "data dir",
            WARN,
            msg + f", less than the outbox budget agent.outbox_max_mb = {budget_bytes / 1e6:.0f} MB",
            "free space, or lower agent.outbox_max_mb so ingestion pauses before the disk fills",
        )
    return Result("data dir", OK, msg)


def check_outbox(path: Path) -> Result:
    from har_edge.agent.outbox import SCHEMA_VERSION

    p = Path(path)
    if not p.exists():
        return Result("outbox", OK, f"{p} does not exist yet: the agent creates it on its first file")
    fix = f"stop the agent and sync, move {p.name} (with its -wal and -shm) aside and restart: a new one is made"
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10.0)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
            found = None
            if rows == ["ok"]:
                has = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
                ).fetchone()
                found = conn.execute("SELECT version FROM schema_version").fetchone()[0] if has else None
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Result("outbox", FAIL, f"{p} cannot be read as SQLite: {exc}", fix)
    if rows != ["ok"]:
        return Result("outbox", FAIL, f"{p} fails PRAGMA quick_check: {'; '.join(map(str, rows[:3]))}", fix)
    if found != SCHEMA_VERSION:
        return Result(
            "outbox",
            FAIL,
            f"{p} has schema version {found}, this har-edge uses {SCHEMA_VERSION}",
            "run the har-edge version that wrote it to deliver its backlog, or move the file away",
        )
    return Result("outbox", OK, f"{p}: quick_check ok, schema version {found}, {p.stat().st_size / 1e6:.1f} MB")


def check_model(settings: Settings) -> Result:
    """The model the agent would run (``agent.model_dir``, else ``models/current``, else the bundled one), verified."""
    from har_edge.agent.model import load_model
    from har_edge.agent.modelstore import choose_model

    a = settings.agent
    choice = choose_model(settings.models_dir, a.model_dir)
    folder, source = choice.folder, choice.source
    try:
        m = load_model(folder, threads=a.threads, batch=a.batch)
    except ModelError as exc:
        fix = (
            "fix or unset agent.model_dir"
            if source == "agent.model_dir"
            else "`har-edge models rollback`, or re-install it (`har-edge models verify` tells more); "
            "meanwhile the agent runs the bundled model"
        )
        return Result("model", FAIL, f"{source} {folder}: {exc}", fix)
    return Result(
        "model",
        OK,
        f"{m.label} ({source}, {m.runner.runtime}): sha256 {m.manifest.sha256[:12]}…, shapes and golden windows check",
    )


def check_mlflow(settings: Settings) -> Result:
    try:
        from har_edge.sync.errors import ServerAccessDenied, ServerRejected, ServerUnreachable
        from har_edge.sync.mlflow_client import make_client, resolve_target
        from har_edge.sync.retry import translate
    except ImportError as exc:
        return Result("mlflow", WARN, f"the sync packages are not installed ({exc})", "pip install 'har-edge[edge]'")
    target = resolve_target(settings)
    if not target.configured:
        return Result("mlflow", OK, f"local store {target.display} (no server configured: sync.tracking_uri)")
    name = settings.sync.experiment
    try:
        client = make_client(settings, target)
        exp = client.get_experiment_by_name(name)
    except Exception as exc:
        err = translate(exc, f"looking up experiment {name!r}", target.display)
        if err is None:
            raise
        if isinstance(err, ServerUnreachable):
            return Result(
                "mlflow",
                FAIL,
                str(err),
                "check sync.tracking_uri and that the server runs and is reachable from here",
            )
        if isinstance(err, (ServerAccessDenied, ServerRejected)):
            return Result(
                "mlflow",
                FAIL,
                str(err),
                "check the credentials: sync.username/password or token (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN)",
            )
        return Result("mlflow", FAIL, str(err), "check sync.tracking_uri")
    if exp is None:
        return Result("mlflow", OK, f"{target.display} answers; experiment {name!r} is created on the first push")
    if exp.lifecycle_stage == "deleted":
        return Result(
            "mlflow",
            FAIL,
            f"experiment {name!r} is deleted on {target.display}",
            "restore it (mlflow experiments restore) or set sync.experiment to another name",
        )
    return Result("mlflow", OK, f"{target.display} answers; experiment {name!r} (id {exp.experiment_id}) is readable")


def check_registry(settings: Settings, *, fetch: bool = True) -> Result:
    s = settings.sync
    if not s.registry:
        return Result("registry", OK, "none (sync.registry is not set: the agent keeps its current model)")
    try:
        from har_edge.sync.errors import RegistryError
        from har_edge.sync.registry import Registry
    except ImportError as exc:
        return Result("registry", WARN, f"the sync packages are not installed ({exc})", "pip install 'har-edge[edge]'")
    reg = Registry.from_settings(settings)
    try:
        releases = reg.releases()
    except RegistryError as exc:
        return Result("registry", FAIL, str(exc), "check sync.registry, the network and the git credentials")
    if not releases:
        return Result(
            "registry",
            WARN,
            f"{reg.display} answers but holds no release of {s.model_name}",
            "release one with `har-train release`, or check sync.model_name",
        )
    newest = releases[-1]
    if not fetch:
        return Result("registry", OK, f"{reg.display}: {len(releases)} release(s), newest {newest.tag}")
    tmp = Path(tempfile.mkdtemp(prefix=".doctor-", dir=settings.data_dir))
    try:
        reg.fetch(newest, tmp / "model")
    except RegistryError as exc:
        return Result(
            "registry",
            FAIL,
            f"{reg.display} lists {len(releases)} release(s) but the DVC remote did not serve {newest.tag}: {exc}",
            "check the DVC remote (sync.registry_remote_url, its credentials) and that the release was pushed",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Result(
        "registry", OK, f"{reg.display}: {len(releases)} release(s); the DVC remote served the newest, {newest.tag}"
    )


def build_time(reference: Path | None = None) -> float:
    """The latest of: the mtime of the installed ``har_edge/__init__.py`` and the bundled model's ``created``."""
    import har_edge
    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.model import BUNDLED_MODEL_DIR

    ref = reference or Path(har_edge.__file__)
    times = [ref.stat().st_mtime]
    if reference is None:
        try:
            created = read_manifest(BUNDLED_MODEL_DIR).created
            if created:
                times.append(datetime.fromisoformat(created).timestamp())
        except (ModelError, ValueError):
            pass
    return max(times)


def check_clock(now: float | None = None, *, built: float | None = None) -> Result:
    now = time.time() if now is None else now
    built = build_time() if built is None else built
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    if now < built - 60:
        return Result(
            "clock",
            FAIL,
            f"the clock says {stamp}, before this har-edge was built "
            f"({datetime.fromtimestamp(built, UTC).isoformat(timespec='seconds')}): results would carry wrong times",
            "set the time (timedatectl set-ntp true, or an NTP client such as chrony) and restart the agent",
        )
    return Result("clock", OK, f"{stamp} (after the build time of this har-edge)")


def _used_inotify_instances(uid: int, proc: Path = Path("/proc")) -> int | None:
    """inotify instances open by processes of ``uid`` (None when /proc cannot tell)."""
    used = 0
    try:
        pids = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if pid.stat().st_uid != uid:
                continue
            for fd in (pid / "fd").iterdir():
                try:
                    if os.readlink(fd) == "anon_inode:inotify":
                        used += 1
                except OSError:
                    continue
        except OSError:
            continue
    return used


def check_inotify(folder: Path = INOTIFY_DIR, *, used: int | None = None) -> Result:
    fix = (
        "raise them: sysctl -w fs.inotify.max_user_instances=512 fs.inotify.max_user_watches=65536 "
        "(and in /etc/sysctl.d/ to keep it)"
    )
    try:
        watches = int((folder / "max_user_watches").read_text().strip())
        instances = int((folder / "max_user_instances").read_text().strip())
    except (OSError, ValueError) as exc:
        return Result(
            "inotify", WARN, f"limits not readable under {folder} ({exc}): the agent falls back on polling if needed"
        )
    if used is None and folder == INOTIFY_DIR:
        used = _used_inotify_instances(os.getuid())
    msg = f"max_user_watches {watches}, max_user_instances {instances}"
    if used is not None:
        msg += f", {used} instance(s) in use by this user"
    if watches < 1 or instances < 1 or (used is not None and used >= instances):
        return Result("inotify", FAIL, msg + ": the agent cannot watch its inbox", fix)
    if used is not None and instances - used < SPARE_INSTANCES:
        return Result("inotify", WARN, msg + ": nearly all instances taken", fix)
    return Result("inotify", OK, msg)


# -- the command -------------------------------------------------------------------------------------


def run_checks(settings: Settings, config: Path | None = None) -> list[Result]:
    checks: list[tuple[str, Callable[[], Result]]] = [
        ("settings", lambda: check_settings(settings, config)),
        ("data dir", lambda: check_data_dir(settings.data_dir, budget_bytes=settings.agent.outbox_max_mb * 1e6)),
        ("outbox", lambda: check_outbox(settings.outbox_path)),
        ("model", lambda: check_model(settings)),
        ("mlflow", lambda: check_mlflow(settings)),
        ("registry", lambda: check_registry(settings)),
        ("clock", check_clock),
        ("inotify", check_inotify),
    ]
    out = []
    for name, check in checks:
        try:
            out.append(check())
        except (HarEdgeError, OSError) as exc:  # a check that cannot even run is a failure, not a crash
            out.append(Result(name, FAIL, f"could not be checked: {exc}", "see the message"))
    return out


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    results = run_checks(settings, getattr(args, "config", None))
    if args.json:
        print(json.dumps({"checks": [asdict(r) for r in results]}, indent=2))
    else:
        width = max(len(r.check) for r in results)
        for r in results:
            fix = f" -- fix: {r.fix}" if r.fix and r.status != OK else ""
            print(f"{r.status:<4}  {r.check:<{width}}  {r.message}{fix}")
        sys.stdout.flush()
    return Exit.FAILED if any(r.status == FAIL for r in results) else Exit.OK


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    """Add ``doctor`` to the ``har-edge`` parser."""
    p = add_command(
        subparsers,
        "doctor",
        cmd_doctor,
        "check settings, data dir, outbox, model, MLflow, registry, clock and inotify; exit 1 on any FAIL",
        parents,
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of one line per check")
