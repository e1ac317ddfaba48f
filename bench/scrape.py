"""The cost of one /metrics scrape on a big outbox (``python -m bench.scrape [--files N --points N]``).

The collector (:mod:`har_edge.agent.metrics`) queries the outbox on every
scrape. This fills an outbox the agent's way (SQLAlchemy schema, WAL) with
``--files`` file rows (half of them delivered) and ``--points`` metric points
(half pending), then times the collector and a whole HTTP scrape of the
agent's registry. Prints the figures; writes nothing but its scratch outbox.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

T0_MS = 1_742_802_739_000


def fill(path: Path, files: int, points: int) -> None:
    from har_edge.agent.outbox import Outbox

    Outbox(path).close()  # the schema, as the agent makes it
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    with conn:
        conn.executemany(
            "INSERT INTO files (id, sha256, name, size, status, received_ms, processed_ms, windows, inference_s, "
            "agent_version, model_sha256, finished_ms) VALUES (?, ?, ?, 1000, ?, ?, ?, ?, ?, '0.1.0', 'x', ?)",
            (
                (
                    i + 1,
                    f"{i:064x}",
                    f"f{i}.fit",
                    "processed" if i % 10 else "failed",
                    T0_MS + i * 60_000,
                    T0_MS + i * 60_000,
                    43_200 if i % 10 else 0,
                    1.5 + (i % 7),
                    T0_MS + i * 60_000 if i < files // 2 else None,
                )
                for i in range(files)
            ),
        )
        per_file = max(1, points // files)
        conn.executemany(
            'INSERT INTO metrics (file_id, "key", value, timestamp_ms, step, delivered_ms) VALUES (?, ?, ?, ?, ?, ?)',
            (
                (
                    1 + j // per_file,
                    f"k{j % 50}",
                    float(j),
                    T0_MS + j,
                    j % 1440,
                    T0_MS + j if j < points // 2 else None,
                )
                for j in range(points)
            ),
        )
    conn.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--points", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    from prometheus_client import CollectorRegistry, generate_latest

    from har_edge.agent.daemon import Agent
    from har_edge.agent.http import agent_checks, agent_registry, serve
    from har_edge.agent.metrics import OutboxCollector
    from har_edge.agent.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="har-scrape-") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        fill(data / "outbox.sqlite", args.files, args.points)
        size = (data / "outbox.sqlite").stat().st_size
        print(
            f"outbox: {args.files} files, {args.points} metric points, {size / 1e6:.0f} MB, filled in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        reg = CollectorRegistry()
        collector = OutboxCollector(data / "outbox.sqlite", model=lambda: None)
        reg.register(collector)
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            generate_latest(reg)
            times.append(time.perf_counter() - t)
        print(
            f"collector: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms "
            f"({args.rounds} scrapes)"
        )
        settings = load_settings(env={}, data_dir=data, http={"address": "127.0.0.1:0"})
        agent = Agent(settings)
        agent.models.refresh()
        http = serve(settings.http.address, agent_registry(agent), agent_checks(agent))
        assert http is not None
        url = f"http://127.0.0.1:{http.address[1]}"
        try:
            for path in ("/metrics", "/readyz"):
                times = []
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    with urllib.request.urlopen(url + path, timeout=60) as r:
                        body = r.read()
                    times.append(time.perf_counter() - t)
                print(
                    f"GET {path}: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms, "
                    f"{len(body)} bytes"
                )
        finally:
            http.stop()


if __name__ == "__main__":
    main()
