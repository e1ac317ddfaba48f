"""Signed releases on a real git + DVC registry: signing, trusted keys, rotation, revocation, substitution, downgrade.

The registry is the one the sync tests use (bare git repo, working clone, local DVC remote,
released the way ``har-train release`` does it); devices pull with ``dvc get``. The last tests
run ``har-train keygen`` and ``har-train release`` themselves as processes.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sync_helpers import (
    MODEL_NAME,
    RegistryRepo,
    make_model_folder,
    release_version,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)

from har_edge.agent.errors import ConfigError, SignatureError
from har_edge.agent.modelstore import read_pointer
from har_edge.agent.settings import load_settings
from har_edge.agent.signing import (
    SIGNATURE_FILE,
    canonical,
    key_id,
    make_payload,
    public_pem,
    public_text,
    read_signature,
    sign_folder,
)
from har_edge.common.hashing import sha256_file
from har_edge.common.states import DeploymentOutcome
from har_edge.sync import cli
from har_edge.sync.models import ModelManager, PullReport
from har_edge.sync.state import ModelState

V0, V1, V2, V3 = (release_version(n) for n in range(4))

pytestmark = pytest.mark.slow


class Key:
    """A signing key pair for the tests (what `har-train keygen` makes)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key()
        self.id = key_id(self.public)
        self.inline = public_text(self.public)

    def signer(self, name: str = MODEL_NAME, version: str | None = None):
        """``prepare`` for RegistryRepo.release: sign the folder as (name, version or the released version)."""

        def prepare(folder: Path, released: str) -> None:
            sign_folder(folder, self.private, name=name, version=version or released)

        return prepare


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {n: Key() for n in ("old", "new", "other")}


def _settings(data_dir: Path, reg: RegistryRepo, **sync):
    return load_settings(
        env={}, data_dir=data_dir, device_id="dev-signing", agent={"settle_s": 0.0}, sync={"registry": reg.url, **sync}
    )


def _manager(data_dir: Path, reg: RegistryRepo, **sync) -> ModelManager:
    return ModelManager(_settings(data_dir, reg, **sync))


def _deployments(mm: ModelManager) -> list[tuple]:
    return sqlite_ids(mm.outbox, "SELECT to_version, outcome, reason FROM deployments ORDER BY id")


def _refused_only(report: PullReport, version: str) -> str:
    assert report.activated is None, report.summary()
    assert [v for v, _ in report.refused] == [version], report.summary()
    return report.refused[0][1]


def _assert_refused_before_anything_activated(mm: ModelManager, version: str, reason: str, active: str | None):
    """Nothing moved: the pointer, no folder of the version, the refusal in the state and as a deployment row."""
    assert read_pointer(mm.models_dir) == active
    assert not (mm.models_dir / version).exists()
    assert ModelState.load(mm.models_dir).refused[version].reason == reason
    rows = [r for r in _deployments(mm) if r[0] == version]
    assert rows[-1][1:] == (DeploymentOutcome.REFUSED, reason)


# -- the payload ---------------------------------------------------------------------------------------


def test_the_signed_payload_is_canonical_and_covers_every_file(tmp_path, keys):
    folder = make_model_folder(tmp_path / "m", V0)
    sig = sign_folder(folder, keys["old"].private, name=MODEL_NAME, version=V0)
    assert set(sig.files) == {"model.tflite", "manifest.json", "golden.npz"}
    assert sig.files["manifest.json"] == sha256_file(folder / "manifest.json")
    assert sig.key_id == keys["old"].id == sig.key_id.lower() and len(sig.key_id) == 16
    # one canonical form: key order and whitespace do not change the signed bytes
    shuffled = json.loads(json.dumps({"version": V0, "files": dict(reversed(sig.files.items())), "name": MODEL_NAME}))
    shuffled["format"] = sig.payload["format"]
    assert canonical(shuffled) == canonical(sig.payload) == canonical(make_payload(MODEL_NAME, V0, sig.files))
    assert b" " not in canonical(sig.payload)
    back = read_signature(folder)
    assert back == sig
    keys["old"].public.verify(back.signature, canonical(back.payload))  # raises when wrong


