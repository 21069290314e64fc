"""Step-2 segment module (SPEC §4): MLP or transformer head, projections, EMA teacher, linear probe.

Every attribute name below is chosen so that the state dict equals the released
`segment_{mlp,tr}.pth` files (`golden/heads.pt: layout`); renaming any of them breaks
loading of the released checkpoints.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.grid import map_to_tokens, tokens_to_map
from modules.quantize import quantize

DROPOUT = 0.1


def _reduction(dim, reduced_dim):
    """The two branches `f1` (linear) and `f2` (two-layer MLP) that map features to R dims."""
    f1 = nn.Conv2d(dim, reduced_dim, 1)
    f2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, reduced_dim, 1))
    return f1, f2


def _reduce(f1, f2, tokens, p):
    """f1(drop(x)) + f2(drop(x)) on the token grid; each branch draws its own dropout mask."""
    x = tokens_to_map(tokens)
    return map_to_tokens(f1(F.dropout(x, p)) + f2(F.dropout(x, p)))


class MLPHead(nn.Module):
    def __init__(self, dim, reduced_dim, dropout=DROPOUT):
        super().__init__()
        self.f1, self.f2 = _reduction(dim, reduced_dim)
        self.dropout = dropout

    def forward(self, feat, dropout=False):
        """[B,P,dim] -> [B,P,R]; `dropout` asks for the head's dropout, active only in train mode."""
        return _reduce(self.f1, self.f2, feat, self.dropout if dropout and self.training else 0.0)


class TRDecoderLayer(nn.Module):
    """One post-norm decoder layer (1 head, FFN 2048) followed by the f1/f2 reduction."""

    def __init__(self, dim, reduced_dim, hidden_dim=2048, dropout=DROPOUT):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.f1, self.f2 = _reduction(dim, reduced_dim)
        self.dropout = dropout

    def forward(self, tgt, memory, pos, head_dropout):
        # Internal dropouts follow train/eval mode, as nn.MultiheadAttention's own do.
        p = self.dropout if self.training else 0.0
        q = tgt + pos
        tgt = self.norm1(tgt + F.dropout(self.self_attn(q, q, tgt, need_weights=False)[0], p))
        attended = self.multihead_attn(tgt + pos, memory, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + F.dropout(attended, p))
        ffn = self.linear2(F.dropout(F.relu(self.linear1(tgt)), p))
        out = memory + self.norm3(tgt + F.dropout(ffn, p))
        return _reduce(self.f1, self.f2, out, head_dropout)


class TRHead(nn.Module):
    """Decoder whose queries are the clusterbook prototypes of the tokens (the "concepts")."""

    def __init__(self, dim, reduced_dim, num_queries, dropout=DROPOUT):
        super().__init__()
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.tr = TRDecoderLayer(dim, reduced_dim, dropout=dropout)
        self.dropout = dropout
        # Frozen step-1 clusterbook; not persistent because the released files omit it.
        self.register_buffer("codebook", None, persistent=False)

    def set_codebook(self, codebook):
        self.codebook = codebook.detach().to(self.query_pos.device)

    def forward(self, feat, dropout=False):
        """[B,P,dim] -> [B,P,R]; P must be the num_queries the head was built for."""
        num_queries, tokens = self.query_pos.shape[0], feat.shape[1]
        if tokens != num_queries:
            side = math.isqrt(num_queries)
            raise ValueError(
                f"the head was built for {num_queries} tokens (a {side}x{side} grid: resolution / patch size "
                f"= {side}); got P = {tokens} tokens: build it with num_queries = (resolution / patch size)^2 "
                f"for the backbone and resolution in use")
        if self.codebook is None:
            raise ValueError("the TR head has no clusterbook: call set_codebook(codebook) before running it")
        tgt = quantize(feat, self.codebook)
        return self.tr(tgt, feat, self.query_pos, self.dropout if dropout and self.training else 0.0)


class PointwiseConv(nn.Module):
    """1x1 convolution on [B,P,C] tokens, returning tokens or (as_map) the [B,out,h,w] map."""

    def __init__(self, in_dim, out_dim, as_map=False):
        super().__init__()
        self.f = nn.Conv2d(in_dim, out_dim, 1)
        self.as_map = as_map

    def forward(self, tokens):
        out = self.f(tokens_to_map(tokens))
        return out if self.as_map else map_to_tokens(out)


class SegmentModule(nn.Module):
    """Student head and projection, their EMA teacher copies, and the labelled linear probe.

    `projection_head(_ema)` map [B,P,R] -> [B,P,projection_dim]; `linear` maps [B,P,R] to
    logits [B,n_classes,h,w]. `dropout` is the probability the heads use when asked to.
    """

    def __init__(self, head_type, dim, reduced_dim=90, projection_dim=2048, n_classes=27, num_queries=None):
        super().__init__()
        if head_type not in ("mlp", "tr"):
            raise ValueError(f"head_type must be 'mlp' or 'tr', got {head_type!r}")
        if head_type == "tr" and num_queries is None:
            raise ValueError("the TR head needs num_queries = (resolution / patch size)^2")
        self.head_type = head_type
        self.dropout = DROPOUT
        self.head = self._make_head(dim, reduced_dim, num_queries)
        self.projection_head = PointwiseConv(reduced_dim, projection_dim)
        self.head_ema = self._make_head(dim, reduced_dim, num_queries)
        self.projection_head_ema = PointwiseConv(reduced_dim, projection_dim)
        self.linear = PointwiseConv(reduced_dim, n_classes, as_map=True)
        self.init_ema()

    def _make_head(self, dim, reduced_dim, num_queries):
        if self.head_type == "tr":
            return TRHead(dim, reduced_dim, num_queries, self.dropout)
        return MLPHead(dim, reduced_dim, self.dropout)

    def _ema_pairs(self):
        return ((self.head, self.head_ema), (self.projection_head, self.projection_head_ema))

    def set_codebook(self, codebook):
        """Give both TR heads the frozen clusterbook; the MLP head does not use it."""
        if self.head_type == "tr":
            self.head.set_codebook(codebook)
            self.head_ema.set_codebook(codebook)

    @torch.no_grad()
    def init_ema(self):
        """Make the teacher heads copies of the student heads; they never receive gradients."""
        for student, teacher in self._ema_pairs():
            for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
                t.copy_(s)
                t.requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, momentum=0.99):
        for student, teacher in self._ema_pairs():
            for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
                t.mul_(momentum).add_(s, alpha=1 - momentum)

    def student_parameters(self):
        """The parameters that learn in step 2: student head, its projection and the linear probe."""
        for module in (self.head, self.projection_head, self.linear):
            yield from module.parameters()
