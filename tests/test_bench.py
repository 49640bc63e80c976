"""The benchmark harness runs end to end and reports every row; it asserts no speed."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import SMOKE, TINY_ARGS, training_rows

from bench.efficiency import Peak, _field, _measured_clock_ghz, flop_per_cycle
from bench.harness import Row, format_table, run_bench
from bench.measure import fast_precision, label
from bench.profile_step import StepProfile, waits_us, with_device_work
from bench.profile_step import main as profile_main
from bench.sync_debug import main as sync_debug_main
from pegasus_dist.training.distributed import Hardware

ZEN4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu fma avx2 avx512f avx512_bf16\n"


def test_a_row_with_a_baseline_is_met_by_its_ratio_one_without_by_its_value():
    assert (Row("r", 3.0, "images/s", baseline=2.0, target=1.4).measured,
            Row("r", 3.0, "images/s", baseline=2.0, target=1.4).met) == (1.5, True)
    assert Row("r", 3.0, "images/s", baseline=2.0, target=2.0).met is False
    assert (Row("v", 4000.0, "images/s", target=5000).measured,
            Row("v", 4000.0, "images/s", target=5000).met) == (4000.0, False)
    assert Row("v", 4000.0, "images/s").met is None  # nothing asked of it
    assert Row("t", 0.8, "s", target=1.0, at_most=True).met is True  # a ceiling: a time
    assert Row("t", 1.2, "s", target=1.0, at_most=True).met is False


def test_the_table_marks_a_missed_target_and_says_why():
    rows = [Row("fast", 3.0, "images/s", baseline=2.0, target=1.4),
            Row("slow", 4000.0, "images/s", target=5000, why="one core unpacks the archive"),
            Row("plain", 7.5, "s"), Row("  small", 0.2, "TFLOP/s", baseline=0.467, target=0.6, why="GEMM"),
            Row("start-up", 1.2, "s", baseline=0.4, target=2.0, at_most=True, why="hashing")]
    assert format_table(rows).splitlines() == [
        "| measurement | value | baseline | measured | target | met |",
        "|---|---:|---:|---:|---:|:-:|",
        "| fast | 3.00 images/s | 2 images/s | 1.50x | 1.4x | yes |",
        "| slow | 4,000.00 images/s |  |  | 5,000 | **no** |",
        "| plain | 7.50 s |  |  |  |  |",
        "|   small | 0.20 TFLOP/s | 0.467 TFLOP/s | 0.43x | 0.6x | **no** |",
        "| start-up | 1.20 s | 0.4 s | 3.00x | at most 2x | **no** |",
        "",
        "- slow: not met: one core unpacks the archive",
        "- small: not met: GEMM",
        "- start-up: not met: hashing",
    ]


@pytest.mark.parametrize(("device", "capability", "native_gpu", "precision"), [
    ("cpu", "AVX2", False, "no"),  # bf16 18 times slower than fp32: the rows train as a user there would
    ("cpu", "AVX512", False, "bf16"),  # oneDNN's bf16 kernels
    ("cuda", "AVX2", True, "bf16"),  # an A100 or H100, whatever the host CPU
    ("cuda", "AVX2", False, "no"),  # a V100 or T4: bf16 emulated
])
def test_the_timed_rows_train_in_bf16_only_where_it_is_fast(device, capability, native_gpu, precision):
    assert fast_precision(torch.device(device), Hardware("x86_64", capability, native_gpu)) == precision
    assert label(precision) == {"no": "fp32", "bf16": "bf16"}[precision]


def test_the_bf16_peak_per_cycle_follows_the_flags_and_the_vendor():
    assert flop_per_cycle(ZEN4) == (64, "AVX512_BF16, 1 VDPBF16PS zmm a cycle")  # 256-bit pipes
    intel = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace(": 25", ": 6")
    assert flop_per_cycle(intel)[0] == 128  # two 512-bit FMA ports
    assert flop_per_cycle(intel.replace("avx512_bf16", "avx512_bf16 amx_bf16"))[0] == 1024
    assert flop_per_cycle(ZEN4.replace(" avx512f avx512_bf16", ""))[0] == 32  # fp32 AVX2 FMAs


def test_the_peak_is_cores_times_clock_times_flop_per_cycle_and_says_so():
    peak = Peak(cores=2, ghz=3.5, clock_from="measured", flop_per_cycle=64, unit="AVX512_BF16")
    assert peak.tflops == pytest.approx(2 * 3.5e9 * 64 / 1e12)
    assert peak.describe() == "2 cores x 3.50 GHz (measured) x 64 FLOP/cycle (AVX512_BF16)"


@pytest.mark.process
def test_the_measured_clock_is_within_a_factor_of_two_of_the_nominal_one():
    """A probe the core can shortcut (adds of an immediate, folded at rename on Intel's Golden Cove
    and later) read 12 GHz on a 4 GHz Xeon, and so tripled the peak that every efficiency row is
    measured against."""
    nominal = float(_field(Path("/proc/cpuinfo").read_text(), "cpu MHz")) / 1e3
    measured = _measured_clock_ghz()
    if measured is None:
        pytest.skip("no C compiler here to build the clock probe")
    assert nominal / 2 < measured < 2 * nominal, (measured, nominal)


@pytest.mark.process
@pytest.mark.timeout(600)  # about 1 minute on an AVX2 CPU, where bf16 is slowest (6x the margin)
def test_the_harness_measures_each_row_against_the_baseline_of_the_same_run(tmp_path):
    out = tmp_path / "bench.json"
    # Batch 8: a bf16 step of the paper model costs 18 times fp32's on a CPU without AVX-512.
    rows = run_bench(images=300, steps=1, out=out, sizes=[32], images_from="synthetic",
                     process_steps=6, compile_rows=False, rounds=1, batch=8)
    # The epoch, efficiency and scaling rows train as a user here would: bf16 unless it is slow here.
    fast = label(fast_precision(torch.device("cpu")))
    saved = json.loads(out.read_text())
    assert saved["images"] == "synthetic" and saved["machine"]["device"] == "cpu"
    by_name = {r["name"]: r for r in saved["rows"]}
    assert list(by_name) == [r.name for r in rows]
    assert all(r["value"] > 0 for r in saved["rows"])
    assert sorted(name for name, r in by_name.items() if r["target"] is not None) == sorted([
        "prepare from the CIFAR-10 archive, per core",
        "loader: stream, 1 worker(s)", "loader: stream, 2 worker(s)", "loader: device-resident",
        "device-resident start-up, per 100k images",
        "trainer vs bare loop, paper model, fp32, batch 8",
        "trainer vs bare loop, paper model, bf16, batch 8",
        f"  achieved {fast} of the CPU's peak, eager", f"  achieved {fast} of the CPU's peak, channels_last",
    ])
    # The efficiency rows: channels_last against eager of the same run; compile only with --compile.
    eager = by_name[f"trainer, paper model, {fast}, eager"]["value"]
    assert by_name[f"trainer, paper model, {fast}, channels_last"]["baseline"] == eager > 0
    assert not any("compile" in name for name in by_name)
    peak = next(r for name, r in by_name.items() if name.startswith(f"CPU {fast} peak: "))
    assert by_name[f"  achieved {fast} of the CPU's peak, eager"]["baseline"] == peak["value"] > 0
    outside = by_name[f"  share of an eager {fast} step outside convolutions and matmuls (profiler)"]
    assert 0 < outside["value"] < 100 and outside["unit"] == "%"
    # Each loader is compared with torchvision's loader of the same run and workers.
    for name, workers in (("loader: stream, 1 worker(s)", 1), ("loader: stream, 2 worker(s)", 2),
                          ("loader: device-resident", 2)):
        baseline = by_name[f"loader: torchvision CIFAR10 baseline, {workers} worker(s)"]["value"]
        row = by_name[name]
        assert row["unit"] == "images/s" and row["value"] > 0 and row["baseline"] == baseline > 0
        assert row["measured"] == pytest.approx(row["value"] / baseline)  # the ratio the table prints
    # Both precisions were measured, each in its own process (accelerate allows one per process).
    fp32, bf16 = (by_name[f"trainer vs bare loop, paper model, {p}, batch 8"] for p in ("fp32", "bf16"))
    assert fp32["baseline"] > 0 and bf16["baseline"] > 0
    assert any(name.startswith(f"image size 32: trainer, {fast}") for name in by_name)
    assert any(name.startswith("  one whole epoch (") and name.endswith(f"), {fast}") for name in by_name)
    # The JSON holds exactly the rows the table prints, value for value, and each table row is one of them.
    fields = ("name", "value", "unit", "baseline", "target", "why", "at_most")
    assert format_table([Row(**{k: r[k] for k in fields}) for r in saved["rows"]]) == format_table(rows)
    table = format_table(rows)
    assert [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()
            if line.startswith("| ")][1:] == list(by_name)  # after the header, in order


@pytest.mark.process
def test_the_gpu_check_stops_in_one_line_without_a_gpu():
    from processes import BIN, run_bounded

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu-check.sh would run in full")
    done = run_bounded(["bash", "bench/gpu-check.sh"], timeout=60, env={"BIN": str(BIN)})
    assert done.returncode == 2, done.stdout
    assert done.stdout.strip() == ("gpu-check: no CUDA GPU is visible to torch (torch.cuda.device_count() "
                                   "is 0): run it on a GPU machine")


# bench/profile_step.py: what gpu-check.sh's profiler rows print. The device events exist on CUDA only:
# their arithmetic is checked here on events shaped as torch.profiler's (activity type, name, duration).
PROFILED = StepProfile(batch=128, steps=2, device="cuda", precision="bf16", ops=600, host_ms=4.0, wall_ms=4.5)


def _event(activity: str, name: str, us: float) -> SimpleNamespace:
    return SimpleNamespace(activity_type=activity, name=name,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_the_device_rows_count_kernels_and_sum_the_device_work_per_step():
    events = [_event("kernel", "void gemm", 300.0), _event("kernel", "void elementwise", 100.0),
              _event("gpu_memcpy", "Memcpy DtoH", 40.0), _event("gpu_memset", "Memset", 10.0),
              _event("gpu_user_annotation", "ProfilerStep", 5000.0),  # a span over kernels, not work
              _event("cuda_runtime", "cudaLaunchKernel", 8.0)]
    found = with_device_work(PROFILED, events)
    assert (found.kernels, found.device_ms) == (1.0, pytest.approx(0.225))  # 2 kernels, 450 us, in 2 steps
    assert found.describe() == ("batch 128: 1 kernels/step, 600 ops/step, host 4.00 ms/step, device 0.23 "
                                "ms/step; 4.50 ms/step without the profiler (2 steps, cuda, bf16)")
    with pytest.raises(RuntimeError, match="no CUDA kernel in the profile .*gpu_memcpy"):
        with_device_work(PROFILED, events[2:])


def test_the_host_time_leaves_out_the_calls_that_wait_for_the_device():
    events = [_event("cuda_runtime", "cudaStreamSynchronize", 700.0),
              _event("cuda_runtime", "cudaMemcpyAsync", 50.0),  # to pageable memory: waits for the copy
              _event("cuda_driver", "cuStreamSynchronize", 20.0),
              _event("cuda_runtime", "cudaLaunchKernel", 8.0),  # issuing work: host time
              _event("cpu_op", "aten::_local_scalar_dense", 760.0)]  # the op around a wait: host time
    assert waits_us(events) == 770.0


def _in_process(main, *args: str) -> None:
    """``main(ARGS)`` of a bench module in this process; the test's logging set up again after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # it sets logging up on the captured stderr
    try:
        main(list(args))
    finally:
        root.handlers[:], root.level = handlers, level