def test_a_damaged_signature_file_is_invalid_not_a_crash(tmp_path, keys, data_dir):
    folder = make_model_folder(tmp_path / "m", V0)
    sign_folder(folder, keys["old"].private, name=MODEL_NAME, version=V0)
    doc = json.loads((folder / SIGNATURE_FILE).read_text())
    doc["signature"] = "not base64!"
    (folder / SIGNATURE_FILE).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="signature is not base64 of 64 bytes"):
        read_signature(folder)
    (folder / SIGNATURE_FILE).write_text("{")
    with pytest.raises(SignatureError, match="not readable JSON"):
        read_signature(folder)


# -- settings --------------------------------------------------------------------------------------------


def test_trusted_keys_come_from_files_or_inline_and_bad_ones_are_named(tmp_path, data_dir, keys):
    k_file, k_inline, k_pem = keys["old"], keys["new"], keys["other"]
    (data_dir / "keys").mkdir()
    (data_dir / "keys" / "old.pub").write_text(k_file.inline + "\n")
    s = load_settings(
        env={"HAR_EDGE_SYNC__REVOKED_KEYS": f"{k_pem.id.upper()}"},
        data_dir=data_dir,
        sync={"trusted_keys": ["keys/old.pub", k_inline.inline, public_pem(k_pem.public).decode()]},
    )
    assert s.sync.revoked_keys == (k_pem.id,)
    mm = ModelManager(s)
    assert set(mm.trust.keys) == {k_file.id, k_inline.id, k_pem.id} and mm.trust.revoked == {k_pem.id}
    assert mm.trust.enforced
    # comma-separated in the environment
    env = load_settings(env={"HAR_EDGE_SYNC__TRUSTED_KEYS": f"{k_file.inline},{k_inline.inline}"}, data_dir=data_dir)
    assert env.sync.trusted_keys == (k_file.inline, k_inline.inline)
    with pytest.raises(ConfigError, match=r"sync.trusted_keys.*inline key #1 is not an ed25519 public key"):
        bad_pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        load_settings(env={}, data_dir=data_dir, sync={"trusted_keys": [bad_pem]})
    with pytest.raises(ConfigError, match=r"sync.revoked_keys.*a key id is 16 hex digits"):
        load_settings(env={}, data_dir=data_dir, sync={"revoked_keys": ["not-a-key-id"]})
    missing = load_settings(env={}, data_dir=data_dir, sync={"trusted_keys": ["keys/missing.pub"]})
    with pytest.raises(ConfigError, match=r"keys/missing.pub cannot be read"):
        ModelManager(missing)
    (data_dir / "keys" / "bad.pub").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"bad.pub is not an ed25519 public key"):
        ModelManager(load_settings(env={}, data_dir=data_dir, sync={"trusted_keys": ["keys/bad.pub"]}))


# -- refusals on a real registry ------------------------------------------------------------------------------


@pytest.fixture
def reg(tmp_path) -> RegistryRepo:
    return RegistryRepo(tmp_path / "registry")


def _tamper_model(folder: Path, _version: str) -> None:
    with open(folder / "model.tflite", "ab") as f:
        f.write(b"\0evil")


def test_a_tampered_model_file_is_refused(reg, data_dir, keys):
    k = keys["old"]
    reg.release(V0, prepare=k.signer())

    def sign_then_tamper(folder: Path, version: str) -> None:
        k.signer()(folder, version)
        _tamper_model(folder, version)  # the manifest still names the old sha256 too

    reg.release(V1, prepare=sign_then_tamper)
    mm = _manager(data_dir, reg, trusted_keys=[k.inline])
    report = mm.update(time.time())
    assert [v for v, _ in report.refused] == [V1] and report.activated == V0  # the next best, same pass
    reason = report.refused[0][1]
    assert "files differ from the signed release" in reason and "model.tflite has sha256" in reason
    assert f"{MODEL_NAME}@v{V1}" in reason
    _assert_refused_before_anything_activated(mm, V1, reason, V0)


