"""Data parallelism for ``torchrun --nproc_per_node=G -m finepruner eval ...`` (issue 3, item 4).

Rank and world size come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the process
group uses nccl on GPU and gloo on CPU. Questions are split into contiguous chunks like LLaVA's
``--num-chunks/--chunk-idx`` (spec section 1.1), so concatenating shards restores question order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def contiguous_chunk(items: Sequence[T], world_size: int, rank: int) -> list[T]:
    """Chunk ``rank`` of ``ceil(len/world)``-sized contiguous slices (empty past the end)."""
    if world_size <= 1:
        return list(items)
    size = math.ceil(len(items) / world_size)
    return list(items[rank * size : (rank + 1) * size])


@dataclass
class DistContext:
    """This process's place in the run; a single process has rank 0 of 1 and no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.local_rank])
            else:
                torch.distributed.barrier()

    def default_device(self) -> str:
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.distributed else "cuda"
        return "cpu"

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed() -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``), else single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world <= 1:
        return DistContext()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)
