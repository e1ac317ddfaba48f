"""``har-edge sync run|once`` and ``har-edge models list|verify|pin|rollback``.

Each command is a function ``(settings, args) -> exit code`` (the table is in
:mod:`har_edge.common.cli`: 1 something was refused or failed a check, 3 a
configured server or registry could not be reached; bad settings are raised as
ConfigError and become 2 in :mod:`har_edge.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from har_edge.agent.settings import Settings
from har_edge.common.cli import Exit, add_command, stop_event
from har_edge.sync.errors import RegistryError, RegistryUnreachable, ServerAccessDenied, ServerUnreachable, SyncError

if TYPE_CHECKING:
    from har_edge.sync.models import ModelManager

log = logging.getLogger(__name__)


# -- sync ------------------------------------------------------------------------------


def cmd_sync_run(settings: Settings, args: argparse.Namespace) -> int:
    from har_edge.sync.daemon import SyncDaemon

    daemon = SyncDaemon(settings)
    if args.check_config:
        reg = daemon.models.registry.display if daemon.models.registry else "none (sync.registry)"
        print(
            f"settings OK; push to {daemon.pusher.target.display} (experiment {settings.sync.experiment}); "
            f"models from {reg}; raw custody to "
            + (daemon.custody.store.display if daemon.custody else "none (sync.raw_store)")
        )
        return Exit.OK
    daemon.run(stop_event())
    return Exit.OK


def cmd_sync_once(settings: Settings, args: argparse.Namespace) -> int:
    """One push, one pull and (with sync.raw_store) one custody pass; print what was delivered and fetched."""
    from har_edge.sync.daemon import SyncDaemon
    from har_edge.sync.passes import record

    daemon = SyncDaemon(settings)
    now = time.time()
    code = Exit.OK
    push = record(daemon.outbox, "push", daemon.push_job(now))
    target = daemon.pusher.target
    if push.report is not None:
        r = push.report
        print(f"pushed to {target.display}: {r.summary()}")
        b = r.backlog
        print(f"  still pending: {b['files']} files, {b['points']} points, {b['deployments']} deployments")
        if r.refused:
            code = Exit.FAILED
            for item in r.refused[:20]:
                print(f"  refused by the server: {item}")
    elif push.error is not None:
        print(f"push: {push.error}")
        if isinstance(push.error, (ServerUnreachable, ServerAccessDenied)) and target.configured:
            code = Exit.UNREACHABLE
        elif not isinstance(push.error, (ServerUnreachable, ServerAccessDenied)):
            code = Exit.FAILED
    pull = record(daemon.outbox, "pull", daemon.pull_job(now))
    if pull.report is not None:
        p = pull.report
        if p.releases:
            reg = daemon.models.configured_registry()  # releases were listed: a registry is configured
            print(f"registry {reg.display}: {len(p.releases)} release(s), newest {p.releases[-1]}")
        print(f"models: {p.summary()}")
        if p.refused or p.rolled_back:
            code = code or Exit.FAILED
    elif pull.error is not None:
        print(f"models: {pull.error}")
        code = Exit.UNREACHABLE if isinstance(pull.error, RegistryError) else (code or Exit.FAILED)
    if daemon.custody is not None:  # raw custody (sync.raw_store): one pass
        custody = record(daemon.outbox, "custody", daemon.custody_job(now))
        if custody.report is not None:
            print(f"raw custody to {daemon.custody.store.display}: {custody.report.summary()}")
            for item in custody.report.failed[:20]:
                print(f"  not delivered: {item}")
        if custody.error is not None:
            if custody.report is None:
                print(f"raw custody: {custody.error}")
            unreachable = isinstance(custody.error, (ServerUnreachable, ServerAccessDenied))
            code = code or (Exit.UNREACHABLE if unreachable else Exit.FAILED)
    return code


# -- models ------------------------------------------------------------------------------


def _manager(settings: Settings) -> ModelManager:
    from har_edge.sync.models import ModelManager

    return ModelManager(settings)


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    mm = _manager(settings)
    state = mm.state()
    cur, prev = mm.pointers()
    cur_m, prev_m = mm.manifest_of(cur), mm.manifest_of(prev)
    rows: dict[str, dict[str, Any]] = {}
    code = Exit.OK
    note = ""
    if mm.registry is not None:
        try:
            for rel in mm.registry.releases():
                rows[rel.version] = {
                    "version": rel.version,
                    "state": "available",
                    "detail": f"tag {rel.tag} {rel.commit[:10]}",
                }
        except RegistryError as exc:
            note = f"registry not listed: {exc}"
            code = Exit.UNREACHABLE
    for version, rf in state.refused.items():
        rows[version] = {"version": version, "state": "refused", "detail": rf.reason}
    if prev_m is not None and cur is not None:  # no previous pointer: a rollback goes to the bundled model
        where = f"models/{prev}" if prev else "bundled with har-edge"
        rows[prev_m.version] = {"version": prev_m.version, "state": "previous", "detail": where}
    if cur_m is not None:
        where = f"models/{cur}" if cur else "bundled with har-edge"
        rows[cur_m.version] = {"version": cur_m.version, "state": "active", "detail": where}
    pin = mm.pin(state)
    if pin:
        rows.setdefault(pin, {"version": pin, "state": "not released", "detail": ""})["pinned"] = True
    if state.probation is not None and state.probation.version in rows:
        rows[state.probation.version]["detail"] += " (on probation: health gate pending)"
    from har_edge.common.versions import parse_version

    released = [(k, r) for r in rows.values() if (k := parse_version(r["version"])) is not None]
    ordered = [r for _, r in sorted(released, key=lambda kr: kr[0], reverse=True)]  # newest first
    ordered += sorted((r for r in rows.values() if parse_version(r["version"]) is None), key=lambda r: r["version"])
    if args.json:
        print(json.dumps({"models": ordered, "pin": pin, "note": note}, indent=2))
        return code
    width = max([len(r["version"]) for r in ordered] + [7])
    print(f"{'VERSION':<{width}}  {'STATE':<12}  DETAIL")
    for r in ordered:
        state_txt = r["state"] + (" pinned" if r.get("pinned") else "")
        print(f"{r['version']:<{width}}  {state_txt:<12}  {r['detail']}")
    if note:
        print(note)
    return code


def cmd_models_verify(settings: Settings, args: argparse.Namespace) -> int:
    mm = _manager(settings)
    if args.release:
        return _verify_release(mm, args.release)
    from har_edge.sync.trust import BUNDLED, TRUSTED

    failed = 0
    signatures = dict(mm.signature_states(args.version))
    for folder, version, problem in mm.verify_installed(args.version):
        verdict = signatures[folder]
        if problem:
            failed += 1
            print(f"{folder}: FAILED: {problem}")
        else:
            print(f"{folder}: OK ({version}: sha256, shapes, labels and golden windows check out)")
        bad = mm.trust.enforced and verdict.state not in (TRUSTED, BUNDLED)
        failed += bool(bad and not problem)
        print(f"{folder}: signature {verdict.describe()}" + (" (sync.trusted_keys is set: FAILED)" if bad else ""))
    return Exit.FAILED if failed else Exit.OK


def _verify_release(mm: ModelManager, version: str) -> int:
    from har_edge.agent.errors import ModelError

    if mm.registry is None:
        raise SyncError("no registry configured (sync.registry)")
    try:
        rel = next((r for r in mm.registry.releases() if r.version == version), None)
    except RegistryError as exc:
        print(f"registry: {exc}")
        return Exit.UNREACHABLE
    if rel is None:
        print(f"{version} is not released in {mm.registry.display}")
        return Exit.FAILED
    staging = mm.models_dir / f".verify-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        folder = mm.registry.fetch(rel, staging / "model")
        print(f"{rel.tag}: signature {mm.trust.examine(folder, (rel.name, rel.version)).describe()}")
        mm.verify(folder, rel)
        mm.validate(folder)
    except RegistryError as exc:
        print(f"{rel.tag}: {exc}")
        return Exit.UNREACHABLE
    except ModelError as exc:
        print(f"{rel.tag}: FAILED: {exc}")
        return Exit.FAILED
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{rel.tag}: OK (verified and validated; not activated)")
    return Exit.OK


def cmd_models_pin(settings: Settings, args: argparse.Namespace) -> int:
    mm = _manager(settings)
    if args.clear:
        old = mm.unpin()
        print(f"unpinned {old}; the newest release is deployed on the next pull" if old else "nothing was pinned")
        if settings.sync.pin:
            print(f"note: sync.pin = {settings.sync.pin} in the settings still pins it")
        return Exit.OK
    if not args.version:
        raise SyncError("give a version to pin, or --clear")
    try:
        report = mm.pin_version(args.version, time.time())
    except RegistryUnreachable as exc:
        print(f"models: {exc}")
        return Exit.UNREACHABLE
    for version, reason in report.refused:
        print(f"refused {version}: {reason}")
    if report.refused:
        return Exit.FAILED
    print(f"pinned {args.version}: {report.summary()}")
    return Exit.OK


def cmd_models_rollback(settings: Settings, args: argparse.Namespace) -> int:
    mm = _manager(settings)
    report = mm.rollback(time.time(), reason=args.reason)
    cur = mm.manifest_of(mm.pointers()[0])
    print(
        f"rolled back {report.rolled_back}; active now: {cur.version if cur else '?'} "
        f"({mm.pointers()[0] or 'bundled'}); {report.rolled_back} is refused until re-released or pinned"
    )
    return Exit.OK


# -- parser -------------------------------------------------------------------------------


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    """Add ``sync run|once`` and ``models list|verify|pin|rollback`` to the ``har-edge`` parser."""
    sync = add_command(subparsers, "sync", None, "deliver the outbox to MLflow and fetch new models", parents)
    ssub = sync.add_subparsers(dest="sync_command", required=True, metavar="COMMAND")
    run = add_command(
        ssub, "run", cmd_sync_run, "push and pull on a schedule until SIGTERM (finishes the current batch)", parents
    )
    run.add_argument("--check-config", action="store_true", help="print where it would push and pull, then exit 0")
    add_command(
        ssub,
        "once",
        cmd_sync_once,
        "one push and one pull; exit 3 if a configured server could not be reached",
        parents,
    )

    models = add_command(subparsers, "models", None, "see and steer the deployed model", parents)
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    ls = add_command(msub, "list", cmd_models_list, "released, active, previous, refused and pinned versions", parents)
    ls.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    ver = add_command(
        msub, "verify", cmd_models_verify, "check installed models (sha256, shapes, labels, golden windows)", parents
    )
    ver.add_argument("version", nargs="?", help="only this installed version (default: active and previous)")
    ver.add_argument("--release", metavar="VERSION", help="fetch this release and check it without activating it")
    pin = add_command(
        msub,
        "pin",
        cmd_models_pin,
        "activate exactly NAME@VERSION (or VERSION of sync.model_name) and stay on it (--clear: follow the newest)",
        parents,
    )
    pin.add_argument("version", nargs="?", metavar="NAME@VERSION", help="the released model to activate and stay on")
    pin.add_argument("--clear", action="store_true", help="remove the pin")
    rb = add_command(
        msub, "rollback", cmd_models_rollback, "switch back to the previous model and refuse the active one", parents
    )
    rb.add_argument("--reason", default="rolled back by a person", help="recorded with the deployment")