def test_a_tampered_manifest_is_refused_even_with_matching_sha256_fields(reg, data_dir, keys):
    """An attacker swaps model.tflite and rewrites the manifest's sha256 to match: sha256 checks pass, the signature
    does not; a manifest edited without touching its sha256 fields (the labels swapped) is refused the same way."""
    k = keys["old"]

    def swap_model_and_fix_manifest(folder: Path, version: str) -> None:
        k.signer()(folder, version)
        _tamper_model(folder, version)
        m = json.loads((folder / "manifest.json").read_text())
        m["sha256"] = sha256_file(folder / "model.tflite")
        (folder / "manifest.json").write_text(json.dumps(m, indent=2))

    def swap_labels(folder: Path, version: str) -> None:
        k.signer()(folder, version)
        m = json.loads((folder / "manifest.json").read_text())
        m["labels"][0], m["labels"][1] = m["labels"][1], m["labels"][0]
        (folder / "manifest.json").write_text(json.dumps(m, indent=2))

    reg.release(V1, prepare=swap_model_and_fix_manifest)
    reg.release(V2, prepare=swap_labels)
    mm = _manager(data_dir, reg, trusted_keys=[k.inline])
    report = mm.update(time.time())
    assert report.activated is None and [v for v, _ in report.refused] == [V2, V1]
    reasons = dict(report.refused)
    assert "manifest.json has sha256" in reasons[V1] and "model.tflite has sha256" in reasons[V1]
    assert "manifest.json has sha256" in reasons[V2] and "model.tflite" not in reasons[V2]
    for v in (V1, V2):
        _assert_refused_before_anything_activated(mm, v, reasons[v], None)
    # without keys the swapped model passes every sha256 check: that is what the signature adds
    plain = _manager(data_dir / "unkeyed", reg)
    assert plain.update(time.time()).activated == V2


def test_untrusted_key_and_unsigned_are_refused_only_when_keys_are_configured(reg, data_dir, keys, caplog):
    reg.release(V0)  # unsigned
    reg.release(V1, prepare=keys["other"].signer())  # a key the device does not hold
    mm = _manager(data_dir, reg, trusted_keys=[keys["old"].inline])
    report = mm.update(time.time())
    assert report.activated is None and [v for v, _ in report.refused] == [V1, V0]
    reasons = dict(report.refused)
    assert f"signature untrusted (key {keys['other'].id})" in reasons[V1] and "not in sync.trusted_keys" in reasons[V1]
    assert "signature unsigned: no manifest.sig" in reasons[V0]
    for v in (V0, V1):
        _assert_refused_before_anything_activated(mm, v, reasons[v], None)

    # no keys: both accepted, each release named in one warning
    caplog.set_level(logging.WARNING, logger="har_edge.sync.trust")
    free = _manager(data_dir / "free", reg)
    first = free.update(time.time())
    assert first.activated == V1 and not first.refused
    warned = [r.getMessage() for r in caplog.records if "without a checked signature" in r.getMessage()]
    assert len(warned) == 1 and f"{MODEL_NAME}@v{V1}" in warned[0] and "unchecked" in warned[0]
    rel = next(r for r in free.registry.releases() if r.version == V1)
    folder = free.registry.fetch(rel, data_dir / "again" / "model")
    free.verify(folder, rel)  # the same release again: no second warning
    assert len([r for r in caplog.records if "without a checked signature" in r.getMessage()]) == 1
    free.pin_version(V0, time.time())
    warned = [r.getMessage() for r in caplog.records if "without a checked signature" in r.getMessage()]
    assert len(warned) == 2 and "unsigned: no manifest.sig" in warned[1]


