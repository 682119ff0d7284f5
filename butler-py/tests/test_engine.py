"""Executing runs in this process with Client.wait: the embedded engine."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import butler
from conftest import HELLO, definition


def test_hello_example_end_to_end(client: butler.Client, hello, home: Path) -> None:
    wf, an = hello
    runs = client.launch(wf, an, HELLO / "runs")
    done = client.wait(runs, timeout=60, slots=2)
    assert [r.id for r in done] == [1, 2]
    assert [r.status for r in done] == ["completed", "completed"]
    for run in done:
        assert run.started_at is not None and run.ended_at is not None
        assert run.created_at <= run.started_at <= run.ended_at
        assert run.logs("say") == "Hello, world! - set by Analysis Run.\n"
        assert run.logs() == "==> say (try 1) <==\nHello, world! - set by Analysis Run.\n"
        (task,) = run.tasks
        assert (task.task_id, task.state, task.try_number, task.exit_code, task.error) == (
            "say",
            "succeeded",
            1,
            0,
            None,
        )
        assert task.started_at is not None and task.ended_at is not None
        assert task.worker is not None and task.worker.endswith(f"/{os.getpid()}")
    log = home / "runs" / "1" / "say" / "1" / "output.log"
    assert log.read_text() == "Hello, world! - set by Analysis Run.\n"
    assert client.get_run_count(an) == {
        "ready": 0,
        "scheduled": 0,
        "in-progress": 0,
        "completed": 2,
        "error": 0,
        "cancelled": 0,
    }
    events = done[0].events
    # The run's and the task's own histories are each in order; how they interleave depends on
    # when the scheduler sees the task start.
    run_steps = [(e.from_state, e.to_state) for e in events if e.task_id is None]
    # A task that ends before the scheduler sees it start takes the run straight to completed.
    assert run_steps in (
        [("ready", "scheduled"), ("scheduled", "in-progress"), ("in-progress", "completed")],
        [("ready", "scheduled"), ("scheduled", "completed")],
    )
    assert [(e.from_state, e.to_state, e.try_number) for e in events if e.task_id == "say"] == [
        ("pending", "queued", 1),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]
    assert events[-1].reason == "every task succeeded"
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.run_id == 1 and e.at.utcoffset() is not None for e in events)
    assert events[0] == done[0].events[0]


def test_wait_accepts_ids_and_finished_runs(client: butler.Client, hello) -> None:
    wf, an = hello
    runs = client.launch(wf, an, [{"a": 1}])
    assert [r.status for r in client.wait([runs[0].id])] == ["completed"]
    again = client.wait(runs)
    assert [r.status for r in again] == ["completed"]
    assert client.wait([]) == []


def test_failed_task_reports_its_error_and_reset_runs_it_again(
    client: butler.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "second-time"
    wf = client.create_workflow(
        "flaky",
        "1",
        {"marker": str(marker)},
        definition(
            {
                "id": "try",
                "run": "if [ -e '{{ config.marker }}' ]; then echo fine; else touch '{{ config.marker }}'; echo broken; exit 3; fi",
            },
            {"id": "after", "run": "echo after", "needs": ["try"]},
        ),
    )
    an = client.create_analysis("a", config={})
    (run,) = client.wait(client.launch(wf, an, [{}]), timeout=60)
    assert run.status == "error"
    assert run.error
    tasks = {t.task_id: t for t in run.tasks}
    assert tasks["try"].state == "failed"
    assert tasks["try"].exit_code == 3
    assert tasks["after"].state == "upstream_failed"
    assert run.logs("try") == "broken\n"
    assert run.logs("after") == ""

    client.reset(run)
    assert client.run(run.id).status == "ready"
    (run,) = client.wait([run], timeout=60)
    assert run.status == "completed"
    assert {t.task_id: t.try_number for t in run.tasks} == {"try": 2, "after": 1}
    assert run.logs("try") == "fine\n"
    assert "==> try (try 2) <==\nfine\n" in run.logs()

    client.reset(run, all=True)
    (run,) = client.wait([run], timeout=60)
    assert run.status == "completed"
    assert {t.task_id: t.try_number for t in run.tasks} == {"try": 3, "after": 2}


def test_wait_runs_only_the_runs_given(client: butler.Client, hello) -> None:
    wf, an = hello
    mine, other = client.launch(wf, an, [{"n": 1}, {"n": 2}])
    (done,) = client.wait([mine], timeout=60)
    assert done.status == "completed"
    assert client.run(other.id).status == "ready"


def test_timeout_stops_the_engine_and_kills_the_attempt(
    client: butler.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "finished"
    wf = client.create_workflow(
        "slow", "1", {}, definition({"id": "nap", "run": f"sleep 2 && touch '{marker}'"})
    )
    an = client.create_analysis("a", config={})
    runs = client.launch(wf, an, [{}])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^0 of 1 runs finished within 0.5s; .*call wait\(\) again"):
        client.wait(runs, timeout=0.5)
    assert time.monotonic() - started < 2
    assert client.run(runs[0].id).status in ("scheduled", "in-progress")
    time.sleep(2.5)
    assert not marker.exists(), "the attempt was killed when the engine stopped"
    client.cancel(runs[0])
    assert client.run(runs[0].id).status == "cancelled"


def test_ctrl_c_interrupts_a_wait(client: butler.Client) -> None:
    wf = client.create_workflow("slow", "1", {}, definition({"id": "nap", "run": "sleep 30"}))
    an = client.create_analysis("a", config={})
    runs = client.launch(wf, an, [{}])
    # A process started in the background by a non-interactive shell ignores SIGINT, and Python
    # keeps that; Ctrl-C's own handler makes the test independent of how it was started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            (run,) = client.wait(runs)
            # Reached only if the run ended before the interrupt: say how it ended.
            tasks = [(t.task_id, t.state, t.exit_code, t.error) for t in run.tasks]
            pytest.fail(f"the wait returned a {run.status} run ({run.error}): {tasks}")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 5
    client.cancel(runs[0])


def test_wait_releases_the_gil(client: butler.Client) -> None:
    wf = client.create_workflow("slow", "1", {}, definition({"id": "nap", "run": "sleep 1"}))
    an = client.create_analysis("a", config={})
    runs = client.launch(wf, an, [{}])
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.01)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        (run,) = client.wait(runs, timeout=60)
    finally:
        stop.set()
        counter.join()
    assert run.status == "completed"
    assert ticks > 30, f"the other thread ran only {ticks} times during a 1 s wait"


def test_cancel_during_a_wait_in_another_thread(client: butler.Client) -> None:
    wf = client.create_workflow("slow", "1", {}, definition({"id": "nap", "run": "sleep 30"}))
    an = client.create_analysis("a", config={})
    (run,) = client.launch(wf, an, [{}])
    result: list[butler.Run] = []
    waiter = threading.Thread(target=lambda: result.extend(client.wait([run], timeout=60)))
    waiter.start()
    deadline = time.monotonic() + 20
    while client.run(run.id).tasks[0].state != "running":
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    started = time.monotonic()
    client.cancel(run)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 10
    assert [r.status for r in result] == ["cancelled"]
    assert result[0].tasks[0].state == "cancelled"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_runtime_and_connection(client: butler.Client, hello) -> None:
    wf, an = hello
    runs = client.launch(wf, an, HELLO / "runs")
    assert len(client.runs()) == 2  # the parent's runtime and pool exist before the fork
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            done = client.wait(runs, timeout=60)
            code = 0 if [r.status for r in done] == ["completed", "completed"] else 3
        except BaseException as err:  # noqa: BLE001 - reported through the exit code
            print(f"child failed: {err!r}", file=sys.stderr)
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.status for r in client.runs()] == ["completed", "completed"]
