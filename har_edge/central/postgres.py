"""PostgreSQL for the central MLflow: ``initdb`` + ``pg_ctl`` on 127.0.0.1 with its own data dir.

PostgreSQL refuses to run as root, so when this process is root the server
runs as the ``postgres`` system user (``runuser``) and its data dir is handed
to that user; otherwise it runs as the current user. Host connections need a
password (scram-sha-256): the superuser's and the ``mlflow`` role's are
generated into ``<root>/secrets/`` (:mod:`har_edge.central.secrets_store`).
MLflow gets the role's password through ``PGPASSWORD`` in its environment, so
no URI or command line ever carries it.

Two databases, both owned by ``mlflow``: ``mlflow`` (runs, metrics, registry)
and ``mlflow_auth`` (basic-auth users and permissions).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from har_edge.central.errors import ServiceStartError
from har_edge.central.process import free_port, port_open
from har_edge.central.secrets_store import secret

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

ROLE = "mlflow"
DATABASES = ("mlflow", "mlflow_auth")
RUN_AS_ROOT_USER = "postgres"


def pg_bindir() -> Path:
    """The folder of ``pg_ctl``: PG_BINDIR, else pg_config's, else the newest /usr/lib/postgresql/N/bin."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    raise ServiceStartError(
        "PostgreSQL is not installed (no pg_ctl on PATH or under /usr/lib/postgresql): "
        "apt-get install -y postgresql, or set PG_BINDIR"
    )


class Postgres:
    """A PostgreSQL server at ``<root>/pg`` listening on 127.0.0.1:``port``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.data_dir = self.root / "pg"
        self.log_path = self.root / "logs" / "postgres.log"
        self.port = port or free_port()
        self.bindir = pg_bindir()
        self.as_user = RUN_AS_ROOT_USER if os.geteuid() == 0 else None

    # -- credentials -------------------------------------------------------------

    @property
    def password(self) -> str:
        """The ``mlflow`` role's password (generated once)."""
        return secret(self.root, "postgres-mlflow-password")

    def sqlalchemy_uri(self, database: str) -> str:
        """The URI MLflow uses, without the password (it goes in ``PGPASSWORD``)."""
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """Variables a client of the ``mlflow`` role needs beside :meth:`sqlalchemy_uri`."""
        return {"PGPASSWORD": self.password}

    # -- commands ------------------------------------------------------------------

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", self.as_user, "--", *cmd] if self.as_user else cmd

    def _run(self, args: Sequence[str], what: str, timeout_s: float = 120.0) -> None:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd="/")
        if res.returncode != 0:
            raise ServiceStartError(f"PostgreSQL {what} failed ({self.data_dir}): {(res.stderr or res.stdout)[-1500:]}")

    def _hand_over(self, path: Path) -> None:
        if self.as_user:
            pw = pwd.getpwnam(self.as_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        """``initdb`` once (scram-sha-256 for every connection), owned by the server's user."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:  # the server's user must reach its data dir (mkdtemp makes folders 0700)
            os.chmod(self.root, os.stat(self.root).st_mode | 0o011)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._hand_over(self.data_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.log_path.exists():
            self.log_path.touch()
        self._hand_over(self.log_path)
        if self.as_user:
            probe = subprocess.run(["runuser", "-u", self.as_user, "--", "test", "-w", str(self.data_dir)], check=False)
            if probe.returncode != 0:
                raise ServiceStartError(
                    f"the {self.as_user} user cannot write {self.data_dir}: put the stack's folder where every "
                    "parent folder is searchable by others (e.g. under /srv or a mkdtemp in /tmp), not under /root"
                )
        pwfile = self.data_dir.parent / ".pg-superuser-pw"
        pwfile.write_text(secret(self.root, "postgres-superuser-password") + "\n", encoding="utf-8")
        os.chmod(pwfile, 0o600)
        self._hand_over(pwfile)
        try:
            self._run(
                self._cmd(
                    "initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "scram-sha-256",
                    "--pwfile", str(pwfile), "-E", "UTF8", "--locale", "C",
                ),
                "initdb",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("initialised PostgreSQL data dir %s", self.data_dir)

    def start(self, timeout_s: float = 60.0) -> float:
        """``pg_ctl start`` and wait until it accepts connections; returns the seconds it took."""
        t0 = time.monotonic()
        self.init()
        opts = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(
            self._cmd("pg_ctl", "-D", str(self.data_dir), "-o", opts, "-l", str(self.log_path), "-w", "start"),
            "start",
            timeout_s,
        )
        while not port_open(self.port):
            if time.monotonic() - t0 > timeout_s:
                raise ServiceStartError(f"PostgreSQL on port {self.port} does not answer; see {self.log_path}")
            time.sleep(0.2)
        self._ensure_databases()
        seconds = time.monotonic() - t0
        log.info("PostgreSQL up on 127.0.0.1:%d in %.1f s", self.port, seconds)
        return seconds

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (``immediate``: as if the server crashed; it recovers at the next start)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop"), "stop")
        log.info("PostgreSQL on port %d stopped (%s)", self.port, mode)

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and port_open(self.port)

    def connect(self, database: str = "postgres", superuser: bool = True) -> psycopg.Connection[Any]:
        """A psycopg connection (autocommit) as the superuser or the ``mlflow`` role."""
        import psycopg

        user, pw = (
            ("postgres", secret(self.root, "postgres-superuser-password")) if superuser else (ROLE, self.password)
        )
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=pw,
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )

    def _ensure_databases(self) -> None:
        from psycopg import sql

        with self.connect() as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(self.password))
                )
            for db in DATABASES:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(ROLE))
                    )

    def dump(self, database: str, dest: Path) -> Path:
        """``pg_dump -Fc`` of one database to ``dest`` (the backup docs/deploy.md describes)."""
        env = dict(os.environ, PGPASSWORD=self.password)
        args = [
            str(self.bindir / "pg_dump"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            ROLE,
            "-Fc",
            "-f",
            str(dest),
            database,
        ]
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode != 0:
            raise ServiceStartError(f"pg_dump {database} failed: {res.stderr[-1000:]}")
        return dest
