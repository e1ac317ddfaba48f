"""The shape of the package: one installed namespace, the dependency rule, entry points, documented commands."""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "har_edge"

#: which of our packages each one may import (the layers of docs/architecture.md)
ALLOWED = {
    "common": {"common"},
    "agent": {"common", "agent"},
    "sync": {"common", "agent", "sync"},
    "trainer": {"common", "agent", "trainer"},
    "central": {"common", "central"},
    "cli": {"common", "agent", "sync", "central", "cli", "doctor"},
    "doctor": {"common", "agent", "sync", "doctor"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set[tuple[str, int]]:
    """Every har_edge subpackage a module imports, lazily inside functions included: (layer, line)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "har_edge" and len(parts) > 1:
                out.add((parts[1], node.lineno))
            elif parts[0] in {"agent", "sync", "trainer"}:
                out.add(("top-level " + parts[0], node.lineno))
    return out


def test_the_dependency_rule_holds_for_every_module():
    """agent imports neither sync nor trainer; sync does not import trainer; common imports none of ours."""
    broken = []
    modules = sorted(PKG.rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        layer = _layer(path)
        for target, line in _imported_layers(path):
            if target in {"__version__", "__init__"}:
                continue
            if target not in ALLOWED[layer]:
                broken.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target}")
    assert not broken, "\n".join(broken)


def test_the_wheel_installs_only_the_har_edge_namespace(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("har_edge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n for n in names if n.endswith(".dist-info/top_level.txt") or n.endswith(".dist-info/RECORD"))
        assert dist_info
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"har_edge"}, tops
    assert not any(n.startswith(("har_edge/tests", "tests/", "bench/")) for n in names)
    assert "har_edge/agent/default_model/model.tflite" in names


def _console_script(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    assert exe.exists(), f"{name} is not installed beside {sys.executable}"
    return str(exe)


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["har-edge", "--version"], "har-edge "),
        (["har-edge", "--help"], "agent"),
        (["har-edge", "models", "--help"], "rollback"),
        (["har-train", "--help"], "release"),
    ],
)
def test_console_scripts_start(argv, expect):
    res = subprocess.run([_console_script(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout


def test_ls_remote_child_runs_isolated(tmp_path):
    """sync lists tags through ``python -I -m har_edge.sync.ls_remote``: -I ignores PYTHONPATH and the cwd."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: apt-get install -y git")
    repo = tmp_path / "r"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "tag", "-a", "m@v1.0.0", "-m", "m"], check=True, env=env)
    res = subprocess.run(
        [sys.executable, "-I", "-m", "har_edge.sync.ls_remote", str(repo), "refs/tags/m@v"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "refs/tags/m@v1.0.0" in res.stdout


def _dockerfile_commands(name: str) -> list[list[str]]:
    text = (ROOT / "docker" / name).read_text()
    text = text.replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^(?:HEALTHCHECK .*?)?(?:CMD|ENTRYPOINT) (\[.*\])\s*$", text, re.M)]


def test_the_edge_images_commands_are_installed_entry_points(tmp_path):
    """The Dockerfile's CMD and HEALTHCHECK, started as written (against an empty data dir)."""
    cmds = _dockerfile_commands("Dockerfile.edge")
    assert ["har-edge", "agent", "run"] in cmds and ["har-edge", "health"] in cmds
    run = [_console_script("har-edge"), "agent", "run", "--check-config", "--data-dir", str(tmp_path)]
    res = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "settings OK" in res.stdout, res.stderr
    res = subprocess.run(
        [_console_script("har-edge"), "health", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "healthy" in res.stdout, res.stdout + res.stderr
    trainer = _dockerfile_commands("Dockerfile.trainer")
    assert ["har-train"] in trainer


# -- every command has help and is documented (like sqlite-utils' test_docs.py) ----------------------------


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        helps = {c.dest: c.help for c in action._choices_actions}
        for name, child in action.choices.items():
            assert helps.get(name), f"{' '.join((*path, name))} has no help line"
            yield from _leaves(child, (*path, name))


def _parsers():
    from har_edge.cli import build_parser as edge_parser
    from har_edge.trainer.cli import build_parser as train_parser

    return [
        ("har-edge", edge_parser(), ROOT / "README.md"),
        ("har-train", train_parser(), PKG / "trainer" / "README.md"),
    ]


@pytest.mark.parametrize("tool", ["har-edge", "har-train"])
def test_every_command_and_argument_has_help(tool):
    _, parser, _ = next(p for p in _parsers() if p[0] == tool)
    missing = []
    leaves = list(_leaves(parser))
    assert len(leaves) >= 9
    for path, leaf in leaves:
        for action in leaf._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{tool} {' '.join(path)}: {action.dest}")
    assert not missing, missing


@pytest.mark.parametrize("tool", ["har-edge", "har-train"])
def test_every_command_is_in_the_readme(tool):
    _, parser, readme = next(p for p in _parsers() if p[0] == tool)
    text = readme.read_text(encoding="utf-8")
    absent = []
    for path, _leaf in _leaves(parser):
        words = " ".join(path)
        if tool == "har-edge":
            ok = f"`har-edge {words}`" in text or f"`har-edge {words} " in text
        else:
            ok = re.search(rf"\| `{re.escape(words)}[ `]", text) is not None
        if not ok:
            absent.append(f"{tool} {words}")
    assert not absent, f"not documented in {readme.relative_to(ROOT)}: {absent}"


def test_readme_exit_codes_are_the_shared_table():
    from har_edge.common.cli import Exit

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for code in Exit:
        assert re.search(rf"^\| {int(code)} \| ", text, re.M), f"exit code {int(code)} ({code.name}) not in the README"


def test_states_are_the_stored_strings():
    """The enums keep today's stored values: a v1 outbox reads the same."""
    from har_edge.common.states import DeploymentOutcome, FileStatus

    assert [s.value for s in FileStatus] == ["processed", "failed", "duplicate"]
    assert FileStatus("failed").shown == "quarantined" and FileStatus.PROCESSED.shown == "processed"
    assert {o.value for o in DeploymentOutcome} == {
        "activated",
        "pinned",
        "refused",
        "rolled_back",
        "load_failed",
        "healthy",
    }


def test_architecture_lists_every_module():
    """docs/architecture.md names every module of the package with its one-line job."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("<!-- modules -->", 1)[1].split("<!-- /modules -->", 1)[0]
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        if "default_model" in path.parts:
            continue
        rel = path.relative_to(PKG).as_posix()
        if f"`{rel}`" not in table:
            missing.append(rel)
    assert not missing, f"add these modules to docs/architecture.md: {missing}"
