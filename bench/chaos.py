"""``make chaos``: the long fault-injection run (>= 200 kill -9, >= 10 server outages) and its figures.

The same harness as tests/test_faults.py (tests/faults_helpers.py) with the long deck: kill -9 and
SIGTERM of the agent and of sync, the MLflow server hung (SIGSTOP), refused (its port closed) and
killed and restarted, slow copies and copies that pause before their first byte. Exits 1 when an
invariant is broken, listing each.

    python -m bench.chaos [--seed N] [--pause-s S] [--files N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench.mlflow_server import MlflowServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from faults_helpers import LONG_DECK, Chaos, check_invariants, make_corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument(
        "--pause-s", type=float, default=None, help="first-byte pause of paused copies (default 3 x settle)"
    )
    ap.add_argument("--settle-s", type=float, default=0.3)
    ap.add_argument("--files", type=int, default=170, help="good exports dropped")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="har-edge-chaos-") as tmp:
        root = Path(tmp)
        server = MlflowServer(root / "mlflow")
        print(f"starting an MLflow server on {server.url} ...", flush=True)
        server.start()
        try:
            corpus = make_corpus(ROOT / ".cache" / "tests" / "faults", args.files, 8, random.Random(args.seed))
            (root / "var").mkdir()
            chaos = Chaos(
                root / "var", server, corpus, seed=args.seed, settle_s=args.settle_s, pause_s=args.pause_s,
                log_dir=root,
            )  # fmt: skip
            report = chaos.run(LONG_DECK, drop_every=3, log=lambda s: print(s, flush=True))
            print("checking the invariants ...", flush=True)
            problems = check_invariants(chaos, root / "downloads")
        finally:
            server.stop()
        print(f"seed {args.seed}: {report.summary()}")
        print(f"total with server start and checks: {time.monotonic() - t0:.0f} s")
        for p in problems:
            print("PROBLEM:", p)
        if problems:
            for name in ("agent.log", "sync.log"):
                print(f"--- tail of {name}\n" + (root / name).read_text(errors="replace")[-3000:])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
