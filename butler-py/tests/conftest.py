"""Fixtures: every test gets its own BUTLER_HOME and SQLite store under pytest's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

import butler

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
HELLO = EXAMPLES / "hello"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("BUTLER_HOME", str(home))
    monkeypatch.delenv("BUTLER_DB", raising=False)
    monkeypatch.delenv("BUTLER_QUEUE", raising=False)
    return home


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/butler.db"


@pytest.fixture
def client(home: Path, db: str) -> butler.Client:
    return butler.connect(db=db)


@pytest.fixture
def hello(client: butler.Client) -> tuple[butler.Workflow, butler.Analysis]:
    """The hello example's workflow and analysis, registered from its files."""
    workflow = client.create_workflow(
        "test", "1.0", HELLO / "workflow-config.json", HELLO / "workflows" / "test.toml"
    )
    analysis = client.create_analysis("hello", config=HELLO / "analysis-config.json")
    return workflow, analysis


def definition(*tasks: dict) -> dict:
    """A definition dict with these tasks."""
    return {"tasks": list(tasks)}
