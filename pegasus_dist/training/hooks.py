"""Explicit points where a test watches the trainer or injects a fault.

:class:`Hooks`: callbacks at named points, passed to ``train`` or ``main``. Every run (real entry points
included) also reads a fault plan from ``PEGASUS_FAULT``: comma-separated faults, ``KIND:key=value:...``::

    PEGASUS_FAULT="nan:step=6:rank=1"            the loss of step 6 on rank 1 is NaN
    PEGASUS_FAULT="kill:step=3:rank=1"           rank 1 kills itself (SIGKILL) before step 3
    PEGASUS_FAULT="kill:step=3:signal=USR1"      ... or sends itself another signal
    PEGASUS_FAULT="slow:ms=100"                  every micro-batch takes 100 ms more
    PEGASUS_FAULT="stall-save:step=8"            the save of step 8 stalls half-written
    PEGASUS_FAULT="fail:at=restore:rank=1"       rank 1 fails a start-up stage (an error to report)
    PEGASUS_FAULT="crash:at=checks:rank=1"       ... or crashes in it (a bug: RuntimeError)
    PEGASUS_FAULT="crash:step=5"                 a crash in the training loop
    PEGASUS_FAULT="oom:step=5"                   step 5 runs out of device memory
    PEGASUS_FAULT="fill-disk:step=5"             before step 5, a file fills the run folder's disk
    PEGASUS_FAULT="kill-wandb:step=5"            before step 5, W&B's service process is killed
    PEGASUS_FAULT="kill-worker:step=5"           ... or the loader's worker processes are

``rank`` is the launcher's ``RANK``; without it every rank takes the fault. A faulted run computes the same
numbers up to the fault. A new kind is a function and a line of :data:`KINDS`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pegasus_dist.errors import ConfigError, PegasusError

if TYPE_CHECKING:
    from pegasus_dist.data.loader import Batch
    from pegasus_dist.training.loop import Trainer
    from pegasus_dist.training.state import TrainState

FAULT_VARIABLE = "PEGASUS_FAULT"
# The agreed stages of start-up, in order (pegasus_dist.training.start): each may fail on one rank.
START_STAGES = ("batch", "lock", "checks", "config", "restore")
STALLED = "stalled-save"  # the file in the run folder that says a save is stalled (stall-save)


@dataclass
class Hooks:
    """Callbacks at named points of a run; each one is optional."""

    # In each start-up stage (START_STAGES), on every rank: a raise is that rank's agreed failure.
    at_start_up: list[Callable[[str], None]] = field(default_factory=list)
    # Once start-up is done, with the trainer (model prepared, checkpoint restored).
    after_start: list[Callable[[Trainer], None]] = field(default_factory=list)
    # Before each micro-batch is trained; trainer.state.step + 1 is the step in progress.
    before_micro_batch: list[Callable[[Trainer, Batch], None]] = field(default_factory=list)
    # (the step in progress from 1, the micro-batch's loss) -> the loss to backpropagate.
    on_loss: list[Callable[[int, torch.Tensor], torch.Tensor]] = field(default_factory=list)
    # On the main process mid-save: the temporary folder holds the weights but no state.json.
    during_save: list[Callable[[Path, TrainState], None]] = field(default_factory=list)

    def __add__(self, other: Hooks) -> Hooks:
        return Hooks(**{name: [*getattr(self, name), *getattr(other, name)] for name in vars(self)})

    def run(self, point: str, *args: Any) -> None:
        """Call the hooks of ``point`` (a field's name) with ``args``, in order."""
        for hook in getattr(self, point):
            hook(*args)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return reduce(lambda loss, hook: hook(step, loss), self.on_loss, loss)


def with_fault_plan(hooks: Hooks | None) -> Hooks:
    """``hooks`` plus the fault plan of ``PEGASUS_FAULT``, if set."""
    return fault_plan(os.environ.get(FAULT_VARIABLE, "")) + (hooks or Hooks())


def fault_plan(text: str) -> Hooks:
    """The hooks of a fault plan (module docstring); a malformed one is a ConfigError naming it."""
    hooks = Hooks()
    for fault in filter(None, (part.strip() for part in text.split(","))):
        kind, *settings = fault.split(":")
        if kind not in KINDS:
            raise _plan_error(fault, f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        build, required, optional = KINDS[kind]
        values = _settings(fault, settings, required, optional)
        rank = values.pop("rank", None)
        try:
            built = build(**values)
        except ValueError as err:
            raise _plan_error(fault, str(err)) from None
        if rank is None or rank == int(os.environ.get("RANK", "0")):
            hooks = hooks + built
    return hooks


def _settings(fault: str, settings: list[str], required: set[str], optional: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise _plan_error(fault, f"{setting!r} is not key=value")
        if key not in required | optional | {"rank"}:
            allowed = ", ".join(f"{k}=" for k in sorted(required | optional | {"rank"}))
            raise _plan_error(fault, f"{setting!r} is not one of {allowed}")
        values[key] = _value(fault, key, value)
    if missing := required - values.keys():
        raise _plan_error(fault, f"it needs {', '.join(f'{k}=' for k in sorted(missing))}")
    return values


def _value(fault: str, key: str, value: str) -> Any:
    if key == "at":
        if value not in START_STAGES:
            raise _plan_error(fault, f"at={value} is not a start-up stage; one of {', '.join(START_STAGES)}")
        return value
    if key == "signal":
        if not hasattr(signal, f"SIG{value}"):
            raise _plan_error(fault, f"signal={value} is not a signal name, e.g. KILL, TERM, USR1")
        return getattr(signal, f"SIG{value}")
    if not value.isdigit():
        raise _plan_error(fault, f"{key}={value} is not a whole number")
    return int(value)


def _plan_error(fault: str, why: str) -> ConfigError:
    return ConfigError(f"{FAULT_VARIABLE}: fault {fault!r}: {why} (e.g. {FAULT_VARIABLE}=nan:step=3:rank=1)")


def _before_step(step: int, action: Callable[[Trainer], object]) -> Hooks:
    """``action(trainer)`` before each micro-batch of ``step`` (from 1)."""
    return Hooks(before_micro_batch=[
        lambda trainer, _batch: action(trainer) if trainer.state.step + 1 == step else None])


def _nonfinite(value: float, step: int) -> Hooks:
    return Hooks(on_loss=[lambda now, loss: loss * value if now == step else loss])


def _kill(step: int, signal: int = signal.SIGKILL) -> Hooks:
    return _before_step(step, lambda _trainer: os.kill(os.getpid(), signal))


def _slow(ms: int) -> Hooks:
    return Hooks(before_micro_batch=[lambda _trainer, _batch: time.sleep(ms / 1000)])


def _stall_save(step: int) -> Hooks:
    """The save of ``step`` cut short after a half-written weights file, and stalled until killed."""
    def stall(folder: Path, state: TrainState) -> None:
        if state.step == step:
            (folder / "model.safetensors").write_bytes(b"half")
            (folder.parent.parent / STALLED).touch()  # the run folder
            while True:
                time.sleep(60)
    return Hooks(during_save=[stall])


def _oom(step: int) -> Hooks:
    """What CUDA raises when a step's activations do not fit (torch.OutOfMemoryError)."""
    def oom(_trainer: Trainer) -> None:
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (an injected fault, "
                                     f"{FAULT_VARIABLE})")
    return _before_step(step, oom)


def _fill_disk(step: int) -> Hooks:
    """Before ``step``, ``<run>/filler`` grows until the disk is full; kept, as another job's file."""
    def fill(trainer: Trainer) -> None:
        with (trainer.cfg.run_dir / "filler").open("wb", buffering=0) as filler:
            for chunk in (bytes(2**20), bytes(4096)):  # megabytes, then the last blocks
                with contextlib.suppress(OSError):  # ENOSPC: the disk is full, which is the fault
                    while True:
                        filler.write(chunk)
    return _before_step(step, fill)


def _kill_children(step: int, name: str) -> Hooks:
    """Before ``step``, SIGKILL this process's children called ``name`` (Linux: read from /proc)."""
    def kill(_trainer: Trainer) -> None:
        for pid in [pid for pid, child in _children().items() if child == name]:
            os.kill(pid, signal.SIGKILL)
    return _before_step(step, kill)


def _children() -> dict[int, str]:
    """This process's children: pid -> name (``comm``)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended while the loop looked
            text = stat.read_text()  # "pid (name) state ppid ..."; the name may hold spaces
            if int(text.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children[int(stat.parent.name)] = text[text.index("(") + 1:text.rindex(")")]
    return children


def _fail(at: str) -> Hooks:
    """A start-up stage that fails as with a user's error (a PegasusError), reported like one."""
    def fail(stage: str) -> None:
        if stage == at:
            raise PegasusError(f"an injected fault in the start-up stage {at} ({FAULT_VARIABLE})")
    return Hooks(at_start_up=[fail])


def _crash(at: str | None = None, step: int | None = None) -> Hooks:
    def crash(where: str) -> None:
        raise RuntimeError(f"an injected crash at {where} ({FAULT_VARIABLE})")
    if (at is None) == (step is None):
        raise ValueError("it needs at= (a start-up stage) or step=, one of them")
    if at is not None:
        return Hooks(at_start_up=[lambda stage: crash(f"start-up stage {at}") if stage == at else None])
    return _before_step(step, lambda _trainer: crash(f"step {step}"))


# kind -> (builder, required settings, optional settings besides rank)
KINDS: dict[str, tuple[Callable[..., Hooks], set[str], set[str]]] = {
    "nan": (partial(_nonfinite, float("nan")), {"step"}, set()),
    "inf": (partial(_nonfinite, float("inf")), {"step"}, set()),
    "kill": (_kill, {"step"}, {"signal"}),
    "slow": (_slow, {"ms"}, set()),
    "stall-save": (_stall_save, {"step"}, set()),
    "fail": (_fail, {"at"}, set()),
    "crash": (_crash, set(), {"at", "step"}),
    "oom": (_oom, {"step"}, set()),
    "fill-disk": (_fill_disk, {"step"}, set()),
    # W&B's service process; torch's name for a loader worker process (data.mode=stream)
    "kill-wandb": (partial(_kill_children, name="wandb-core"), {"step"}, set()),
    "kill-worker": (partial(_kill_children, name="pt_data_worker"), {"step"}, set()),
}
