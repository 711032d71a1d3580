"""Several processes training one model (torchrun): who this process is, and the few collective
operations the training program needs.

`torchrun --nproc_per_node=N -m mmtag train ...` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK set; each joins one process group (NCCL between GPUs, gloo on CPUs).
Every rank trains on its own shard of each epoch's shuffled rows; DistributedDataParallel
averages the gradients. Rank 0 alone writes files. Without torchrun nothing here does anything.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as torch_dist

from mmtag.data.batching import shard_indices

log = logging.getLogger("mmtag.train")


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def from_env() -> Dist:
    """The torchrun variables of this process; one process when they are absent."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets "
                         "them); unset them to train in one process") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Dist(rank, world, local)


def start(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (a no-op for one process); returns this rank's device: on CUDA
    the GPU of its LOCAL_RANK."""
    if not dist.active:
        return device
    if device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {dist.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): lower --nproc_per_node")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        # rank 0 alone builds caches and chooses thresholds while the others wait: longer than
        # the 10-minute default on a large dataset
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=timedelta(hours=2))
    if not dist.main:
        # one voice: the other ranks report only problems
        logging.getLogger("mmtag").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s); rank 0, which writes the run folder, is on %s "
             "(%s)", dist.world, torch_dist.get_backend(), socket.gethostname(), device)
    return device


def stop(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier()


@contextmanager
def local_first(dist: Dist) -> Iterator[None]:
    """Each machine's first process (LOCAL_RANK 0) runs the body before the others do: it
    fills the machine's caches (images, features), which the others then read."""
    if dist.local_rank != 0:
        barrier(dist)
    yield
    if dist.local_rank == 0:
        barrier(dist)


def on_main(dist: Dist, fn, errors: tuple[type[Exception], ...] = (ValueError, OSError,
                                                                  RuntimeError)):
    """fn() run by rank 0; its result, or the error it raised, on every rank (the others would
    wait for rank 0 forever if it failed alone)."""
    result, error = None, None
    if dist.main:
        try:
            result = fn()
        except errors as e:
            error = e
    if dist.active:
        box = [(result, None if error is None else (type(error).__name__, str(error)))]
        torch_dist.broadcast_object_list(box, src=0)
        result, raised = box[0]
        if raised is not None and error is None:
            kinds = {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError}
            error = kinds.get(raised[0], ValueError)(raised[1])
    if error is not None:
        raise error
    return result


def from_rank_zero(tensors, dist: Dist) -> None:
    """Copy rank 0's values of `tensors` into every rank's, in place: the BatchNorm statistics
    each rank updated from its own batches, so that all ranks validate the same model."""
    if dist.active:
        for t in tensors:
            torch_dist.broadcast(t.data, src=0)


def all_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The element-wise sum of `x` over the ranks (x itself for one process)."""
    if dist.active:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


def gather_rows(x: torch.Tensor, n: int, dist: Dist) -> torch.Tensor:
    """Every rank's `x` (its rows `mmtag.data.batching.shard_indices(n, rank, world,
    equal='pad')`) put back into row order 0..n-1 on every rank."""
    if not dist.active:
        return x[:n]
    parts = [torch.empty_like(x) for _ in range(dist.world)]
    torch_dist.all_gather(parts, x.contiguous())
    # rank r's j-th row is row j * world + r
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]


def sharded(n: int, dist: Dist, device: torch.device, fn) -> np.ndarray:
    """fn(row indices) -> (len, ...) array, run by each rank on its share of rows 0..n-1; the
    rows of every rank in order 0..n-1 (every rank gets them). One process: fn(all rows)."""
    if not dist.active:
        return fn(list(range(n)))
    idx = shard_indices(n, dist.rank, dist.world, equal="pad")
    part = torch.as_tensor(np.asarray(fn(idx.tolist())))
    # NCCL gathers GPU tensors only
    return gather_rows(part.to(device), n, dist).cpu().numpy()
