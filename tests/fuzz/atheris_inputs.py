"""Coverage-guided fuzzing of the input formats with atheris (libFuzzer), for ``make fuzz``.

The same structure-aware mutators and invariant as tests/test_fuzz_inputs.py (tests/fuzzinputs.py),
driven by libFuzzer's bytes: the first bytes pick the format and the seed, the rest become mutation
operations. A broken invariant raises InvariantBroken, which libFuzzer reports as a crash with the
input that caused it (replay: ``python tests/fuzz/atheris_inputs.py crash-<hash>``).

    python tests/fuzz/atheris_inputs.py -runs=1000000 -rss_limit_mb=2048 -timeout=30
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["har_edge"]):
    import fitgen
    import fuzzinputs as fz

    import har_edge.agent.decode
    import har_edge.agent.preprocess  # noqa: F401

_WORK = Path(tempfile.mkdtemp(prefix="har-edge-atheris-"))
_SEEDS: dict[str, bytes] = {}
SEED_KW = {"walk": {}, "accel_only": {"with_gyro": False}, "raw": {"raw_counts": True}, "hsa": {"hsa": True},
           "be": {"big_endian": True}, "dev": {"developer_field": True, "extra_messages": True}}  # fmt: skip


def _seeds() -> dict[str, bytes]:
    if not _SEEDS:
        for k, kw in SEED_KW.items():
            _SEEDS[k] = fitgen.write_imu_fit(_WORK / f"seed-{k}.fit", seconds=10, **kw).path.read_bytes()
    return _SEEDS


def _ops(fdp: atheris.FuzzedDataProvider, n: int) -> list[tuple[int, int, int]]:
    return [(fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 1 << 16), fdp.ConsumeIntInRange(0, 1 << 24))
            for _ in range(n)]  # fmt: skip


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    seeds = _seeds()
    names = sorted(seeds)
    if kind == 0:
        files = [("export.fit", fz.mutate_fit(seeds[names[fdp.ConsumeIntInRange(0, len(names) - 1)]],
                                              _ops(fdp, fdp.ConsumeIntInRange(1, 6))))]  # fmt: skip
    elif kind == 1:
        rows = fz.mutate_rows(fz.study_rows("accelerometer", fdp.ConsumeIntInRange(1, 20)), _ops(fdp, 4), 6)
        files = [("r-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, rows))]
        if fdp.ConsumeBool():
            g = fz.mutate_rows(fz.study_rows("gyroscope", len(rows) or 1), _ops(fdp, 2), 6)
            files.append(("r-gyroscope_data.csv", fz.csv_bytes(fz.GYR_HEAD, g)))
    elif kind == 2:
        rows = fz.mutate_rows(fz.study_rows("accelerometer", 8), _ops(fdp, 3), 6)
        blob = fz.xlsx_bytes(fz.ACC_HEAD, rows, far_row=fdp.ConsumeBool())
        files = [("r-accelerometer.xlsx", fz.rewrite_xlsx_part(blob, _ops(fdp, fdp.ConsumeIntInRange(0, 3))))]
    else:
        members = [(fz.ZIP_NAMES[fdp.ConsumeIntInRange(0, len(fz.ZIP_NAMES) - 1)],
                    fz.mutate_fit(seeds[names[fdp.ConsumeIntInRange(0, len(names) - 1)]], _ops(fdp, 1)))
                   for _ in range(fdp.ConsumeIntInRange(1, 3))]  # fmt: skip
        files = [("export.zip", fz.zip_bytes(members, _ops(fdp, fdp.ConsumeIntInRange(0, 3))))]
    folder = _WORK / "case"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(exist_ok=True)
    fz.check_input(fz.write_files(folder, files))


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
