"""Step-2 segment module (docs/cause.md §4): MLP or transformer head, projections, EMA teacher, linear probe.

Every attribute name below is chosen so that the state dict equals the released
`segment_{mlp,tr}.pth` files (`tests/golden/heads.pt: layout`); renaming any of them breaks
loading of the released checkpoints.

Dropout is the caller's choice, not a train/eval mode: a head applies dropout exactly when it is
given a `dropout(x, p)` function (a training step passes its BatchRandom's, so that every process
of a global batch draws the same masks); without one it is deterministic.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.grid import map_to_tokens, tokens_to_map
from modules.quantize import quantize

DROPOUT = 0.1


def _no_dropout(x):
    return x


def _dropout_at(dropout, p):
    """x -> dropout(x, p), or the identity when no dropout function is given."""
    if dropout is None:
        return _no_dropout
    return lambda x: dropout(x, p)


def _reduction(dim, reduced_dim):
    """The two branches `f1` (linear) and `f2` (two-layer MLP) that map features to R dims."""
    f1 = nn.Conv2d(dim, reduced_dim, 1)
    f2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, reduced_dim, 1))
    return f1, f2


def _reduce(f1, f2, tokens, drop):
    """f1(drop(x)) + f2(drop(x)) on the token grid; each branch draws its own dropout mask."""
    x = tokens_to_map(tokens)
    return map_to_tokens(f1(drop(x)) + f2(drop(x)))


class MLPHead(nn.Module):
    def __init__(self, dim, reduced_dim, dropout=DROPOUT):
        super().__init__()
        self.f1, self.f2 = _reduction(dim, reduced_dim)
        self.dropout = dropout

    def forward(self, feat, dropout=None):
        """[B,P,dim] -> [B,P,R]; `dropout`, a dropout(x, p) function, turns the head's dropout on."""
        return _reduce(self.f1, self.f2, feat, _dropout_at(dropout, self.dropout))


def _attention(layer, query, key, value, drop):
    """One-head attention of an nn.MultiheadAttention `layer`, with `drop` on the attention weights.

    Without dropout the module's own (fused) path runs. With dropout the weights are formed
    explicitly, so that their mask comes from the caller's generator like every other mask.
    """
    if drop is _no_dropout:
        return layer(query, key, value, need_weights=False)[0]
    w_q, w_k, w_v = layer.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    return layer.out_proj(drop(weights) @ v)


class TRDecoderLayer(nn.Module):
    """One post-norm decoder layer (1 head, FFN 2048) followed by the f1/f2 reduction."""

    def __init__(self, dim, reduced_dim, hidden_dim=2048, dropout=DROPOUT):
        super().__init__()
        # The attention modules' own dropout stays 0: attention-weight dropout is applied in _attention.
        self.self_attn = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.f1, self.f2 = _reduction(dim, reduced_dim)
        self.dropout = dropout

    def forward(self, tgt, memory, pos, dropout, head_dropout):
        drop = _dropout_at(dropout, self.dropout)
        q = tgt + pos
        tgt = self.norm1(tgt + drop(_attention(self.self_attn, q, q, tgt, drop)))
        tgt = self.norm2(tgt + drop(_attention(self.multihead_attn, tgt + pos, memory, memory, drop)))
        ffn = self.linear2(drop(F.relu(self.linear1(tgt))))
        out = memory + self.norm3(tgt + drop(ffn))
        return _reduce(self.f1, self.f2, out, _dropout_at(dropout, head_dropout))


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
        self.codebook = codebook

    def forward(self, feat, dropout=None):
        """[B,P,dim] -> [B,P,R]; P must equal the num_queries the head was built for."""
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
        return self.tr(tgt, feat, self.query_pos, dropout, self.dropout)


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
    logits [B,n_classes,h,w].
    """

    def __init__(self, head_type, dim, reduced_dim=90, projection_dim=2048, n_classes=27, num_queries=None):
        super().__init__()
        if head_type not in ("mlp", "tr"):
            raise ValueError(f"head_type must be 'mlp' or 'tr', got {head_type!r}")
        if head_type == "tr" and num_queries is None:
            raise ValueError("the TR head needs num_queries = (resolution / patch size)^2")
        self.head_type = head_type
        self.head = self._make_head(dim, reduced_dim, num_queries)
        self.projection_head = PointwiseConv(reduced_dim, projection_dim)
        self.head_ema = self._make_head(dim, reduced_dim, num_queries)
        self.projection_head_ema = PointwiseConv(reduced_dim, projection_dim)
        self.linear = PointwiseConv(reduced_dim, n_classes, as_map=True)
        self._init_ema()

    def _make_head(self, dim, reduced_dim, num_queries):
        if self.head_type == "tr":
            return TRHead(dim, reduced_dim, num_queries)
        return MLPHead(dim, reduced_dim)

    def _ema_pairs(self):
        return ((self.head, self.head_ema), (self.projection_head, self.projection_head_ema))

    def set_codebook(self, codebook):
        """Give both TR heads the frozen clusterbook; the MLP head does not use it."""
        if self.head_type == "tr":
            self.head.set_codebook(codebook)
            self.head_ema.set_codebook(codebook)

    @torch.no_grad()
    def _init_ema(self):
        """Make the teacher heads copies of the student heads; they never receive gradients."""
        for student, teacher in self._ema_pairs():
            for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
                t.copy_(s)
                t.requires_grad_(False)

    @torch.no_grad()
    def update_ema(self, momentum=0.99):
        """teacher = momentum · teacher + (1 − momentum) · student, parameter by parameter."""
        for student, teacher in self._ema_pairs():
            for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
                t.mul_(momentum).add_(s, alpha=1 - momentum)

    def student_parameters(self):
        """The parameters that learn in step 2: student head, its projection and the linear probe."""
        for module in (self.head, self.projection_head, self.linear):
            yield from module.parameters()


def build_segment(head, dim, reduced_dim, projection_dim, n_classes, num_queries, codebook, device):
    """The segment module of a run, on `device`, holding the frozen clusterbook (TR)."""
    segment = SegmentModule(head, dim, reduced_dim, projection_dim, n_classes,
                            num_queries if head == "tr" else None).to(device)
    segment.set_codebook(codebook.to(device))
    return segment
