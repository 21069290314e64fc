"""The concept bank of docs/cause.md §4: per prototype, the newest `capacity` teacher projections."""
import torch


class ConceptBank:
    """A preallocated ring buffer per prototype; starts empty every run and is no artifact
    (only a resume state keeps it, so that an interrupted run continues as it would have).

    Slot (k, s) is filled once `count[k] > s`; `head[k]` is the slot the next value of
    prototype k goes to, so the oldest stored value sits at `head[k]` once the ring is full.
    One extra trash row after the K·capacity slots absorbs the writes of tokens that are
    not stored, which keeps `update` free of data-dependent shapes.
    """

    def __init__(self, num_prototypes, dim, capacity=100, device=None, compact=False):
        self.num_prototypes = num_prototypes
        # compact: candidates() hands out only the stored rows. That takes a host sync per step, so
        # fixed shapes are the GPU's choice; on a CPU a sync costs nothing and a bank far from full
        # (2048 × 100 slots) would otherwise cost the contrastive loss most of its time.
        self.compact = compact
        self.dim = dim
        self.capacity = capacity
        self._storage = torch.zeros(num_prototypes * capacity + 1, dim, device=device, dtype=torch.float32)
        self.count = torch.zeros(num_prototypes, dtype=torch.int64, device=device)
        self.head = torch.zeros(num_prototypes, dtype=torch.int64, device=device)

    @property
    def values(self):
        """[K, capacity, dim]; slots beyond `count` hold zeros (finite, so masking them suffices)."""
        return self._storage[:-1].view(self.num_prototypes, self.capacity, self.dim)

    def valid(self):
        """[K, capacity] bool: which slots hold a stored value."""
        slots = torch.arange(self.capacity, device=self.count.device)
        return slots < self.count[:, None]

    def update(self, index, values, order=None):
        """Store half (rounded down) of each prototype's tokens, chosen by `order`.

        index [N] prototype of each token, values [N, dim] their teacher projections; `order`, a
        permutation of the N tokens (default: a uniformly random one), decides which are kept:
        each prototype keeps its tokens that come first in it, appended in that order, and only
        the newest `capacity` survive, as the official bank does. The identity keeps the first
        half in token order (the setting the official loops were recorded with).
        """
        index = index.reshape(-1).to(self.count.device)
        values = values.detach().reshape(-1, self.dim).to(self._storage)
        n = index.numel()
        # The permutation, then a stable sort by prototype: each prototype's tokens end up
        # contiguous and in the permutation's order.
        perm = torch.randperm(n, device=index.device) if order is None else order.to(index.device)
        group, order = torch.sort(index[perm], stable=True)
        token = perm[order]
        # Group bounds by binary search in the sorted prototypes (bincount would sync on CUDA).
        prototypes = torch.arange(self.num_prototypes, device=index.device)
        starts = torch.searchsorted(group, prototypes)
        sizes = torch.searchsorted(group, prototypes, right=True) - starts
        rank = torch.arange(n, device=index.device) - starts[group]
        taken = sizes // 2
        # The first `taken` in random order are appended; of those, only the last
        # `capacity` would survive the trim, so only they are written (each slot once).
        stored = (rank < taken[group]) & (rank >= taken[group] - self.capacity)
        slot = group * self.capacity + (self.head[group] + rank) % self.capacity
        trash = self._storage.shape[0] - 1
        self._storage[torch.where(stored, slot, trash)] = values[token]
        self.head = (self.head + taken) % self.capacity
        self.count = (self.count + taken).clamp_max(self.capacity)

    def candidates(self):
        """(prototype [n] int64, values [n, dim], valid [n]): the whole buffer, n = K·capacity, with fixed
        shapes; or, compact, only the stored rows (all valid)."""
        # Integer division rather than repeat_interleave, which syncs to size its output.
        prototype = torch.arange(self.num_prototypes * self.capacity, device=self.count.device) // self.capacity
        valid = self.valid().reshape(-1)
        if not self.compact:
            return prototype, self._storage[:-1], valid
        stored = valid.nonzero().squeeze(1)
        return prototype[stored], self._storage[stored], valid[stored]

    def state_dict(self):
        return {"storage": self._storage, "count": self.count, "head": self.head}

    def load_state_dict(self, state):
        if state["storage"].shape != self._storage.shape:
            raise ValueError(f"saved concept bank has shape {tuple(state['storage'].shape)}, "
                             f"expected {tuple(self._storage.shape)}")
        self._storage.copy_(state["storage"])
        self.count.copy_(state["count"])
        self.head.copy_(state["head"])
