"""The random draws of one training step: dropout masks (STEGO's channel dropout too), grid positions, the
concept bank's cut.

Every draw is made for the whole *global batch* (loader/samplers.py) from a generator that all
processes sharing that batch seed alike, and each process keeps its own rows. A step therefore
draws the same numbers whether one process or eight share the batch, and the paper recipe gives
one trajectory on any process count. The generator is seeded from (run seed, epoch, batch), so a
resumed run draws what the uninterrupted one would without saving generator states.
"""
import hashlib

import torch


def mixed_seed(*words):
    """A 63-bit seed from integers, well spread even for neighbouring inputs."""
    digest = hashlib.sha256(repr(tuple(int(w) for w in words)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BatchRandom:
    """Draws of one step. `share` is the process's BatchShare (offset, rows, global_rows)."""

    def __init__(self, seed, share, device):
        self.share = share
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)

    def _rows(self, draw):
        """This process's rows of a draw made for the global batch."""
        start = self.share.offset
        return draw[start:start + self.share.rows]

    def uniform(self, shape):
        """[rows, *shape] uniform [0, 1) numbers: this process's rows of [global_rows, *shape]."""
        return self._rows(torch.rand((self.share.global_rows, *shape), generator=self.generator, device=self.device))

    def integers(self, high, shape):
        """[rows, *shape] integers in [0, high), drawn as uniform() is."""
        draw = torch.randint(high, (self.share.global_rows, *shape), generator=self.generator, device=self.device)
        return self._rows(draw)

    def dropout(self, x, p):
        """Inverted dropout of x [rows, ...] with probability p."""
        return self._dropped(x, p, x.shape[1:])

    def channel_dropout(self, x, p):
        """Dropout2d of x [rows, C, h, w]: whole channels of each image zeroed with probability p, the rest
        scaled by 1/(1-p)."""
        return self._dropped(x, p, (x.shape[1], 1, 1))

    def _dropped(self, x, p, shape):
        """x with a keep-mask of `shape` per row (broadcast over the rest) drawn as uniform() is."""
        if p == 0:
            return x
        keep = self.uniform(shape) >= p
        return x * keep.to(x.dtype) / (1 - p)

    def permutation(self, n):
        """A permutation of n items that are the same on every process (drawn whole, not by rows)."""
        return torch.randperm(n, generator=self.generator, device=self.device)