def test_rotation_old_trusted_then_new_added_then_old_revoked(reg, data_dir, keys, capsys):
    old, new = keys["old"], keys["new"]
    (data_dir / "keys").mkdir()
    for k in (old, new):
        (data_dir / "keys" / f"{k.id}.pub").write_text(k.inline + "\n")
    old_file, new_file = f"keys/{old.id}.pub", f"keys/{new.id}.pub"

    reg.release(V0, prepare=old.signer())
    mm = _manager(data_dir, reg, trusted_keys=[old_file])
    assert mm.update(time.time()).activated == V0

    # the trainer starts signing with the new key before the device knows it: refused
    reg.release(V1, prepare=new.signer())
    reason = _refused_only(mm.update(time.time()), V1)
    assert f"untrusted (key {new.id})" in reason

    # both keys trusted: the refused V1 is judged again under the new keys, without a re-release or a pin
    mm = _manager(data_dir, reg, trusted_keys=[old_file, new_file])
    assert mm.update(time.time()).activated == V1
    assert V1 not in ModelState.load(mm.models_dir).refused

    # the old key revoked (still listed as trusted): its signatures are refused, the new key's accepted
    reg.release(V2, prepare=old.signer())
    mm = _manager(data_dir, reg, trusted_keys=[old_file, new_file], revoked_keys=[old.id])
    reason = _refused_only(mm.update(time.time()), V2)
    assert f"signature revoked (key {old.id})" in reason and "sync.revoked_keys" in reason
    _assert_refused_before_anything_activated(mm, V2, reason, V1)
    reg.release(V3, prepare=new.signer())
    assert mm.update(time.time()).activated == V3

    # `models verify` shows what the agent would run: V3 trusted under the new key, V1 (previous) too
    settings = mm.settings
    capsys.readouterr()
    assert cli.cmd_models_verify(settings, argparse.Namespace(version=None, release=None)) == 0
    out = capsys.readouterr().out
    assert f"{V3}: signature trusted (key {new.id}): signed as {MODEL_NAME} {V3}" in out
    assert f"{V1}: signature trusted (key {new.id})" in out
    # a release signed by the revoked key, checked without installing it
    assert cli.cmd_models_verify(settings, argparse.Namespace(version=None, release=V2)) == 1
    out = capsys.readouterr().out
    assert f"signature revoked (key {old.id})" in out and "FAILED" in out

    # an installed folder whose signature no longer holds (the old key revoked after V0... here: V3 tampered)
    _tamper_model(mm.models_dir / V3, V3)
    assert cli.cmd_models_verify(settings, argparse.Namespace(version=V3, release=None)) == 1
    out = capsys.readouterr().out
    assert f"{V3}: signature invalid (key {new.id}): files differ" in out


def test_models_verify_shows_unsigned_and_bundled(reg, data_dir, keys, capsys):
    reg.release(V0)
    plain = _manager(data_dir, reg)
    capsys.readouterr()
    assert cli.cmd_models_verify(plain.settings, argparse.Namespace(version=None, release=None)) == 0
    assert "bundled: signature bundled: part of the har-edge install" in capsys.readouterr().out
    assert plain.update(time.time()).activated == V0
    assert cli.cmd_models_verify(plain.settings, argparse.Namespace(version=None, release=None)) == 0
    assert f"{V0}: signature unsigned: no manifest.sig" in capsys.readouterr().out
    # the same device with keys: the installed unsigned model is reported as failing
    keyed = _settings(data_dir, reg, trusted_keys=[keys["old"].inline])
    assert cli.cmd_models_verify(keyed, argparse.Namespace(version=None, release=None)) == 1
    out = capsys.readouterr().out
    assert f"{V0}: FAILED: signature unsigned" in out and "sync.trusted_keys is set" in out


# -- no substitution, no downgrade ---------------------------------------------------------------------------


def test_a_signed_model_under_another_tag_is_refused(reg, data_dir, keys):
    """V0, properly signed, re-tagged as V2: the tag must equal the signed name and version."""
    k = keys["old"]
    reg.release(V0, prepare=k.signer())
    reg.release(V1, prepare=k.signer())
    signed_v0 = reg.folders[V0]

    def substitute(folder: Path, _version: str) -> None:
        shutil.rmtree(folder)
        shutil.copytree(signed_v0, folder)

    reg.release(V2, prepare=substitute)
    # another model's signed release under this model's name
    reg.release(V3, prepare=k.signer(name="other-model"))
    mm = _manager(data_dir, reg, trusted_keys=[k.inline])
    report = mm.update(time.time())
    assert report.activated == V1
    reasons = dict(report.refused)
    assert f"signed as {MODEL_NAME} {V0}, released as {MODEL_NAME} {V2}" in reasons[V2]
    assert f"signed as other-model {V3}, released as {MODEL_NAME} {V3}" in reasons[V3]


