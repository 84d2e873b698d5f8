"""Data-parallel runs past one machine: this process's shard when ``accelerate launch`` started several.

``accelerate launch --multi_gpu --num_processes N -m cellhub evaluate|predict ...`` starts N
processes (one per GPU; on a machine without GPUs, N CPU processes talking over gloo). Each one
takes a contiguous shard of the inputs (:meth:`Processes.shard`), and the main process gathers the
results (:meth:`Processes.gather`) into one report or CSV. Started plainly, there is one process
and every method is a no-op: the same code runs either way.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["Processes"]


class Processes:
    """Rank, world size and device of this process; shards, gathering, and ordering between processes."""

    def __init__(self) -> None:
        self._state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # on a machine without GPUs accelerate needs cpu=True to set up gloo rather than stay alone
            self._state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self._state.process_index if self._state is not None else 0
        self.world = self._state.num_processes if self._state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Any:
        """This process's device when several run (its GPU, or the CPU); ``None`` (choose as usual) alone."""
        return self._state.device if self._state is not None else None

    def shard(self, n: int) -> range:
        """This process's contiguous block of ``range(n)``; the blocks in rank order are ``range(n)``."""
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return range(lo, hi)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (picklable objects, sent between this run's processes only)."""
        if self._state is None:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (filling caches), then the others."""
        if self._state is None:
            yield
        else:
            with self._state.main_process_first():
                yield

    def close(self) -> None:
        """Leave the process group (a clean exit for every process)."""
        if self._state is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
