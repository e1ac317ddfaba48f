"""The model registry as ``har-train release`` writes it: a git repository plus a DVC remote.

A release of model ``<name>`` version ``<v>`` is the git tag ``<name>@v<v>``
on a commit holding ``models/<name>.dvc``; the files (model.tflite,
manifest.json, golden.npz) are in the DVC remote. Discovering releases is one
ls-remote (no clone) done by dulwich, the pure-Python git that DVC already
brings, so no git binary is needed; fetching one is ``dvc get`` (no clone or
cache either). Both run as child processes with a hard time-out: a thread
cannot be stopped when an HTTP remote hangs, a process group can be killed.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from har_edge.common.proc import CommandTimeout, dvc_command, redact, run, tool_env
from har_edge.common.releases import model_path, tag_name, tag_prefix
from har_edge.common.versions import VersionKey, parse_version
from har_edge.sync.errors import RegistryError, RegistryUnreachable

if TYPE_CHECKING:
    from har_edge.agent.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    tag: str
    #: the commit the tag names (peeled): a re-release moves the tag and changes it
    commit: str
    key: VersionKey


def parse_ls_remote(text: str, name: str) -> list[Release]:
    """Releases of ``name`` in ``git ls-remote --tags`` output (as ``har_edge.sync.ls_remote`` writes it), oldest first.

    Unparseable versions are skipped.
    """
    prefix = tag_prefix(name)
    objects: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in text.splitlines():
        sha, _, ref = line.strip().partition("\t")
        if not ref.startswith(prefix):
            continue
        if ref.endswith("^{}"):
            peeled[ref[len(prefix) : -3]] = sha
        else:
            objects[ref[len(prefix) :]] = sha
    out = []
    for version, sha in objects.items():
        key = parse_version(version)
        if key is None:
            log.debug("tag %s@v%s does not hold a release version: ignored", name, version)
            continue
        out.append(Release(name, version, tag_name(name, version), peeled.get(version, sha), key))
    return sorted(out, key=lambda r: r.key)


class Registry:
    def __init__(
        self,
        url: str,
        name: str,
        *,
        data_dir: Path,
        timeout_s: float,
        remote_url: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.timeout_s = timeout_s
        self.remote_url = remote_url
        #: an S3-compatible store's endpoint (the keys stay in the AWS variables of the environment)
        self.endpoint_url = endpoint_url
        self.env = tool_env(Path(data_dir) / ".dvc-site-cache")
        self.site_cache = Path(self.env["DVC_SITE_CACHE_DIR"])

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry ``sync.registry`` names, with the DVC remote overrides of the sync settings."""
        s = settings.sync
        if not s.registry:
            raise RegistryError("no registry configured (sync.registry)")
        return cls(
            s.registry,
            s.model_name,
            data_dir=settings.data_dir,
            timeout_s=s.command_timeout_s,
            remote_url=s.registry_remote_url,
            endpoint_url=s.dvc_remote_endpoint,
        )

    @property
    def display(self) -> str:
        return redact(self.url)

    def releases(self) -> list[Release]:
        """Every release of the model, oldest first. Raises RegistryUnreachable when the tags cannot be listed."""
        return parse_ls_remote(self._ls_remote(tag_prefix(self.name)), self.name)

    def names(self) -> list[str]:
        """Names of every model released in the registry (tags ``<name>@v<version>``)."""
        found = set()
        for line in self._ls_remote("refs/tags/").splitlines():
            ref = line.split("\t")[-1].removeprefix("refs/tags/").removesuffix("^{}")
            if "@v" in ref:
                found.add(ref.rsplit("@v", 1)[0])
        return sorted(found)

    def _ls_remote(self, prefix: str) -> str:
        args = [sys.executable, "-I", "-m", "har_edge.sync.ls_remote", self.url, prefix]
        try:
            res = run(args, timeout_s=self.timeout_s, env=self.env)
        except CommandTimeout as exc:
            raise RegistryUnreachable(
                f"registry {self.display}: ls-remote did not finish within {exc.timeout_s:.0f} s "
                "(sync.command_timeout_s)"
            ) from None
        if res.returncode != 0:
            raise RegistryUnreachable(
                f"registry {self.display} could not be listed (ls-remote exit {res.returncode}: {res.tail()}): "
                "check sync.registry and the network"
            )
        log.debug("registry %s: refs under %s listed in %.2f s", self.display, prefix, res.seconds)
        return res.stdout

    def fetch(self, release: Release, dest: Path) -> Path:
        """Download ``models/<name>`` at the release's tag into ``dest`` (which must not exist)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = self.url
        if "://" not in source and Path(source).exists():
            # a local path as a file:// URL: given a bare path inside another DVC project, dvc get takes that
            # project's cache (and config) for the registry's remote and fails
            source = Path(source).resolve().as_uri()
        args = [*dvc_command(), "get", source, model_path(self.name), "--rev", release.tag, "-o", str(dest)]
        if self.remote_url:
            args += ["--remote-config", f"url={self.remote_url}"]
        env = self.env
        if self.endpoint_url:
            # botocore's own variable, not `--remote-config endpointurl=`: dvc get merges --remote-config into
            # whichever remote it settles on (measured: another project's cache, which refuses the key)
            env = {**self.env, "AWS_ENDPOINT_URL_S3": self.endpoint_url}
        self.site_cache.mkdir(parents=True, exist_ok=True)
        try:
            res = run(args, timeout_s=self.timeout_s, env=env, cwd=dest.parent)
        except CommandTimeout as exc:
            raise RegistryUnreachable(
                f"fetching {release.tag} from {self.display}: {exc}: the DVC remote may be unreachable "
                "(sync.command_timeout_s bounds it)"
            ) from None
        if res.returncode != 0 or not dest.is_dir():
            raise RegistryError(
                f"dvc get of {release.tag} from {self.display} failed (exit {res.returncode}: {res.tail()}): "
                "check that the release was pushed (dvc push) and the DVC remote is reachable"
            )
        log.debug("fetched %s in %.2f s", release.tag, res.seconds)
        return dest
