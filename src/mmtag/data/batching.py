"""How one pass over a dataset is batched and, under torchrun, shared among the processes:
the one rule the DataLoader path and the device path both follow."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pass:
    """How one pass over a dataset is batched."""

    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    rank: int = 0   # under torchrun: this process reads its shard of the seeded order
    world: int = 1


def shard_indices(n: int, rank: int, world: int, *, equal: str) -> torch.Tensor:
    """Rank `rank`'s rows of 0..n-1 among `world` processes: every world-th from its rank.
    Every rank gets the same count (DistributedDataParallel needs equal step counts):
    `equal='drop'` leaves out the last n % world rows (training), 'pad' repeats row 0
    (evaluation; mmtag.distributed.gather_rows trims the repeats)."""
    if equal not in ("drop", "pad"):
        raise ValueError(f"equal must be 'drop' or 'pad', got {equal!r}")
    idx = torch.arange(rank, n, world)
    if equal == "drop":
        return idx[: n // world]
    per = -(-n // world)
    return torch.cat([idx, idx.new_zeros(per - len(idx))])


def pass_order(n: int, how: Pass, *, equal: str) -> torch.Tensor:
    """The rows this rank reads in one pass over n rows: the seeded shuffle (the same on
    every rank), or file order, then its `shard_indices` share of it."""
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(how.seed)) if how.shuffle
             else torch.arange(n))
    return order[shard_indices(n, how.rank, how.world, equal=equal)]
