#!/usr/bin/env python3
"""Launch one run per sample from Python, execute them here, and summarise how they went.

Uses only the public API of the `butler` module:

    python examples/python/launch_and_summarise.py --samples 20 --fail-every 7

The store is BUTLER_DB, or $BUTLER_HOME/butler.db (BUTLER_HOME defaults to ~/.butler), or the
--db URL. Running the script again reuses the workflow and launches into a new analysis.
Exits 1 when a run did not complete.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import butler

WORKFLOW = "greet"
VERSION = "1.0"

# The same shape as a TOML or JSON definition file.
DEFINITION = {
    "tasks": [
        {
            "id": "greet",
            "run": (
                "{% if config.fail %}echo '{{ config.sample }} is marked to fail' >&2; exit 3"
                "{% else %}echo '{{ config.greeting }}, {{ config.sample }}!'{% endif %}"
            ),
            "timeout": "1m",
        },
        {"id": "count", "run": "echo '{{ config.sample | length }} letters'", "needs": ["greet"]},
    ]
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="store URL (default: BUTLER_DB or $BUTLER_HOME/butler.db)")
    parser.add_argument("--samples", type=int, default=10, help="how many runs to launch")
    parser.add_argument("--fail-every", type=int, default=0, help="make every Nth sample fail")
    parser.add_argument("--slots", type=int, default=None, help="tasks at once (default: CPUs)")
    args = parser.parse_args()

    client = butler.connect(db=args.db)

    # Register the workflow once; later runs of the script reuse it.
    existing = [w for w in client.list_workflows() if (w.name, w.version) == (WORKFLOW, VERSION)]
    if existing:
        workflow = existing[0]
    else:
        workflow = client.create_workflow(WORKFLOW, VERSION, {"greeting": "Hello"}, DEFINITION)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    analysis = client.create_analysis(f"greetings-{stamp}", config={"fail": False})

    # One config per sample, generated here instead of written to files.
    configs = [
        {
            "sample": f"sample-{i:02}",
            "fail": args.fail_every > 0 and i % args.fail_every == 0,
        }
        for i in range(1, args.samples + 1)
    ]
    runs = client.launch(workflow, analysis, configs)
    print(f"Launched {len(runs)} runs of {workflow.name} {workflow.version} for analysis {analysis.id}")

    runs = client.wait(runs, slots=args.slots)

    print("Summary:")
    for status, count in client.get_run_count(analysis).items():
        if count:
            print(f"  {status}: {count}")
    for run in runs:
        sample = run.effective_config["sample"]
        if run.status == "completed":
            print(f"  {sample}: {run.logs('greet').strip()}")
            continue
        for task in run.tasks:
            if task.state == "failed":
                reason = run.logs(task.task_id).strip()
                print(
                    f"  {sample}: task `{task.task_id}` failed (exit code {task.exit_code}): {reason}"
                )
    return 0 if all(run.status == "completed" for run in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except butler.ButlerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
