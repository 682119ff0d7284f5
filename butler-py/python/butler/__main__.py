"""``python -m butler worker``: a process that executes the Python tasks of Butler's runs.

Tasks defined with ``python = "module.path:function"`` go to their own queue, which only Python
workers take from. A worker imports task modules as this interpreter would here: from the
current directory, ``PYTHONPATH`` and the directories given with ``--path``. It schedules
nothing: run ``butler server`` (or wait with ``butler wait``) for that.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional

import butler


def _slots(text: str) -> int:
    try:
        slots = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if slots < 1:
        raise argparse.ArgumentTypeError(f"{slots} would run no task; give 1 or more")
    return slots


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m butler",
        description="Butler from Python. `worker` executes the Python tasks of Butler's runs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    worker = commands.add_parser(
        "worker",
        help="execute Python tasks until stopped with Ctrl-C or SIGTERM",
        description=(
            "Executes the attempts of Python tasks (python = \"module:function\") that a "
            "`butler server` schedules, until stopped with Ctrl-C or SIGTERM. Task modules are "
            "imported from the current directory, PYTHONPATH and every --path."
        ),
    )
    worker.add_argument(
        "--slots",
        type=_slots,
        metavar="N",
        help="attempts to run at once (default: one per CPU)",
    )
    worker.add_argument(
        "--db",
        metavar="URL",
        help="the run store: a URL or a SQLite file (default: BUTLER_DB, else "
        "$BUTLER_HOME/butler.db)",
    )
    worker.add_argument(
        "--queue",
        metavar="URL",
        help="the task queue's URL (default: BUTLER_QUEUE, else the store's own queue)",
    )
    worker.add_argument(
        "--home",
        metavar="DIR",
        help="Butler's home, where attempt directories and logs go (default: BUTLER_HOME, "
        "else ~/.butler)",
    )
    worker.add_argument(
        "--path",
        metavar="DIR",
        action="append",
        default=[],
        help="a directory to import task modules from, before the others (repeatable)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Runs ``python -m butler``; returns the exit code."""
    args = _parser().parse_args(argv)
    for directory in reversed(args.path):
        sys.path.insert(0, str(Path(directory).absolute()))
    try:
        client = butler.connect(db=args.db, queue=args.queue, home=args.home)
        worker = butler.Worker(client, slots=args.slots)
    except butler.ButlerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    # From here on SIGTERM stops the worker as Ctrl-C does, cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(
            f"Butler Python worker: running tasks from queue {worker.queue} in {worker.slots} "
            f"slot{'s' if worker.slots != 1 else ''} (store {client.db}); stop with Ctrl-C or "
            "SIGTERM",
            file=sys.stderr,
            flush=True,
        )
        worker.run()
    except KeyboardInterrupt:
        pass  # stopped before run() began watching for it
    except butler.ButlerError as err:
        print(f"error: the worker stopped: {err}", file=sys.stderr)
        return 1
    print(
        "Stopped: attempts that were running were given back to the queue",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
