"""fp16's loss scaling: the updates it drops are counted, whatever the optimizer; bf16 on a CPU
or a GPU without fast bf16 kernels is named before it trains.

fp16 runs on GPUs only; here a CPU GradScaler stands in for the one Accelerate
makes there, through the same AcceleratedOptimizer and ``accelerator.backward``.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from pegasus_dist.config import Config
from pegasus_dist.training.distributed import Hardware, slow_bf16_warning
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


@pytest.mark.parametrize(("machine", "capability", "native_gpu", "device", "precision", "fix"), [
    ("x86_64", "AVX2", False, "cpu", "bf16", "no"),  # an AVX2 EPYC or laptop: 18 times slower than fp32
    ("AMD64", "DEFAULT", False, "cpu", "bf16", "no"),  # Windows' name, a CPU without AVX2
    ("x86_64", "AVX512", False, "cpu", "bf16", None),  # oneDNN's bf16 kernels
    ("x86_64", "AVX2", False, "cpu", "no", None),
    ("aarch64", "DEFAULT", False, "cpu", "bf16", None),  # not measured: no claim
    ("x86_64", "AVX2", False, "cuda", "bf16", "fp16"),  # a V100 or T4: bf16 emulated
    ("x86_64", "AVX2", True, "cuda", "bf16", None),  # an A100 or H100, whatever the host CPU
    ("x86_64", "AVX2", False, "cuda", "fp16", None),
])
def test_bf16_without_fast_kernels_is_named_with_its_fix(machine, capability, native_gpu, device, precision,
                                                         fix):
    cfg = Config.model_validate({"train": {"mixed_precision": precision}})
    warning = slow_bf16_warning(cfg, torch.device(device), Hardware(machine, capability, native_gpu))
    if fix is None:
        assert warning is None
    else:
        where = f"a CPU without AVX-512 (torch reports {capability})" if device == "cpu" else \
            "a GPU without native bf16"
        assert warning.startswith(f"train.mixed_precision=bf16 on {where}")
        assert warning.endswith(f"pass train.mixed_precision={fix}")
