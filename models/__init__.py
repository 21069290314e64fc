"""Frozen self-supervised ViT backbones (SPEC §1): the arch registry, the model, release-file loading."""
from .checkpoints import convert_checkpoint, load_backbone
from .registry import ARCHS, FAMILIES, ArchSpec, CheckpointError, resolve_arch
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
]
