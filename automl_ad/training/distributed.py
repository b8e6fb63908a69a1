"""Data-parallel training across processes with plain ``torch.distributed`` (no Ray).

Methods train through ``training_step``, not ``forward``, so DistributedDataParallel's
forward hooks do not apply. Instead every rank starts from rank 0's weights, draws its
own batches, and averages gradients with one all-reduce per step: the same update DDP
makes, for any method and any number of phases. Ray Train's TorchTrainer sets up the
process group; tests set one up with gloo on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class DataParallel:
    """Gradient averaging over the default process group."""

    def __init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def broadcast_(self, module: nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers."""
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def average_gradients_(self, module: nn.Module) -> None:
        """Mean of each gradient over ranks, in one flattened all-reduce."""
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            count = grad.numel()
            grad.copy_(flat[offset : offset + count].view_as(grad))
            offset += count
