#!/usr/bin/env python3
"""Execute an analysis's unfinished runs here, then summarise its runs by status.

Uses only the public API of the `butler` module. With write_and_launch.py beside it:

    id=$(python examples/python/write_and_launch.py | tail -n1)
    python examples/python/wait_and_summarise.py --analysis "$id"

Runs already finished are only counted. After --timeout seconds the engine stops and the
unfinished runs stay in the store: calling the script again resumes them. The store is
BUTLER_DB, or $BUTLER_HOME/butler.db (BUTLER_HOME defaults to ~/.butler), or the --db URL.
Exits 1 when a run did not complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import butler

FINISHED = {"completed", "error", "cancelled"}
FAILED_SHOWN = 5


def failure(run: butler.Run) -> str:
    """The run's error, and the last log line of the task that failed."""
    for task in run.tasks:
        if task.state in ("failed", "timed_out"):
            last_lines = run.logs(task.task_id).strip().splitlines()[-1:]
            return " / ".join([run.error or f"task `{task.task_id}` {task.state}", *last_lines])
    return run.error or run.status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", type=int, required=True, help="the analysis id")
    parser.add_argument("--db", help="store URL (default: BUTLER_DB or $BUTLER_HOME/butler.db)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    parser.add_argument("--slots", type=int, default=None, help="tasks at once (default: CPUs)")
    args = parser.parse_args()

    client = butler.connect(db=args.db)
    analysis = client.analysis(args.analysis)
    runs = client.runs(analysis=analysis)
    unfinished = [run for run in runs if run.status not in FINISHED]
    if unfinished:
        print(f"Waiting for {len(unfinished)} of {len(runs)} runs of {analysis.name}", flush=True)
        try:
            client.wait(unfinished, timeout=args.timeout, slots=args.slots)
        except TimeoutError as err:
            print(f"timed out: {err}", file=sys.stderr)

    counts = {status: n for status, n in client.get_run_count(analysis).items() if n}
    print(f"{'status':<12} {'runs':>6}")
    for status, n in counts.items():
        print(f"{status:<12} {n:>6}")
    print(f"{'total':<12} {sum(counts.values()):>6}")

    failed = client.runs(analysis=analysis, status="error")
    if failed:
        print(f"Failed runs (first {min(len(failed), FAILED_SHOWN)} of {len(failed)}):")
    for run in failed[:FAILED_SHOWN]:
        source = Path(run.source_file).name if run.source_file else "-"
        print(f"  run {run.id} ({source}): {failure(run)}")
    return 0 if counts.keys() <= {"completed"} else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except butler.ButlerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
