"""CPU efficiency: torch.compile and channels_last against the eager trainer, and the CPU's peak.

The trainer runs in bf16, or in fp32 where bf16 has no fast kernels
(:func:`bench.measure.fast_precision`: an AVX2 CPU, whose peak is then its
fp32 FMAs). The peak is cores x clock x FLOP per cycle and core:

- cores: ``os.sched_getaffinity`` (the cores this process may run on);
- clock: ``/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq`` where the
  kernel exposes it; else measured, by timing a chain of dependent
  register-to-register adds (one a cycle) compiled with the C compiler
  torch.compile needs anyway (adds of an immediate would not do: Intel's
  Golden Cove cores and later fold them at rename, and the chain read 12 GHz
  on a 4 GHz Xeon);
  else ``cpu MHz`` of ``/proc/cpuinfo``, which in a virtual machine is the
  nominal clock, not the boost the cores run at (2.6 against 3.66 GHz on the
  bench's 2-core AMD EPYC), and so understates the peak;
- FLOP per cycle, from the flags of ``/proc/cpuinfo``: ``amx_bf16`` 1024
  (Intel's AMX: 1,024 bf16 operations per cycle and core); ``avx512_bf16``
  64 per zmm VDPBF16PS (16 lanes x 2 bf16 pairs x multiply and add) times
  the VDPBF16PS issued a cycle: one on AMD family 19h (Zen 4 executes
  512-bit operations on 256-bit pipes: 64.2 FLOP a cycle measured on the
  bench machine with 12 independent chains), two elsewhere (two 512-bit FMA
  ports; assumed, not measured); without it, fp32 FMAs: 32 per zmm or 16
  per ymm FMA, two a cycle.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.measure import (
    WARMUP,
    Row,
    flops_per_image,
    in_own_process,
    label,
    loop_rate,
    synchronize,
    train_config,
)
from pegasus_dist.config import Config
from pegasus_dist.training.loop import Trainer

log = logging.getLogger("bench.efficiency")
CPUINFO = Path("/proc/cpuinfo")
MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
TARGET = 0.60  # issue 23: achieved at least 60 % of the CPU's peak
# Each names both settings: "eager" is NCHW, whatever the config's defaults are.
VARIANTS = {"eager": {"channels_last": False}, "channels_last": {"channels_last": True},
            "compile": {"compile": True, "channels_last": False},
            "compile + channels_last": {"compile": True, "channels_last": True}}
# One core's clock: 4 dependent adds an iteration, one a cycle, the loop's own
# increment and branch beside them on other ALUs.
CLOCK_PROBE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    long x = 0, one = 1, n = 50000000L;
    struct timespec a, b;
    /* This thread's CPU time, not the wall's: time spent waiting for a busy core is no cycle. */
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++)
        __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    printf("%f\n", 4.0 * n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9);
    return x != 4 * n;
}
"""


@dataclass(frozen=True)
class Peak:
    """The CPU's peak (bf16, or fp32 without a bf16 dot product) and how it was computed."""

    cores: int
    ghz: float
    clock_from: str
    flop_per_cycle: int
    unit: str  # the instructions that reach it

    @property
    def tflops(self) -> float:
        return self.cores * self.ghz * self.flop_per_cycle / 1e3

    def describe(self) -> str:
        return (f"{self.cores} cores x {self.ghz:.2f} GHz ({self.clock_from}) x {self.flop_per_cycle} "
                f"FLOP/cycle ({self.unit})")


