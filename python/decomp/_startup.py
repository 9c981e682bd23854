"""Ctrl-C while the `decomp` command is still starting (importing torch and decomp, before the command line's own
handler is in place) is one line on stderr and exit code 130, never a Python traceback.

`decomp/__init__.py` calls `guard_startup()` first thing; it installs a SIGINT handler only when this process is the
command line (`python -m decomp ...` or the `decomp` console script), never when decomp is imported as a library.
The command line's `main` calls `release()` as soon as its own handler (`app/errors.py: guarded`) takes over."""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = 130   # 128 + SIGINT, as shells report it
MESSAGE = "decomp: interrupted while starting; nothing was done"


def _interrupted(signum, frame):
    try:
        sys.stderr.write(MESSAGE + "\n")
        sys.stderr.flush()
    finally:
        raise SystemExit(INTERRUPTED)


def running_as_cli() -> bool:
    """Whether this process is `python -m decomp[.…]` or the `decomp` console script."""
    original = list(getattr(sys, "orig_argv", []) or [])
    for i, arg in enumerate(original[1:], start=1):
        if arg.startswith("-m"):
            module = arg[2:] or (original[i + 1] if i + 1 < len(original) else "")
            return module == "decomp" or module.startswith("decomp.")
        if not arg.startswith("-"):
            break   # the script: options after it are its own
    script = os.path.basename((getattr(sys, "argv", None) or [""])[0])
    return script in ("decomp", "decomp.exe", "decomp-script.py")


def guard_startup() -> None:
    """Installs the start-up SIGINT handler when this process is the command line and SIGINT has Python's default
    handler (a program that set its own keeps it)."""
    if threading.current_thread() is not threading.main_thread() or not running_as_cli():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def release() -> None:
    """Gives SIGINT back to Python's default handler (KeyboardInterrupt), if the start-up handler holds it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
