"""The frozen ViT backbones: timm blocks, the releases' parameter names, the official positional-embedding
resampling; DINOv3's RoPE ViT."""
import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from errors import UserError

from .registry import ARCHS


def resample_pos_embed(pos_embed, grid, pretrain_grid, family):
    """The positional embedding `[1, 1 + gh*gw, dim]` for a (gh, gw) patch grid (docs/cause.md §1).

    The rules are the official implementations' ones, numbers included: dino, dinov2, ibot and
    mae resample bicubically with a scale factor of (side + 0.1) / n per axis, msn with
    sqrt(gh*gw / n²) and no offset. Passing a scale factor rather than an output size matters:
    torch maps coordinates with the given factor, and resampling to a target size gives
    visibly different features. DINOv2 with registers is the exception that does pass the output
    size, and resamples with antialiasing (its hub models set interpolate_offset 0 and
    interpolate_antialias). The class-token embedding is kept as is.
    """
    gh, gw = grid
    n = pretrain_grid
    # Images are multiples of the patch, so an n×n grid means a square image at the pretrain
    # size: the stored embedding applies unchanged.
    if (gh, gw) == (n, n):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    # float32 as DINOv2 does; the weights are loaded as float32, so for the other families
    # this is the same computation.
    patch_pos = patch_pos.float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
    if family == "dinov2_reg":
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    else:
        scale = math.sqrt(gh * gw / n**2) if family == "msn" else ((gh + 0.1) / n, (gw + 0.1) / n)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
    if patch_pos.shape[-2:] != (gh, gw):
        # Only msn's rule can miss: it has no offset against rounding down and is isotropic,
        # so the official code fails on such grids too (e.g. non-square images).
        raise UserError(
            f"the {family} positional-embedding rule resamples the {n}x{n} grid to "
            f"{tuple(patch_pos.shape[-2:])}, not to the image's {gh}x{gw} patch grid; use another image size"
        )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _init_linears(blocks):
    """timm's ViT init of the blocks' linear layers: truncated normal weights (std 0.02), zero biases."""
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


class FrozenBackbone(nn.Module):
    """What every backbone shares: its identity, the frozen contract and the image checks.

    forward(images [B, 3, H, W]) -> patch tokens [B, (H/p)*(W/p), dim]: the final LayerNorm of
    every token, the class token and any register / storage tokens dropped, row-major over the
    patch grid.
    """

    def __init__(self, arch, spec):
        super().__init__()
        self.arch = arch
        self.family = spec.family
        self.patch_size = spec.patch
        self.embed_dim = spec.dim
        self.pretrain_grid = spec.pretrain_grid
        self.extra_tokens = spec.extra_tokens

    def train(self, mode=True):
        """Stay in eval mode whatever is asked: the backbone is a frozen feature extractor."""
        return super().train(False)

    def _freeze(self):
        self.requires_grad_(False)
        self.train(False)

    def _grid(self, images):
        """The (rows, columns) patch grid of an image batch, refusing what the model cannot take."""
        if images.ndim != 4:
            raise ValueError(f"{self.arch} expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"{self.arch} needs image sides that are multiples of its patch size {p}, got {height}x{width}"
            )
        return height // p, width // p


class ViTBackbone(FrozenBackbone):
    """A frozen ViT with a learned positional embedding (dino, dinov2, dinov2_reg, ibot, msn, mae) whose
    parameter names are those of the release state dicts. DINOv2 with registers inserts its 4 register
    tokens after the class token once the positional embedding is added, so they carry none.
    """

    def __init__(self, arch, spec, num_heads):
        super().__init__(arch, spec)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # timm names DINOv2's layer scale `ls1.gamma` / `ls2.gamma`, as the release does; the
        # value here is only the random init, a release's gammas replace it.
        layer_scale = 1.0 if spec.family in ("dinov2", "dinov2_reg") else None
        self.patch_embed = PatchEmbed(
            img_size=spec.patch * spec.pretrain_grid, patch_size=spec.patch, embed_dim=spec.dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, spec.extra_tokens, spec.dim)) if spec.extra_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pretrain_grid**2, spec.dim))
        self.blocks = nn.Sequential(*[
            Block(spec.dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=layer_scale, norm_layer=norm_layer)
            for _ in range(spec.depth)
        ])
        self.norm = norm_layer(spec.dim)
        self._init_weights()
        self._freeze()

    def _init_weights(self):
        # timm's ViT init; only the demo and tests run on it, real runs load a release.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        _init_linears(self.blocks)

    def forward(self, images):
        grid = self._grid(images)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + resample_pos_embed(self.pos_embed, grid, self.pretrain_grid, self.family).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        x = self.norm(self.blocks(x))
        return x[:, 1 + self.extra_tokens:]


# --- DINOv3: rotary position embedding, masked key bias, storage tokens -----------------------------------

ROPE_BASE = 100.0  # the hub models' pos_embed_rope_base


