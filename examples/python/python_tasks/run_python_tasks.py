#!/usr/bin/env python3
"""Count the words of every text in texts/ with a workflow mixing a command and a Python task.

Uses only the public API of the `butler` module:

    python examples/python/python_tasks/run_python_tasks.py
    python examples/python/python_tasks/run_python_tasks.py --fail-on-empty

word_count.toml defines the tasks: `split` is a shell command, `count` the Python function
steps.count_words, which Client.wait runs in processes of this interpreter (this directory
is on sys.path, so `steps` imports). The store is BUTLER_DB, or $BUTLER_HOME/butler.db
(BUTLER_HOME defaults to ~/.butler), or the --db URL. Exits 1 when a run did not complete.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import butler

HERE = Path(__file__).resolve().parent
WORKFLOW = "word-count"
VERSION = "1.0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="store URL (default: BUTLER_DB or $BUTLER_HOME/butler.db)")
    parser.add_argument("--work", help="where the split words go (default: a new temporary dir)")
    parser.add_argument("--slots", type=int, default=None, help="tasks at once (default: CPUs)")
    parser.add_argument(
        "--fail-on-empty", action="store_true", help="make `count` fail for a text with no words"
    )
    args = parser.parse_args()

    client = butler.connect(db=args.db)
    existing = [w for w in client.list_workflows() if (w.name, w.version) == (WORKFLOW, VERSION)]
    if existing:
        workflow = existing[0]
    else:
        workflow = client.create_workflow(WORKFLOW, VERSION, {"top": 3}, HERE / "word_count.toml")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="butler-words-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    analysis = client.create_analysis(
        f"words-{stamp}", config={"work": str(work), "fail_on_empty": args.fail_on_empty}
    )
    texts = sorted((HERE / "texts").glob("*.txt"))
    runs = client.launch(
        workflow, analysis, [{"sample": text.stem, "text": str(text)} for text in texts]
    )
    print(f"Launched {len(runs)} runs of {workflow.name} {workflow.version} for analysis {analysis.id}")

    runs = client.wait(runs, slots=args.slots)

    for run in runs:
        sample = run.effective_config["sample"]
        if run.status == "completed":
            summary = run.output("count")
            top = ", ".join(f"{word} ({count})" for word, count in summary["top"]) or "none"
            print(
                f"  {sample}: {summary['words']} words, {summary['distinct']} distinct; "
                f"most common: {top}"
            )
            continue
        for task in run.tasks:
            if task.state == "failed":
                last_line = run.logs(task.task_id).strip().splitlines()[-1]
                print(
                    f"  {sample}: task `{task.task_id}` failed after {task.try_number} tries "
                    f"(exit code {task.exit_code}): {last_line}"
                )
    print("Summary:")
    for status, count in client.get_run_count(analysis).items():
        if count:
            print(f"  {status}: {count}")
    return 0 if all(run.status == "completed" for run in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except butler.ButlerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
