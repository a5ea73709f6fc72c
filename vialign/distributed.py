"""The collective operations of a training run over N processes (``torch.distributed``), and their
one-process identities. The trainer makes one :class:`Processes` from accelerate's state; algorithms use
it through :class:`vialign.algorithms.TrainingContext`.

Gradients are not synchronised by DDP hooks: every algorithm's backward passes accumulate local
gradients, and :meth:`Processes.sum_gradients` adds them over processes once, before the optimizer
step. That allows any number of denoiser calls per backward pass (reward-gradient methods call the
denoiser once per sampling step), and costs one bucketed all-reduce per optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vialign.errors import VialignInputError

# elements per all-reduce: bounds the extra memory of the flat buffer (64 M floats = 256 MB)
BUCKET_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True)
class Processes:
    """This process's place among ``world_size`` processes; ``device`` is where collectives run (CPU for
    gloo, the GPU for NCCL)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def local_range(self, global_size: int) -> tuple[int, int]:
        """This process's contiguous share [lo, hi) of a global batch of ``global_size`` samples."""
        if global_size % self.world_size:
            raise VialignInputError(
                f"a global batch of {global_size} samples does not split evenly over {self.world_size} "
                "processes; make the samples per step a multiple of the number of processes"
            )
        share = global_size // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape everywhere), concatenated in process order along dim 0."""
        if self.world_size == 1:
            return tensor
        local = tensor.detach().contiguous().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or ``op="mean"``) of ``tensor`` over processes."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone().to(self.device)
        torch.distributed.all_reduce(total)
        return (total / self.world_size if op == "mean" else total).to(tensor.device)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over processes (a missing gradient counts as 0)."""
        if self.world_size == 1:
            return
        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads:
            bucket.append(grad)
            size += grad.numel()
            if size >= BUCKET_ELEMENTS:
                self._all_reduce(bucket)
                bucket, size = [], 0
        if bucket:
            self._all_reduce(bucket)

    def _all_reduce(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1).to(self.device, torch.float32) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
