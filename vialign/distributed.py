"""The collective operations of a training run over N processes (``torch.distributed``), and their
one-process identities. The trainer makes one :class:`Processes` from accelerate's state; algorithms use
it through :class:`vialign.algorithms.TrainingContext`.

Gradients are not synchronised by DDP hooks: every algorithm's backward passes accumulate local
gradients, and :meth:`Processes.sum_gradients` adds them over processes once, before the optimizer
step. That allows any number of denoiser calls per backward pass (reward-gradient methods call the
denoiser once per sampling step), and costs one bucketed all-reduce per optimizer step.

When one process fails, every process ends at once (``vialign train`` does it with the functions at
the end of this module; docs/faults.md, "Several processes"): the failing one records its error in the
process group's store, prints it unless another process printed the same, and leaves with
``os._exit`` (no clean-up that could wait on the others). Its peers then stop too: a gloo collective
fails as soon as a peer's sockets close; the launcher (``accelerate launch``, ``torchrun``) sends
SIGTERM to the other processes of its node as soon as one exits non-zero (it looks every 0.1 s); an
NCCL collective that no launcher ends times out (``torch.distributed``'s 10 minutes). A peer whose
collective failed prints one line naming the process that failed, not its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
        """Replace each parameter's gradient by its sum over processes (a missing gradient counts as 0).
        A sharded parameter (a DTensor: ``vialign.sharding``) only gets its zero: FSDP has summed its
        gradient already."""
        if self.world_size == 1:
            return
        from torch.distributed.tensor import DTensor

        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if not isinstance(param, DTensor):
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


# ------------------------------------------------------------------ one process fails
FAILURE_KEY = "vialign/failure"  # the store key: "RANK\nMESSAGE" of the first process that failed
STORE_TIMEOUT = timedelta(seconds=10)  # for the store calls made while failing


def process_group_rank() -> int | None:
    """This process's rank in a process group of two or more processes, else ``None``."""
    if "torch.distributed" not in sys.modules or not torch.distributed.is_available():
        return None
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return None
    return torch.distributed.get_rank()


def raised_by_collective(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.distributed`` (a collective or the store failed:
    another process ended or stopped answering), rather than by this process's own work."""
    if isinstance(error, torch.distributed.DistError):
        return True
    package = str(Path(torch.distributed.__file__).parent)
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and trace.tb_frame.f_code.co_filename.startswith(package)


def _store():
    store = torch.distributed.distributed_c10d._get_default_store()
    store.set_timeout(STORE_TIMEOUT)
    return store


def record_failure(rank: int, message: str) -> tuple[int, str] | None:
    """Record that process ``rank`` failed with ``message``, unless another process did so first:
    return ``None`` if this is the first failure, else the first one's (rank, message). Best effort: a
    store that cannot be reached counts as no earlier failure."""
    mine = f"{rank}\n{message}"
    try:
        first = _store().compare_set(FAILURE_KEY, "", mine)
    except Exception:  # the store's host is gone: nothing to compare with
        return None
    first = first.decode() if isinstance(first, bytes) else str(first)
    if first == mine:
        return None
    other, _, text = first.partition("\n")
    return int(other), text


def first_failure() -> tuple[int, str] | None:
    """The (rank, message) another process recorded with :func:`record_failure`, if any."""
    try:
        store = _store()
        if not store.check([FAILURE_KEY]):
            return None
        other, _, text = store.get(FAILURE_KEY).decode().partition("\n")
        return int(other), text
    except Exception:
        return None


def exit_now(code: int) -> None:
    """End this process at once: flush the output, skip the interpreter's clean-up (destroying a process
    group whose peers are gone can wait for as long as a collective times out)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
