"""Runs one attempt of a Python task: ``python -m butler._task module.path:function``.

A Python worker starts this module as the attempt's process, in the attempt's directory, with
the executor's environment (``BUTLER_CONFIG``, ``BUTLER_RUN_ID``, ``BUTLER_TASK_ID``,
``BUTLER_TRY``) and the worker's ``sys.path`` in ``PYTHONPATH``. It imports the module, calls
``function(config, context)`` with the run's effective config and a :class:`TaskContext`, and
writes the return value as JSON to ``output.json`` in the attempt's directory. Everything the
function prints, logs with ``context.log`` or raises goes to the attempt's log.

Exit codes: 0 the function returned; 1 it raised (its traceback is in the log); 2 the target
cannot be found or the attempt's environment is not a Butler attempt's; 3 the return value is
not JSON. A ``sys.exit(n)`` in the function exits with ``n``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from butler._context import TaskContext

__all__ = ["OUTPUT_FILE", "main", "run"]

#: The file in an attempt's directory that holds what the function returned, as JSON.
OUTPUT_FILE = "output.json"

#: The exit code of a target that cannot be imported or called.
EXIT_NOT_FOUND = 2
#: The exit code of a function whose return value is not JSON.
EXIT_NOT_JSON = 3


class _Abort(Exception):
    """Ends the attempt with `code` after printing `message` to stderr (the attempt's log)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise _Abort(
            EXIT_NOT_FOUND,
            f"butler._task: {name} is not set; this module runs Python tasks inside a Butler "
            "attempt (started by `python -m butler worker` or `Client.wait`), not by hand",
        )
    return value


def _env_int(name: str) -> int:
    value = _env(name)
    try:
        return int(value)
    except ValueError:
        raise _Abort(
            EXIT_NOT_FOUND, f"butler._task: {name}={value!r} is not a whole number"
        ) from None


def _context(config_path: Path) -> TaskContext:
    task_id = _env("BUTLER_TASK_ID")
    # Records of the task's own logger and of any library's logger go to stdout, which the
    # executor appends to the attempt's log.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return TaskContext(
        run_id=_env_int("BUTLER_RUN_ID"),
        task_id=task_id,
        try_number=_env_int("BUTLER_TRY"),
        workdir=config_path.parent,
        config_path=config_path,
        log=logging.getLogger(task_id),
    )


def _read_config(config_path: Path) -> Any:
    try:
        with open(config_path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as err:
        raise _Abort(
            EXIT_NOT_FOUND,
            f"butler._task: cannot read the run's config {config_path}: {err}",
        ) from None


def _resolve(target: str) -> Callable[..., Any]:
    """The function `module.path:function` names."""
    module_name, sep, function_name = target.partition(":")
    if not sep or not module_name or not function_name:
        raise _Abort(
            EXIT_NOT_FOUND,
            f"butler._task: {target!r} is not a Python target; write it as module.path:function",
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            path = "\n  ".join(p or "(the working directory)" for p in sys.path)
            raise _Abort(
                EXIT_NOT_FOUND,
                f"butler._task: cannot import module `{module_name}` of task target {target}: "
                f"no module named `{missing}`. Start the worker (or the script that calls "
                f"Client.wait) where `import {module_name}` works, or add its directory to "
                f"PYTHONPATH. Searched:\n  {path}",
            ) from None
        # The module exists but one of its own imports failed: that is the task's error.
        raise
    function = getattr(module, function_name, None)
    if function is None:
        functions = sorted(
            name
            for name, value in vars(module).items()
            if callable(value) and not name.startswith("_")
        )
        listing = ", ".join(functions) if functions else "none"
        raise _Abort(
            EXIT_NOT_FOUND,
            f"butler._task: module `{module_name}` ({getattr(module, '__file__', None)}) has "
            f"no function `{function_name}`; its public callables are: {listing}",
        )
    if not callable(function):
        raise _Abort(
            EXIT_NOT_FOUND,
            f"butler._task: `{target}` is a {type(function).__name__}, not a function; name a "
            "function taking (config, context)",
        )
    return function  # type: ignore[no-any-return]


def _not_json(value: Any, path: str = "", depth: int = 0) -> Optional[str]:
    """Where in `value` the first thing JSON cannot hold is, and what it is; None if nothing."""
    if depth > 256:
        return f"{path or 'the value'}: nested more than 256 levels deep (does it contain itself?)"
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return f"{path or 'the value'}: the float {value!r}, which JSON cannot hold"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{path or 'the value'}: a key of type {type(key).__name__}"
            found = _not_json(item, f"{path}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _not_json(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    return f"{path or 'the value'}: a {type(value).__module__}.{type(value).__qualname__}"


def _write_output(workdir: Path, target: str, value: Any) -> None:
    problem = _not_json(value)
    if problem:
        raise _Abort(
            EXIT_NOT_JSON,
            f"butler._task: {target} returned a value that is not JSON-serialisable ({problem}); "
            "return None, a bool, a number, a str, or lists and dicts of them",
        )
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=2)
    # Written whole and then renamed, so a reader never sees half an output.
    partial = workdir / (OUTPUT_FILE + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, workdir / OUTPUT_FILE)


def run(target: str) -> int:
    """Runs the attempt of `target` this process was started for; returns its exit code."""
    # The log is a file: without this, printed lines would reach it after later log records.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    try:
        config_path = Path(_env("BUTLER_CONFIG")).absolute()
        config = _read_config(config_path)
        context = _context(config_path)
        function = _resolve(target)
        result = function(config, context)
        _write_output(context.workdir, target, result)
    except _Abort as abort:
        print(abort.message, file=sys.stderr)
        return abort.code
    except Exception:  # noqa: BLE001 - the task's own failure: its traceback is the report
        traceback.print_exc()
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> NoReturn:
    """Entry point of ``python -m butler._task module.path:function``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m butler._task module.path:function (inside a Butler attempt)",
            file=sys.stderr,
        )
        sys.exit(EXIT_NOT_FOUND)
    code = run(args[0])
    logging.shutdown()
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