def flop_per_cycle(cpuinfo: str) -> tuple[int, str]:
    """bf16 FLOP per cycle and core from the first processor's flags and family in ``cpuinfo``."""
    flags = set(_field(cpuinfo, "flags").split())
    amd_zen4 = _field(cpuinfo, "vendor_id") == "AuthenticAMD" and _field(cpuinfo, "cpu family") == "25"
    if "amx_bf16" in flags:
        return 1024, "AMX_BF16 tiles"
    if "avx512_bf16" in flags:
        return (64, "AVX512_BF16, 1 VDPBF16PS zmm a cycle") if amd_zen4 else \
               (128, "AVX512_BF16, 2 VDPBF16PS zmm a cycle")
    if "avx512f" in flags:
        return 64, "no bf16 dot product: fp32 AVX-512, 2 FMA zmm a cycle"
    if "fma" in flags:
        return 32, "no bf16 dot product: fp32 AVX2, 2 FMA ymm a cycle"
    return 8, "no FMA: fp32 SSE, a 4-wide multiply and add a cycle"


def cpu_peak() -> Peak | None:
    """This machine's peak (:func:`flop_per_cycle`): its flags, its clock, the cores this process may
    use; None (and why, logged) off x86 Linux, where /proc/cpuinfo has no flags or clock for it."""
    cpuinfo = CPUINFO.read_text() if CPUINFO.is_file() else ""
    if not _field(cpuinfo, "flags") or platform.machine() not in ("x86_64", "AMD64"):
        log.warning("no x86 flags in %s: the rows against the CPU's peak are left out", CPUINFO)
        return None
    per_cycle, unit = flop_per_cycle(cpuinfo)
    ghz, clock_from = _clock_ghz(cpuinfo)
    return Peak(len(os.sched_getaffinity(0)), ghz, clock_from, per_cycle, unit)


