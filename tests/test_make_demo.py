"""`make demo` needs no root: only the test targets install the report tests' browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRIVILEGED = ("apt-get", "apt ", "sudo", "chromium", "dpkg")


def _dry_run(target: str) -> str:
    """Every command ``make <target>`` would run, as if nothing were built yet (``-B``)."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed; the Makefile cannot be checked here")
    done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_demo_recipe_runs_nothing_privileged():
    commands = _dry_run("demo")
    assert "qgraph demo" in commands
    assert not [word for word in PRIVILEGED if word in commands], commands


@pytest.mark.parametrize("target", ["test", "test-all"])
def test_the_test_targets_install_the_browser(target):
    """The same check on the test targets finds apt-get: it can fail."""
    commands = _dry_run(target)
    assert "apt-get install -y chromium" in commands and "pytest" in commands


def _unprivileged(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]


@pytest.mark.slow  # the demo trains and exports for about a minute
def test_demo_runs_as_an_unprivileged_user():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop to the user nobody")
    probe = subprocess.run(_unprivileged([sys.executable, "-c", "import qgraph"]), capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the user nobody cannot run {sys.executable} here (an interpreter under a private home)")
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path sits under a root-only folder
        work = Path(tmp)
        work.chmod(0o777)
        argv = [sys.executable, "-m", "qgraph.cli", "demo", "--out", str(work / "out"), "--fp32-epochs", "1",
                "--qat-epochs", "1", "--no-low-bit"]  # fmt: skip
        env = {**os.environ, "HOME": str(work)}
        done = subprocess.run(_unprivileged(argv), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert (work / "out" / "digits_int8.pte").exists() and "accuracy %" in done.stdout
        assert done.stderr == ""  # quiet: no C++ log lines, no warnings, no bars (stderr is not a terminal)
