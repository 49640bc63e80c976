"""What a person sees: log lines, and errors as one line with a non-zero exit."""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from pegasus_dist.errors import PegasusError, Preempted

T = TypeVar("T")
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a job stopped by Ctrl-C


def setup_logging() -> None:
    """INFO on the main process (rank 0 by torchrun/accelerate's RANK), warnings elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    # A stream closed at start (`2>&-`) is None: /dev/null instead, opened on the free descriptor,
    # so that no file of the run takes it and receives what C libraries write to stderr.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (the process's, open to its end)
        if isinstance(stream := getattr(sys, name), io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")  # a path the locale cannot encode (LC_ALL=C)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Accelerate names every file of a checkpoint it writes or reads (temporary folder included).
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)


def print_error(message: str) -> None:
    """The one line that reports an error a person can act on."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def import_entry(module: str) -> object:
    """Import ``module`` (torch comes with it: seconds) under :func:`exit_on_user_error`: a Ctrl-C
    then is one line and exit 130, as later. It is only noted until the import is done: torch's C++
    side runs Python code while it loads, and a KeyboardInterrupt raised there is cleared (numpy's
    import: the run went on as if none came) or aborts the process (pybind11's error_already_set)."""
    def load() -> object:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return importlib.import_module(module)  # e.g. ignored, as in a script's background job
        came: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, _frame: came.append(signum))
        try:
            loaded = importlib.import_module(module)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if came:
            raise KeyboardInterrupt
        return loaded

    return exit_on_user_error(load)


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; a :class:`PegasusError` becomes ``error: ...`` on stderr and its exit code,
    :class:`Preempted` exit 75 (whoever started it may requeue it), Ctrl-C exit 130, an
    ``OSError`` that names a path one line naming it (exit 2)."""
    try:
        return fn()
    except PegasusError as err:
        if not err.reported:
            print_error(str(err))
        raise SystemExit(err.exit_code) from None
    except Preempted as stop:
        raise SystemExit(stop.exit_code) from None
    except OSError as err:  # a path the user gave that cannot be read or written (--out /proc/x)
        if err.filename is None:  # no path to name: the system's or a bug, with its traceback
            raise
        print_error(f"{err.filename}: {err.strerror or err}; check that path: a folder to write into must be "
                    "writable (or creatable), a file to read must be there and readable")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print_error("interrupted (Ctrl-C); run the same command again (training resumes from its last "
                    "checkpoint)")
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