def rope_periods(head_dim, base=ROPE_BASE):
    """DINOv3's RoPE periods [head_dim / 4]: base^(2i / (head_dim / 2)). A release stores them as the
    buffer `rope_embed.periods`, and the stored values are the ones used; this only initialises a
    random model (and the stand-in files)."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def key_bias_mask(dim):
    """DINOv3's `attn.qkv.bias_mask` [3 dim] as its init sets it: 1, with 0 over the key third, so the
    keys get no bias. A release stores the mask, and the stored values are the ones used."""
    mask = torch.ones(3 * dim)
    mask[dim:2 * dim] = 0
    return mask


class RopeEmbedding(nn.Module):
    """The sines and cosines of DINOv3's 2-D RoPE for a patch grid (its RopePositionEmbedding in eval
    mode, normalize_coords "separate"): patch centres at (i + 0.5) / side per axis, mapped to [-1, 1],
    angles 2π·coordinate / period, the row angles then the column angles, the whole repeated twice to
    cover a head. Computed in float32, as the hub models' pos_embed_rope_dtype fp32 says."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim))

    def forward(self, grid):
        rows, cols = grid
        options = {"device": self.periods.device, "dtype": torch.float32}
        coords_h = torch.arange(0.5, rows, **options) / rows
        coords_w = torch.arange(0.5, cols, **options) / cols
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x, sin, cos, prefix):
    """x [B, heads, N, head_dim] with RoPE applied to its tokens after the first `prefix` (the class and
    storage tokens carry no position), in float32 and cast back, as DINOv3 does."""
    rotated = x[:, :, prefix:].float()
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat([x[:, :, :prefix], rotated.to(x.dtype)], dim=2)


class MaskedKeyBiasLinear(nn.Linear):
    """DINOv3's qkv projection: its bias is multiplied by the stored `bias_mask` (0 over the keys)."""

    def __init__(self, dim):
        super().__init__(dim, 3 * dim)
        self.register_buffer("bias_mask", key_bias_mask(dim))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class RopeAttention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys, one scaled_dot_product_attention call."""

    def __init__(self, dim, num_heads, prefix):
        super().__init__()
        self.num_heads, self.prefix = num_heads, prefix
        self.qkv = MaskedKeyBiasLinear(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        sin, cos = rope
        q, k = apply_rope(q, sin, cos, self.prefix), apply_rope(k, sin, cos, self.prefix)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class SwiGLU(nn.Module):
    """DINOv3's SwiGLU FFN: w3(silu(w1 x) · w2 x); hidden width 2/3 of dim·ratio, rounded up to 8."""

    def __init__(self, dim, ratio):
        super().__init__()
        hidden = int(dim * ratio * 2 / 3)
        hidden += -hidden % 8
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


SWIGLU_RATIO = 6.0  # the plus archs' ffn_ratio

# DINOv3's LayerNorms (its "layernormbf16") take eps 1e-5, not DINOv2's 1e-6.
DINOV3_NORM = partial(nn.LayerNorm, eps=1e-5)


class RopeBlock(nn.Module):
    """A DINOv3 block: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)), with the release's names."""

    def __init__(self, dim, num_heads, prefix, ffn):
        super().__init__()
        self.norm1 = DINOV3_NORM(dim)
        self.attn = RopeAttention(dim, num_heads, prefix)
        self.ls1 = LayerScale(dim)
        self.norm2 = DINOV3_NORM(dim)
        self.mlp = SwiGLU(dim, SWIGLU_RATIO) if ffn == "swiglu" else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeViTBackbone(FrozenBackbone):
    """DINOv3's ViT (facebookresearch/dinov3 DinoVisionTransformer, as its hub models build it), with the
    release's names: no positional embedding, RoPE in every block, a class token and 4 storage tokens
    before the patch tokens. Its `mask_token` serves masked pretraining only and is not part of it."""

    def __init__(self, arch, spec):
        super().__init__(arch, spec)
        prefix = 1 + spec.extra_tokens
        self.patch_embed = PatchEmbed(img_size=None, patch_size=spec.patch, embed_dim=spec.dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, spec.extra_tokens, spec.dim))
        self.rope_embed = RopeEmbedding(spec.dim // spec.heads)
        self.blocks = nn.ModuleList([RopeBlock(spec.dim, spec.heads, prefix, spec.ffn) for _ in range(spec.depth)])
        self.norm = DINOV3_NORM(spec.dim)
        self._init_weights()
        self._freeze()

    def _init_weights(self):
        # DINOv3's init (the release replaces it); only the demo and tests run on it.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        _init_linears(self.blocks)

    def forward(self, images):
        grid = self._grid(images)
        x = self.patch_embed(images)
        # Concatenated as they are: under autocast the float32 tokens promote the sequence to float32,
        # so the residual stream stays float32 as in the official code.
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1)
        x = torch.cat([prefix.expand(len(x), -1, -1), x], dim=1)
        rope = self.rope_embed(grid)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)[:, 1 + self.extra_tokens:]


def build_backbone(arch, dino_small_heads=12):
    """A randomly initialised, frozen backbone of `arch` (a key of ARCHS).

    dino_small_heads: attention heads of the DINO ViT-S archs. DINO defines ViT-S with 6 heads,
    but the official CAUSE code builds it with 12 (its model file copies the ViT-B settings),
    and the paper's S/8 and S/16 numbers and released CAUSE heads come from that 12-head model.
    The weights' shapes do not depend on the head count, so a DINO release loads either way,
    but the features differ. Default 12 reproduces CAUSE; 6 is DINO's own definition.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(sorted(ARCHS))}")
    if dino_small_heads not in (6, 12):
        raise ValueError(f"dino_small_heads must be 6 (DINO's ViT-S) or 12 (official CAUSE), got {dino_small_heads}")
    spec = ARCHS[arch]
    if spec.family == "dinov3":
        return RopeViTBackbone(arch, spec)
    heads = dino_small_heads if spec.family == "dino" and spec.dim == 384 else spec.heads
    return ViTBackbone(arch, spec, heads)
