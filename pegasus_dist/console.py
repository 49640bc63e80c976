"""What a person sees: log lines, and errors as one line with a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from pegasus_dist.errors import PegasusError

T = TypeVar("T")


def setup_logging() -> None:
    """INFO on the main process (rank 0 by torchrun/accelerate's RANK), warnings elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; a :class:`PegasusError` becomes ``error: ...`` on stderr and its exit code."""
    try:
        return fn()
    except PegasusError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
