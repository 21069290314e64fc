"""The official CAUSE formulation of the training objectives, transcribed as it computes them.

This is a baseline for `utils.benchmark` and a reference for `tests/test_benchmark.py`,
never used in training. It keeps the costs the project's own code avoids:

- the modularity loss builds the [B, K, P, P] tensor of tanh(S_ik S_jk / τ) and takes its
  max over the K prototypes (docs/cause.md §3);
- the concept bank is a dict of per-prototype tensors, updated by a Python loop over the
  prototypes present, with a device→host copy at every dict access, and flattened again
  by growing concatenations before every loss evaluation;
- the contrastive loss loops over the images of the batch (docs/cause.md §4).

The numbers are those of the official code; only the names and the layout are this
project's (flat [N] indices and [N, dim] values instead of [B, P] grids).
"""
import torch
import torch.nn.functional as F

from modules.quantize import quantize_index


def official_modularity_loss(codebook, feat, temp=0.1):
    """-mean over images of tr((W / e) δ) with δ the max over K of the [B, K, P, P] tanh tensor."""
    x = F.normalize(feat.detach(), dim=2)
    affinity = (x @ x.transpose(2, 1)).clamp(0)
    affinity = affinity - affinity * torch.eye(affinity.shape[1], device=affinity.device)
    degree = affinity.sum(dim=2, keepdim=True)
    edges = affinity.sum(dim=(1, 2), keepdim=True)
    modularity_matrix = affinity - (degree / edges) @ (degree.transpose(2, 1) / edges) * edges

    assign = (x @ F.normalize(codebook, dim=1).T).clamp(0)  # [B, P, K]
    per_prototype = assign.transpose(2, 1)  # [B, K, P]
    # The outer product per prototype: this [B, K, P, P] tensor, and tanh's copy of it kept
    # for the backward pass, are what the official code grid-samples the tokens to afford.
    delta = torch.tanh(per_prototype.unsqueeze(3) @ per_prototype.unsqueeze(2) / temp).max(dim=1).values
    q = ((modularity_matrix / edges) @ delta).diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return -q.mean()


class OfficialBank:
    """The official concept bank: {prototype: [n, dim] teacher projections, oldest first}."""

    def __init__(self, num_prototypes, dim, capacity=100, device=None):
        self.capacity = capacity
        self.dim = dim
        # Every prototype starts with an empty entry, as the official bank_init does.
        empty = torch.empty(0, dim, device=device)
        self.stored = {k: empty for k in range(num_prototypes)}

    @classmethod
    def from_entries(cls, entries, num_prototypes, capacity=100, dim=None):
        """A bank holding copies of `entries` {prototype: [n, dim]}, the newest `capacity` of each; `dim` is
        needed only when `entries` is empty."""
        first = next(iter(entries.values()), None)
        if first is None and dim is None:
            raise ValueError("an empty entries dict does not tell the projection dim: pass dim")
        bank = cls(num_prototypes, first.shape[-1] if dim is None else dim, capacity,
                   device=None if first is None else first.device)
        for k, values in entries.items():
            bank.stored[k] = values[-capacity:].clone()
        return bank

    def entries(self):
        """{prototype: [n, dim]} for the non-empty prototypes (ConceptBank.entries' form)."""
        return {k: values for k, values in self.stored.items() if values.shape[0]}

    def update(self, index, values, order=None):
        """Append a random half (rounded down) of each present prototype's tokens; keep the newest.

        index [N] prototype of each token, values [N, dim]. The official code shuffles each
        prototype's tokens with its own CPU permutation; `order`, a permutation of the N
        tokens, replaces those by one shared order (each prototype's tokens in the order
        they appear in it), which is how ConceptBank draws, so tests can feed both alike.
        """
        if order is not None:
            index, values = index[order], values[order]
        for k in index.unique():
            key = values[torch.where(index == k)]
            if order is None:
                key = key[torch.randperm(len(key))]
            key = key[:int(len(key) * 0.5)]
            # The official code turns the prototype into a dict key with .item() at each of
            # these accesses: each one is a device→host copy that waits for the device.
            self.stored[k.item()] = torch.cat([self.stored[k.item()], key], dim=0)
            length = len(self.stored[k.item()])
            if length >= self.capacity:
                self.stored[k.item()] = self.stored[k.item()][length - self.capacity:]

    def compute(self, codebook):
        """Flatten the bank: (normalised prototype of each stored value, normalised values).

        The official code rebuilds these before every loss evaluation, growing both
        tensors by one concatenation per non-empty prototype.
        """
        prototypes = torch.empty(0, codebook.shape[1], device=codebook.device, dtype=codebook.dtype)
        values = torch.empty(0, self.dim, device=codebook.device)
        for k, stored in self.stored.items():
            n = stored.shape[0]
            if n == 0:
                continue
            prototypes = torch.cat([prototypes, codebook[k].unsqueeze(0).repeat(n, 1)], dim=0)
            values = torch.cat([values, stored], dim=0)
        return F.normalize(prototypes, dim=1), F.normalize(values, dim=1)


def _official_nce(logits, pos, neg):
    """Mean over the positive pairs of -s + log Σ_{pos ∪ neg} exp(s), s shifted by its row max."""
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    # Adding boolean masks is a logical or: the official code sums exp(s) over pos ∪ neg this way.
    denominator = (shifted.exp() * (pos + neg)).sum(dim=1, keepdim=True)
    per_pair = -shifted + torch.log(denominator)
    return per_pair[torch.where(pos)].mean()


def official_contrastive_loss(feat, proj, proj_ema, codebook, bank=None, temp=0.07, pos_thresh=0.3,
                              neg_thresh=0.1):
    """Concept-wise contrastive loss of docs/cause.md §4, one image of anchors at a time.

    feat [B, P, D] sampled backbone tokens, proj / proj_ema [B, P, Dp], codebook [K, D],
    bank an OfficialBank or None (flattened here, as the official step does before the loss).
    A term without positive pairs is NaN, as in the official code.
    """
    batch, tokens, _ = proj.shape
    quantized = F.normalize(codebook[quantize_index(feat, codebook)], dim=2)
    flat_quantized = quantized.reshape(batch * tokens, -1)
    student = F.normalize(proj, dim=2)
    teacher = F.normalize(proj_ema, dim=2).reshape(batch * tokens, -1)
    if bank is not None:
        bank_prototypes, bank_values = bank.compute(codebook)

    terms = []
    for b in range(batch):
        anchor_quantized = quantized[b]
        anchor = student[b]

        # In-batch term: this image's anchors against every teacher token of the batch.
        codebook_cos = anchor_quantized @ flat_quantized.T
        pos = codebook_cos > pos_thresh
        not_self = torch.ones_like(pos)
        not_self[:, b * tokens:(b + 1) * tokens].fill_diagonal_(0)
        pos = pos * not_self
        terms.append(_official_nce(anchor @ teacher.T / temp, pos, codebook_cos < neg_thresh))

        # Bank term: the same anchors against every stored teacher projection.
        if bank is not None and bank_values.shape[0] != 0:
            bank_cos = anchor_quantized @ bank_prototypes.T
            terms.append(_official_nce(anchor @ bank_values.T / temp, bank_cos > pos_thresh,
                                       bank_cos < neg_thresh))
    return sum(terms) / float(len(terms))


@torch.no_grad()
def official_ema_update(student, teacher, momentum=0.99):
    """teacher ← momentum·teacher + (1 − momentum)·student, with new tensors as the official code makes."""
    for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
        t.data = momentum * t.data + (1 - momentum) * s.data
