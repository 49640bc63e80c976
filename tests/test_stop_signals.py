"""Every stop signal a scheduler, a limit or a person sends, delivered to this process's handler.

The end-to-end runs (a signal or a CPU-time limit mid-run: exit 75 with a checkpoint) are in
test_launch and test_faults; here each signal is sent for real to :class:`StopSignals` in this
process, which is what decides whether the process checkpoints or dies at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from processes import BIN, run_bounded

from pegasus_dist.errors import REQUEUE_EXIT_CODE
from pegasus_dist.training.faults import (
    ENDING_SIGNALS,
    SAME_REQUEST_S,
    STOP_SIGNALS,
    WARNING_SIGNALS,
    StopSignals,
)

# What the schedulers send ahead of the end: SLURM's --signal (USR1 in our jobs, USR2 at some
# sites), LSF's run limit (USR2), a soft CPU-time limit (XCPU, again every CPU second).
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)
ENDINGS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # scancel, a dropped ssh connection, Ctrl-C


@pytest.fixture(autouse=True)
def _handlers_kept():
    """This process's handlers as they were: a stopped run leaves the warnings ignored."""
    before = {sent: signal.getsignal(sent) for sent in (*WARNINGS, *ENDINGS)}
    yield
    for sent, handler in before.items():
        signal.signal(sent, handler)


def handled(sent: signal.Signals) -> None:
    """Fail here, not by killing pytest, when ``sent`` would find no handler of ours."""
    assert sent in STOP_SIGNALS, f"{sent.name} would end the process at once, without a checkpoint"


@pytest.mark.parametrize("sent", [*WARNINGS, *ENDINGS], ids=lambda s: s.name)
def test_every_stop_signal_in_the_loop_asks_for_a_checkpoint(sent, caplog):
    handled(sent)
    before = signal.getsignal(sent)
    signals = StopSignals()
    try:
        with caplog.at_level(logging.WARNING), signals.training():
            os.kill(os.getpid(), sent)
            deadline = time.monotonic() + 5
            while signals.received is None and time.monotonic() < deadline:
                time.sleep(0.001)  # Python runs the handler between bytecodes
    finally:
        signals.restore()
    assert signals.received == sent
    assert caplog.messages == [f"received {sent.name}: stopping with a checkpoint within two steps"]
    # The run is over: an ending signal ends the process as before the run; a warning sent
    # again while it exits (SIGXCPU, every CPU second) ends nothing.
    assert signal.getsignal(sent) == (signal.SIG_IGN if sent in WARNINGS else before)


def test_a_warning_sent_again_while_stopping_or_exiting_ends_nothing(caplog):
    """SIGXCPU comes every CPU second until the hard limit: a repeat is not a second request."""
    assert set(WARNINGS) == set(WARNING_SIGNALS) and set(ENDINGS) == set(ENDING_SIGNALS)
    for sent in WARNINGS:
        handled(sent)
    signals = StopSignals()
    try:
        with caplog.at_level(logging.WARNING):
            with signals.training():
                os.kill(os.getpid(), signal.SIGXCPU)
                time.sleep(SAME_REQUEST_S + 0.1)  # past the window in which a repeat is the same one
                for sent in WARNINGS:
                    os.kill(os.getpid(), sent)
            for sent in WARNINGS:  # the checkpoint is written: the run is ending
                os.kill(os.getpid(), sent)
            time.sleep(0.01)
    finally:
        signals.restore()
    for sent in WARNINGS:  # and while the process exits
        assert signal.getsignal(sent) == signal.SIG_IGN, f"{sent.name} would end the process"
        os.kill(os.getpid(), sent)
    assert signals.received == signal.SIGXCPU  # this process is alive, and still stopping
    assert caplog.messages == ["received SIGXCPU: stopping with a checkpoint within two steps"]


SENT_AGAIN = """
import os, signal, sys, time
from pegasus_dist.training.faults import SAME_REQUEST_S, StopSignals
signals = StopSignals()
with signals.training():
    os.kill(os.getpid(), signal.{first})
    time.sleep(0.05)
signals.checkpointed = True  # what the loop sets once the stop checkpoint is written
signals.restore()  # the run is over; the process is ending (W&B, interpreter shutdown)
time.sleep(SAME_REQUEST_S + 0.1)  # past the window in which a repeat is the same request
os.kill(os.getpid(), signal.{again})
time.sleep(30)
sys.exit(0)
"""


@pytest.mark.process
@pytest.mark.parametrize(("first", "again"), [("SIGUSR1", "SIGTERM"), ("SIGTERM", "SIGHUP")])
def test_a_second_ending_signal_after_the_stop_checkpoint_still_exits_to_be_requeued(first, again):
    """scancel, then the time limit's SIGTERM while the stopped run ends: the run it saved is requeued."""
    done = run_bounded([str(BIN / "python"), "-c", SENT_AGAIN.format(first=first, again=again)], timeout=60)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stdout[-2000:]
    assert f"received {again} again: exiting {REQUEUE_EXIT_CODE} at once, the stop checkpoint written" \
        in done.stdout
