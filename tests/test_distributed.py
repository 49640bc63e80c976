"""Real multi-process runs (gloo on the CPU), each bounded by a timeout, and how a rank reads the
errors its collectives raise when a peer fails."""

import pytest
import torch
import torch.distributed as dist
from helpers import SCRIPTS
from processes import on_ranks

from pegasus_dist.training.faults import peer_lost


# The wordings torch 2.14's transports and store use (the strings of libtorch_cpu.so); which one a
# survivor sees depends on where the peer stopped: gloo's pair timer or its recv wait may fire first.
@pytest.mark.parametrize(("err", "starts"), [
    (RuntimeError("Application timeout caused pair closure"), "another rank did not answer"),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 20000ms for recv operation"),
     "another rank did not answer"),
    (dist.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"),
     "another rank did not answer"),
    (dist.DistStoreError("Socket Timeout"), "another rank did not answer"),
    (RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:29500"),
     "lost another rank"),
    (dist.DistNetworkError("failed to recv, got 0 bytes"), "a collective failed"),
])
def test_every_wording_of_a_failed_peer_is_one_line_naming_the_step(err, starts):
    lost = peer_lost(err, "step 3 (epoch 1)")
    assert lost is not None and str(lost).startswith(starts)
    assert "at step 3 (epoch 1)" in str(lost) and "resumes from the last checkpoint" in str(lost)


def test_an_error_that_is_no_peer_s_stays_a_traceback():
    shapes = RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)")
    assert peer_lost(shapes, "step 3") is None


@pytest.mark.process
def test_global_batchnorm_equals_one_process_on_the_whole_batch(tmp_path):
    on_ranks(SCRIPTS / "global_batchnorm.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    x_all = (torch.randn(8, 3, 4, 4) * 3 + 1).requires_grad_()
    w_all = torch.randn(8, 3, 4, 4)
    bn = torch.nn.BatchNorm2d(3)
    y = bn(x_all)
    (y * w_all).sum().backward()

    tol = {"atol": 1e-5, "rtol": 1e-5}
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y.detach(), **tol)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), x_all.grad, **tol)
    for r in ranks:
        assert torch.allclose(r["w_grad"], bn.weight.grad, **tol)
        assert torch.allclose(r["running_mean"], bn.running_mean, **tol)
        assert torch.allclose(r["running_var"], bn.running_var, **tol)
