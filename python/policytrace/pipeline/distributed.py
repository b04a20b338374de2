"""Several processes on one run folder (``torchrun --nproc_per_node N -m policytrace run ...``).

Rank 0 checks the folder, runs the base stages and writes the shared files while the others
wait at a barrier; then every rank loads the base state and takes the shards ``i`` with
``i % world == rank`` (a deterministic division; shards already finished are skipped), writing
each shard's files and its own marker, so no two processes ever write one file (in gradient
mode the concepts are divided the same way, ``c % world == rank``, and each rank broadcasts the
gradients it computed to the others); after a last barrier rank 0 verifies every marker and
merges. A run in which a rank dies is finished by starting the same command again, with any
number of processes. Backend: NCCL when the model runs on CUDA (with gloo beside it for tensors
kept on the host), gloo on CPU; one process per GPU (``model.device = "cuda"`` becomes
``cuda:<LOCAL_RANK>``). Outside torchrun (no ``WORLD_SIZE``) everything here is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config

# Rank 0 may train the default SAE and run the base pass while the others wait.
BARRIER_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects: results and exceptions alike)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The (total, D) host tensor whose row ``c`` was computed by rank ``c % world``;
        ``local`` holds this rank's rows in order. Each row keeps its owner's bits, so the result
        does not depend on the number of processes."""
        mine = [c for c in range(total) if self.owns(c)]
        if local.shape[0] != len(mine):
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows, owns {len(mine)}")
        if not self.distributed:
            return local
        import torch.distributed as dist

        out = torch.empty(total, local.shape[1], dtype=local.dtype)
        for j, c in enumerate(mine):
            out[c] = local[j]
        for c in range(total):
            dist.broadcast(out[c], src=c % self.world)
        return out


SINGLE = Ranks()
"""A run in one process."""


def ranks_from_env(device: str) -> Ranks:
    """Join the process group torchrun set up (env://), or a single-process :class:`Ranks`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        # NCCL moves CUDA tensors; the host tensors (concept gradients) go through gloo
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            # NCCL's object broadcasts use the current device: each process its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def runtime_config(cfg: Config, ranks: Ranks) -> Config:
    """The config this process runs with: one GPU per process under torchrun. (The run folder
    keeps the user's config; the device does not enter its identity.)"""
    if ranks.distributed and cfg.model.device == "cuda":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=f"cuda:{ranks.local_rank}"))
    return cfg


def finish(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
