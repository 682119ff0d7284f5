"""Python tasks: `python = "module:function"` tasks run as `python -m butler._task` processes,
by `Client.wait` and by `python -m butler worker`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import butler
from conftest import REPO, definition

# The task functions, written to a module the tests import through sys.path.
STEPS = '''
import json
import os
import time
from pathlib import Path

import butler


def count_words(config, context):
    words = config["text"].split()
    print(f"counting {len(words)} words")
    context.log.info("counted %d words in try %d", len(words), context.try_number)
    return {
        "words": len(words),
        "first": words[0] if words else None,
        "context": {
            "run_id": context.run_id,
            "task_id": context.task_id,
            "try_number": context.try_number,
            "workdir": str(context.workdir),
            "config_path": str(context.config_path),
            "cwd": os.getcwd(),
            "is_task_context": isinstance(context, butler.TaskContext),
        },
    }


def nothing(config, context):
    return None


def read_split(config, context):
    words = Path(config["work"], "words.txt").read_text().split()
    context.log.info("read %d words", len(words))
    return sorted(set(words))


def flaky(config, context):
    counter = Path(config["counter"])
    tries = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(tries + 1))
    if tries == 0:
        raise ValueError(f"not ready in try {context.try_number}")
    return {"tries": tries + 1}


def always_fails(config, context):
    raise RuntimeError("this step is broken")


def sleepy(config, context):
    context.log.info("going to sleep")
    time.sleep(30)
    Path(config["marker"]).write_text("woke up")


def returns_a_set(config, context):
    return {"ok": [1, 2], "bad": {"nested": {1, 2}}}


def returns_nan(config, context):
    return float("nan")


def exits_with_4(config, context):
    raise SystemExit(4)
'''


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a module holding the task functions above, importable by the attempts."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "pysteps.py").write_text(STEPS)
    monkeypatch.syspath_prepend(str(modules))
    return "pysteps"


def one_run(client: butler.Client, tasks: list[dict], config: dict | None = None) -> butler.Run:
    """Launches one run of a workflow with `tasks`."""
    wf = client.create_workflow("py", "1", config or {}, definition(*tasks))
    an = client.create_analysis("a", config={})
    (run,) = client.launch(wf, an, [{}])
    return run


def test_python_task_returns_its_value_and_logs(
    client: butler.Client, steps: str, home: Path
) -> None:
    run = one_run(
        client,
        [{"id": "count", "python": f"{steps}:count_words"}],
        {"text": "the quick brown fox jumps"},
    )
    assert run.output("count") is None, "nothing is returned before the task ran"
    (run,) = client.wait([run], timeout=60)
    assert run.status == "completed", run.logs()
    (task,) = run.tasks
    assert (task.state, task.exit_code, task.try_number) == ("succeeded", 0, 1)
    workdir = home / "runs" / str(run.id) / "count" / "1"
    assert run.output("count") == {
        "words": 5,
        "first": "the",
        "context": {
            "run_id": run.id,
            "task_id": "count",
            "try_number": 1,
            "workdir": str(workdir),
            "config_path": str(workdir / "config.json"),
            "cwd": str(workdir),
            "is_task_context": True,
        },
    }
    assert json.loads((workdir / "output.json").read_text())["words"] == 5
    log = run.logs("count")
    lines = log.splitlines()
    assert lines[0] == "counting 5 words"
    assert lines[1].endswith(" INFO count: counted 5 words in try 1"), log
    assert len(lines) == 2, log


def test_a_function_returning_none_has_no_output(client: butler.Client, steps: str) -> None:
    run = one_run(client, [{"id": "noop", "python": f"{steps}:nothing"}])
    (run,) = client.wait([run], timeout=60)
    assert run.status == "completed", run.logs()
    assert run.output("noop") is None
    with pytest.raises(butler.NotFoundError, match=r"has no task `ghost`; its tasks are: noop"):
        run.output("ghost")


def test_command_and_python_tasks_need_each_other(
    client: butler.Client, steps: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run = one_run(
        client,
        [
            {"id": "split", "run": "echo 'b a c a' | tr ' ' '\\n' > '{{ config.work }}/words.txt'"},
            {"id": "unique", "python": f"{steps}:read_split", "needs": ["split"]},
            {"id": "report", "run": "echo \"found $(wc -l < '{{ config.work }}/words.txt') words\"",
             "needs": ["unique"]},
        ],
        {"work": str(work)},
    )
    (run,) = client.wait([run], timeout=60, slots=1)
    assert run.status == "completed", run.logs()
    tasks = {t.task_id: t for t in run.tasks}
    assert all(t.state == "succeeded" for t in tasks.values())
    assert tasks["split"].ended_at <= tasks["unique"].started_at
    assert tasks["unique"].ended_at <= tasks["report"].started_at
    assert run.output("unique") == ["a", "b", "c"]
    assert run.output("split") is None
    assert "INFO unique: read 4 words" in run.logs("unique")
    assert run.logs("report") == "found 4 words\n"
    # Both kinds ran in this process, the Python task in the Python workers' own engine,
    # which signs its changes in the event log apart from the command workers'.
    assert tasks["unique"].worker.endswith(f"/{os.getpid()}")
    assert tasks["split"].worker.endswith(f"/{os.getpid()}")
    started_by = {e.task_id: e.by for e in run.events if e.to_state == "running"}
    assert started_by["unique"] != started_by["split"], started_by


def test_an_exception_fails_the_attempt_and_is_retried(
    client: butler.Client, steps: str, tmp_path: Path, home: Path
) -> None:
    run = one_run(
        client,
        [{"id": "flaky", "python": f"{steps}:flaky", "retries": 2, "retry_delay": "1s"}],
        {"counter": str(tmp_path / "counter")},
    )
    started = time.monotonic()
    (run,) = client.wait([run], timeout=60)
    assert run.status == "completed", run.logs()
    # The first retry waits retry_delay scaled by a jitter factor in [0.5, 1].
    assert time.monotonic() - started >= 0.5, "the retry waited for retry_delay"
    (task,) = run.tasks
    assert (task.state, task.try_number, task.failures) == ("succeeded", 2, 1)
    assert run.output("flaky") == {"tries": 2}
    first = (home / "runs" / str(run.id) / "flaky" / "1" / "output.log").read_text()
    assert first.startswith("Traceback (most recent call last):"), first
    assert 'pysteps.py", line' in first and "in flaky" in first
    assert first.rstrip().endswith("ValueError: not ready in try 1")
    assert not (home / "runs" / str(run.id) / "flaky" / "1" / "output.json").exists()
    steps_seen = [(e.from_state, e.to_state, e.try_number) for e in run.events if e.task_id]
    assert ("running", "up_for_retry", 1) in steps_seen
    assert any("exit code 1" in e.reason for e in run.events if e.to_state == "up_for_retry")


def test_a_function_that_keeps_failing_fails_the_run(client: butler.Client, steps: str) -> None:
    run = one_run(
        client,
        [
            {"id": "broken", "python": f"{steps}:always_fails"},
            {"id": "after", "run": "echo never", "needs": ["broken"]},
        ],
    )
    (run,) = client.wait([run], timeout=60)
    assert run.status == "error"
    tasks = {t.task_id: t for t in run.tasks}
    assert (tasks["broken"].state, tasks["broken"].exit_code) == ("failed", 1)
    assert tasks["after"].state == "upstream_failed"
    assert "RuntimeError: this step is broken" in run.logs("broken")
    assert run.output("broken") is None


def test_a_timeout_kills_a_sleeping_function(
    client: butler.Client, steps: str, tmp_path: Path
) -> None:
    marker = tmp_path / "woke"
    run = one_run(
        client,
        [{"id": "nap", "python": f"{steps}:sleepy", "timeout": "1s"}],
        {"marker": str(marker)},
    )
    started = time.monotonic()
    (run,) = client.wait([run], timeout=60)
    assert time.monotonic() - started < 15
    assert run.status == "error"
    (task,) = run.tasks
    assert task.state == "timed_out"
    assert "INFO nap: going to sleep" in run.logs("nap")
    time.sleep(0.5)
    assert not marker.exists()


def test_cancel_kills_a_running_function(client: butler.Client, steps: str, tmp_path: Path) -> None:
    run = one_run(
        client,
        [{"id": "nap", "python": f"{steps}:sleepy"}],
        {"marker": str(tmp_path / "woke")},
    )
    result: list[butler.Run] = []
    waiter = threading.Thread(target=lambda: result.extend(client.wait([run], timeout=60)))
    waiter.start()
    deadline = time.monotonic() + 20
    while "going to sleep" not in run.logs("nap"):
        assert time.monotonic() < deadline, "the function never started"
        time.sleep(0.05)
    client.cancel(run)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert [r.status for r in result] == ["cancelled"]
    assert result[0].tasks[0].state == "cancelled"


def test_a_missing_target_fails_with_a_clear_message(client: butler.Client, steps: str) -> None:
    run = one_run(
        client,
        [
            {"id": "no-function", "python": f"{steps}:does_not_exist"},
            {"id": "no-module", "python": "no_such_module.inner:f"},
        ],
    )
    (run,) = client.wait([run], timeout=60)
    assert run.status == "error"
    tasks = {t.task_id: t for t in run.tasks}
    assert (tasks["no-function"].state, tasks["no-function"].exit_code) == ("failed", 2)
    assert (tasks["no-module"].state, tasks["no-module"].exit_code) == ("failed", 2)
    log = run.logs("no-function")
    assert f"module `{steps}`" in log and "has no function `does_not_exist`" in log
    assert "count_words" in log, "the message lists the functions there are"
    log = run.logs("no-module")
    assert "cannot import module `no_such_module.inner`" in log
    assert "no module named `no_such_module`" in log
    assert "PYTHONPATH" in log


def test_a_return_value_that_is_not_json_fails_naming_its_type(
    client: butler.Client, steps: str
) -> None:
    run = one_run(
        client,
        [
            {"id": "set", "python": f"{steps}:returns_a_set"},
            {"id": "nan", "python": f"{steps}:returns_nan"},
            {"id": "exit", "python": f"{steps}:exits_with_4"},
        ],
    )
    (run,) = client.wait([run], timeout=60)
    tasks = {t.task_id: t for t in run.tasks}
    assert (tasks["set"].state, tasks["set"].exit_code) == ("failed", 3)
    log = run.logs("set")
    assert "returned a value that is not JSON-serialisable" in log
    assert "['bad']['nested']: a builtins.set" in log
    assert (tasks["nan"].state, tasks["nan"].exit_code) == ("failed", 3)
    assert "the float nan" in run.logs("nan")
    assert (tasks["exit"].state, tasks["exit"].exit_code) == ("failed", 4)
    assert run.output("set") is None


def test_the_runner_refuses_to_run_outside_an_attempt(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    result = subprocess.run(
        [sys.executable, "-m", "butler._task", "pysteps:nothing"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "BUTLER_CONFIG is not set" in result.stderr


def test_worker_arguments_and_stop(client: butler.Client) -> None:
    with pytest.raises(butler.InvalidInputError, match="slots=0 would run no task"):
        butler.Worker(client, slots=0)
    worker = butler.Worker(client, slots=3)
    assert (worker.slots, worker.queue) == (3, "butler.tasks.python")
    assert repr(worker) == f"Worker(db='{client.db}', queue='butler.tasks.python', slots=3)"
    worker.stop()  # not running: nothing to stop
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "run() blocks until stopped"
    worker.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == []


def cli_binary() -> Path:
    found = os.environ.get("BUTLER_BIN") or str(REPO / "target" / "debug" / "butler")
    if not Path(found).is_file():
        pytest.skip(f"skipping: no butler binary at {found}; build it with cargo build -p butler-cli")
    return Path(found)


def test_python_worker_process_runs_the_python_tasks_of_a_cli_wait(
    tmp_path: Path, home: Path, db: str
) -> None:
    butler_bin = cli_binary()
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "pysteps.py").write_text(STEPS)
    work = tmp_path / "work"
    work.mkdir()
    client = butler.connect(db=db)
    wf = client.create_workflow(
        "mixed",
        "1",
        {"work": str(work)},
        definition(
            {"id": "split", "run": "echo 'z y z' | tr ' ' '\\n' > '{{ config.work }}/words.txt'"},
            {"id": "unique", "python": "pysteps:read_split", "needs": ["split"]},
            {"id": "count", "python": "pysteps:count_words", "needs": ["unique"]},
        ),
    )
    an = client.create_analysis("a", config={})
    runs = client.launch(wf, an, [{"text": "one two"}, {"text": "three"}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    env["BUTLER_HOME"] = str(home)
    worker = subprocess.Popen(
        [sys.executable, "-m", "butler", "worker", "--slots", "2", "--db", db,
         "--path", str(modules)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The CLI schedules and runs the commands; it never takes Python tasks.
        waited = subprocess.run(
            [str(butler_bin), "--db", db, "wait", "--slots", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert worker.poll() is None, "the worker runs until it is stopped"
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "running tasks from queue butler.tasks.python in 2 slots" in err
    assert "Stopped" in err
    for run in runs:
        run = run.refresh()
        assert run.status == "completed", run.logs()
        tasks = {t.task_id: t for t in run.tasks}
        assert not tasks["split"].worker.endswith(f"/{worker.pid}")
        assert tasks["unique"].worker.endswith(f"/{worker.pid}")
        assert tasks["count"].worker.endswith(f"/{worker.pid}")
        assert run.output("unique") == ["y", "z"]
    first, second = (r.refresh() for r in runs)
    assert first.output("count")["words"] == 2
    assert second.output("count")["words"] == 1


def test_sigterm_stops_an_idle_worker_process(tmp_path: Path, home: Path, db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    env["BUTLER_HOME"] = str(home)
    worker = subprocess.Popen(
        [sys.executable, "-m", "butler", "worker", "--slots", "1", "--db", db],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stderr is not None
    banner = worker.stderr.readline()
    assert "Butler Python worker: running tasks from queue butler.tasks.python in 1 slot " in banner
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert time.monotonic() - started < 10
    assert "Stopped" in err


def test_worker_command_line_errors(tmp_path: Path) -> None:
    for args, message in [
        (["worker", "--slots", "0"], "0 would run no task"),
        ([], "the following arguments are required: COMMAND"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "butler", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


def test_module_help_names_the_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "butler", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--slots N" in result.stdout
    assert "Ctrl-C or SIGTERM" in result.stdout


EXAMPLE = REPO / "examples" / "python" / "python_tasks"


def test_python_tasks_example_end_to_end(tmp_path: Path) -> None:
    script = EXAMPLE / "run_python_tasks.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTLER_")}
    env["BUTLER_HOME"] = str(tmp_path / "home")
    db = f"sqlite://{tmp_path}/butler.db"
    result = subprocess.run(
        [sys.executable, str(script), "--db", db, "--work", str(tmp_path / "work")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Launched 3 runs of word-count 1.0 for analysis 1" in out
    assert "  fox: 19 words, 13 distinct; most common: the (5), fox (2), dog (2)" in out
    assert "  rain: 18 words, 11 distinct; most common: the (4), rain (2), falls (2)" in out
    assert "  empty: 0 words, 0 distinct; most common: none" in out
    assert "completed: 3" in out

    # The Python step fails for the empty text, is retried, and the script reports why.
    failing = subprocess.run(
        [sys.executable, str(script), "--db", db, "--fail-on-empty", "--work", str(tmp_path / "w2")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "  empty: task `count` failed after 3 tries (exit code 1): ValueError: " in failing.stdout
    assert "holds no words" in failing.stdout
    assert "completed: 2" in failing.stdout and "error: 1" in failing.stdout


def test_python_tasks_example_type_checks_against_the_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path),
            str(EXAMPLE / "run_python_tasks.py"), str(EXAMPLE / "steps.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
