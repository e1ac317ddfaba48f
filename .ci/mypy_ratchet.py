"""Run mypy once and hold each package to its budget (``make lint``).

The edge packages (common, agent, sync, the CLI) are strict and must have no
error. The trainer and bench are checked with mypy's default rules and may not
get worse than their recorded count in ``mypy-ratchet.json`` (lower it when you
fix some). ``# type: ignore`` comments are capped too, and each must carry its
error code (mypy's ``ignore-without-code``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ROOT / ".ci" / "mypy-ratchet.json"
STRICT = (
    "har_edge/common/",
    "har_edge/agent/",
    "har_edge/sync/",
    "har_edge/central/",
    "har_edge/cli.py",
    "har_edge/__init__.py",
)
RATCHETED = {"har_edge/trainer/": "trainer", "bench/": "bench"}
_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: ")
_IGNORE = re.compile(r"#\s*type:\s*ignore")


def main() -> int:
    budget = json.loads(BUDGET.read_text())
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    lines = res.stdout.splitlines()
    counts = {"strict": 0, **{k: 0 for k in RATCHETED.values()}}
    strict_lines = []
    for line in lines:
        m = _ERROR.match(line)
        if not m:
            continue
        path = m["path"]
        if path.startswith(STRICT):
            counts["strict"] += 1
            strict_lines.append(line)
        for prefix, name in RATCHETED.items():
            if path.startswith(prefix):
                counts[name] += 1
    ignores = sum(
        len(_IGNORE.findall(p.read_text(encoding="utf-8")))
        for folder in ("har_edge", "bench")
        for p in (ROOT / folder).rglob("*.py")
    )
    failed = False
    if res.returncode not in (0, 1) or (res.returncode == 1 and not any(_ERROR.match(x) for x in lines)):
        print(res.stdout + res.stderr)
        print("mypy did not run cleanly")
        return 2
    if counts["strict"]:
        print("\n".join(strict_lines))
        print(f"mypy: {counts['strict']} errors in the strict packages (common, agent, sync, central, cli): fix them")
        failed = True
    for name in RATCHETED.values():
        have, allowed = counts[name], budget[name]
        if have > allowed:
            print(
                "\n".join(x for x in lines if x.startswith(f"{'har_edge/trainer/' if name == 'trainer' else 'bench/'}"))
            )
            print(f"mypy: {name} has {have} errors, its budget is {allowed}: fix the new ones")
            failed = True
        elif have < allowed:
            print(f"mypy: {name} has {have} errors, fewer than its budget {allowed}: lower it in {BUDGET.name}")
    if ignores > budget["type_ignores"]:
        print(f"mypy: {ignores} '# type: ignore' comments, the cap is {budget['type_ignores']}")
        failed = True
    if not failed:
        print(
            f"mypy: strict packages clean; trainer {counts['trainer']}/{budget['trainer']}, "
            f"bench {counts['bench']}/{budget['bench']} errors; {ignores}/{budget['type_ignores']} ignores"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
