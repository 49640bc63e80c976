"""Real multi-process runs (gloo on the CPU), each bounded by a timeout."""

import pytest
import torch
from helpers import SCRIPTS
from processes import torchrun


@pytest.mark.process
def test_global_batchnorm_equals_one_process_on_the_whole_batch(tmp_path):
    torchrun(SCRIPTS / "global_batchnorm.py", str(tmp_path))
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
