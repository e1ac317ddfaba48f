"""``python -m har_edge.central up|add-device|backup``: the central stack from the command line (``make central``).

- ``up`` starts PostgreSQL, SeaweedFS and MLflow under ``--root`` and keeps them
  running until SIGTERM or Ctrl-C; ``stack.json`` there says where each listens.
- ``add-device NAME`` makes the device's account and experiment on a running
  stack (``--root``) or on any server (``--url``, admin password from
  ``MLFLOW_TRACKING_PASSWORD``) and writes the device's settings to a 0600
  TOML file; the password is printed nowhere.
- ``backup DEST`` writes ``pg_dump`` files of both databases.

Exit codes are the shared table (:mod:`har_edge.common.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from har_edge.central.accounts import Admin, write_device_config
from har_edge.central.errors import CentralError
from har_edge.central.stack import STATE_FILE, CentralStack, StackOptions
from har_edge.common import telemetry
from har_edge.common.cli import Exit, stop_event

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("var/central")


def _state(root: Path) -> dict[str, object]:
    path = root / STATE_FILE
    if not path.exists():
        raise CentralError(
            f"{path} does not exist: start the stack first (python -m har_edge.central up --root {root})"
        )
    state: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return state


def cmd_up(args: argparse.Namespace) -> int:
    options = StackOptions(
        host=args.host,
        mlflow_port=args.port,
        postgres_port=args.postgres_port,
        s3_port=args.s3_port,
        workers=args.workers,
        auth=not args.no_auth,
        auth_cache_ttl_s=args.auth_cache_ttl,
        tls=args.tls,
        bucket=args.bucket,
    )
    stack = CentralStack(args.root, options)
    stop = stop_event()
    with stack:
        t = stack.timings
        print(f"central stack up in {t['total_s']:.1f} s: MLflow {stack.url} ({options.workers} workers"
              f"{', basic-auth' if options.auth else ', NO auth'}), PostgreSQL 127.0.0.1:{stack.postgres.port}, "
              f"S3 {stack.store.endpoint} bucket {stack.bucket}")  # fmt: skip
        if options.auth:
            print(f"admin user 'admin', password in {stack.root / 'secrets' / 'mlflow-admin-password'}")
        if stack.ca_path:
            print(f"devices trust {stack.ca_path} (sync.server_cert_path)")
        print(f"state in {stack.root / STATE_FILE}; logs in {stack.root / 'logs'}; Ctrl-C stops")
        sys.stdout.flush()
        while not stop.is_set():
            if not stack.mlflow.service or not stack.mlflow.service.running():
                print("the MLflow server exited; stopping the stack", file=sys.stderr)
                return Exit.FAILED
            stop.wait(2.0)
    return Exit.OK


def _admin(args: argparse.Namespace) -> tuple[Admin, str, Path | None]:
    if args.url:
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if not password:
            raise CentralError("--url needs the admin password in MLFLOW_TRACKING_PASSWORD")
        ca = Path(args.ca) if args.ca else None
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "admin")
        return Admin(args.url, password, username=user, verify=str(ca) if ca else True), args.url, ca
    state = _state(args.root)
    pw_file = state.get("admin_password_file")
    if not isinstance(pw_file, str):
        raise CentralError(f"the stack at {args.root} runs without auth: there are no accounts to make")
    ca = Path(str(state["ca"])) if state.get("ca") else None
    url = str(state["url"])
    password = Path(pw_file).read_text(encoding="utf-8").strip()
    return Admin(url, password, verify=str(ca) if ca else True), url, ca


def cmd_add_device(args: argparse.Namespace) -> int:
    admin, url, ca = _admin(args)
    account = admin.add_device(args.name, rotate=args.rotate)
    dest = Path(args.out) if args.out else Path(f"{args.name}.har-edge.toml")
    write_device_config(account, url, dest, ca)
    print(f"device {account.device}: MLflow user and experiment {account.experiment!r} (id {account.experiment_id}), "
          f"MANAGE on it only; its settings (with the password) are in {dest} (mode 0600): "
          f"copy it to the device as <data dir>/har-edge.toml")  # fmt: skip
    return Exit.OK


def cmd_backup(args: argparse.Namespace) -> int:
    from har_edge.central.postgres import DATABASES, Postgres

    state = _state(args.root)
    pg_state = state["postgres"]
    assert isinstance(pg_state, dict)
    pg = Postgres(args.root, port=int(pg_state["port"]))
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for db in DATABASES:
        out = pg.dump(db, dest / f"{db}-{stamp}.dump")
        print(f"{db}: {out} ({out.stat().st_size} bytes)")
    return Exit.OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m har_edge.central", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def root(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the stack's folder (default var/central)")

    up = sub.add_parser("up", help="start PostgreSQL, SeaweedFS and MLflow; run until SIGTERM/Ctrl-C")
    root(up)
    up.add_argument("--host", default="127.0.0.1", help="address MLflow listens on (0.0.0.0 for devices elsewhere)")
    up.add_argument("--port", type=int, default=5000, help="MLflow's port (default 5000)")
    up.add_argument("--postgres-port", type=int, default=None, help="PostgreSQL's port (default: a free one)")
    up.add_argument("--s3-port", type=int, default=None, help="the S3 gateway's port (default: a free one)")
    up.add_argument("--workers", type=int, default=2, help="MLflow (uvicorn) worker processes")
    up.add_argument("--no-auth", action="store_true", help="without basic-auth (measurements only)")
    up.add_argument(
        "--auth-cache-ttl",
        type=int,
        default=0,
        help="seconds a worker trusts a checked password (0: check each request)",
    )
    up.add_argument(
        "--tls", action="store_true", help="serve HTTPS with a certificate from a private CA under <root>/tls"
    )
    up.add_argument("--bucket", default="har-edge", help="the S3 bucket for artifacts")
    up.set_defaults(func=cmd_up)

    add = sub.add_parser("add-device", help="an MLflow account and experiment for one device")
    root(add)
    add.add_argument("name", help="the device id (also its user name and experiment har-edge/<name>)")
    add.add_argument("--url", help="an MLflow server not started here (admin password in MLFLOW_TRACKING_PASSWORD)")
    add.add_argument("--ca", help="with --url: the CA bundle that server's certificate is signed by")
    add.add_argument("--out", help="the device settings file to write (default ./<name>.har-edge.toml)")
    add.add_argument("--rotate", action="store_true", help="the user exists: give it a new password")
    add.set_defaults(func=cmd_add_device)

    bk = sub.add_parser("backup", help="pg_dump both databases of a running stack into DEST")
    root(bk)
    bk.add_argument("dest", help="folder for the dump files")
    bk.set_defaults(func=cmd_backup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    telemetry.opt_out()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CentralError as exc:
        print(f"har_edge.central: {exc}", file=sys.stderr)
        return Exit.FAILED