def _clock_ghz(cpuinfo: str) -> tuple[float, str]:
    if MAX_FREQ.is_file():
        return int(MAX_FREQ.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    if (measured := _measured_clock_ghz()) is not None:
        return measured, "measured"
    return float(_field(cpuinfo, "cpu MHz")) / 1e3, "/proc/cpuinfo cpu MHz: nominal, may understate"


def _measured_clock_ghz() -> float | None:
    """The best of 3 runs of CLOCK_PROBE, or None (and why, logged) without a working C compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc, or $CC): the CPU's clock is read from /proc/cpuinfo")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "clock.c", Path(tmp) / "clock"
        source.write_text(CLOCK_PROBE)
        built = subprocess.run([compiler, "-O1", "-o", str(binary), str(source)], capture_output=True,
                               text=True, timeout=60)
        if built.returncode:
            log.warning("the clock probe did not compile (%s): the CPU's clock is read from "
                        "/proc/cpuinfo", built.stderr.strip()[-300:])
            return None
        return max(float(subprocess.run([str(binary)], capture_output=True, text=True, timeout=60,
                                        check=True).stdout) for _ in range(3))


def _field(cpuinfo: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else ""


def efficiency_rows(work: Path, steps: int, device: torch.device, compile_rows: bool,
                    rounds: int, batch: int, precision: str) -> list[Row]:
    """The trainer of the paper model in ``precision`` eager, channels_last and (``compile_rows``)
    compiled, side by side; on the CPU also what each achieves of the CPU's peak, and why not more."""
    cfgs = {name: train_config(work / "shards", work / "runs", precision, device, batch=batch, **settings)
            for name, settings in VARIANTS.items() if compile_rows or not settings.get("compile")}
    measured = in_own_process(_variant_rates, cfgs, steps, device, rounds)
    flops = flops_per_image(cfgs["eager"])
    peak = cpu_peak() if device.type == "cpu" else None
    name = label(precision)
    rows = []
    if peak:
        side, ceiling = _matmul_tflops(torch.bfloat16 if precision == "bf16" else torch.float32)
        rows += [Row(f"CPU {name} peak: {peak.describe()}", peak.tflops, "TFLOP/s"),
                 Row(f"  {name} matmul ceiling, {side}^2, {torch.get_num_threads()} threads",
                     ceiling, "TFLOP/s", peak.tflops)]
    eager = measured.rates["eager"]
    for variant, rate in measured.rates.items():
        rows.append(Row(f"trainer, paper model, {name}, {variant}", rate, "images/s",
                        None if variant == "eager" else eager))
        if peak:
            rows.append(Row(f"  achieved {name} of the CPU's peak, {variant}", rate * flops / 1e12,
                            "TFLOP/s", peak.tflops, TARGET, WHY))
    rows.append(Row(f"  share of an eager {name} step outside convolutions and matmuls (profiler)",
                    100 * measured.outside_gemm, "%"))
    if peak:
        rows.append(Row("  achieved inside the convolutions and matmuls alone, eager (profiler)",
                        measured.gemm_tflops, "TFLOP/s", peak.tflops))
    return rows


@dataclass(frozen=True)
class _Variants:
    rates: dict[str, float]  # images/s of each variant, the best of the rounds
    outside_gemm: float  # the share of an eager step's time outside convolution and matmul operators
    gemm_tflops: float  # the step's FLOPs over the time inside them


def _variant_rates(cfgs: dict[str, Config], steps: int, device: torch.device, rounds: int) -> _Variants:
    """In its own process (:func:`in_own_process`): each variant's trainer, timed in turn.

    All in one process (one precision) and in alternating rounds, the best
    of each kept: a neighbour's burst on a shared machine then slows every
    variant alike or none. Compiling happens in the warm-up, before any timing.
    """
    trainers = {name: Trainer(cfg) for name, cfg in cfgs.items()}
    for trainer in trainers.values():
        trainer.run_epochs(until_step=WARMUP + 1)  # torch.compile: the forward, then the backward
    rates = dict.fromkeys(trainers, 0.0)
    for _ in range(rounds):
        for name, trainer in trainers.items():
            rates[name] = max(rates[name], loop_rate(trainer, 0, steps, device))
    return _Variants(rates, *_gemm_profile(trainers["eager"], device))


def _gemm_profile(trainer: Trainer, device: torch.device, steps: int = 2) -> tuple[float, float]:
    """Of ``steps`` eager steps under the profiler: the share of their wall time outside convolution
    and matmul operators, and the TFLOP/s inside them (all of a step's FLOPs are theirs)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        trainer.run_epochs(until_step=trainer.state.step + steps)
        synchronize(device)
    wall_us = (time.perf_counter() - started) * 1e6
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    gemm_us = sum(getattr(event, attr) for event in profiler.key_averages() if GEMM.search(event.key))
    flops = steps * trainer.schedule.global_batch * flops_per_image(trainer.cfg)
    return max(0.0, 1 - gemm_us / wall_us), flops / gemm_us / 1e6


MATMUL_SIDE = 2048  # the largest matmul of the ceiling; smaller where one takes over MATMUL_SECONDS
MATMUL_SECONDS = 0.05
# The operators that do a convolution's or a linear layer's arithmetic (forward and backward).
GEMM = re.compile(r"conv|mm$|matmul|linear", re.IGNORECASE)
WHY = ("see the matmul ceiling (what oneDNN's GEMM reaches here) and the share of a step "
       "outside convolutions and matmuls: elementwise, normalization, loss and Adam at memory speed")


def _matmul_tflops(dtype: torch.dtype, repeats: int = 5) -> tuple[int, float]:
    """The side and best rate of a large matmul in ``dtype`` on all of torch's threads: what a GEMM
    can reach here. The side doubles from 256 to MATMUL_SIDE while one product takes under
    MATMUL_SECONDS: where bf16 has no fast kernels (an AVX2 CPU) a bf16 2048^2 product takes a minute."""
    side = 256
    while True:
        a, b = (torch.randn(side, side, dtype=dtype) for _ in range(2))
        fastest = min(_product_seconds(a, b) for _ in range(repeats))
        if side >= MATMUL_SIDE or fastest > MATMUL_SECONDS:
            return side, 2 * side**3 / fastest / 1e12
        side *= 2


def _product_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    started = time.perf_counter()
    a @ b
    return time.perf_counter() - started
