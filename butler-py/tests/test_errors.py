"""Bad input raises Butler's exceptions with the messages the CLI prints."""

from __future__ import annotations

from pathlib import Path

import pytest

import butler
from conftest import HELLO, definition


def test_exception_hierarchy() -> None:
    for cls in (
        butler.NotFoundError,
        butler.InvalidInputError,
        butler.ConflictError,
        butler.UnavailableError,
    ):
        assert issubclass(cls, butler.ButlerError)
    assert issubclass(butler.ButlerError, Exception)
    assert butler.ButlerError.__module__ == "butler"


def test_missing_config_file(client: butler.Client, tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(butler.InvalidInputError, match=f"^cannot read {missing}: "):
        client.create_workflow("w", "1", missing, HELLO / "workflows" / "test.toml")
    with pytest.raises(butler.InvalidInputError, match="cannot read run configs at"):
        client.launch(1, 1, missing)
    assert client.list_workflows() == []


def test_missing_definition_file(client: butler.Client, tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(butler.InvalidInputError, match=f"cannot read workflow definition {missing}"):
        client.create_workflow("w", "1", {}, missing)


def test_invalid_json_names_line_and_column(client: butler.Client, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": 1 2\n}\n')
    with pytest.raises(butler.InvalidInputError) as caught:
        client.create_analysis("a", config=bad)
    message = str(caught.value)
    assert message.startswith(f"{bad}:3:10: invalid JSON: expected `,` or `}}`"), message
    assert client.list_analyses() == []


def test_invalid_run_config_fails_the_whole_launch(client: butler.Client, hello, tmp_path: Path) -> None:
    wf, an = hello
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a.json").write_text('{"ok": 1}')
    (runs / "b.json").write_text('{"broken": ')
    with pytest.raises(butler.InvalidInputError, match=rf"^{runs / 'b.json'}:1:\d+: invalid JSON"):
        client.launch(wf, an, runs)
    with pytest.raises(butler.InvalidInputError, match=r"run config #2: a config must be a JSON object"):
        client.launch(wf, an, [{"ok": 1}, [1, 2]])
    assert client.runs() == []


def test_config_that_is_not_an_object(client: butler.Client, tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(butler.InvalidInputError, match="analysis config: a config must be a JSON object .* found an array"):
        client.create_analysis("a", config=path)


def test_definition_with_a_cycle(client: butler.Client, tmp_path: Path) -> None:
    cyclic = definition(
        {"id": "a", "run": "true", "needs": ["b"]},
        {"id": "b", "run": "true", "needs": ["a"]},
    )
    with pytest.raises(butler.InvalidInputError, match=r"the tasks' needs form a cycle: a -> b -> a"):
        client.create_workflow("w", "1", {}, cyclic)
    toml = tmp_path / "cycle.toml"
    toml.write_text('[[tasks]]\nid = "x"\nrun = "true"\nneeds = ["x2"]\n\n[[tasks]]\nid = "x2"\nrun = "true"\nneeds = ["x"]\n')
    with pytest.raises(butler.InvalidInputError, match=rf"^{toml}: the tasks' needs form a cycle"):
        client.create_workflow("w", "1", {}, toml)
    assert client.list_workflows() == []


def test_definition_problems_name_the_task(client: butler.Client) -> None:
    with pytest.raises(butler.InvalidInputError, match=r"^workflow definition \(dict\).*task `a` has no `run`"):
        client.create_workflow("w", "1", {}, definition({"id": "a"}))
    with pytest.raises(butler.InvalidInputError, match="task `a` needs `ghost`, which is not a task"):
        client.create_workflow("w", "1", {}, definition({"id": "a", "run": "true", "needs": ["ghost"]}))
    with pytest.raises(butler.InvalidInputError, match="task `t`"):
        client.create_workflow("w", "1", {}, definition({"id": "t", "run": "echo {{ config.x "}))


def test_template_key_missing_at_launch(client: butler.Client) -> None:
    wf = client.create_workflow("w", "1", {}, definition({"id": "t", "run": "echo {{ config.sample.name }}"}))
    an = client.create_analysis("a", config={})
    with pytest.raises(butler.InvalidInputError, match=r"^run config #2: "):
        client.launch(wf, an, [{"sample": {"name": "ok"}}, {"other": 1}])
    assert client.runs() == []


def test_values_json_cannot_hold(client: butler.Client) -> None:
    with pytest.raises(butler.InvalidInputError, match=r"^workflow config at \['a'\]\[1\]: \{1\} is a set"):
        client.create_workflow("w", "1", {"a": [0, {1}]}, definition({"id": "t", "run": "true"}))
    with pytest.raises(butler.InvalidInputError, match=r"^analysis config: the key 1 is an int, but JSON keys are strings"):
        client.create_analysis("a", config={1: "x"})
    with pytest.raises(butler.InvalidInputError, match=r"at \['x'\]: nan is not a JSON number"):
        client.create_analysis("a", config={"x": float("nan")})
    with pytest.raises(butler.InvalidInputError, match="does not fit in 64 bits"):
        client.create_analysis("a", config={"x": 2**64})
    looped: dict = {}
    looped["self"] = looped
    with pytest.raises(butler.InvalidInputError, match="contains itself"):
        client.create_analysis("a", config=looped)
    assert client.list_analyses() == []


def test_wrong_argument_types(client: butler.Client, hello) -> None:
    wf, an = hello
    with pytest.raises(TypeError, match="config must be a dict or the path of a JSON file, not a list"):
        client.create_analysis("a", config=[1])
    with pytest.raises(TypeError, match="pass \\[config\\]"):
        client.launch(wf, an, {"sample": 1})
    with pytest.raises(TypeError, match="a workflow is given as a Workflow or an int id, not a str"):
        client.launch("1", an, [{}])
    with pytest.raises(TypeError, match="pass \\[run\\]"):
        client.wait(1)
    with pytest.raises(TypeError, match="date must be"):
        client.create_analysis("a", 20240101, config={})


def test_unknown_ids(client: butler.Client, hello) -> None:
    wf, an = hello
    with pytest.raises(butler.NotFoundError, match=r"^run 999 not found; list them with `butler list-runs`$"):
        client.run(999)
    with pytest.raises(butler.NotFoundError, match="^workflow 42 not found"):
        client.launch(42, an, [{}])
    with pytest.raises(butler.NotFoundError, match="^analysis 42 not found"):
        client.launch(wf, 42, [{}])
    with pytest.raises(butler.NotFoundError, match="^workflow 7 not found"):
        client.workflow(7)
    with pytest.raises(butler.NotFoundError, match="^analysis 7 not found"):
        client.update_config(analysis=7, config={})
    with pytest.raises(butler.NotFoundError, match="^analysis 7 not found"):
        client.get_run_count(7)
    with pytest.raises(butler.NotFoundError, match="^run 5 not found"):
        client.reset(5)
    with pytest.raises(butler.NotFoundError, match="^run 5 not found"):
        client.wait([5], timeout=5)
    run = client.launch(wf, an, [{}])[0]
    with pytest.raises(butler.NotFoundError, match="run 1 has no task `nope`; its tasks are: say"):
        run.logs("nope")


def test_duplicate_workflow(client: butler.Client, hello) -> None:
    with pytest.raises(butler.ConflictError, match="test"):
        client.create_workflow("test", "1.0", {}, HELLO / "workflows" / "test.toml")
    assert len(client.list_workflows()) == 1


def test_duplicate_launch(client: butler.Client, hello) -> None:
    wf, an = hello
    client.launch(wf, an, HELLO / "runs")
    with pytest.raises(butler.ConflictError) as caught:
        client.launch(wf, an, [HELLO / "runs" / "run-1.json", {"new": True}])
    message = str(caught.value)
    assert message.startswith("1 run config(s) were already launched for this workflow and analysis")
    assert f"{HELLO / 'runs' / 'run-1.json'} duplicates run 1" in message
    assert "allow_duplicates=True" in message
    assert len(client.runs()) == 2


def test_bad_arguments_are_invalid_input(client: butler.Client, hello) -> None:
    wf, an = hello
    with pytest.raises(butler.InvalidInputError, match=r'bad date "31/03/2024"'):
        client.create_analysis("a", "31/03/2024", config={})
    with pytest.raises(butler.InvalidInputError, match='unknown run status "done"'):
        client.runs(status="done")
    with pytest.raises(butler.InvalidInputError, match="exactly one of workflow= or analysis="):
        client.update_config(workflow=wf, analysis=an, config={})
    with pytest.raises(butler.InvalidInputError, match="exactly one of workflow= or analysis="):
        client.update_config(config={})
    with pytest.raises(butler.InvalidInputError, match="the workflow name is empty"):
        client.create_workflow(" ", "1", {}, definition({"id": "t", "run": "true"}))
    with pytest.raises(butler.InvalidInputError, match="nothing to launch"):
        client.launch(wf, an, [])
    with pytest.raises(butler.InvalidInputError, match="slots=0"):
        client.wait([1], slots=0)
    with pytest.raises(butler.InvalidInputError, match="timeout=-1"):
        client.wait([1], timeout=-1)


def test_unsupported_store_url(home: Path) -> None:
    with pytest.raises(butler.ButlerError, match="unknown store URL scheme `ftp`"):
        butler.connect(db="ftp://example/db")


def test_reset_and_cancel_check_the_run_state(client: butler.Client, hello) -> None:
    wf, an = hello
    run = client.launch(wf, an, [{}])[0]
    with pytest.raises(butler.ConflictError, match="only a finished run can be reset"):
        client.reset(run)
    client.cancel(run)
    assert client.run(run.id).status == "cancelled"
    with pytest.raises(butler.ConflictError, match="already cancelled; nothing to cancel"):
        client.cancel(run.id)
