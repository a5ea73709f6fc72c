"""The processes ``accelerate launch`` or ``torchrun`` started for ``vialign sample`` and ``vialign score``
(training has its own, :mod:`vialign.distributed`): whole batches are dealt out to them round-robin,
each process appends its rows to a file of its own, and the main process merges them in order, so the
files end as one process writes them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vialign.errors import VialignInputError
from vialign.files import read_jsonl_rows

# the final wait lasts until the slowest process has made its last batch; a process that fails stops
# the launcher's whole group, so nothing waits this long for a dead process
COLLECTIVE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes ``accelerate launch`` or ``torchrun`` started; one process
    without a launcher. ``vialign sample`` and ``vialign score`` deal whole batches out to them, and the
    main process writes the index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo group of the collectives: they carry rows and barriers, CPU objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        """`` (process R of N)`` for progress bars under a launcher, else nothing."""
        return f" (process {self.rank} of {self.world_size})" if self.world_size > 1 else ""

    def share(self, batches: Sequence[Sequence[int]]) -> list[int]:
        """This process's batches (every ``world_size``-th, round-robin, so the processes finish together
        however a resumed run's missing batches lie), concatenated in order."""
        return [i for batch in batches[self.rank :: self.world_size] for i in batch]

    def from_main(self, value: Any) -> Any:
        """``value`` as the main process has it. Every process waits here until all have arrived, so
        whatever the main process does after this, the others have finished their checks before."""
        if self.world_size == 1:
            return value
        values = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(values, src=0, group=self.group)
        torch.distributed.barrier(group=self.group)  # a broadcast's sender may go on before all receive
        return values[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier(group=self.group)

    def own_file(self, path: Path) -> Path:
        """Where this process appends its rows of ``path``: the main process ``path`` itself, process R
        ``<stem>.rankR<suffix>`` (a file of its own: processes never append to one file together)."""
        return path if self.is_main else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")


@contextmanager
def launched_processes() -> Iterator[Launch]:
    """The processes of ``accelerate launch`` / ``torchrun`` (from their RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT), joined in a gloo group for the job; one process without a launcher.
    A process group that is already set up (a caller's) is used, not torn down; after a failure the group
    is left as it is, for the CLI to end the process at once (destroying a group whose peers are gone can
    wait as long as a collective times out)."""
    dist = torch.distributed
    started = False
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            yield Launch()
            return
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise VialignInputError(
                f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start the processes with "
                "accelerate launch or torchrun, or unset WORLD_SIZE to run one process"
            )
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        started = True
    group = (
        None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    )
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    yield Launch(dist.get_rank(), dist.get_world_size(), local_rank, group)
    if started:
        dist.destroy_process_group()


def process_device(requested: str, launch: Launch) -> str:
    """The device this process computes on: ``auto`` is the GPU when torch sees one, else the CPU; under a
    launcher ``auto`` and ``cuda`` are this process's own GPU, ``cuda:LOCAL_RANK``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cuda" or launch.world_size == 1:
        return requested
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise VialignInputError(
            f"process {launch.rank} has LOCAL_RANK={launch.local_rank} but torch sees {count} GPU(s) on this "
            f"machine: start at most {count} processes per machine (--num_processes), or pass --device cpu"
        )
    torch.cuda.set_device(launch.local_rank)  # libraries that put tensors on plain "cuda" use this GPU too
    return f"cuda:{launch.local_rank}"


def rank_files(path: Path) -> list[Path]:
    """The rows other processes of a launch appended for ``path`` and did not merge yet (an interrupted
    run's), in process order."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank([1-9][0-9]*){re.escape(path.suffix)}")
    found = {int(m.group(1)): p for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))}
    return [found[rank] for rank in sorted(found)]


def read_rows_and_parts(path: Path) -> list[dict]:
    """The rows of ``path`` (if it exists), then those of its :func:`rank_files`."""
    return [row for file in [path, *rank_files(path)] if file.exists() for row in read_jsonl_rows(file)]
