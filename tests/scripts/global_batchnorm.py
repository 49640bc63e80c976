"""Run by tests/test_distributed.py on 2 ranks: GlobalBatchNorm2d on 2 gloo ranks.

Each rank normalises its half of a fixed batch, backpropagates a fixed loss
and saves its output, input gradient, weight gradient and running stats.
"""

import sys

import torch
import torch.distributed as dist

from pegasus_dist.training.distributed import GlobalBatchNorm2d

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x_all = torch.randn(8, 3, 4, 4) * 3 + 1
w_all = torch.randn(8, 3, 4, 4)  # fixed weights of a linear "loss"
share = 8 // world
x = x_all[rank * share : (rank + 1) * share].clone().requires_grad_()
bn = GlobalBatchNorm2d(3)
y = bn(x)
(y * w_all[rank * share : (rank + 1) * share]).sum().backward()
dist.all_reduce(bn.weight.grad)  # what DDP would do (sum; the loss is a sum too)
torch.save(
    {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad,
     "running_mean": bn.running_mean, "running_var": bn.running_var},
    f"{sys.argv[1]}/rank{rank}.pt",
)
dist.destroy_process_group()