def _profile_lines(capsys, *args: str) -> list[str]:
    """``python -m bench.profile_step ARGS`` in this process: its printed lines (its log kept out)."""
    _in_process(profile_main, *args)
    return capsys.readouterr().out.splitlines()


PROFILE_LINE = re.compile(r"batch (?P<batch>\d+): (?P<ops>[\d,]+) ops/step, host (?P<host>[\d.]+) ms/step "
                          r"\(device ms only measured on CUDA\); (?P<wall>[\d.]+) ms/step without the "
                          r"profiler \(3 steps, cpu, no\)")


@pytest.mark.slow  # trains the tiny model 8 steps at each of two batch sizes, in this process
def test_the_step_profile_counts_ops_and_host_time_at_each_batch_size(capsys):
    lines = _profile_lines(capsys, "--device", "cpu", "--precision", "no", "--batch", "4", "--batch", "8",
                           "--steps", "3", "--config", SMOKE, *TINY_ARGS)
    found = [PROFILE_LINE.fullmatch(line) for line in lines]
    assert all(found) and [int(m["batch"]) for m in found] == [4, 8], lines
    ops = [int(m["ops"].replace(",", "")) for m in found]
    # The same model and step: as many operators at either batch size, give or take the odd one.
    assert min(ops) > 50 and max(ops) / min(ops) < 1.5, lines
    assert all(float(m["host"]) > 0 and float(m["wall"]) > 0 for m in found), lines


