"""Butler from Python: register workflows and analyses, launch runs, follow and execute them.

    import butler

    client = butler.connect()                      # BUTLER_DB, or $BUTLER_HOME/butler.db
    wf = client.create_workflow("hello", "1.0", {"greeting": "hi"}, "hello.toml")
    an = client.create_analysis("batch-1", config={})
    runs = client.launch(wf, an, [{"sample": "S1"}, {"sample": "S2"}])
    for run in client.wait(runs):                  # executes them in this process
        print(run.id, run.status, run.logs())

A task may be a Python function instead of a command (``python = "module:function"`` in the
definition); ``Client.wait`` runs such tasks too, and ``python -m butler worker`` (or
``butler.Worker``) runs them for runs that a ``butler server`` schedules.

Every call goes to Butler's core library; errors are ``ButlerError`` subclasses whose
messages are those of the ``butler`` command.
"""

from butler._butler import (
    Analysis,
    ButlerError,
    Client,
    Command,
    ConflictError,
    Event,
    InvalidInputError,
    NotFoundError,
    Provenance,
    Run,
    Task,
    UnavailableError,
    Worker,
    Workflow,
    __version__,
    connect,
)
from butler._context import TaskContext

__all__ = [
    "Analysis",
    "ButlerError",
    "Client",
    "Command",
    "ConflictError",
    "Event",
    "InvalidInputError",
    "NotFoundError",
    "Provenance",
    "Run",
    "Task",
    "TaskContext",
    "UnavailableError",
    "Worker",
    "Workflow",
    "__version__",
    "connect",
]