def test_a_lower_version_is_refused_unless_pinned_or_rolled_back_to(reg, data_dir, keys):
    k = keys["old"]
    reg.release_many([(V0, "good"), (V1, "good")], prepare=k.signer())
    mm = _manager(data_dir, reg, trusted_keys=[k.inline])
    assert mm.update(time.time()).activated == V1
    assert mm.update(time.time()).note == f"{V1} is the newest usable release"

    # an automatic install of V0 over V1 (the path a pull takes) is refused as a downgrade
    rel_v0 = next(r for r in mm.registry.releases() if r.version == V0)
    report = PullReport()
    mm._install(rel_v0, time.time(), report, outcome=DeploymentOutcome.ACTIVATED, reason="newer release")
    reason = _refused_only(report, V0)
    assert f"{MODEL_NAME} {V0} is older than the active {V1}: a pull never downgrades" in reason
    _assert_refused_before_anything_activated(mm, V0, reason, V1)

    # a person pins it: allowed (signature still checked)
    assert mm.pin_version(V0, time.time()).activated == V0
    assert read_pointer(mm.models_dir) == V0
    mm.unpin()
    assert mm.update(time.time()).activated.startswith(V1)  # following the newest again (V1 is still previous)
    # and a rollback to the previous (lower) version is allowed
    assert mm.rollback(time.time()).rolled_back.startswith(V1)
    assert read_pointer(mm.models_dir) == V0


def test_a_pinned_release_is_checked_like_a_pulled_one(reg, data_dir, keys):
    """A pin checks the signature like a pull: an unsigned release is refused even when pinned by a person."""
    k = keys["old"]
    reg.release(V0, prepare=k.signer())
    reg.release(V1)
    mm = _manager(data_dir, reg, trusted_keys=[k.inline])
    report = mm.pin_version(V1, time.time())
    assert [v for v, _ in report.refused] == [V1] and "signature unsigned" in report.refused[0][1]
    assert read_pointer(mm.models_dir) is None


# -- har-train keygen + release, as processes -------------------------------------------------------------------


