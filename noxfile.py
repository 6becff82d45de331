"""The test matrix: the whole suite once per supported Python and mitmproxy pair.

    python -m nox                      # every session (what CI runs)
    python -m nox -s tests-3.12        # one session
    python -m nox -s tests-3.12 -- tests/test_netbackend.py -x   # arguments after -- go to pytest

mitmproxy 11.1 and later need Python >= 3.12, so Python 3.11 gets mitmproxy 11.0.x and 3.12/3.13
get mitmproxy 12.x (pyproject.toml's dependencies say the same, with environment markers; the
project test checks the two agree).

Interpreters are found on PATH (``python3.12``) or among pyenv's versions (``$PYENV_ROOT`` or
``~/.pyenv``, newest patch release first); each candidate is run once to make sure it is that
Python, since a pyenv shim on PATH exists whether or not its version is active. An interpreter
found nowhere is a skipped session with nox's "Missing interpreters will error in CI" message, and
a failed one when the CI environment variable is set (nox's own default; ``--error-on-missing-
interpreters`` forces it anywhere). nox never downloads an interpreter: the matrix tests what the
machine has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

# (Python, the mitmproxy it is tested with): keep in step with pyproject.toml's dependencies.
MATRIX = (
    ("3.11", "mitmproxy>=11.0.2,<11.1"),
    ("3.12", "mitmproxy>=12.3.1,<12.4"),
    ("3.13", "mitmproxy>=12.3.1,<12.4"),
)

nox.options.sessions = [f"tests-{python}" for python, _ in MATRIX]
nox.options.download_python = "never"  # (an option since nox 2025.10.14; older ones do not download)


def _pyenv_root() -> Path:
    if root := os.environ.get("PYENV_ROOT"):
        return Path(root)
    if pyenv := shutil.which("pyenv"):
        try:
            out = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30, check=True)
            return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return Path.home() / ".pyenv"


def _is_python(path: str, version: str) -> bool:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYENV_VERSION": ""},  # a shim must not pick a version by itself
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def interpreter(version: str) -> str:
    """The path of a working Python `version` ("3.12"), or `version` itself when there is none
    (nox then reports the interpreter missing)."""
    candidates = []
    if on_path := shutil.which(f"python{version}"):
        candidates.append(on_path)
    patch = re.compile(rf"{re.escape(version)}\.(\d+)")
    installed = [d for d in (_pyenv_root() / "versions").glob(f"{version}.*") if patch.fullmatch(d.name)]
    installed.sort(key=lambda d: int(patch.fullmatch(d.name)[1]), reverse=True)  # type: ignore[index]
    candidates += [str(d / "bin" / f"python{version}") for d in installed]
    return next((c for c in candidates if _is_python(c, version)), version)


def _tests(session: nox.Session, mitmproxy: str) -> None:
    session.install("-e", ".[test]", mitmproxy)
    session.run(
        "python", "-c", "import sys, mitmproxy.version as m; print(sys.version, 'mitmproxy', m.VERSION)"
    )
    # Any exit code but 0 fails the session, pytest's 5 ("no tests ran") included.
    session.run("python", "-m", "pytest", *session.posargs)


for _python, _mitmproxy in MATRIX:

    def _session(session: nox.Session, mitmproxy: str = _mitmproxy) -> None:
        _tests(session, mitmproxy)

    _session.__doc__ = f"The whole test suite on Python {_python} with {_mitmproxy}."
    nox.session(name=f"tests-{_python}", python=interpreter(_python))(_session)
