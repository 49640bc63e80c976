"""Faults that stop a run cleanly: preemption signals and non-finite losses.

Ranks must agree on both: a rank that checkpoints, skips or stops alone
would leave the others waiting in a collective forever. Agreeing costs a
collective and a host read, which stalls a GPU's queue of work, so the
trainer agrees only at sync points (every ``train.log_every`` steps, before
each checkpoint, at epoch ends and at the end of the run) on two facts: did
any rank get a stop signal (SLURM's ``SIGUSR1`` warning before a time limit
or preemption, or ``SIGTERM``), and which was the first step whose loss was
NaN or Inf. Between sync points each rank notes that step on the device
(:class:`NonfiniteWatch`), which costs no sync. Only
``train.on_nonfinite=skip`` agrees every step (:func:`nonfinite_ranks`): it
must skip the update on every rank at exactly the bad step.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from types import FrameType

import torch
from accelerate import Accelerator

from pegasus_dist.errors import PegasusError

log = logging.getLogger("pegasus_dist.faults")

# sysexits.h EX_TEMPFAIL: "try again later". The SLURM scripts requeue the job on it.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
NO_STEP = -1  # NonfiniteWatch.first_bad while every loss was finite


class TrainingError(PegasusError):
    """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite=stop)."""

    exit_code = 3


class Preempted(Exception):  # noqa: N818 (not an error: a requested, clean stop)
    """Raised after the stop checkpoint is written; the process exits with REQUEUE_EXIT_CODE."""


class StopSignals:
    """Records SIGUSR1/SIGTERM instead of dying, so that the ranks stop together at a sync point."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("received %s: stopping at the next sync point", signal.Signals(signum).name)
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonfiniteWatch:
    """This rank's first step with a NaN/Inf loss since the last sync point, noted on the device.

    :meth:`record` runs every step without waiting for the device: the flag is
    set by a device operation, and the step's position (epoch, batch) is kept
    on the host so that the error can name it once :func:`agree` finds it.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self._positions: dict[int, tuple[int, int]] = {}

    def record(self, step: int, epoch: int, batch: int, loss: torch.Tensor) -> None:
        """Note ``step`` (epoch and batch counted from 1) and whether its loss is finite."""
        self._positions[step] = (epoch, batch)
        first_bad_here = ~torch.isfinite(loss.detach()) & (self.first_bad == NO_STEP)
        self.first_bad.masked_fill_(first_bad_here, step)  # a scalar fill: no host read

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch) of a step recorded since the last :meth:`clear`."""
        return self._positions[step]

    def clear(self) -> None:
        """Forget the positions of steps that the ranks found finite."""
        self._positions.clear()


@dataclass(frozen=True)
class Agreement:
    """What every rank learns at a sync point, the same on every rank."""

    stop: bool  # some rank received a stop signal
    first_bad_step: int | None  # the earliest step with a NaN/Inf loss on any rank
    bad_ranks: list[int]  # the ranks whose loss was NaN/Inf at that step


def agree(accelerator: Accelerator, stop_requested: bool, watch: NonfiniteWatch) -> Agreement:
    """One gather over the ranks and one host read: call it at sync points only."""
    first_bad = watch.first_bad
    local = torch.stack([first_bad.new_full((), int(stop_requested)), first_bad])
    rows = accelerator.gather(local[None]).view(-1, 2).cpu()  # one row per rank
    stop, firsts = bool(rows[:, 0].any()), rows[:, 1]
    if bool((firsts == NO_STEP).all()):
        return Agreement(stop, None, [])
    first = int(firsts[firsts != NO_STEP].min())
    return Agreement(stop, first, torch.nonzero(firsts == first).flatten().tolist())


def nonfinite_ranks(accelerator: Accelerator, loss: torch.Tensor) -> list[int]:
    """The ranks whose ``loss`` is NaN/Inf, on every rank; waits for the device (one host read)."""
    local = (~torch.isfinite(loss.detach())).float()
    flags = accelerator.gather(local[None]).cpu()  # one flag per rank
    return [int(r) for r in torch.nonzero(flags).flatten()]
