"""Per-device MLflow accounts: one basic-auth user and one experiment, ``MANAGE`` on it and nothing else.

MLflow's basic-auth has users and passwords, no tokens, and permissions per
experiment (or registered model). The central server runs with
``default_permission = NO_PERMISSIONS`` (:mod:`har_edge.central.mlflow_server`),
so a device account can read and write its own experiment ``har-edge/<device>``
and cannot even see another device's runs. What it can still do, as every
authenticated MLflow user can while workspaces are off: create new
experiments of its own (it then manages those). Only the admin creates users
and grants permissions.

Calls go to the auth REST API with the admin's credentials:
``POST /api/2.0/mlflow/users/create``, ``POST /api/2.0/mlflow/experiments/create``
and ``POST /api/3.0/mlflow/users/permissions/grant`` (MLflow 3.17's form of
the older ``experiments/permissions/create``).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from har_edge.central.errors import AccountError
from har_edge.central.secrets_store import write_secret

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "har-edge/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class DeviceAccount:
    device: str
    username: str
    password: str
    experiment: str
    experiment_id: str

    def __repr__(self) -> str:  # never show the password
        return f"DeviceAccount(device={self.device!r}, experiment={self.experiment!r} ({self.experiment_id}))"

    __str__ = __repr__


def experiment_name(device: str) -> str:
    return EXPERIMENT_PREFIX + device


class Admin:
    """The admin side of the auth API on ``url`` (``verify``: a CA bundle path for a private CA, or True)."""

    def __init__(self, url: str, password: str, *, username: str = "admin", verify: str | bool = True) -> None:
        import requests

        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = (username, password)
        # per request, not on the session: requests lets REQUESTS_CA_BUNDLE override a session's verify
        self.verify = verify
        self.timeout_s = 30.0

    def _call(self, method: str, path: str, what: str, ok: tuple[int, ...] = (200,), **kw: Any) -> dict[str, Any]:
        resp = self.session.request(method, self.url + path, timeout=self.timeout_s, verify=self.verify, **kw)
        if resp.status_code not in ok:
            try:
                message = resp.json().get("message", resp.text[:300])
            except ValueError:
                message = resp.text[:300]
            raise AccountError(f"MLflow at {self.url} refused {what}: HTTP {resp.status_code} {message}")
        try:
            body: dict[str, Any] = resp.json() if resp.content else {}
        except ValueError:
            body = {}
        body["_status"] = resp.status_code
        return body

    def user_exists(self, username: str) -> bool:
        body = self._call(
            "GET",
            "/api/2.0/mlflow/users/get",
            f"looking up user {username!r}",
            ok=(200, 404),
            params={"username": username},
        )
        return bool(body["_status"] == 200)

    def create_user(self, username: str, password: str) -> None:
        self._call(
            "POST",
            "/api/2.0/mlflow/users/create",
            f"creating user {username!r}",
            json={"username": username, "password": password},
        )

    def set_password(self, username: str, password: str) -> None:
        self._call(
            "PATCH",
            "/api/2.0/mlflow/users/update-password",
            f"changing the password of {username!r}",
            json={"username": username, "password": password},
        )

    def delete_user(self, username: str) -> None:
        self._call("DELETE", "/api/2.0/mlflow/users/delete", f"deleting user {username!r}", json={"username": username})

    def experiment_id(self, name: str, tags: dict[str, str] | None = None) -> str:
        """The id of experiment ``name``, created when missing."""
        body = self._call(
            "GET",
            "/api/2.0/mlflow/experiments/get-by-name",
            f"looking up experiment {name!r}",
            ok=(200, 404),
            params={"experiment_name": name},
        )
        if body["_status"] == 200:
            return str(body["experiment"]["experiment_id"])
        body = self._call(
            "POST",
            "/api/2.0/mlflow/experiments/create",
            f"creating experiment {name!r}",
            json={"name": name, "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        )
        return str(body["experiment_id"])

    def grant(self, username: str, experiment_id: str, permission: str = "MANAGE") -> None:
        self._call(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            f"granting {permission} on experiment {experiment_id} to {username!r}",
            json={
                "username": username,
                "resource_type": "experiment",
                "resource_id": experiment_id,
                "permission": permission,
            },
        )

    def permission(self, username: str, experiment_id: str) -> str:
        body = self._call(
            "GET",
            "/api/3.0/mlflow/users/permissions/get",
            f"reading the permission of {username!r} on experiment {experiment_id}",
            params={"username": username, "resource_type": "experiment", "resource_id": experiment_id},
        )
        return str(body.get("permission", ""))

    def add_device(self, device: str, password: str | None = None, *, rotate: bool = False) -> DeviceAccount:
        """User ``device`` + experiment ``har-edge/<device>`` with MANAGE on it.

        An existing user is refused unless ``rotate`` (then it gets a new password); the
        experiment and the grant are made idempotently.
        """
        if not _NAME.match(device):
            raise AccountError(
                f"device name {device!r} is not usable as an MLflow user: letters, digits, '.', '_', '-' (max 64)"
            )
        password = password or secrets.token_urlsafe(24)
        if self.user_exists(device):
            if not rotate:
                raise AccountError(
                    f"user {device!r} already exists on {self.url}: pass --rotate to give it a new password"
                )
            self.set_password(device, password)
        else:
            self.create_user(device, password)
        name = experiment_name(device)
        exp_id = self.experiment_id(name, {"har.device": device, "har.created_by": "har-edge central add-device"})
        self.grant(device, exp_id, "MANAGE")
        log.info("device %s: user and experiment %r (%s) with MANAGE", device, name, exp_id)
        return DeviceAccount(device, device, password, name, exp_id)


def device_config_toml(account: DeviceAccount, url: str, ca: Path | None = None) -> str:
    """The settings a device needs (its ``har-edge.toml`` or the [sync] part of it)."""

    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"device_id = {q(account.device)}",
        "",
        "[sync]",
        f"tracking_uri = {q(url)}",
        f"experiment = {q(account.experiment)}",
        f"username = {q(account.username)}",
        f"password = {q(account.password)}",
    ]
    if ca is not None:
        lines.append(f"server_cert_path = {q(str(ca))}")
    return "\n".join(lines) + "\n"


def write_device_config(account: DeviceAccount, url: str, dest: Path, ca: Path | None = None) -> Path:
    """Write :func:`device_config_toml` to ``dest``, readable by its owner only."""
    write_secret(Path(dest), device_config_toml(account, url, ca).rstrip("\n"))
    return Path(dest)
