"""The backbone archs CAUSE runs on (docs/cause.md §1) and how a checkpoint file names its arch."""
from dataclasses import dataclass
from pathlib import Path

from errors import UserError

from .releases import OFFICIAL_FILE_NAMES

FAMILIES = ("dino", "dinov2", "dinov2_reg", "dinov3", "ibot", "msn", "mae")
# The families whose token sequence holds 4 extra tokens after the class token: DINOv2's registers
# (`register_tokens`), DINOv3's storage tokens (`storage_tokens`). Both are dropped from the output.
EXTRA_TOKENS = {"dinov2_reg": 4, "dinov3": 4}


class CheckpointError(UserError):
    """A backbone checkpoint that cannot be identified or does not fit its arch."""


@dataclass(frozen=True)
class ArchSpec:
    family: str
    patch: int
    dim: int
    heads: int
    pretrain_grid: int  # side of the patch grid the stored positional embedding was trained on; 0: none (RoPE)
    depth: int = 12
    ffn: str = "mlp"  # "mlp" (fc1, GELU, fc2) or "swiglu" (DINOv3's plus archs: w1, w2, w3)

    @property
    def extra_tokens(self):
        """Tokens between the class token and the patch tokens (registers, storage tokens)."""
        return EXTRA_TOKENS.get(self.family, 0)


ARCHS = {
    # DINO ViT-S: 12 heads as the official CAUSE code builds it; see build_backbone's dino_small_heads.
    "dino_vit_small_8": ArchSpec("dino", 8, 384, 12, 28),
    "dino_vit_small_16": ArchSpec("dino", 16, 384, 12, 14),
    "dino_vit_base_8": ArchSpec("dino", 8, 768, 12, 28),
    "dino_vit_base_16": ArchSpec("dino", 16, 768, 12, 14),
    # The shape of DINO's ViT-Tiny. DINO released no weights for it: it is a small stand-in
    # that the demo and the tests initialise at random, never a pretrained backbone.
    "dino_vit_tiny_8": ArchSpec("dino", 8, 192, 3, 28),
    "dino_vit_tiny_16": ArchSpec("dino", 16, 192, 3, 14),
    "dinov2_vit_small_14": ArchSpec("dinov2", 14, 384, 6, 37),
    "dinov2_vit_base_14": ArchSpec("dinov2", 14, 768, 12, 37),
    # DINOv2 with registers (dinov2_vit{s,b}14_reg4_pretrain.pth): DINOv2 plus 4 register tokens, and its
    # positional embedding resampled by output size with antialiasing (vit.resample_pos_embed).
    "dinov2_reg_vit_small_14": ArchSpec("dinov2_reg", 14, 384, 6, 37),
    "dinov2_reg_vit_base_14": ArchSpec("dinov2_reg", 14, 768, 12, 37),
    # DINOv3 (facebookresearch/dinov3 hub: dinov3_vits16, _vits16plus, _vitb16, _vitl16, LVD-1689M
    # weights): RoPE instead of a stored positional embedding, 4 storage tokens, 64-wide heads; the S+
    # arch's FFN is a SwiGLU of hidden width 6·384·2/3 = 1536.
    "dinov3_vit_small_16": ArchSpec("dinov3", 16, 384, 6, 0),
    "dinov3_vit_small_plus_16": ArchSpec("dinov3", 16, 384, 6, 0, ffn="swiglu"),
    "dinov3_vit_base_16": ArchSpec("dinov3", 16, 768, 12, 0),
    "dinov3_vit_large_16": ArchSpec("dinov3", 16, 1024, 16, 0, depth=24),
    "ibot_vit_small_16": ArchSpec("ibot", 16, 384, 6, 14),
    "ibot_vit_base_16": ArchSpec("ibot", 16, 768, 12, 14),
    "msn_vit_small_16": ArchSpec("msn", 16, 384, 6, 14),
    "msn_vit_base_16": ArchSpec("msn", 16, 768, 12, 14),
    "mae_vit_base_16": ArchSpec("mae", 16, 768, 12, 14),
}


# How other code bases name these archs (docs/sota.md §1, §3b).
# DINO's vision_transformer.py names its ViTs by width (STEGO's and HP's cfg `model_type`; official STEGO
# and HP build only vit_small and vit_base; vit_tiny is what the ViT-Tiny stand-ins name themselves).
DINO_MODEL_TYPES = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
# PriMaPs' --backbone-arch, a torch.hub name without the patch, -> this project's arch without it;
# dino_vitt names the ViT-Tiny stand-ins (no hub model has it).
PRIMAPS_BACKBONES = {"dino_vitt": "dino_vit_tiny", "dino_vits": "dino_vit_small", "dino_vitb": "dino_vit_base",
                     "dinov2_vits": "dinov2_vit_small", "dinov2_vitb": "dinov2_vit_base"}


def resolve_arch(ckpt_path, arch=None):
    """The arch of a backbone checkpoint: `arch` when given, else the file's stem, or the arch whose
    official file name it has (releases.OFFICIAL_FILE_NAMES: DINOv2 with registers, DINOv3).

    The official scripts name release files `checkpoint/<arch>.pth`, so the stem is the arch;
    `arch` (the --arch option) covers files named otherwise.
    """
    known = ", ".join(sorted(ARCHS))
    if arch is not None:
        if arch not in ARCHS:
            raise CheckpointError(f"unknown arch {arch!r}; known archs: {known}")
        return arch
    stem = Path(ckpt_path).stem
    official = {name: arch for arch, name in OFFICIAL_FILE_NAMES.items()}.get(Path(ckpt_path).name)
    if official is not None:
        return official
    if stem not in ARCHS:
        raise CheckpointError(
            f"cannot tell the arch of {ckpt_path}: its file name {stem!r} is not a known arch. "
            f"Name the file <arch>.pth (or its official name, for DINOv2 with registers and DINOv3) or pass "
            f"--arch <arch>; known archs: {known}"
        )
    return stem
