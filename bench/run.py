"""``python -m bench.run`` (``make bench``): every section, one table, figures side by side in one run.

    python -m bench.run                       # all sections, ~10-15 min on 2 quiet cores
    python -m bench.run --sections e2e,swap   # some of them
    python -m bench.run --quick               # fewer rounds and repeats (a smoke run)
    python -m bench.run --model-dir DIR --keras FILE.keras
    python -m bench.run --write-docs          # also rewrite the figures block of docs/benchmarks.md
                                              # (refused on a busy machine unless BENCH_FORCE=1 or --force)

Prints the table and writes every raw number to ``.cache/bench/results.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, SCRATCH, Report, machine

log = logging.getLogger("bench")

SECTIONS = ("inference", "own_model", "e2e", "swap", "memory", "sync", "monitoring")
DOCS = ROOT / "docs" / "benchmarks.md"
FORCE_ENV = "BENCH_FORCE"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repeats: a smoke run, not figures")
    ap.add_argument("--model-dir", type=Path, help="model folder to measure (default: the bundled model)")
    ap.add_argument(
        "--keras",
        type=Path,
        help="the float Keras model of the same architecture "
        "(default: build/trainer/train/model.keras when it exists, else trainer.model's architecture)",
    )
    ap.add_argument("--sync-points", type=int, default=100_000, help="metric points queued for the sync section")
    ap.add_argument("--write-docs", action="store_true", help=f"rewrite the figures block of {DOCS.relative_to(ROOT)}")
    ap.add_argument(
        "--force",
        action="store_true",
        help=f"--write-docs even when the machine was busy (load average above the core count; or {FORCE_ENV}=1)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("bench").setLevel(logging.INFO)
    for noisy in ("agent", "sync", "mlflow", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        print(f"unknown sections: {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    report = Report()
    report.raw["machine"] = machine()
    cores = report.raw["machine"]["cores_usable"]
    print(f"load average {report.raw['machine']['load_avg_at_start']} (1, 5, 15 min) on {cores} usable cores"
          + ("" if os.getloadavg()[0] <= cores else ": busy, figures will be noisy"), flush=True)  # fmt: skip
    report.raw["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    load_sampler = LoadSampler()
    server = None
    try:
        if "inference" in wanted:
            from bench import inference

            inference.run(
                report, model_dir=args.model_dir, keras_path=args.keras, rounds=3 if args.quick else inference.ROUNDS
            )
        if "own_model" in wanted:
            from bench import own_model

            own_model.run(report, quick=args.quick)
        if "e2e" in wanted:
            from bench import e2e

            e2e.run(report, model_dir=args.model_dir, repeats=1 if args.quick else e2e.REPEATS, quick=args.quick)
        if "swap" in wanted:
            from bench import swap

            swap.run(report, model_dir=args.model_dir, files=4 if args.quick else swap.FILES)
        if "monitoring" in wanted:
            from bench import monitoring

            monitoring.run(report, quick=args.quick)
        if "sync" in wanted or "memory" in wanted:
            # ~30 s of CPU to start: in the background of the memory section, whose figures are not times
            from bench.mlflow_server import MlflowServer

            server = MlflowServer(SCRATCH / "mlflow-server")
            server.start_background()
            if "memory" in wanted:
                from bench import memory

                memory.run_agent(report, model_dir=args.model_dir)
            if "sync" in wanted:
                from bench import delivery

                server.wait()
                delivery.run(report, server, points=args.sync_points if not args.quick else 10_000, quick=args.quick)
            if "memory" in wanted:
                from bench import memory

                server.wait()
                memory.run_sync_once(report, server)
    finally:
        if server is not None:
            server.stop()
    report.raw["seconds"] = round(time.perf_counter() - t_start, 1)
    report.raw["machine"]["load_avg_at_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report.raw["load_samples"] = load_sampler.stop()
    (SCRATCH / "results.json").write_text(report.to_json())
    m = report.raw["machine"]
    print(f"\nhar-edge bench: {m['cpu']} ({m['cores_usable']} cores usable), Python {m['python']}, "
          f"load {m['load_avg_at_start']} -> {m['load_avg_at_end']}, {report.raw['seconds']:.0f} s\n")  # fmt: skip
    print(report.table())
    for note in report.notes:
        print(f"- {note}")
    print(f"\nraw figures: {(SCRATCH / 'results.json').relative_to(ROOT)}")
    if args.write_docs:
        busy = busy_reason(report.raw["machine"], report.raw["load_samples"])
        forced = args.force or os.environ.get(FORCE_ENV, "") not in ("", "0")
        if busy and not forced:
            print(f"\nNOT written to {DOCS.relative_to(ROOT)}: {busy}; the published figures are quiet-machine "
                  f"figures (run again when idle, or force it with {FORCE_ENV}=1 or --force)")  # fmt: skip
        else:
            write_docs(report, busy)
            print(f"figures written to {DOCS.relative_to(ROOT)}" + (f" (forced: {busy})" if busy else ""))
    missed = [r for r in report.rows if r.ok is False]
    return 1 if missed else 0


class LoadSampler:
    """The 1-minute load average every 10 s while the bench runs (its own work counts: up to the cores it uses)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="load-sampler", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        return self.samples


def busy_reason(m: dict[str, Any], samples: list[float]) -> str:
    """Why this run's figures are not quiet-machine figures ('' when they are).

    Busy: the 1-minute load average above the usable core count at the start (others were running before
    the bench added its own load), or its median over the run above the core count plus one (the bench
    itself keeps up to two cores busy in its 2-thread rounds, so a load of cores + 1 means others ran too).
    """
    cores = int(m["cores_usable"])
    start = float(m["load_avg_at_start"].split()[0])
    if start > cores:
        return f"load average {start:.1f} at the start, above the {cores} usable cores"
    med = statistics.median(samples) if samples else 0.0
    if med > cores + 1:
        return f"median load average {med:.1f} during the run, above {cores} cores + the bench's own"
    return ""


def write_docs(report: Report, busy: str = "") -> None:
    """Replace the block between the bench markers of docs/benchmarks.md with this run's table."""
    m = report.raw["machine"]
    block = "\n".join([
        BEGIN,
        f"Run of {time.strftime('%Y-%m-%d %H:%M %Z')}: `{report.raw['command'].strip()}` in "
        f"{report.raw['seconds']:.0f} s on {m['cpu']} ({m['cores_usable']} cores usable, {m['isa']}), "
        f"{m['memory']}, {m['os']}, Python {m['python']}, numpy {m['numpy']}, ai-edge-litert {m['ai_edge_litert']}, "
        f"OPENBLAS_CORETYPE {m['OPENBLAS_CORETYPE']}; load average {m['load_avg_at_start']} at the start, "
        f"{m['load_avg_at_end']} at the end"
        + (f"; WRITTEN WHILE BUSY ({busy}), forced." if busy else "."),
        "",
        report.table(),
        "",
        *[f"- {n}" for n in report.notes],
        END,
    ])  # fmt: skip
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
