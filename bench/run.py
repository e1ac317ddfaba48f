"""``python -m bench.run`` (``make bench``): every section, one table, figures side by side in one run.

    python -m bench.run                       # all sections, ~5-8 min on 2 cores
    python -m bench.run --sections e2e,swap   # some of them
    python -m bench.run --quick               # fewer rounds and repeats (a smoke run)
    python -m bench.run --model-dir DIR --keras FILE.keras
    python -m bench.run --write-docs          # also rewrite the figures block of docs/benchmarks.md

Prints the table and writes every raw number to ``.cache/bench/results.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import ROOT, SCRATCH, Report, machine

log = logging.getLogger("bench")

SECTIONS = ("inference", "own_model", "e2e", "swap", "memory", "sync", "monitoring")
DOCS = ROOT / "docs" / "benchmarks.md"
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
    report.raw["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
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
    (SCRATCH / "results.json").write_text(report.to_json())
    m = report.raw["machine"]
    print(f"\nhar-edge bench: {m['cpu']} ({m['cores_usable']} cores usable), Python {m['python']}, "
          f"load {m['load_avg_at_start']} -> {m['load_avg_at_end']}, {report.raw['seconds']:.0f} s\n")  # fmt: skip
    print(report.table())
    for note in report.notes:
        print(f"- {note}")
    print(f"\nraw figures: {(SCRATCH / 'results.json').relative_to(ROOT)}")
    if args.write_docs:
        write_docs(report)
        print(f"figures written to {DOCS.relative_to(ROOT)}")
    missed = [r for r in report.rows if r.ok is False]
    return 1 if missed else 0


def write_docs(report: Report) -> None:
    """Replace the block between the bench markers of docs/benchmarks.md with this run's table."""
    m = report.raw["machine"]
    block = "\n".join([
        BEGIN,
        f"Run of {time.strftime('%Y-%m-%d %H:%M %Z')}: `{report.raw['command'].strip()}` in "
        f"{report.raw['seconds']:.0f} s on {m['cpu']} ({m['cores_usable']} cores usable, {m['isa']}), "
        f"{m['memory']}, {m['os']}, Python {m['python']}, numpy {m['numpy']}, ai-edge-litert {m['ai_edge_litert']}, "
        f"OPENBLAS_CORETYPE {m['OPENBLAS_CORETYPE']}; load average {m['load_avg_at_start']} at the start, "
        f"{m['load_avg_at_end']} at the end.",
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
