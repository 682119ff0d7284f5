"""The two-step example: write_and_launch.py, then wait_and_summarise.py, as a shell runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import butler
from conftest import EXAMPLES

WRITE = EXAMPLES / "python" / "write_and_launch.py"
WAIT = EXAMPLES / "python" / "wait_and_summarise.py"


def run(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    env["BUTLER_HOME"] = str(home)
    return env


def row(out: str, status: str) -> int | None:
    """The count on the summary table's row for `status`, or None without that row."""
    found = re.search(rf"^{status}\s+(\d+)$", out, re.MULTILINE)
    return int(found.group(1)) if found else None


def test_write_then_wait_completes_every_sample(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_env(home)
    out_dir = tmp_path / "runs"

    # The store comes from BUTLER_HOME here and from --db below: both name the same file.
    written = run(WRITE, "--samples", "50", "--out", str(out_dir), env=env)
    assert written.returncode == 0, written.stdout + written.stderr
    lines = written.stdout.splitlines()
    analysis_id = lines[-1]
    assert analysis_id.isdigit(), written.stdout
    assert "Launched 50 runs of align-sample 1.0" in written.stdout
    configs = sorted(out_dir.glob("*.json"))
    assert len(configs) == 50
    first = json.loads(configs[0].read_text())
    assert first["sample"] == "S0001"
    assert first["fastq"]["r2"] == "/data/fastq/S0001_R2.fastq.gz"
    assert "fail" not in first

    summary = run(WAIT, "--analysis", analysis_id, "--db", f"sqlite://{home}/butler.db", env=env)
    assert summary.returncode == 0, summary.stdout + summary.stderr
    assert "Waiting for 50 of 50 runs" in summary.stdout
    assert row(summary.stdout, "completed") == 50
    assert row(summary.stdout, "total") == 50
    assert row(summary.stdout, "error") is None
    assert "Failed runs" not in summary.stdout

    # The layers met: the workflow's reference, the analysis's batch, each sample's own quality.
    client = butler.connect(home=home)
    runs = {r.effective_config["sample"]: r for r in client.runs(analysis=int(analysis_id))}
    assert len(runs) == 50
    s3 = runs["S0003"]
    assert s3.source_file == str(out_dir / "S0003.json")
    assert s3.effective_config["min_quality"] == 20
    assert runs["S0004"].effective_config["min_quality"] == 25
    assert s3.logs("trim").strip() == (
        "trim /data/fastq/S0003_R1.fastq.gz /data/fastq/S0003_R2.fastq.gz at Q20"
    )
    batch = client.analysis(int(analysis_id)).name
    assert s3.logs("align").strip() == f"align S0003 to GRCh38, {batch}"

    # Everything finished: a second summary only counts.
    again = run(WAIT, "--analysis", analysis_id, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Waiting" not in again.stdout
    assert row(again.stdout, "completed") == 50


def test_failed_runs_are_listed_and_exit_1(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    env["BUTLER_DB"] = f"sqlite://{tmp_path}/other.db"
    first = run(WRITE, "--samples", "3", "--out", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    written = run(
        WRITE, "--samples", "20", "--fail-every", "3", "--out", str(tmp_path / "b"), env=env
    )
    assert written.returncode == 0, written.stdout + written.stderr
    analysis_id = written.stdout.splitlines()[-1]

    summary = run(WAIT, "--analysis", analysis_id, env=env)
    assert summary.returncode == 1, summary.stdout + summary.stderr
    assert row(summary.stdout, "completed") == 14
    assert row(summary.stdout, "error") == 6
    assert "Failed runs (first 5 of 6):" in summary.stdout
    assert (
        "(S0003.json): task `trim` failed: exit code 3 / S0003 is marked to fail" in summary.stdout
    )
    assert "S0015.json" in summary.stdout and "S0018.json" not in summary.stdout

    # BUTLER_DB was honoured, and the second launch reused the first one's workflow.
    client = butler.connect(db=env["BUTLER_DB"])
    assert [(w.name, w.version) for w in client.list_workflows()] == [("align-sample", "1.0")]
    assert len(client.list_analyses()) == 2
    assert not (tmp_path / "home" / "butler.db").exists()


def test_a_timeout_leaves_runs_to_resume(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    written = run(WRITE, "--samples", "4", env=env)
    assert written.returncode == 0, written.stdout + written.stderr
    analysis_id = written.stdout.splitlines()[-1]

    stopped = run(WAIT, "--analysis", analysis_id, "--timeout", "0", env=env)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert re.search(r"timed out: \d of 4 runs finished within 0s", stopped.stderr)
    assert (row(stopped.stdout, "completed") or 0) < 4
    assert row(stopped.stdout, "total") == 4

    resumed = run(WAIT, "--analysis", analysis_id, "--slots", "2", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert row(resumed.stdout, "completed") == 4


def test_bad_input_is_refused_with_the_reason(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    out_dir = tmp_path / "runs"
    assert run(WRITE, "--samples", "2", "--out", str(out_dir), env=env).returncode == 0

    reused = run(WRITE, "--samples", "2", "--out", str(out_dir), env=env)
    assert reused.returncode == 2
    assert f"--out {out_dir}: already holds JSON run configs" in reused.stderr

    missing = run(WAIT, "--analysis", "999", env=env)
    assert missing.returncode == 2
    assert "error: analysis 999 not found" in missing.stderr


def test_examples_type_check_against_the_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path)]
        + [str(WRITE), str(WAIT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
