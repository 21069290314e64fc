"""Which items each process reads: training batches (both recipes) and evaluation shards.

Training reads *global batches*: runs of `global_batch` consecutive indices of the epoch's
order. One global batch is one optimiser step, whatever the number of processes: each process
reads its rows of it (`BatchShare`), and the step engines reduce over the processes that share
it. The epoch's order is DistributedSampler's for (shards, shard, seed, epoch):

  paper recipe   shards 4, shard 0, global batch 16 split over all G processes: what the
                 released models saw (the official scripts trained each of 4 GPUs alone and
                 kept rank 0's copy), on any process count;
  scaled recipe  shards G, shard r, global batch = each process's own batch: every crop each
                 epoch, the batch growing with G (this project's earlier behaviour).
"""
import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler


@dataclass(frozen=True)
class BatchShare:
    """This process's rows [offset, offset + rows) of a global batch of `global_rows` items."""
    offset: int
    rows: int
    global_rows: int


def share_of(global_rows, processes, rank):
    """Rows of a global batch for `rank`: equal shares, the first `global_rows % processes` ranks one more
    (a short last batch can leave a rank none)."""
    base, extra = divmod(global_rows, processes)
    offset = rank * base + min(rank, extra)
    return BatchShare(offset, base + (rank < extra), global_rows)


class GlobalBatchSampler(Sampler):
    """Yields, for each global batch of an epoch, the list of this process's indices (possibly empty)."""

    def __init__(self, length, global_batch, *, shards, shard, processes, rank, seed, drop_last=False):
        if global_batch < 1:
            raise ValueError(f"global_batch must be at least 1, got {global_batch}")
        self.length = length
        self.global_batch = global_batch
        self.drop_last = drop_last  # leave out the short last batch of an epoch, as DataLoader(drop_last=True)
        self.shards, self.shard = shards, shard
        self.processes, self.rank = processes, rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_order(self):
        """The epoch's indices: DistributedSampler's own order, so it is the official one by construction."""
        sampler = DistributedSampler(range(self.length), num_replicas=self.shards, rank=self.shard, shuffle=True,
                                     seed=self.seed)
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def samples_per_epoch(self):
        return math.ceil(self.length / self.shards)

    def __len__(self):
        batches = self.samples_per_epoch() / self.global_batch
        return math.floor(batches) if self.drop_last else math.ceil(batches)

    def share(self, batch_index):
        """This process's BatchShare of global batch `batch_index` of the epoch."""
        global_rows = min(self.global_batch, self.samples_per_epoch() - batch_index * self.global_batch)
        return share_of(global_rows, self.processes, self.rank)

    def __iter__(self):
        order = self.epoch_order()
        for index in range(len(self)):
            start = index * self.global_batch
            share = self.share(index)
            yield order[start + share.offset:start + share.offset + share.rows]


class ShardSampler(Sampler):
    """Every index once, rank r reading r, r + W, r + 2W, ...: no padding, no shuffling.

    For evaluation, where DistributedSampler's padding to a multiple of W would count a few
    images twice. Ranks may then run different numbers of batches, so evaluation loops must
    not reduce across ranks until they have finished.
    """

    def __init__(self, dataset, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size} processes")
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.length, self.world_size))


class _Collate:
    """default_collate, except that no items make `empty` (a rank's empty share of a short last batch)."""

    def __init__(self, empty):
        self.empty = empty

    def __call__(self, items):
        if not items:
            return self.empty()
        return torch.utils.data.default_collate(items)


def training_loader(dataset, sampler, num_workers=0):
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=_Collate(dataset.empty_batch), pin_memory=torch.cuda.is_available())


def evaluation_loader(dataset, batch_size, rank=0, world_size=1, num_workers=0):
    """Every item exactly once over all ranks, in order within each rank's shard."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, rank, world_size),
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())
