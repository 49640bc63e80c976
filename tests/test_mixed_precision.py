"""fp16's loss scaling: the updates it drops are counted, whatever the optimizer; bf16 on a CPU
without fast bf16 kernels is named before it trains.

fp16 runs on GPUs only; here a CPU GradScaler stands in for the one Accelerate
makes there, through the same AcceleratedOptimizer and ``accelerator.backward``.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from pegasus_dist.config import Config
from pegasus_dist.training.distributed import slow_bf16_warning
from pegasus_dist.training.optim import DroppedUpdates

OVERFLOWS = (1, 3)  # the steps whose gradients are infinite


@pytest.mark.parametrize("fused", [True, False], ids=["fused Adam", "unfused Adam"])
def test_every_update_dropped_by_the_loss_scaler_is_counted(fused):
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1, fused=fused))
    dropped = DroppedUpdates(optimizer, accelerator.device)
    unchanged, skipped_flags = [], []
    for step in range(5):
        loss = model(torch.randn(3, 4)).sum()
        accelerator.backward(loss * float("inf") if step in OVERFLOWS else loss)
        before = model.weight.detach().clone()
        dropped.note_step()
        optimizer.step()
        optimizer.zero_grad()
        unchanged.append(torch.equal(before, model.weight))
        skipped_flags.append(accelerator.optimizer_step_was_skipped)
    assert unchanged == [step in OVERFLOWS for step in range(5)]  # the overflows were really dropped
    assert dropped.take() == len(OVERFLOWS)
    assert dropped.take() == 0  # counted once
    assert accelerator.scaler.get_scale() == 2.0**10 / 4  # halved by each overflow
    # What the trainer used to read: Accelerate's flag never sees a fused optimizer's drop.
    assert skipped_flags == ([False] * 5 if fused else [step in OVERFLOWS for step in range(5)])


@pytest.mark.parametrize(("machine", "capability", "device", "precision", "warned"), [
    ("x86_64", "AVX2", "cpu", "bf16", True),  # an AVX2 EPYC or laptop: 18 times slower than fp32
    ("AMD64", "DEFAULT", "cpu", "bf16", True),  # Windows' name, a CPU without AVX2
    ("x86_64", "AVX512", "cpu", "bf16", False),  # oneDNN's bf16 kernels
    ("x86_64", "AVX2", "cpu", "no", False),
    ("x86_64", "AVX2", "cuda", "bf16", False),  # the GPU computes, not the CPU
    ("aarch64", "DEFAULT", "cpu", "bf16", False),  # not measured: no claim
])
def test_bf16_on_a_cpu_without_avx512_is_named_with_the_fix(machine, capability, device, precision, warned):
    cfg = Config.model_validate({"train": {"mixed_precision": precision}})
    warning = slow_bf16_warning(cfg, torch.device(device), machine, capability)
    if warned:
        assert warning.startswith("train.mixed_precision=bf16 on a CPU without AVX-512 "
                                  f"(torch reports {capability})")
        assert warning.endswith("pass train.mixed_precision=no")
    else:
        assert warning is None
