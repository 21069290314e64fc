"""The frozen ViT backbone: timm blocks, the releases' parameter names, the official positional-embedding resampling."""
import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
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
    visibly different features. The class-token embedding is kept as is.
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
    if family == "msn":
        scale = math.sqrt(gh * gw / n**2)
    else:
        scale = ((gh + 0.1) / n, (gw + 0.1) / n)
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


class ViTBackbone(nn.Module):
    """A frozen ViT whose parameter names are those of the release state dicts.

    forward(images [B, 3, H, W]) -> patch tokens [B, (H/p)*(W/p), dim]: the final LayerNorm of
    every token, class token dropped, row-major over the patch grid.
    """

    def __init__(self, arch, spec, num_heads):
        super().__init__()
        self.arch = arch
        self.family = spec.family
        self.patch_size = spec.patch
        self.embed_dim = spec.dim
        self.pretrain_grid = spec.pretrain_grid
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # timm names DINOv2's layer scale `ls1.gamma` / `ls2.gamma`, as the release does; the
        # value here is only the random init, a release's gammas replace it.
        layer_scale = 1.0 if spec.family == "dinov2" else None
        self.patch_embed = PatchEmbed(
            img_size=spec.patch * spec.pretrain_grid, patch_size=spec.patch, embed_dim=spec.dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pretrain_grid**2, spec.dim))
        self.blocks = nn.Sequential(*[
            Block(spec.dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=layer_scale, norm_layer=norm_layer)
            for _ in range(spec.depth)
        ])
        self.norm = norm_layer(spec.dim)
        self._init_weights()
        self.requires_grad_(False)
        self.train(False)

    def _init_weights(self):
        # timm's ViT init; only the demo and tests run on it, real runs load a release.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def train(self, mode=True):
        """Stay in eval mode whatever is asked: the backbone is a frozen feature extractor."""
        return super().train(False)

    def forward(self, images):
        if images.ndim != 4:
            raise ValueError(f"{self.arch} expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"{self.arch} needs image sides that are multiples of its patch size {p}, got {height}x{width}"
            )
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, (height // p, width // p), self.pretrain_grid, self.family)
        x = self.norm(self.blocks(x + pos.to(x.dtype)))
        return x[:, 1:]


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
    heads = dino_small_heads if spec.family == "dino" and spec.dim == 384 else spec.heads
    return ViTBackbone(arch, spec, heads)
