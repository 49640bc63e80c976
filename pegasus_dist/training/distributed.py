"""Process-group setup and what makes N processes compute what one process does.

With ``model.sync_batchnorm`` the batch-norm statistics are taken over the global batch: torch's
``SyncBatchNorm`` runs only on GPUs, so on the CPU (gloo) :class:`GlobalBatchNorm2d` all-reduces the sums.
"""

from __future__ import annotations

import logging
import os
import platform
import typing
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn
from torch.distributed.nn.functional import all_reduce

from pegasus_dist.config import Config, Precision
from pegasus_dist.errors import ConfigError

log = logging.getLogger("pegasus_dist.training.distributed")


def build_accelerator(cfg: Config, log_with: list[str] | None = None) -> Accelerator:
    """One Accelerator for the run, on the CPU when there is no GPU (``cpu=True``: else
    ``accelerate launch --multi_gpu`` without CUDA starts N processes that each train alone)."""
    t = cfg.train
    use_cpu = t.cpu or not torch.cuda.is_available()
    if use_cpu and t.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU (loss scaling is a CUDA feature); "
                          "use bf16 or no on the CPU")
    if use_cpu and t.ddp_bf16_gradients:
        raise ConfigError("train.ddp_bf16_gradients=true needs GPUs (NCCL); set it to false on the CPU")
    torch.backends.cudnn.benchmark = t.cudnn_benchmark
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=t.ddp_bucket_view,
        comm_hook=DDPCommunicationHookType.BF16 if t.ddp_bf16_gradients else DDPCommunicationHookType.NO)
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=t.mixed_precision, log_with=log_with, project_dir=str(cfg.run_dir),
        # A rank that dies must not leave the others waiting in a collective forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout_s)), ddp],
    )
    backend = dist.get_backend() if dist.is_initialized() else "none"
    log.info("process group: world_size=%d rank=%d local_rank=%d backend=%s device=%s "
             "distributed_type=%s mixed_precision=%s; DDP bucket_view=%s bf16_gradients=%s",
             accelerator.num_processes, accelerator.process_index, accelerator.local_process_index,
             backend, accelerator.device, accelerator.distributed_type.value, accelerator.mixed_precision,
             t.ddp_bucket_view, t.ddp_bf16_gradients)
    return accelerator


def same_as_main(seen: list[dict[str, object]], rank: int, what: str, fix: str) -> None:
    """Raise when ``seen[rank]`` (every rank's ``what``, gathered) differs from the main process's,
    naming each key that differs: ranks started apart (a node with other overrides, or its own copy
    of the YAML, the package or the shards) would otherwise train apart in one group without a word."""
    mine, main = seen[rank], seen[0]
    if differ := [f"{key}={mine.get(key)!r} (rank 0: {value!r})" for key, value in main.items()
                  if mine.get(key) != value]:
        raise ConfigError(f"this rank's {what} differs from rank 0's: {'; '.join(differ)}; {fix}")


def warn_about_precision(cfg: Config, device: torch.device) -> None:
    """Say so when ``accelerate launch --mixed_precision X`` asks for what the config does not use ("no" is
    what launch/ and slurm/ pass to leave the choice to the config), and :func:`slow_bf16_warning`."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", cfg.train.mixed_precision):
        choices = typing.get_args(Precision)
        fix = (f"to train in {launcher} pass train.mixed_precision={launcher}" if launcher in choices
               else f"train.mixed_precision takes {', '.join(choices)}")
        log.warning("accelerate launch --mixed_precision %s is not used: this run trains with "
                    "train.mixed_precision=%s from its config; %s", launcher, cfg.train.mixed_precision, fix)
    if warning := slow_bf16_warning(cfg, device, Hardware.here(device)):
        log.warning(warning)


@dataclass(frozen=True)
class Hardware:
    """What decides whether bf16 is fast here, as torch reports it."""

    machine: str  # platform.machine(): x86_64, AMD64, aarch64
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    gpu_native_bf16: bool  # a GPU of compute capability 8.0 or newer (Ampere, Hopper)

    @classmethod
    def here(cls, device: torch.device) -> Hardware:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return cls(platform.machine(), torch.backends.cpu.get_cpu_capability(), native)


def slow_bf16_warning(cfg: Config, device: torch.device, hardware: Hardware) -> str | None:
    """A warning for bf16 where it has no fast kernels, else None: the ETA alone (hours where minutes were
    expected) says neither why nor what to change.

    - A GPU before Ampere: Volta's and Turing's tensor cores take fp16, not bf16 (NVIDIA's whitepapers), so
      torch emulates bf16 there; fp16 is that GPU's fast precision.
    - An x86 CPU without AVX-512 (torch reports AVX2 or less): oneDNN has no bf16 convolution kernels and
      falls back to reference code. Measured on a 2-core AMD EPYC with AVX2 (docs/performance.md):
      configs/reference trains 8 images/s in bf16 against 147 in fp32. CPUs with AVX-512 but no native bf16
      are not flagged: oneDNN converts bf16 there with AVX-512 instructions, and no such CPU was measured.
    """
    if cfg.train.mixed_precision != "bf16":
        return None
    if device.type == "cuda":
        return None if hardware.gpu_native_bf16 else (
            "train.mixed_precision=bf16 on a GPU without native bf16 (compute capability below 8.0: its "
            "tensor cores take fp16, not bf16), so torch emulates it; pass train.mixed_precision=fp16")
    x86 = hardware.machine.lower() in ("x86_64", "amd64")
    if device.type != "cpu" or not x86 or hardware.cpu_capability.startswith("AVX512"):
        return None
    return (f"train.mixed_precision=bf16 on a CPU without AVX-512 (torch reports {hardware.cpu_capability}): "
            "bf16 has no fast convolution kernels here, and a step takes many times longer than in fp32 "
            "(18 times for configs/reference on an AVX2 EPYC); pass train.mixed_precision=no")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all ranks, on any backend: the sums of x
    and x^2 and the count are all-reduced differentiably, so the output and its gradient equal one process's
    holding the whole global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / channels, device=x.device)
        local = torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), count])
        sums, squares, total = all_reduce(local).split([channels, channels, 1])  # differentiable
        mean = sums / total
        var = (squares / total - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm2d for a global-batch one: torch's on GPU, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_modules(remove_duplicate=False)):
        if type(child) is nn.BatchNorm2d:
            sync = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            model.set_submodule(name, sync)
    return model
