"""The package surface: the example script end to end, exports, and the type stubs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import butler
from conftest import EXAMPLES, REPO


def test_example_script_end_to_end(tmp_path: Path) -> None:
    script = EXAMPLES / "python" / "launch_and_summarise.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    env["BUTLER_HOME"] = str(tmp_path / "home")
    db = f"sqlite://{tmp_path}/butler.db"
    result = subprocess.run(
        [sys.executable, str(script), "--db", db, "--samples", "12", "--fail-every", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "Launched 12 runs of greet 1.0 for analysis" in out
    assert "completed: 10" in out
    assert "error: 2" in out
    assert "Hello, sample-01!" in out
    assert "sample-05: task `greet` failed (exit code 3): sample-05 is marked to fail" in out
    assert "sample-10: task `greet` failed (exit code 3): sample-10 is marked to fail" in out

    # The same script against the same store reuses the workflow and makes a new analysis.
    again = subprocess.run(
        [sys.executable, str(script), "--db", db, "--samples", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "completed: 3" in again.stdout
    client = butler.connect(db=db, home=tmp_path / "home")
    assert [w.name for w in client.list_workflows()] == ["greet"]
    assert len(client.list_analyses()) == 2


def test_exports_and_version() -> None:
    assert butler.__version__ == "0.1.0"
    for name in butler.__all__:
        assert hasattr(butler, name), name
    assert butler.Run.__module__ == "butler"
    assert butler.Provenance._fields == ("path", "layer", "value")


def test_stubs_match_the_module(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "butler"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_script_type_checks_against_the_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    script = EXAMPLES / "python" / "launch_and_summarise.py"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
