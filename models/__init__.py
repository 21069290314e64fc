"""Frozen self-supervised ViT backbones (docs/cause.md §1): the arch registry, the model, release-file loading."""
from .checkpoints import convert_checkpoint, load_backbone
from .registry import ARCHS, FAMILIES, ArchSpec, CheckpointError, resolve_arch
from .stand_in import stand_in_release, stand_in_state_dict
from .vit import build_backbone

__all__ = [
    "ARCHS",
    "ArchSpec",
    "CheckpointError",
    "FAMILIES",
    "build_backbone",
    "convert_checkpoint",
    "load_backbone",
    "resolve_arch",
    "stand_in_release",
    "stand_in_state_dict",
]
