"""The backbone archs CAUSE runs on (docs/cause.md §1) and how a checkpoint file names its arch."""
from dataclasses import dataclass
from pathlib import Path

from errors import UserError

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae")


class CheckpointError(UserError):
    """A backbone checkpoint that cannot be identified or does not fit its arch."""


@dataclass(frozen=True)
class ArchSpec:
    family: str
    patch: int
    dim: int
    heads: int
    pretrain_grid: int  # side of the patch grid the stored positional embedding was trained on
    depth: int = 12


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
    """The arch of a backbone checkpoint: `arch` when given, else the file's stem.

    The official scripts name release files `checkpoint/<arch>.pth`, so the stem is the arch;
    `arch` (the --arch option) covers files named otherwise.
    """
    known = ", ".join(sorted(ARCHS))
    if arch is not None:
        if arch not in ARCHS:
            raise CheckpointError(f"unknown arch {arch!r}; known archs: {known}")
        return arch
    stem = Path(ckpt_path).stem
    if stem not in ARCHS:
        raise CheckpointError(
            f"cannot tell the arch of {ckpt_path}: its file name {stem!r} is not a known arch. "
            f"Name the file <arch>.pth or pass --arch <arch>; known archs: {known}"
        )
    return stem
