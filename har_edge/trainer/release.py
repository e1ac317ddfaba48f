"""Publish a verified model folder: DVC (files) + git tag (version) + MLflow Model Registry.

The model registry is a git repository with DVC initialised in it:

    models/<name>.dvc        DVC's pointer to the folder (committed)
    models/<name>/           model.tflite, manifest.json, golden.npz, manifest.sig (DVC-tracked, git-ignored)
    .dvc/config              the default remote holding the files (committed, so `dvc get` finds it)

Tag scheme: ``<name>@v<version>`` (e.g. ``har-cnn@v1.0.0``), an annotated tag on
the commit that adds that version's ``.dvc`` file; its message carries
``sha256=<model.tflite sha256>``. Versions come from ``export.version`` in
params.yaml and are never moved: a tag that already holds another model is an
error (bump the version). The edge finds versions with an ``ls-remote`` of the
registry's tags (dulwich) and fetches one with ``dvc get <registry> models/<name> --rev <tag>
-o <staging>``, then checks the sha256s against the manifest.

Releasing is idempotent: when the tag already holds this very model, the DVC
push (a no-op when the remote has the files), the git push and the MLflow
registration (found by its ``sha256`` tag) are only made sure of. A model whose
manifest says it failed the gate, or whose figures are below the thresholds, is
refused, and so is a folder that does not load and reproduce its golden windows.
Every git/dvc call is bounded by ``release.timeout_s``. With a signing key
(:mod:`har_edge.trainer.keys`) the registry copy gets a ``manifest.sig`` over all
its files and the tag message records ``signed_by=<key id>``.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from har_edge.agent.manifest import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    read_manifest,
    verify_files,
    write_manifest,
)
from har_edge.common import proc
from har_edge.common.proc import CommandTimeout, Result, dvc_command, tool_env
from har_edge.common.releases import model_path, tag_name
from har_edge.common.versions import newer_than
from har_edge.trainer import tracking
from har_edge.trainer.errors import GateFailed, ReleaseError, ToolFailed
from har_edge.trainer.export import verify_folder
from har_edge.trainer.gate import check_gate
from har_edge.trainer.importer.figures import ACCEPT_NAMES
from har_edge.trainer.keys import sign_release
from har_edge.trainer.settings import Settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

REMOTE_NAME = "storage"
_FALLBACK_IDENTITY = {"user.name": "har-train", "user.email": "har-train@localhost"}


@dataclass
class ReleaseResult:
    name: str
    version: str
    tag: str
    commit: str
    sha256: str
    registry: str
    remote: str
    created: bool
    git_pushed: bool
    mlflow_version: str | None
    mlflow_created: bool
    #: the signing key's id (``manifest.sig``), None for an unsigned release
    key_id: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Tools:
    """git and dvc in one working repository, each call bounded by a timeout (its whole process group killed)."""

    def __init__(self, repo: Path, *, timeout_s: float, site_cache: Path) -> None:
        self.repo = repo
        self.timeout_s = timeout_s
        self.env = tool_env(site_cache)
        site_cache.mkdir(parents=True, exist_ok=True)
        self._identity: list[str] | None = None

    def run(self, *cmd: str, check: bool = True) -> Result:
        try:
            res = proc.run(cmd, timeout_s=self.timeout_s, env=self.env, cwd=self.repo)
        except CommandTimeout:
            raise ToolFailed(
                f"`{' '.join(cmd[:4])}` in {self.repo} did not finish in {self.timeout_s:.0f} s: "
                "check that the remote is reachable (or raise release.timeout_s)"
            ) from None
        except FileNotFoundError:
            raise ToolFailed(f"{cmd[0]} is not installed: install git (and the trainer extra for dvc)") from None
        if check and res.returncode != 0:
            raise ToolFailed(f"`{' '.join(cmd[:6])}` failed in {self.repo} (exit {res.returncode}): {res.tail(800)}")
        return res

    def git(self, *args: str, check: bool = True) -> Result:
        return self.run("git", *self.identity(), *args, check=check)

    def dvc(self, *args: str, check: bool = True) -> Result:
        return self.run(*dvc_command(), *args, check=check)

    def identity(self) -> list[str]:
        """``-c user.name=… -c user.email=…`` only where git has none configured."""
        if self._identity is None:
            self._identity = []
            for key, value in _FALLBACK_IDENTITY.items():
                got = self.run("git", "config", key, check=False)
                if got.returncode != 0 or not got.stdout.strip():
                    self._identity += ["-c", f"{key}={value}"]
        return self._identity


def unmeasured_figures(manifest: Manifest) -> list[str]:
    """Gate figures the manifest records as not measured (an import without labelled data, a float model)."""
    from har_edge.trainer.importer.figures import GATE_CHECKS

    return [k for k in GATE_CHECKS if k in manifest.measured and manifest.measured[k].value is None]


def check_release_gate(manifest: Manifest, settings: Settings, accept_unmeasured: list[str] | None = None) -> None:
    """Refuse a model that failed (or never went through) the gate, or is below today's thresholds.

    A figure that was not measured is refused unless it is named in ``accept_unmeasured``.
    """
    from har_edge.trainer.importer.figures import ACCEPT_NAMES, GATE_CHECKS

    what = f"{manifest.name} {manifest.version}"
    gate = manifest.training.get("gate")
    if not isinstance(gate, dict) or gate.get("passed") is not True:
        raise GateFailed(f"{what}: its manifest does not record a passed gate: export it again with `har-train export`")
    accepted: set[str] = set()
    for name in accept_unmeasured or []:
        if name not in ACCEPT_NAMES:
            raise GateFailed(f"--accept-unmeasured {name}: not a gate figure; one of {sorted(ACCEPT_NAMES)}")
        accepted.add(ACCEPT_NAMES[name])
    missing = [k for k in unmeasured_figures(manifest) if k not in accepted]
    if missing:
        short = {v: k for k, v in ACCEPT_NAMES.items() if not k.startswith("int8_")}
        names = ",".join(short.get(k, k) for k in missing)
        why = "; ".join(f"{k}: {manifest.measured[k].on}" for k in missing)
        raise GateFailed(
            f"{what}: {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} not measured ({why}): "
            f"measure {'it' if len(missing) == 1 else 'them'} (import with --labelled data) or release knowingly "
            f"with --accept-unmeasured {names}"
        )
    skip = {GATE_CHECKS[k][0] for k in accepted if k in GATE_CHECKS}
    for source, thresholds in (("the manifest's", gate.get("thresholds", {})), ("params.yaml", settings.gate)):
        if not isinstance(thresholds, dict):
            thresholds = thresholds.model_dump()
        thresholds = {k: v for k, v in thresholds.items() if k not in skip}
        result = check_gate(manifest.metrics, thresholds)
        if not result.passed:
            raise GateFailed(
                f"{what} is below {source} thresholds: " + "; ".join(result.failures) + ": refusing to release it"
            )


def _remote_url(remote: str) -> str:
    """Absolute form of a DVC remote (local paths made absolute; URLs as given)."""
    parsed = urlparse(remote)
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme != "file":
        return remote
    path = Path(parsed.path if parsed.scheme == "file" else remote).expanduser()
    return str(path.resolve())


def _ensure_dvc(t: Tools, remote: str) -> str:
    """DVC initialised with ``remote`` as the committed default; return the remote URL in use."""
    changed: list[str] = []
    if not (t.repo / ".dvc").is_dir():
        t.dvc("init", "-q")
        changed.append(".dvc")
        changed.append(".dvcignore")
    current = t.dvc("config", "core.check_update", check=False).stdout.strip()
    if current != "false":
        t.dvc("config", "core.check_update", "false")
        changed.append(".dvc/config")
    default = t.dvc("remote", "default", check=False).stdout.strip()
    url = t.dvc("config", f"remote.{default}.url", check=False).stdout.strip() if default else ""
    if remote:
        remote = _remote_url(remote)
        if url != remote:
            t.dvc("remote", "add", "-d", "-f", REMOTE_NAME, remote)
            changed.append(".dvc/config")
            url = remote
    if not url:
        raise ReleaseError(f"{t.repo} has no DVC remote: pass --remote <url> (an absolute path or URL)")
    if changed:
        t.git("add", *sorted(set(changed)))
        if t.git("diff", "--cached", "--quiet", check=False).returncode != 0:
            t.git("commit", "-q", "-m", "dvc: registry remote and settings")
    return url


def _tag_message(t: Tools, tag: str) -> str | None:
    """An existing tag's message (None without the tag)."""
    if t.git("rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode != 0:
        return None
    return t.git("tag", "-l", "--format=%(contents)", tag).stdout


def _tag_sha256(message: str) -> str:
    """sha256 recorded in a tag's message; '' when it has none."""
    m = re.search(r"sha256=([0-9a-f]{64})", message)
    return m.group(1) if m else ""


def _tag_field(message: str, field: str) -> str | None:
    """A ``field=value`` line of a tag's message (None without it)."""
    m = re.search(rf"^{re.escape(field)}=(\S+)$", message, re.MULTILINE)
    return m.group(1) if m else None


def _copy_model(folder: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    extra = read_manifest(folder).source_files  # the float source released beside model.tflite
    for name in (MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE, *extra):
        shutil.copyfile(folder / name, dest / name)


def _git_remote(t: Tools) -> str | None:
    remotes = t.git("remote", check=False).stdout.split()
    return "origin" if "origin" in remotes else (remotes[0] if remotes else None)


def release(
    settings: Settings,
    folder: Path,
    *,
    registry: str,
    remote: str = "",
    push_git: bool = True,
    accept_unmeasured: list[str] | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> ReleaseResult:
    folder = Path(folder)
    if not registry:
        raise ReleaseError("no registry given: pass --registry <git working repository> (or set release.registry)")
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    check_release_gate(manifest, settings, accept_unmeasured)
    accepted = sorted({ACCEPT_NAMES[n] for n in accept_unmeasured or []} & set(unmeasured_figures(manifest)))
    if accepted != sorted(manifest.accepted_unmeasured):
        # the operator's acceptance is written into the manifest (not a file the sha256s cover)
        manifest = manifest.model_copy(update={"accepted_unmeasured": accepted})
        write_manifest(folder, manifest)
    verify_folder(folder)
    repo = Path(registry).expanduser().resolve()
    t = Tools(repo, timeout_s=settings.release.timeout_s, site_cache=settings.cache_dir / "dvc-site")
    if not repo.is_dir() or t.run("git", "rev-parse", "--show-toplevel", check=False).returncode != 0:
        raise ReleaseError(f"{repo} is not a git working repository: `git init` it or clone the model registry")
    if t.git("diff", "--cached", "--quiet", check=False).returncode != 0:
        raise ReleaseError(f"{repo} has staged changes: commit or unstage them before releasing into it")
    remote_url = _ensure_dvc(t, remote)
    name, version = manifest.name, manifest.version
    tag = tag_name(name, version)
    rel = Path(model_path(name))
    existing = _tag_message(t, tag)
    recorded = None if existing is None else _tag_sha256(existing)
    if recorded is not None and recorded != manifest.sha256:
        raise ReleaseError(
            f"tag {tag} in {repo} already holds another model (sha256 {recorded[:12] or '?'}…, this one "
            f"{manifest.sha256[:12]}…): versions are never moved; bump export.version in params.yaml and export again"
        )
    created = existing is None
    if existing is None:
        _copy_model(folder, repo / rel)
        key_id = sign_release(repo / rel, manifest, signing_key)  # manifest.sig, tracked with the model
        t.dvc("add", "-q", str(rel))
        t.dvc("push", "-q", f"{rel}.dvc")
        t.git("add", f"{rel}.dvc", str(rel.parent / ".gitignore"))
        if t.git("diff", "--cached", "--quiet", check=False).returncode != 0:
            t.git("commit", "-q", "-m", f"release {name} {version}")
        message = f"{name} {version}\n\nsha256={manifest.sha256}\ndata_hash={manifest.data_hash}\n"
        if manifest.accepted_unmeasured:
            message += f"accepted_unmeasured={','.join(manifest.accepted_unmeasured)}\n"
        if key_id:
            message += f"signed_by={key_id}\n"
        t.git("tag", "-a", tag, "-m", message)
        log.info("released %s as tag %s in %s (files pushed to %s)", name, tag, repo, remote_url)
    else:
        # make sure the remote holds the files of the tagged version (a no-op when it does)
        same = t.git("diff", "--quiet", tag, "HEAD", "--", f"{rel}.dvc", check=False).returncode == 0
        if same and (repo / rel).is_dir():
            t.dvc("push", "-q", f"{rel}.dvc")
        log.info("%s is already released as %s in %s: nothing to change", name, tag, repo)
        key_id = _tag_field(existing, "signed_by")
        if signing_key is not None and key_id is None:
            log.warning("%s was released unsigned; versions are never moved: bump the version to sign it", tag)
    commit = t.git("rev-list", "-n", "1", tag).stdout.strip()
    git_pushed = False
    origin = _git_remote(t)
    if push_git and origin:
        branch = t.git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
        t.git("push", "-q", origin, branch)
        t.git("push", "-q", origin, f"refs/tags/{tag}")
        git_pushed = True
    mlflow_version, mlflow_created = _register(
        settings, folder, manifest, tag=tag, commit=commit, registry=str(repo), remote=remote_url
    )
    return ReleaseResult(
        name,
        version,
        tag,
        commit,
        manifest.sha256,
        str(repo),
        remote_url,
        created,
        git_pushed,
        mlflow_version,
        mlflow_created,
        key_id,
    )


def _register(
    settings: Settings, folder: Path, manifest: Manifest, *, tag: str, commit: str, registry: str, remote: str
) -> tuple[str, bool]:
    """A registry version for the release (found by sha256, else created from the training run's artifact)."""
    c = tracking.client(settings)
    run_id = manifest.mlflow_run_id
    has_artifact = False
    if tracking.run_exists(settings, run_id):
        has_artifact = any(a.path.endswith(MODEL_FILE) for a in c.list_artifacts(run_id, "model"))
    if not has_artifact:
        existing = c.search_model_versions(f"name = '{manifest.name}' and tag.sha256 = '{manifest.sha256}'")
        if existing:  # registered already: register_version returns that version (a version may have no run)
            run_id = existing[0].run_id or run_id
        else:
            run_id = tracking.start_run(settings, kind="release", extra_tags={"har.sha256": manifest.sha256})
            tracking.log_artifacts(settings, run_id, [folder], "model")
            tracking.end_run(settings, run_id)
    newest = tracking.alias_version(settings, manifest.name, settings.mlflow.alias)
    alias: str | None = settings.mlflow.alias
    if newest is not None:
        held = c.get_model_version(manifest.name, newest).tags.get("model_version", "")
        if newer_than(held, manifest.version):
            alias = None  # a newer version holds the alias
    version, created = tracking.register_version(
        settings,
        name=manifest.name,
        run_id=run_id,
        artifact_path="model",
        sha256=manifest.sha256,
        tags={
            "dvc_rev": commit,
            "git_tag": tag,
            "model_version": manifest.version,
            "data_hash": manifest.data_hash,
            "registry": registry,
            "dvc_remote": remote,
            "accepted_unmeasured": ",".join(manifest.accepted_unmeasured),
        },
        description=f"{manifest.name} {manifest.version}: dvc get {registry} {model_path(manifest.name)} --rev {tag}",
        alias=alias,
    )
    if manifest.accepted_unmeasured:
        c.set_model_version_tag(manifest.name, version, "accepted_unmeasured", ",".join(manifest.accepted_unmeasured))
        if tracking.run_exists(settings, manifest.mlflow_run_id):
            tracking.set_tags(
                settings, manifest.mlflow_run_id, {"har.accepted_unmeasured": ",".join(manifest.accepted_unmeasured)}
            )
    log.info("MLflow registry: %s version %s (%s)", manifest.name, version, "created" if created else "existing")
    return version, created


def bundle(folder: Path, dest: Path, settings: Settings) -> Path:
    """Verify a model folder (files, gate, golden windows) and copy it to ``dest`` (replacing it)."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    check_release_gate(manifest, settings)
    verify_folder(folder)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _copy_model(folder, dest)
    verify_folder(dest)
    return dest
