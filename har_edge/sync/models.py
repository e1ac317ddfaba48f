"""Registry -> staging -> verify -> validate -> ``models/<version>/`` -> ``current``; health gate and rollback.

Order of trust: a fetched folder is first *verified* (its manifest names this
model and this version, the channel order is the agent's, and sha256 of
``model.tflite`` and ``golden.npz`` match the manifest: DVC does not notice a
corrupted remote object by default), then *validated* with the agent's
own loader (it loads in the edge runtime, shapes and types match the
manifest, one output per label, the golden windows reproduce). Only then is it
moved under ``models/`` and the ``current`` pointer switched atomically (the
old target becomes ``previous``); older folders are removed, so disk use is
two models at most. A version that fails any step is *refused*: recorded in
``models/sync-state.json`` and as a deployment row, and not fetched again
until it is re-released (its tag moved to another commit) or pinned by hand.

After activation the version is on probation until the health gate
(:mod:`har_edge.sync.health`) passes it; a failed gate rolls back to ``previous``.
Every mutation holds ``models/.sync-models.lock``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from har_edge.agent.errors import ChecksumMismatch, ModelError, SignatureError
from har_edge.agent.manifest import Manifest, read_manifest, verify_files
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.modelstore import CURRENT, PREVIOUS, folder_of, fsync_dir, read_pointer, set_pointer
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import Settings
from har_edge.common.states import DeploymentOutcome
from har_edge.common.versions import parse_version
from har_edge.sync.errors import ModelRefused, RegistryError, SyncError
from har_edge.sync.health import judge
from har_edge.sync.locks import file_lock
from har_edge.sync.registry import Registry, Release
from har_edge.sync.state import Installed, ModelState, Probation, Refusal
from har_edge.sync.trust import BUNDLED, TrustStore, Verdict, check_manifest, check_not_downgrade

log = logging.getLogger(__name__)

LOCK_NAME = ".sync-models.lock"
LOCK_WAIT_S = 300.0
STAGING_PREFIX = ".staging-"
MAX_INSTALLS_PER_PASS = 3


@dataclass
class PullReport:
    releases: list[str] = field(default_factory=list)
    activated: str | None = None
    replaced: str | None = None
    refused: list[tuple[str, str]] = field(default_factory=list)
    rolled_back: str | None = None
    health: str | None = None
    note: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        parts = []
        if self.rolled_back:
            parts.append(f"rolled back {self.rolled_back}")
        if self.activated:
            parts.append(f"activated {self.activated} (was {self.replaced})")
        for version, reason in self.refused:
            parts.append(f"refused {version}: {reason}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts) or "nothing to do"


class ModelManager:
    def __init__(self, settings: Settings, outbox: Outbox | None = None, registry: Registry | None = None) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.models_dir = Path(settings.models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = outbox or Outbox(settings.outbox_path)
        if registry is None and self.sync.registry:
            registry = Registry.from_settings(settings)
        self.registry = registry
        self.trust = TrustStore.from_settings(settings)  # sync.trusted_keys / revoked_keys (ConfigError)

    # -- reading state ------------------------------------------------------------------

    def lock(self) -> AbstractContextManager[None]:
        return file_lock(self.models_dir / LOCK_NAME, LOCK_WAIT_S)

    def configured_registry(self) -> Registry:
        """The registry models come from; SyncError when none is configured."""
        if self.registry is None:
            raise SyncError("no registry configured (sync.registry): set it to a Git URL or path of the model registry")
        return self.registry

    def state(self) -> ModelState:
        return ModelState.load(self.models_dir)

    def pointers(self) -> tuple[str | None, str | None]:
        return read_pointer(self.models_dir, CURRENT), read_pointer(self.models_dir, PREVIOUS)

    def folder_of(self, pointer: str | None) -> Path:
        return folder_of(self.models_dir, pointer)

    def manifest_of(self, pointer: str | None) -> Manifest | None:
        try:
            return read_manifest(self.folder_of(pointer))
        except ModelError:
            return None

    def pin(self, state: ModelState | None = None) -> str | None:
        state = state or self.state()
        return state.pin or self.sync.pin

    def is_refused(self, release: Release, state: ModelState) -> Refusal | None:
        r = state.refused.get(release.version)
        if r is not None and r.trust and r.trust != self.trust.fingerprint:
            return None  # refused for its signature under other keys: judged again under these
        if r is not None and (not r.commit or r.commit == release.commit):
            return r
        return None

    # -- choosing ----------------------------------------------------------------------------

    def choose(self, releases: list[Release], state: ModelState) -> tuple[Release | None, str]:
        """The release to install now (or None) and why."""
        pointer = self.pointers()[0]
        current = self.manifest_of(pointer) if pointer else None  # the bundled model is a fallback, never a reason
        # identity is (name, version): an active model of another name is no reason to skip a release
        cur_version = current.version if current is not None and current.name == self.sync.model_name else None
        pin = self.pin(state)
        if pin:
            rel = next((r for r in releases if r.version == pin), None)
            if rel is None:
                return None, f"pinned version {pin} is not released in {self.configured_registry().display}"
            if pin == cur_version:
                return None, f"pinned version {pin} is active"
            refusal = self.is_refused(rel, state)
            if refusal:
                return None, (
                    f"pinned version {pin} was refused ({refusal.reason}): re-release it, "
                    f"or run `har-edge models pin {pin}` to try again"
                )
            return rel, f"pinned version {pin}"
        usable = [r for r in releases if self.sync.allow_prerelease or not r.key.prerelease]
        usable = [r for r in usable if not self.is_refused(r, state)]
        if not usable:
            return None, "no usable release" + (" (all refused)" if releases else "")
        best = usable[-1]
        cur_key = parse_version(cur_version) if cur_version else None
        if cur_key is not None and best.key <= cur_key:
            return None, f"{cur_version} is the newest usable release"
        return best, f"newer release {best.version}"

    # -- the pass ---------------------------------------------------------------------------------

    def update(self, now: float) -> PullReport:
        """One pull pass: judge the model on probation, then fetch and activate a newer (or pinned) release."""
        t0 = time.monotonic()
        report = PullReport()
        with self.lock():
            self._clean_staging()
            self._check_health(now, report)
            if self.registry is None:
                report.note = "no registry configured (sync.registry)"
                return report
            releases = self.registry.releases()
            report.releases = [r.version for r in releases]
            if not releases:
                report.note = self.no_release_note()
            for _attempt in range(MAX_INSTALLS_PER_PASS):  # a refused release: the next best one, same pass
                release, why = self.choose(releases, self.state())
                if release is None:
                    report.note = why if releases else report.note
                    break
                log.info("installing %s: %s", release.tag, why)
                self._install(release, now, report, outcome=DeploymentOutcome.ACTIVATED, reason=why)
                if report.activated:
                    break
        report.seconds = time.monotonic() - t0
        return report

    def no_release_note(self) -> str:
        """Why nothing of the followed name is released, naming what the registry does hold."""
        assert self.registry is not None
        others = [n for n in self.registry.names() if n != self.sync.model_name]
        if not others:
            return f"the registry {self.registry.display} has no releases"
        return (
            f"the registry has releases of {', '.join(others)}; you follow {self.sync.model_name}: set sync.model_name"
        )

    def check_health(self, now: float) -> PullReport:
        report = PullReport()
        with self.lock():
            self._check_health(now, report)
        return report

    # -- install --------------------------------------------------------------------------------

    def verify(self, folder: Path, release: Release | None) -> Manifest:
        """Signature, manifest, identity and sha256 checks (cheap, before anything is loaded)."""
        what = f"{release.tag} (commit {release.commit[:10]})" if release else None  # None: no warning
        verdict = self.trust.check(folder, (release.name, release.version) if release else None, what)
        m = read_manifest(folder)
        check_manifest(verdict, m)
        if m.name != self.sync.model_name:
            raise ModelRefused(
                f"{folder} holds model {m.name!r}, not {self.sync.model_name!r} (sync.model_name): "
                "the release was made from the wrong folder"
            )
        if release is not None and m.version != release.version:
            raise ModelRefused(
                f"release {release.tag} holds a manifest of version {m.version}: "
                "the tag and the manifest must agree; re-release it"
            )
        _ = m.channel_map  # every channel is one the agent can feed, in a unit it converts to (ManifestError)
        verify_files(folder, m)
        return m

    def validate(self, folder: Path) -> Manifest:
        """The agent's own loader: it loads, shapes and types agree, labels = outputs, golden windows reproduce."""
        a = self.settings.agent
        return load_model(folder, threads=a.threads, batch=a.batch).manifest

    def _install(self, release: Release, now: float, report: PullReport, *, outcome: str, reason: str) -> None:
        staging = self.models_dir / f"{STAGING_PREFIX}{release.version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            t0 = time.monotonic()
            folder = self.configured_registry().fetch(release, staging / "model")
            t_fetch = time.monotonic() - t0
            state = self.state()
            m: Manifest | None = None
            try:
                m = self.verify(folder, release)
                pinned = outcome == DeploymentOutcome.PINNED or self.pin(state) == release.version
                if not pinned and self.pointers()[0]:  # a pin may go back; a pull never does
                    check_not_downgrade(m, self.manifest_of(self.pointers()[0]))
                old = state.refused.get(release.version)
                if old is not None and old.sha256 == m.sha256:
                    raise ModelRefused(f"same bytes as the refused {release.version} ({old.reason})")
                self.validate(folder)
            except ModelError as exc:
                reason = str(exc).replace(str(folder) + "/", "").replace(str(folder), release.tag)
                if isinstance(exc, ChecksumMismatch):
                    reason += (
                        f" (DVC does not verify remote objects: check the DVC remote, then run "
                        f"`har-edge models pin {release.version}` to try again)"
                    )
                trust = self.trust.fingerprint if isinstance(exc, SignatureError) else ""
                self._refuse(release, m.sha256 if m else "", f"{release.tag}: {reason}", now, report, state, trust)
                return
            log.info("%s verified and validated (fetched in %.1f s)", release.tag, t_fetch)
            self._activate(folder, m, release, now, report, outcome=outcome, reason=reason)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _refuse(
        self,
        release: Release,
        sha256: str,
        reason: str,
        now: float,
        report: PullReport,
        state: ModelState,
        trust: str = "",
    ) -> None:
        cur = self.manifest_of(self.pointers()[0])
        log.error("refusing %s: %s (keeping %s)", release.tag, reason, cur.version if cur else "the bundled model")
        state.refused[release.version] = Refusal(
            version=release.version,
            commit=release.commit,
            sha256=sha256,
            reason=reason,
            time_ms=int(now * 1000),
            trust=trust,
        )
        state.save(self.models_dir)
        self.outbox.record_deployment(
            from_version=cur.version if cur else None,
            to_version=release.version,
            outcome=DeploymentOutcome.REFUSED,
            reason=reason,
            time_ms=int(now * 1000),
        )
        report.refused.append((release.version, reason))

    def _activate(
        self,
        folder: Path,
        m: Manifest,
        release: Release | None,
        now: float,
        report: PullReport,
        *,
        outcome: str,
        reason: str,
    ) -> None:
        cur, prev = self.pointers()
        old = self.manifest_of(cur)
        if folder.parent == self.models_dir:  # already installed (the previous version, pinned again)
            name = folder.name
        else:
            name = m.version
            if name in (cur, prev):  # a re-release of an installed version: keep both apart
                name = f"{m.version}+{m.sha256[:8]}"
            dest = self.models_dir / name
            if dest.exists():
                shutil.rmtree(dest)  # a leftover of an interrupted install
            os.rename(folder, dest)
            fsync_dir(self.models_dir)
        # state first: a crash before the switch leaves a probation that names a folder not current, which
        # the next health check drops; a crash after it leaves the switch judged as it should be
        state = self.state()
        known = state.installed.get(name)
        state.installed[name] = Installed(
            version=m.version,
            commit=release.commit if release else (known.commit if known else ""),
            sha256=m.sha256,
            time_ms=int(now * 1000),
        )
        state.remember(m)
        if old is not None and old.sha256 not in state.known:
            state.remember(old)
        rf = state.refused.get(m.version)
        if rf is not None and rf.sha256 != m.sha256:
            del state.refused[m.version]
        state.probation = Probation(
            folder=name,
            version=m.version,
            sha256=m.sha256,
            since_ms=int(now * 1000),
            previous_folder=cur,
            previous_version=old.version if old else None,
            previous_sha256=old.sha256 if old else None,
        )
        state.save(self.models_dir)
        set_pointer(self.models_dir, cur, PREVIOUS)
        set_pointer(self.models_dir, name, CURRENT)  # the switch: the agent takes it between files
        detail = f"{release.tag} (commit {release.commit[:10]}), " if release else ""
        self.outbox.record_deployment(
            from_version=old.version if old else None,
            to_version=name,
            outcome=outcome,
            reason=f"{reason}: {detail}sha256 {m.sha256[:12]}",
            time_ms=int(now * 1000),
        )
        log.info("activated %s %s (was %s); previous kept for rollback", m.name, name, old.version if old else None)
        report.activated, report.replaced = name, (old.version if old else None)
        self._prune(state)

    # -- health and rollback -----------------------------------------------------------------------

    def _check_health(self, now: float, report: PullReport) -> None:
        state = self.state()
        p = state.probation
        if p is None:
            return
        if self.pointers()[0] != p.folder:  # a person switched models meanwhile: nothing left to judge
            state.probation = None
            state.save(self.models_dir)
            return
        new_m = self.manifest_of(p.folder)
        prev_m = self.manifest_of(p.previous_folder)  # None folder: the bundled model
        labels = (new_m.labels if new_m else None, prev_m.labels if prev_m else None)
        verdict = judge(self.outbox, p, self.sync, labels=labels)
        report.health = verdict.state
        if verdict.state == "pending":
            log.debug("health gate for %s: %s", p.version, verdict.reason)
        elif verdict.state == "healthy":
            log.info("%s passed the health gate: %s", p.version, verdict.reason)
            state.probation = None
            state.save(self.models_dir)
            self.outbox.record_deployment(
                from_version=p.previous_version,
                to_version=p.folder,
                outcome=DeploymentOutcome.HEALTHY,
                reason=verdict.reason,
            )
        else:
            log.error("%s failed the health gate: %s", p.version, verdict.reason)
            self._rollback(now, report, reason=f"health gate: {verdict.reason}", refuse=True)

    def rollback(self, now: float, reason: str = "rolled back by a person") -> PullReport:
        report = PullReport()
        with self.lock():
            self._rollback(now, report, reason=reason, refuse=True)
        return report

    def _rollback(self, now: float, report: PullReport, *, reason: str, refuse: bool) -> None:
        cur, prev = self.pointers()
        if cur is None:
            raise SyncError("nothing to roll back to: the bundled model is active (models/current is not set)")
        bad = self.manifest_of(cur)
        target = prev if prev and (self.models_dir / prev).is_dir() else None
        good = self.manifest_of(target)
        set_pointer(self.models_dir, target, CURRENT)
        set_pointer(self.models_dir, None, PREVIOUS)
        state = self.state()
        version = bad.version if bad else cur
        if refuse:
            inst = state.installed.get(cur)
            state.refused[version] = Refusal(
                version=version,
                commit=inst.commit if inst else "",
                sha256=bad.sha256 if bad else "",
                reason=reason,
                time_ms=int(now * 1000),
            )
        if state.pin == version:
            state.pin = None
            log.warning("unpinned %s (it was rolled back)", version)
        state.probation = None
        state.save(self.models_dir)
        to = target or (f"{good.version} (bundled)" if good else "bundled")
        self.outbox.record_deployment(
            from_version=cur,
            to_version=target or (good.version if good else None),
            outcome=DeploymentOutcome.ROLLED_BACK,
            reason=reason,
            time_ms=int(now * 1000),
        )
        log.warning("rolled back %s -> %s: %s", cur, to, reason)
        if self.sync.pin == version:
            log.warning("sync.pin still names %s, which is now refused: change the setting", version)
        report.rolled_back = cur
        self._prune(state)

    # -- pin -----------------------------------------------------------------------------------------

    def pin_version(self, version: str, now: float) -> PullReport:
        """Activate exactly ``version`` or ``NAME@VERSION`` (from the registry, or the local previous folder)."""
        report = PullReport()
        name = self.sync.model_name
        if "@" in version:
            name, version = version.split("@", 1)
            version = version.removeprefix("v") if version[:1] == "v" and version[1:2].isdigit() else version
            if name != self.sync.model_name:
                raise SyncError(
                    f"{name}@{version}: this device follows {self.sync.model_name}: set sync.model_name = {name} "
                    "to run that model"
                )
        with self.lock():
            state = self.state()
            state.refused.pop(version, None)  # a person asked for it: try again
            cur, prev = self.pointers()
            cur_m, prev_m = self.manifest_of(cur), self.manifest_of(prev)
            if cur is not None and cur_m is not None and (cur_m.name, cur_m.version) == (name, version):
                report.note = f"{name}@{version} is already active"
            elif prev is not None and prev_m is not None and (prev_m.name, prev_m.version) == (name, version):
                folder = self.models_dir / prev
                try:
                    m = self.verify(folder, None)
                    self.validate(folder)
                except ModelError as exc:
                    state.save(self.models_dir)
                    raise ModelRefused(f"the local copy of {version} ({folder}) fails its checks: {exc}") from None
                state.save(self.models_dir)
                self._activate(
                    folder, m, None, now, report, outcome=DeploymentOutcome.PINNED, reason="pinned by a person"
                )
            else:
                if self.registry is None:
                    raise SyncError(f"{version} is not installed here and no registry is configured (sync.registry)")
                releases = self.registry.releases()
                rel = next((r for r in releases if r.version == version), None)
                if rel is None:
                    listed = ", ".join(r.version for r in releases) or "none"
                    hint = f"; {self.no_release_note()}" if not releases else ""
                    raise RegistryError(
                        f"{name}@{version} is not released in {self.registry.display} (releases: {listed}){hint}"
                    )
                state.save(self.models_dir)
                self._install(rel, now, report, outcome=DeploymentOutcome.PINNED, reason="pinned by a person")
                if report.refused:
                    return report
            state = self.state()
            state.pin = version
            state.save(self.models_dir)
        return report

    def unpin(self) -> str | None:
        with self.lock():
            state = self.state()
            old, state.pin = state.pin, None
            state.save(self.models_dir)
        return old

    # -- housekeeping ---------------------------------------------------------------------------------

    def _prune(self, state: ModelState) -> None:
        keep = {p for p in self.pointers() if p}
        for entry in self.models_dir.iterdir():
            if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink() or entry.name in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed model folder %s (only current and previous are kept)", entry.name)
        changed = False
        for name in list(state.installed):
            if name not in keep:
                del state.installed[name]
                changed = True
        if changed:
            state.save(self.models_dir)

    def _clean_staging(self) -> None:
        for entry in self.models_dir.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(entry, ignore_errors=True)

    def installed_folders(self, version: str | None = None) -> list[tuple[str, Path, bool]]:
        """(label, folder, explicit) of what ``models verify`` checks: agent.model_dir, else current and previous."""
        explicit = self.settings.agent.model_dir
        if explicit is not None and version is None:  # what the agent runs: agent.model_dir wins over models/
            return [(f"agent.model_dir {explicit}", Path(explicit), True)]
        cur, prev = self.pointers()
        names: list[str | None] = [p for p in (cur, prev) if p]
        if version is not None:
            names = [n for n in names if (m := self.manifest_of(n)) is not None and m.version == version]
            if not names:
                raise SyncError(f"{version} is not installed here (current: {cur or 'bundled'}, previous: {prev})")
        return [(name or "bundled", self.folder_of(name), False) for name in names or [None]]

    def signature_states(self, version: str | None = None) -> list[tuple[str, Verdict]]:
        """(label, signature verdict) of the folders :meth:`verify_installed` checks."""
        out = []
        for label, folder, _ in self.installed_folders(version):
            if folder == BUNDLED_MODEL_DIR:
                out.append((label, Verdict(BUNDLED, None, "part of the har-edge install, not a release")))
            else:
                try:
                    m = read_manifest(folder)
                except ModelError:
                    m = None
                out.append((label, self.trust.examine(folder, (m.name, m.version) if m else None)))
        return out

    def verify_installed(self, version: str | None = None) -> list[tuple[str, str, str | None]]:
        """(folder, version, problem or None) for current and previous (or the folder holding ``version``)."""
        out: list[tuple[str, str, str | None]] = []
        for label, folder, explicit in self.installed_folders(version):
            if explicit:
                try:
                    out.append((label, self.validate(folder).version, None))
                except ModelError as exc:
                    out.append((label, "?", str(exc)))
                continue
            name = None if folder == BUNDLED_MODEL_DIR else folder.name
            try:
                m = self.verify(folder, None) if name else read_manifest(folder)
                self.validate(folder)
                out.append((label, m.version, None))
            except ModelError as exc:
                out.append((label, "?", str(exc)))
        return out