def _run(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_har_train_keygen_and_release_sign_and_never_show_the_private_key(tmp_path, data_dir):
    from trainer_helpers import synthetic_params

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), DVC_NO_ANALYTICS="1")
    env.pop("HAR_TRAIN_SIGNING_KEY", None)
    train = [sys.executable, "-m", "har_edge.trainer.cli", "-v"]
    secrets = tmp_path / "secrets"

    gen = _run([*train, "keygen", "--out", str(secrets / "release.key")], cwd=tmp_path, env=env)
    assert gen.returncode == 0, gen.stderr
    key_file, pub_file = secrets / "release.key", secrets / "release.key.pub"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    from har_edge.trainer.keys import load_signing_key

    private = load_signing_key(key_file, {})
    kid = key_id(private.public_key())
    assert f"key id {kid}" in gen.stdout
    again = _run([*train, "keygen", "--out", str(key_file)], cwd=tmp_path, env=env)
    assert again.returncode == 1 and "is never overwritten" in again.stderr

    reg = RegistryRepo(tmp_path / "registry")
    params = synthetic_params(tmp_path / "trainer", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out_logs = [gen.stdout + gen.stderr]
    for n, how in enumerate(("file", "env", "params")):
        version = release_version(n)
        folder = make_model_folder(tmp_path / f"model-{version}", version)
        run_env = dict(env)
        args = [*train, "--params", str(params), "release", str(folder), "--registry", str(reg.work)]
        args += ["--remote", str(reg.store)]
        if how == "file":
            args += ["--signing-key", str(key_file)]
        elif how == "env":
            run_env["HAR_TRAIN_SIGNING_KEY"] = key_file.read_text()
        else:
            args[len(train) : len(train)] = ["--set", f"release.signing_key={key_file}"]
        res = _run(args, cwd=tmp_path, env=run_env)
        assert res.returncode == 0, res.stderr[-3000:]
        result = json.loads(res.stdout[res.stdout.index("{") :])
        assert result["key_id"] == kid and result["tag"] == f"{MODEL_NAME}@v{version}"
        assert not (folder / SIGNATURE_FILE).exists()  # the signature goes into the registry copy
        out_logs.append(res.stdout + res.stderr)
    tag_msg = subprocess.run(
        ["git", "tag", "-l", "--format=%(contents)", f"{MODEL_NAME}@v{V1}"],
        cwd=reg.work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"signed_by={kid}" in tag_msg

    # the device trusts the .pub file: both signed releases verify; the newest is activated
    shutil.copy(pub_file, data_dir / "release.pub")
    mm = _manager(data_dir, reg, trusted_keys=["release.pub"])
    assert mm.update(time.time()).activated == V2
    states = dict(mm.signature_states())
    assert states[V2].state == "trusted" and states[V2].key_id == kid

    # the private key appears nowhere: not in any output or log, not in the registry, its remote or the DVC store
    pem = key_file.read_text()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    seed = private.private_bytes_raw()
    needles = [body, base64.b64encode(seed).decode(), seed.hex(), body[8:40]]
    everything = "\n".join(out_logs)
    for needle in needles:
        assert needle not in everything
    history = subprocess.run(
        ["git", "log", "--all", "-p", "--format=%B"], cwd=reg.work, capture_output=True, text=True, check=True
    ).stdout
    assert all(n not in history for n in needles)
    for path in tmp_path.rglob("*"):  # registry, its git remote, the DVC store, MLflow, the device
        if secrets not in path.parents and path.is_file() and not path.is_symlink():
            raw = path.read_bytes()
            assert seed not in raw and all(n.encode() not in raw for n in needles), path
    # a key file placed inside the registry is refused
    inside = reg.work / "release.key"
    shutil.copy(key_file, inside)
    version = release_version(5)
    folder = make_model_folder(tmp_path / "model-inside", version)
    args = [*train, "--params", str(params), "release", str(folder), "--registry", str(reg.work)]
    res = _run([*args, "--signing-key", str(inside)], cwd=tmp_path, env=env)
    assert res.returncode == 1 and "lies inside the registry" in res.stderr


def test_a_release_without_a_key_is_unsigned_with_a_warning(tmp_path, data_dir, caplog):
    """A release with no key: allowed, warned, no manifest.sig; devices with keys refuse it."""
    from trainer_helpers import synthetic_params

    from har_edge.trainer.release import release
    from har_edge.trainer.settings import load_settings as trainer_settings

    reg = RegistryRepo(tmp_path / "registry")
    s = trainer_settings(synthetic_params(tmp_path / "trainer", tracking_uri=f"sqlite:///{tmp_path / 'ml.db'}"))
    folder = make_model_folder(tmp_path / "model", V0)
    caplog.set_level(logging.WARNING, logger="har_edge.trainer.keys")
    r = release(s, folder, registry=str(reg.work), remote=str(reg.store))
    assert r.key_id is None
    assert any(f"releasing {MODEL_NAME} {V0} unsigned" in m for m in caplog.messages)
    assert not (reg.work / "models" / MODEL_NAME / SIGNATURE_FILE).exists()
    mm = _manager(data_dir, reg, trusted_keys=[Key().inline])
    assert "signature unsigned" in _refused_only(mm.update(time.time()), V0)


def test_a_bad_private_key_is_named_without_echoing_it(tmp_path, caplog):
    from har_edge.trainer.errors import ReleaseError
    from har_edge.trainer.keys import ENV_KEY, load_signing_key

    secret = "-----BEGIN PRIVATE KEY-----\nTOPSECRETxMATERIALxTHATxISxNOTxAxKEY\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigError) as err:
        load_signing_key(None, {ENV_KEY: secret})
    assert f"${ENV_KEY} is not an unencrypted ed25519 private key" in str(err.value)
    assert "TOPSECRET" not in str(err.value)
    assert load_signing_key("", {}) is None  # no key: an unsigned release (warned at release)
    loose = tmp_path / "loose.key"
    key = Ed25519PrivateKey.generate()
    loose.write_text(key.private_bytes_raw().hex())  # neither PEM nor base64
    with pytest.raises(ConfigError, match=r"loose\.key is not an unencrypted ed25519 private key") as err:
        load_signing_key(loose, {})
    assert key.private_bytes_raw().hex() not in str(err.value)
    loose.write_text(base64.b64encode(key.private_bytes_raw()).decode())
    loose.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="har_edge.trainer.keys")
    assert key_id(load_signing_key(loose, {}).public_key()) == key_id(key.public_key())
    assert any("readable by others (mode 644): chmod 600 it" in m for m in caplog.messages)
    with pytest.raises(ReleaseError, match="cannot be read"):
        load_signing_key(tmp_path / "absent.key", {})
