"""The linux/arm64 edge image, built and run under qemu-user-static, against the x86_64 image.

``docker/build.sh edge --arch arm64`` debootstraps an arm64 base (second stage under qemu, cached in
.cache/podman/ and in podman's storage), downloads the aarch64 wheels on the host
(``pip download --platform manylinux_2_*_aarch64``) and builds the image with ``podman build
--platform linux/arm64``: every RUN step executes under emulation. The agent then runs in it the way
it is deployed (non-root, ``--network=none --read-only``, one data volume) with ``QEMU_CPU=cortex-a72``,
the Raspberry Pi 4's core, so that LiteRT/XNNPACK pick the kernels such a device runs (no dotprod, no
fp16 arithmetic). Its predictions on a FIT export are compared with the x86_64 image's on the same file.

Needs root (binfmt_misc mount, qemu-user-static); otherwise it skips with the reason. Marker
``arm64``: ``make test-arm64`` runs it, ``make test`` leaves it out (docs/deploy.md gives the figures).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from test_docker import BUILD, CACHE, IMAGE, UID, Podman, data_volume, drop_export, outbox_copy

IMAGE_ARM64 = "localhost/har-edge:test-arm64"
MANIFEST = "localhost/har-edge:test-multiarch"
QEMU_CPU = "cortex-a72"  # Raspberry Pi 4 (Pi 5: cortex-a76)
EXPORT_MINUTES = 10

pytestmark = [pytest.mark.arm64, pytest.mark.podman, pytest.mark.slow, pytest.mark.timeout(3600)]


def _build(*args: str) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    res = subprocess.run([str(BUILD), *args], capture_output=True, text=True, timeout=3600)
    if res.returncode == 3:
        pytest.skip(
            "an arm64 build needs podman, qemu-user-static and a binfmt_misc entry for qemu-aarch64, which only "
            "root can install and register: as root, apt-get install -y podman runc debootstrap zstd uidmap "
            "qemu-user-static binfmt-support; mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc "
            f"({res.stderr.strip()[-300:]})"
        )
    assert res.returncode == 0, f"docker/build.sh {' '.join(args)} failed:\n{res.stderr[-5000:]}"
    print(
        f"docker/build.sh {' '.join(args)}: {time.monotonic() - t0:.0f} s\n{res.stderr.strip()}\n{res.stdout.strip()}"
    )
    return res


@pytest.fixture(scope="module")
def podman() -> Podman:
    """Both images: the x86_64 one and the arm64 one (built under emulation)."""
    if os.geteuid() != 0 and not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip(
            "no binfmt_misc entry for qemu-aarch64 and not root (only root can mount binfmt_misc and register "
            "qemu-user-static): as root, apt-get install -y qemu-user-static binfmt-support and run again"
        )
    _build("edge", "--tag", IMAGE)
    res = _build("edge", "--arch", "arm64", "--tag", IMAGE_ARM64)
    p = Podman(dict(os.environ, CONTAINERS_CONF=str(CACHE / "containers.conf")), IMAGE_ARM64, res.stdout.strip())
    # LiteRT's interpreter under this qemu first: when qemu cannot run it, say so at once instead of waiting
    # for an export that the agent never processes
    load = (
        "from ai_edge_litert.interpreter import Interpreter; from har_edge.agent.model import BUNDLED_MODEL_DIR; "
        "Interpreter(model_path=str(BUNDLED_MODEL_DIR / 'model.tflite')).allocate_tensors(); print('loaded')"
    )
    probe = ("run", "--rm", "--network", "none", "-e", f"QEMU_CPU={QEMU_CPU}", IMAGE_ARM64, "python3", "-c", load)
    res = p(*probe, check=False, timeout=600)
    if "loaded" not in res.stdout:
        qemu = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout
        pytest.fail(
            f"LiteRT's Interpreter does not load in the arm64 image under {qemu.splitlines()[0] if qemu else 'qemu'}"
            f" (exit {res.returncode}): {(res.stdout + res.stderr).strip()[-800:]}"
        )
    yield p
    for n in reversed(p.names):
        p("rm", "-f", "-t", "0", n, check=False)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from fitgen import write_imu_fit

    path = tmp_path_factory.mktemp("export") / "walk.fit"
    write_imu_fit(path, rate_hz=50, seconds=60 * EXPORT_MINUTES, start=datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC))
    return path


@dataclass
class Run:
    image: str
    data: Path
    uid: str
    arch: str
    runtime_line: str
    opt_write: subprocess.CompletedProcess
    log_line: str
    labels: list[str]
    probs: np.ndarray
    starts: np.ndarray
    windows: int
    process_s: float


_LINE = re.compile(r"walk\.fit: (\d+) windows with .* in ([\d.]+) s \(decode ([\d.]+), .* inference ([\d.]+),")


def _run_agent(podman: Podman, image: str, root: Path, export: Path, env: dict[str, str]) -> Run:
    """`har-edge agent run` in `image` as deployed; the export renamed into the mounted inbox; SIGTERM."""
    from har_edge.common.hashing import export_sha256

    data = data_volume(root / "data")
    name = podman.name("arm64" if image == IMAGE_ARM64 else "amd64")
    env = {"HAR_EDGE_AGENT__SETTLE_S": "0.5", **env}
    podman("run", "-d", "--name", name, *podman.run_args(data, env=env), image)
    podman.wait_for_log(name, "watching /data/inbox", timeout=600)
    uid = podman("exec", name, "id", "-u").stdout.strip()
    arch = podman("exec", name, "uname", "-m").stdout.strip()
    runtime_line = podman(
        "exec", name, "python3", "-c", "from har_edge.agent.runtime import runtime_name; print(runtime_name())"
    ).stdout.strip()
    opt_write = podman("exec", name, "touch", "/opt/venv/x", check=False)
    t0 = drop_export(data, export)
    while not list((data / "archive").rglob("walk.fit")):
        if list((data / "quarantine").glob("*.reason.json")):
            raise AssertionError(f"{image}: the export was quarantined:\n{podman.logs(name)[-3000:]}")
        if time.monotonic() - t0 > 900:
            raise AssertionError(f"{image}: the export was not processed within 900 s:\n{podman.logs(name)[-3000:]}")
        time.sleep(0.5)
    process_s = time.monotonic() - t0
    podman("stop", "-t", "60", name, timeout=180)
    logs = podman.logs(name)
    (log_line,) = [m.group(0) for m in _LINE.finditer(logs)] or [f"no processing line in:\n{logs[-2000:]}"]
    with outbox_copy(data, root / "ob") as ob:
        rec = ob.processed_file(export_sha256([export]))
        assert rec is not None, f"{image}: no processed file in the outbox {ob.status_counts()}"
        labels, starts, probs = ob.file_windows(rec.id)
        windows = rec.windows
    return Run(image, data, uid, arch, runtime_line, opt_write, log_line, labels, probs, starts, windows, process_s)


@pytest.fixture(scope="module")
def runs(podman: Podman, export: Path, tmp_path_factory) -> dict[str, Run]:
    amd64 = _run_agent(podman, IMAGE, tmp_path_factory.mktemp("amd64"), export, {})
    arm64 = _run_agent(podman, IMAGE_ARM64, tmp_path_factory.mktemp("arm64"), export, {"QEMU_CPU": QEMU_CPU})
    for r in (amd64, arm64):
        m = _LINE.search(r.log_line)
        if m:
            n, total, _decode, infer = int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))
            print(
                f"{r.image} ({r.arch}): {n} windows in {total:.2f} s = {n / total:.0f} windows/s "
                f"(inference alone {infer:.2f} s = {n / max(infer, 1e-9):.0f} windows/s); "
                f"drop to archive {r.process_s:.1f} s"
            )
    return {"amd64": amd64, "arm64": arm64}


def _output_step() -> float:
    """The int8 output quantization step (scale) of the bundled model."""
    from ai_edge_litert.interpreter import Interpreter

    from har_edge.agent.model import BUNDLED_MODEL_DIR

    (out,) = Interpreter(model_path=str(BUNDLED_MODEL_DIR / "model.tflite")).get_output_details()
    assert np.dtype(out["dtype"]) == np.int8, out
    return float(out["quantization"][0])


def test_arm64_image_is_an_arm64_image(podman: Podman):
    (cfg,) = json.loads(podman("image", "inspect", IMAGE_ARM64).stdout)
    assert cfg["Os"] == "linux" and cfg["Architecture"] == "arm64", (cfg["Os"], cfg["Architecture"])
    assert cfg["Config"]["User"] == f"{UID}:{UID}" and cfg["Config"]["Cmd"] == ["har-edge", "agent", "run"]
    (x86,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    assert x86["Architecture"] == "amd64"
    print(f"image sizes: amd64 {x86['Size'] / 1e6:.0f} MB, arm64 {cfg['Size'] / 1e6:.0f} MB")
    assert cfg["Size"] < 480e6, f"the arm64 edge image grew to {cfg['Size'] / 1e6:.0f} MB"


def test_the_export_ends_as_rows_in_the_outbox_of_the_arm64_image(runs: dict[str, Run]):
    r = runs["arm64"]
    assert r.arch == "aarch64", r.arch
    assert r.runtime_line == "ai_edge_litert", r.runtime_line
    assert r.uid == str(UID)
    assert r.opt_write.returncode != 0 and "Read-only file system" in r.opt_write.stderr
    assert r.windows > 0 and len(r.probs) == r.windows, (r.windows, r.probs.shape)
    assert _LINE.search(r.log_line), r.log_line
    assert not list((r.data / "inbox").iterdir())


def test_arm64_predictions_agree_with_the_x86_64_image(runs: dict[str, Run]):
    a, b = runs["amd64"], runs["arm64"]
    assert a.labels == b.labels and a.windows == b.windows and np.array_equal(a.starts, b.starts)
    step = _output_step()
    diff = np.abs(a.probs - b.probs)
    steps = diff / step
    top2 = np.sort(a.probs, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * step  # windows whose winner is more than 2 output steps ahead
    same = np.argmax(a.probs, axis=1) == np.argmax(b.probs, axis=1)
    print(
        f"{a.windows} windows: output step {step:.6f}; max |p_x86 - p_arm64| = {diff.max():.6f} "
        f"({steps.max():.1f} steps); {int((steps > 0.5).sum())} of {steps.size} probabilities differ; "
        f"labels differ in {int((~same).sum())} windows, {int((~same & clear).sum())} of them with a "
        f"top-2 margin > 2 steps ({int(clear.sum())} such windows)"
    )
    assert clear.any(), "no window with a clear winner: the comparison says nothing"
    assert same[clear].all(), np.flatnonzero(clear & ~same)[:20]
    assert steps.max() <= 2 + 1e-3, f"probabilities differ by up to {steps.max():.2f} output steps"


def test_a_manifest_list_holds_both_images(podman: Podman):
    res = subprocess.run(
        [str(BUILD), "manifest", "--tag", MANIFEST, "--from", IMAGE, "--from", IMAGE_ARM64],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(podman("manifest", "inspect", MANIFEST).stdout)
    platforms = sorted((m["platform"]["os"], m["platform"]["architecture"]) for m in doc["manifests"])
    assert platforms == [("linux", "amd64"), ("linux", "arm64")], doc
    digests = {m["digest"] for m in doc["manifests"]}
    assert len(digests) == 2
