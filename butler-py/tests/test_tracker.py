"""The tracker through the Python API: workflows, analyses, configs, launches, runs."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import butler
from conftest import HELLO, definition


def test_connect_defaults_to_a_store_in_butler_home(home: Path) -> None:
    client = butler.connect()
    assert client.home == home
    assert client.db == f"sqlite://{home}/butler.db"
    assert client.queue is None
    assert (home / "butler.db").is_file()
    assert client.list_workflows() == []


def test_connect_reads_butler_db_and_takes_home_argument(
    tmp_path: Path, home: Path, monkeypatch
) -> None:
    monkeypatch.setenv("BUTLER_DB", f"sqlite://{tmp_path}/from-env.db")
    other = tmp_path / "elsewhere"
    client = butler.connect(home=other)
    assert client.db == f"sqlite://{tmp_path}/from-env.db"
    assert client.home == other
    assert (tmp_path / "from-env.db").is_file()
    assert not home.exists(), "a home is only created for the default store"
    assert repr(client) == f"Client(db='sqlite://{tmp_path}/from-env.db', home='{other}')"


def test_connect_accepts_a_plain_database_path(tmp_path: Path, home: Path) -> None:
    client = butler.connect(db=tmp_path / "plain.db")
    client.create_analysis("a", config={})
    again = butler.connect(db=str(tmp_path / "plain.db"))
    assert [a.name for a in again.list_analyses()] == ["a"]


def test_create_and_list_workflows(client: butler.Client) -> None:
    wf = client.create_workflow(
        "test", "1.0", HELLO / "workflow-config.json", str(HELLO / "workflows" / "test.toml")
    )
    assert (wf.id, wf.name, wf.version) == (1, "test", "1.0")
    assert wf.config == {"test_message": "Hello, world!"}
    assert wf.definition["tasks"][0]["id"] == "say"
    assert wf.definition["tasks"][0]["timeout"] == "1m"
    assert wf.created_at.tzinfo is not None
    assert wf.created_at.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - wf.created_at).total_seconds() < 60

    second = client.create_workflow(
        "inline",
        "2",
        {"z": 1, "a": {"y": [1, 2.5, None, True], "b": "x"}},
        definition({"id": "one", "run": "echo {{ config.a.b }}"}),
    )
    assert second.id == 2
    assert list(second.config) == ["z", "a"], "key order is kept"
    assert list(second.config["a"]) == ["y", "b"]
    assert second.config["a"]["y"] == [1, 2.5, None, True]
    assert client.list_workflows() == [wf, second]
    assert client.workflow(2) == second
    assert client.workflow(second) == second
    assert repr(wf) == f"Workflow(id=1, name='test', version='1.0', config_id='{wf.config_id}')"
    assert hash(wf) == hash(client.workflow(1))
    assert wf != second


def test_json_definition_file_is_accepted(client: butler.Client, tmp_path: Path) -> None:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(definition({"id": "a", "run": "true"}, {"id": "b", "run": "true", "needs": ["a"]})))
    wf = client.create_workflow("json", "1", {}, path)
    assert [t["id"] for t in wf.definition["tasks"]] == ["a", "b"]
    assert wf.definition["tasks"][1]["needs"] == ["a"]


def test_create_analysis_dates(client: butler.Client) -> None:
    today = datetime.datetime.now(datetime.timezone.utc).date()
    a = client.create_analysis("a", config={"k": 1})
    b = client.create_analysis("b", datetime.date(2024, 3, 31), config={})
    c = client.create_analysis("c", "2024-03-31", config={})
    d = client.create_analysis("d", "03-31-2024", config=HELLO / "analysis-config.json")
    assert a.start_date == today
    assert b.start_date == c.start_date == d.start_date == datetime.date(2024, 3, 31)
    assert a.config == {"k": 1}
    assert d.config == {"test_message": "Hello, world! - set by Analysis"}
    assert client.list_analyses() == [a, b, c, d]
    assert client.analysis(3) == c
    assert repr(b).startswith("Analysis(id=2, name='b', start_date=datetime.date(2024, 3, 31), ")


def test_update_config_applies_to_later_launches(
    client: butler.Client, hello: tuple[butler.Workflow, butler.Analysis]
) -> None:
    wf, an = hello
    first = client.launch(wf, an, [{"sample": "S1"}])
    new_id = client.update_config(analysis=an, config={"test_message": "changed", "extra": 1})
    assert new_id != an.config_id
    assert client.analysis(an.id).config_id == new_id
    assert client.analysis(an.id).config == {"test_message": "changed", "extra": 1}
    wf_config = client.update_config(workflow=wf.id, config=HELLO / "workflow-config.json")
    assert client.workflow(wf.id).config_id == wf_config

    second = client.launch(wf, an, [{"sample": "S2"}])
    assert first[0].effective_config["test_message"] == "Hello, world! - set by Analysis"
    assert second[0].effective_config == {
        "test_message": "changed",
        "extra": 1,
        "sample": "S2",
        "analysis_run_id": second[0].id,
    }


def test_launch_from_a_directory(client: butler.Client, hello) -> None:
    wf, an = hello
    runs = client.launch(wf.id, an.id, HELLO / "runs")
    assert [r.id for r in runs] == [1, 2]
    assert [r.source_file for r in runs] == [
        str(HELLO / "runs" / "run-1.json"),
        str(HELLO / "runs" / "run-2.json"),
    ]
    run = runs[0]
    assert (run.workflow_id, run.analysis_id, run.status, run.error) == (1, 1, "ready", None)
    assert run.started_at is None and run.ended_at is None
    assert run.created_at.utcoffset() == datetime.timedelta(0)
    assert run.effective_config == {
        "test_message": "Hello, world! - set by Analysis Run.",
        "sample_id": "sample-1",
        "analysis_run_id": 1,
    }
    assert run.explain() == [
        ("test_message", "run", "Hello, world! - set by Analysis Run."),
        ("sample_id", "run", "sample-1"),
        ("analysis_run_id", "butler", 1),
    ]
    entry = run.explain()[0]
    assert isinstance(entry, butler.Provenance)
    assert (entry.path, entry.layer) == ("test_message", "run")
    assert run.commands() == [("say", "echo 'Hello, world! - set by Analysis Run.'", {})]
    command = run.commands()[0]
    assert isinstance(command, butler.Command)
    assert (command.task, command.env) == ("say", {})
    assert repr(run) == (
        f"Run(id=1, workflow_id=1, analysis_id=1, status='ready', "
        f"source_file='{HELLO / 'runs' / 'run-1.json'}', error=None)"
    )
    assert [t.task_id for t in run.tasks] == ["say"]
    assert run.tasks[0].state == "pending"
    assert run.tasks[0].try_number == 0
    assert run.logs() == ""
    assert run.logs("say") == ""
    assert run.events == []


def test_launch_from_a_list_of_paths_dicts_and_tuples(client: butler.Client, hello, tmp_path: Path) -> None:
    wf, an = hello
    extra = tmp_path / "extra.json"
    extra.write_text('{"sample_id": "from-file"}')
    runs = client.launch(wf, an, (HELLO / "runs" / "run-2.json", {"sample_id": "inline"}, str(extra)))
    assert [r.source_file for r in runs] == [str(HELLO / "runs" / "run-2.json"), None, str(extra)]
    assert [r.effective_config["sample_id"] for r in runs] == ["sample-2", "inline", "from-file"]
    assert [r.explain()[0].layer for r in runs] == ["run", "analysis", "analysis"]


def test_runs_filters_and_counts(client: butler.Client, hello) -> None:
    wf, an = hello
    other_an = client.create_analysis("other", config={})
    client.launch(wf, an, [{"s": 1}, {"s": 2}, {"s": 3}])
    client.launch(wf, other_an, [{"s": 1}])
    assert [r.id for r in client.runs()] == [1, 2, 3, 4]
    assert [r.id for r in client.runs(analysis=an)] == [1, 2, 3]
    assert [r.id for r in client.runs(workflow=wf.id, analysis=other_an.id)] == [4]
    assert [r.id for r in client.runs(status="ready")] == [1, 2, 3, 4]
    assert client.runs(status="completed") == []
    assert client.run(2) == client.runs()[1]
    assert client.run(client.run(2)).id == 2
    assert client.get_run_count(an, "ready") == 3
    assert client.get_run_count(an.id, status="error") == 0
    counts = client.get_run_count(an)
    assert counts == {
        "ready": 3,
        "scheduled": 0,
        "in-progress": 0,
        "completed": 0,
        "error": 0,
        "cancelled": 0,
    }
    assert list(counts) == ["ready", "scheduled", "in-progress", "completed", "error", "cancelled"]


def test_allow_duplicates_launches_the_same_config_again(client: butler.Client, hello) -> None:
    wf, an = hello
    client.launch(wf, an, [{"s": 1}])
    again = client.launch(wf, an, [{"s": 1}], allow_duplicates=True)
    assert [r.id for r in again] == [2]


def test_launching_a_thousand_dict_configs(client: butler.Client, hello) -> None:
    wf, an = hello
    configs = [{"sample_id": f"S{i:04}", "lane": i % 8, "tags": ["x", i]} for i in range(1000)]
    runs = client.launch(wf, an, configs)
    assert len(runs) == 1000
    assert [r.id for r in runs] == list(range(1, 1001))
    assert all(r.source_file is None and r.status == "ready" for r in runs)
    assert client.get_run_count(an, "ready") == 1000
    assert len(client.runs(analysis=an)) == 1000
    assert runs[999].effective_config == {
        "test_message": "Hello, world! - set by Analysis",
        "sample_id": "S0999",
        "lane": 7,
        "tags": ["x", 999],
        "analysis_run_id": 1000,
    }


def test_json_values_round_trip(client: butler.Client, hello) -> None:
    wf, an = hello
    config = {
        "big": 2**63 - 1,
        "unsigned": 2**64 - 1,
        "negative": -(2**63),
        "float": 0.1,
        "unicode": "ünï \u2603 \U0001f600",
        "nested": {"list": [[], {}, [None]], "tuple": (1, 2)},
        "flag": False,
    }
    run = client.launch(wf, an, [config])[0]
    effective = run.effective_config
    assert effective["big"] == 2**63 - 1
    assert effective["unsigned"] == 2**64 - 1
    assert effective["negative"] == -(2**63)
    assert effective["float"] == 0.1
    assert effective["unicode"] == config["unicode"]
    assert effective["nested"] == {"list": [[], {}, [None]], "tuple": [1, 2]}
    assert effective["flag"] is False


def test_objects_are_comparable_and_hashable(client: butler.Client, hello) -> None:
    wf, an = hello
    runs = client.launch(wf, an, HELLO / "runs")
    assert runs[0] == client.run(1)
    assert runs[0] != runs[1]
    assert runs[0] != 1
    assert {runs[0], client.run(1), runs[1]} == {runs[0], runs[1]}
    assert {an: "x"}[client.analysis(an.id)] == "x"
