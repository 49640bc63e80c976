"""Faults that stop a run cleanly, agreed by every rank: stop signals, NaN/Inf losses, start-up.

A rank that checkpoints, skips or stops alone would leave the others in a collective forever. Agreeing costs a
collective and a host read: at sync points only, but every step for stop signals (:class:`StopPoll`, on the
host) and ``train.on_nonfinite=skip`` (:func:`nonfinite_ranks`). README.md, "Fault tolerance": the guarantees.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object

from pegasus_dist.config import Config
from pegasus_dist.console import print_error
from pegasus_dist.data.loader import LoaderWorkerLost
from pegasus_dist.errors import REQUEUE_EXIT_CODE, PegasusError
from pegasus_dist.training.distributed import build_accelerator

log = logging.getLogger("pegasus_dist.training.faults")
T = TypeVar("T")

# Warnings that an end is coming: SIGUSR1, the SLURM jobs' time-limit warning (--signal=B:USR1@120); SIGUSR2,
# another site's --signal choice and LSF's run limit (bsub -W, SIGKILL 10 minutes later); SIGXCPU, a soft
# CPU-time limit reached (ulimit -St, LSF's CPULIMIT), sent again every CPU second until the hard limit's
# SIGKILL. Requests to end: SIGTERM; SIGHUP, a dropped ssh connection; SIGINT, Ctrl-C. Every one of them,
# in the training loop, means "checkpoint and stop".
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
STOP_SIGNALS = WARNING_SIGNALS + ENDING_SIGNALS
# A scheduler's, sent again once the stop checkpoint is written: still exit with the requeue code.
# (Ctrl-C again stays Python's KeyboardInterrupt: a person at a terminal, not a scheduler.)
REQUEUE_AGAIN = (signal.SIGTERM, signal.SIGHUP)
# A SIGTERM this soon after the first is the same request: a launcher killed with several threads sends its
# ranks the parent-death signal once per thread.
SAME_REQUEST_S = 1.0
NO_STEP = -1  # NonfiniteWatch.first_bad while every loss was finite


class TrainingError(PegasusError):
    """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite=stop)."""

    exit_code = 3


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, for a one-line error (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(". ") if text else type(err).__name__


def out_of_memory(err: Exception, where: str, batch: str, batch_size: int) -> TrainingError | None:
    """One line for a step (or its batch) that ran out of memory; None for any other error. The CPU allocator
    raises a RuntimeError that "can't allocate memory"; NumPy and Python (loader or step) a MemoryError."""
    if not (isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)):
        return None
    half = max(1, batch_size // 2)
    return TrainingError(f"out of memory at {where} ({first_line(err)}); {batch}; "
                         f"lower data.batch_size (data.batch_size={half} train.grad_accum_steps=2 keeps "
                         "the global batch) or use train.mixed_precision=bf16")


def loader_worker_lost(err: Exception, where: str) -> TrainingError | None:
    """One line for a loader worker process that died under the step (killed by a signal, gone without a word,
    or while handing over a batch); None for any other error. torch raises it from its SIGCHLD handler,
    anywhere: once the death is known, that handler is reset lest it raise again as the line is reported."""
    if not (isinstance(err, LoaderWorkerLost) or "DataLoader worker (pid" in str(err)):
        return None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return TrainingError(f"a data loader process died at {where} ({first_line(err)}): the kernel's "
                         "out-of-memory killer is the usual cause (`dmesg` names it); lower data.num_workers "
                         "or data.batch_size, then the same command resumes from the last checkpoint")


# What a collective raises on a surviving rank when another rank's process ended: gloo's TCP transport reading
# or writing to it, NCCL's watchdog aborting the communicator.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted", "remote process exited")
# What gloo, NCCL and the store say, in their many wordings, when a peer is alive but silent past
# train.collective_timeout_s: "Timed out waiting 20000ms for recv", "Application timeout caused pair
# closure", "Watchdog caught collective operation timeout", "Socket Timeout". Matched without case.
PEER_SILENT = ("timed out", "timeout")


def peer_lost(err: Exception, where: str) -> TrainingError | None:
    """One line for a collective whose peer process ended (that rank's own lines say why) or went
    silent, instead of the transport's traceback on every rank that outlived it; None for any other."""
    if found := next((phrase for phrase in PEER_GONE if phrase in str(err)), None):
        return TrainingError(f"lost another rank at {where} ({found}): it ended first, and its own lines "
                             "or the launcher's summary say how; the same command resumes from the last "
                             "checkpoint")
    if any(phrase in str(err).lower() for phrase in PEER_SILENT):
        return TrainingError(f"another rank did not answer within train.collective_timeout_s at {where}: "
                             "it is stalled (stopped, swapped out, waiting on a filesystem) or cut off from "
                             "this one; the same command resumes from the last checkpoint (raise "
                             "train.collective_timeout_s if the ranks are only slow)")
    if isinstance(err, dist.DistError):  # any other failure of the transport or the store
        return TrainingError(f"a collective failed at {where} ({first_line(err)}): another rank ended or "
                             "cannot be reached; the same command resumes from the last checkpoint")
    return None


def run_folder_lost(err: OSError, run_dir: Path) -> TrainingError | None:
    """One line for a file of ``run_dir`` that cannot be written (the folder removed, made read-only
    or full under the run); None for an error elsewhere, which is no fault of the run folder's."""
    if err.filename is None or not Path(err.filename).resolve().is_relative_to(run_dir.resolve()):
        return None
    return TrainingError(f"cannot write {err.filename}: {err.strerror or err}; the run folder {run_dir} "
                         "was removed, made read-only or filled under the run: put it right, then run the "
                         "same command to resume from the last checkpoint it holds")


class StartupError(PegasusError):
    """Some rank could not start; raised on every rank once rank 0 has printed the message."""

    reported = True

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """A stop signal (:data:`STOP_SIGNALS`) in the training loop: recorded, so that the ranks stop together.
    A second ending signal (SIGTERM, SIGHUP, SIGINT), or one outside :meth:`training`, ends the process at
    once, as with no handler: no run outlives a second one. Once the stop checkpoint is written
    (:attr:`checkpointed`), a second SIGTERM or SIGHUP exits with the requeue code instead, so that a
    scheduler still requeues the run it saved. A warning never ends a run: sent again (SIGXCPU repeats while
    the checkpoint is written) or after the loop, it changes nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.checkpointed = False  # the stop checkpoint is written: the run is safe to requeue
        self._received_at = 0.0
        self._training = False
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    @contextmanager
    def training(self) -> Iterator[None]:
        """The span in which a signal means "checkpoint with the others and stop"."""
        self._training = True
        try:
            yield
        finally:
            self._training = False

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.received is not None and now - self._received_at < SAME_REQUEST_S:
            return  # the same request, delivered again
        if signum in ENDING_SIGNALS and (self.received is not None or not self._training):
            if self.checkpointed and signum in REQUEUE_AGAIN:
                log.warning("received %s again: exiting %d at once, the stop checkpoint written",
                            name, REQUEUE_EXIT_CODE)
                os._exit(REQUEUE_EXIT_CODE)  # not SystemExit: that would run the teardown it interrupts
            why = "again" if self.received is not None else "outside the training loop"
            log.warning("received %s %s: exiting at once, without a checkpoint", name, why)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Python's own Ctrl-C: one line and exit 130 (console.py)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            if self._training:
                log.warning("received %s: stopping with a checkpoint within two steps", name)
            self.received, self._received_at = signum, now

    def restore(self) -> None:
        """The handlers from before the run; once a signal stopped it, the warnings stay ignored (they come
        again while the process ends, SIGXCPU every CPU second), and after the stop checkpoint SIGTERM and
        SIGHUP keep exiting with the requeue code."""
        for sig, handler in self._previous.items():
            if self.checkpointed and sig in REQUEUE_AGAIN:
                continue  # until the process is gone, a second one still exits with the requeue code
            ignored = self.received is not None and sig in WARNING_SIGNALS
            signal.signal(sig, signal.SIG_IGN if ignored else handler)


class StopPoll:
    """Whether any rank received a stop signal, agreed every optimizer step without waiting: each step posts
    an async all-reduce (max) of its flag on a CPU gloo group and reads the one posted a step before, which
    every rank has posted by then (DDP keeps them within a step)."""

    def __init__(self, accelerator: Accelerator, signals: StopSignals, timeout_s: int) -> None:
        self.signals = signals
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if accelerator.num_processes > 1 else None)
        self.pending: tuple[torch.Tensor, dist.Work] | None = None  # the flag posted a step before

    def after_step(self) -> bool:
        """Every rank calls this after every optimizer step: True on every rank at the same step."""
        local = self.signals.received is not None
        if self.group is None:
            return local
        flag = torch.tensor([int(local)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        posted, self.pending = self.pending, (flag, work)
        if posted is None:
            return False
        posted[1].wait()
        return bool(posted[0].item())

    def drain(self) -> None:
        """Wait for the flag still in flight; every rank posted the same one, so none blocks."""
        if self.pending is not None:
            self.pending[1].wait()
            self.pending = None


class NonfiniteWatch:
    """This rank's first step with a NaN/Inf loss since the last sync point, noted on the device."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        # (epoch, batch) of each step since the last sync point, on the host, for the error.
        self.positions: dict[int, tuple[int, int]] = {}

    def record(self, step: int, epoch: int, batch: int, loss: torch.Tensor) -> None:
        """Note ``step`` (epoch and batch counted from 1) and whether its loss is finite."""
        self.positions[step] = (epoch, batch)
        first_bad_here = ~torch.isfinite(loss.detach()) & (self.first_bad == NO_STEP)
        self.first_bad.masked_fill_(first_bad_here, step)  # a scalar fill: no host read


@dataclass(frozen=True)
class Agreement:
    """What every rank learns at a sync point, the same on every rank."""

    stop: bool  # some rank received a stop signal
    save: bool  # the main process's clock says a checkpoint is due (train.checkpoint_minutes)
    first_bad_step: int | None  # the earliest step with a NaN/Inf loss on any rank
    bad_ranks: list[int]  # the ranks whose loss was NaN/Inf at that step


def describe_position(step: int, epoch: int, batch: int, ranks: list[int]) -> str:
    """Where a fault happened, for its message: ``step 6 (epoch 1, batch 6) on rank(s) [1]``."""
    return f"step {step} (epoch {epoch}, batch {batch}) on rank(s) {ranks}"


def agree(accelerator: Accelerator, stop_requested: bool, watch: NonfiniteWatch, save_due: bool) -> Agreement:
    """One gather and one host read, at sync points only; the main process's save_due decides."""
    first_bad = watch.first_bad
    local = torch.stack([first_bad.new_full((), int(stop_requested)), first_bad,
                         first_bad.new_full((), int(save_due))])
    rows = accelerator.gather(local[None]).view(-1, 3).cpu()  # one row per rank
    stop, firsts, save = bool(rows[:, 0].any()), rows[:, 1], bool(rows[0, 2])
    if bool((firsts == NO_STEP).all()):
        return Agreement(stop, save, None, [])
    first = int(firsts[firsts != NO_STEP].min())
    return Agreement(stop, save, first, torch.nonzero(firsts == first).flatten().tolist())


def nonfinite_ranks(accelerator: Accelerator, loss: torch.Tensor) -> list[int]:
    """The ranks whose ``loss`` is NaN/Inf, on every rank; waits for the device (one host read)."""
    flags = accelerator.gather((~torch.isfinite(loss.detach())).float()[None]).cpu()  # one flag per rank
    return torch.nonzero(flags).flatten().tolist()


def agree_on_start(accelerator: Accelerator, checks: Callable[[], T]) -> T:
    """Run this rank's start-up ``checks``, then agree with every rank on how they went. ``checks`` must hold
    no collective: a rank that fails early would meet the others' in the wrong one. On a failure rank 0 prints
    one line naming the ranks and every rank raises :class:`StartupError`; a crash (no :class:`PegasusError`)
    re-raises its own, for its traceback."""
    try:
        result, failure = checks(), None
    except Exception as err:  # agreed on below, then raised again on this rank
        result, failure = None, err
    outcomes = gather_object([None if failure is None else _outcome(failure)])
    failed = [(rank, *o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    if accelerator.num_processes == 1:
        raise failure
    message = _failure_line(failed, accelerator.num_processes)
    if accelerator.is_main_process:
        print_error(message)
    # The line is out before any rank exits: the launcher stops the others when one exits.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if failure is not None and not isinstance(failure, PegasusError):
        raise failure
    raise StartupError(message, exit_code=failed[0][1])


def fail_with_every_rank(err: PegasusError) -> NoReturn:
    """Raise ``err``, found before the ranks formed a group, once agreed: the others may wait in
    :func:`agree_on_start`, so meet them there with the default config."""
    def fail() -> NoReturn:
        raise err
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        agree_on_start(build_accelerator(Config()), fail)
    raise err


def _outcome(err: Exception) -> tuple[int, str]:
    """(exit code, message) of one rank's failure; a crash's message points to its traceback."""
    if isinstance(err, PegasusError):
        return err.exit_code, str(err)
    return 1, f"{type(err).__name__}: {err} (a crash: its traceback is in that rank's output)"


def _failure_line(failed: list[tuple[int, int, str]], world_size: int) -> str:
    """One line for all failed ranks: ranks with the same message share it."""
    by_message: dict[str, list[int]] = {}
    for rank, _code, message in failed:
        by_message.setdefault(message, []).append(rank)
    if len(by_message) == 1 and len(failed) == world_size:
        return next(iter(by_message))  # the same on every rank: nothing rank-specific to say
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
                     for message, ranks in by_message.items())
