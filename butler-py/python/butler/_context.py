"""`TaskContext`: what a Python task's function is told about the attempt it runs in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TaskContext"]


@dataclass(frozen=True)
class TaskContext:
    """What a Python task knows about the attempt it runs in; its function is called as
    ``function(config, context)``.

    ``log`` is a :class:`logging.Logger` whose records go to the attempt's log (the task's
    ``run.logs(task)``), as does anything the function prints.
    """

    run_id: int
    """The analysis run the task belongs to."""
    task_id: str
    """The task's id in the workflow definition."""
    try_number: int
    """Which attempt this is, starting at 1."""
    workdir: Path
    """The attempt's own directory (the process's working directory at the start)."""
    config_path: Path
    """The run's effective config as a JSON file, ``workdir / "config.json"``."""
    log: logging.Logger
    """A logger writing to the attempt's log."""
