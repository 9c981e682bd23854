"""The command line's error boundary: known bad input is one line and exit code 2; an unexpected error is one line
naming a log file that holds its traceback (exit code 1); Ctrl-C is one line and exit code 130; --debug (or
DECOMP_DEBUG=1) lets every traceback through."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from pathlib import Path

BAD_INPUT = 2
UNEXPECTED = 1
INTERRUPTED = 130   # 128 + SIGINT, as shells report it


class CommandError(Exception):
    """A problem with the user's input, reported as one line."""


def input_errors() -> tuple:
    """The exception types that mean bad input: ours, the library's argument checks (ValueError), files that are
    missing or unreadable (OSError), and unparsable YAML or safetensors."""
    import yaml
    known = [CommandError, ValueError, OSError, FloatingPointError, yaml.YAMLError]
    try:
        from safetensors import SafetensorError
        known.append(SafetensorError)
    except ImportError:
        pass
    return tuple(known)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception behind `error` (libraries such as datasets wrap the parser's own)."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    return error


def write_log(command: str, error: BaseException) -> Path:
    """A log file in the system's temporary folder with the command line and the full traceback."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    handle, name = tempfile.mkstemp(prefix=f"decomp-{command}-{stamp}-", suffix=".log")
    with os.fdopen(handle, "w") as log:
        log.write(f"command: {' '.join(sys.argv)}\npython: {sys.version.split()[0]}\n\n")
        log.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return Path(name)


def guarded(command: str, debug: bool, run) -> int:
    """Calls run() and returns the exit code: 0, or that of what stopped it, reported as one line on stderr."""
    prefix = f"decomp {command}"
    try:
        run()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: interrupted; run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except input_errors() as error:
        if debug:
            raise
        print(f"{prefix}: error: {first_line(error)}", file=sys.stderr)
        return BAD_INPUT
    except Exception as error:
        if debug:
            raise
        log = write_log(command, error)
        print(f"{prefix}: unexpected error: {type(error).__name__}: {first_line(error)} (traceback in {log}; "
              f"--debug prints it)", file=sys.stderr)
        return UNEXPECTED
    return 0