@pytest.mark.slow  # starts the tiny model's trainer in this process
def test_the_step_profile_refuses_shards_too_small_for_one_epoch(smoke_shards, capsys):
    with pytest.raises(SystemExit) as stopped:
        _profile_lines(capsys, "--device", "cpu", "--precision", "no", "--batch", "64", "--steps", "20",
                       "--shards", str(smoke_shards), "--config", SMOKE, *TINY_ARGS)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {smoke_shards} holds ") and error.endswith(
        "fewer than the 2752 that 20 steps at batch 64 need in one epoch: prepare more (pegasus-dist "
        "prepare --source synthetic:N), pass fewer --steps, or leave --shards out"), error


@pytest.mark.slow  # trains the tiny model 2 steps, then 2 more, in this process
def test_the_sync_debug_wrapper_trains_and_the_same_command_resumes(smoke_shards, tmp_path, capsys):
    """On the CPU the mode cannot be set (it is CUDA's): what gpu-check.sh's row relies on besides it."""
    def run(steps: int) -> str:
        _in_process(sync_debug_main, "--config", SMOKE, f"data.shards={smoke_shards}",
                    f"run.output_dir={tmp_path}", f"train.max_steps={steps}", "data.batch_size=16",
                    "wandb.mode=disabled", *TINY_ARGS)
        return capsys.readouterr().err

    assert "resumed from" not in run(2)
    assert training_rows(tmp_path / "pretrain")[-1]["step"] == 2
    resumed = re.findall(r"resumed from (\S+): .*, step (\d+)$", run(4), re.MULTILINE)
    assert resumed == [(str(tmp_path / "pretrain/checkpoints/step_00000002"), "2")]
    assert [row["step"] for row in training_rows(tmp_path / "pretrain")][-1] == 4
