"""Backbone release files: read them, convert each release layout to ViTBackbone's names, load strictly.

Each family's release has its own layout (docs/cause.md §1); one pure converter per layout turns the
file's object into a state dict with ViTBackbone's names, dropping by rule the keys the backbone
never uses. Whatever is still missing, unexpected or misshapen after that is refused: a wrong or
mislabelled file must not load half its weights silently, as the official strict=False loading does.
"""
from collections.abc import Mapping
from pathlib import Path

import torch

from .registry import ARCHS, CheckpointError, resolve_arch
from .safe_load import safe_load
from .vit import build_backbone

# What each family's release file holds at its top level.
LAYOUTS = {
    "dino": "a flat state_dict {name: tensor}",
    "dinov2": "a flat state_dict {name: tensor}",
    "dinov2_reg": "a flat state_dict {name: tensor} with register_tokens",
    "dinov3": "a flat state_dict {name: tensor} with storage_tokens and rope_embed.periods",
    "ibot": "{'state_dict': state_dict}",
    "msn": "{'target_encoder': {'module.' + name: tensor}}",
    "mae": "{'model': state_dict}",
}
# The top-level key holding the state dict, for the releases that wrap it.
WRAPPERS = {"ibot": "state_dict", "msn": "target_encoder", "mae": "model"}

# Name prefixes of release keys the backbone never uses, per family. Only these are dropped.
UNUSED_KEYS = {
    "dino": ("head.",),  # a classifier or projection head saved with the backbone
    "dinov2": ("mask_token", "head."),  # masked-image-modelling token, used only in pretraining
    "dinov2_reg": ("mask_token", "head."),
    "dinov3": ("mask_token",),  # the hub model's own mask token; it loads strictly with nothing else
    "ibot": ("masked_embed", "head.", "fc_norm."),  # MIM token; classifier head and its pooled-token norm
    "msn": ("fc.", "prototypes"),  # projection head and prototypes of the MSN objective
    "mae": ("decoder_", "mask_token", "head.", "fc_norm."),  # pixel decoder and its mask token; classifier
}


def _describe(obj):
    """A short account of a loaded object's layout, naming the family whose layout it is."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a flat state_dict of {len(obj)} tensors (the dino/dinov2/dinov2_reg/dinov3 layout)"
    keys = sorted(map(str, obj))
    text = f"a dict with keys {keys[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    for family, key in WRAPPERS.items():
        if isinstance(obj.get(key), Mapping):
            return f"{text} (the {family} layout)"
    return text


def _state_dict(obj, family):
    """The tensors that `obj`, in `family`'s release layout, holds; CheckpointError for any other layout."""
    key = WRAPPERS.get(family)
    sd = obj.get(key) if key is not None and isinstance(obj, Mapping) else obj
    if not (isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"{family} release files hold {LAYOUTS[family]}, but this file holds {_describe(obj)}")
    return dict(sd)


def _drop_unused(sd, family):
    return {k: v for k, v in sd.items() if not k.startswith(UNUSED_KEYS[family])}


def convert_dino(obj):
    """DINO release (dino_deit*/dino_vitbase*_pretrain.pth): a flat state dict already in timm's names."""
    return _drop_unused(_state_dict(obj, "dino"), "dino")


def convert_dinov2(obj):
    """DINOv2 release: a flat state dict. Its layer scale is `blocks.i.ls1.gamma`/`ls2.gamma`,
    the names timm's Block uses too, so nothing is renamed."""
    return _drop_unused(_state_dict(obj, "dinov2"), "dinov2")


def convert_dinov2_reg(obj):
    """DINOv2-with-registers release (dinov2_vit{s,b}14_reg4_pretrain.pth): DINOv2's flat state dict and
    `register_tokens` [1, 4, dim]; nothing is renamed."""
    return _drop_unused(_state_dict(obj, "dinov2_reg"), "dinov2_reg")


def convert_dinov3(obj):
    """DINOv3 release (dinov3_vit*16*_pretrain_lvd1689m-*.pth): the flat state dict the hub model loads
    strictly, in RopeViTBackbone's names already (`attn.qkv.bias_mask` and `rope_embed.periods` are
    buffers the model reads)."""
    return _drop_unused(_state_dict(obj, "dinov3"), "dinov3")


def convert_ibot(obj):
    """iBOT release (checkpoint_teacher.pth): {'state_dict': state dict}."""
    return _drop_unused(_state_dict(obj, "ibot"), "ibot")


def convert_msn(obj):
    """MSN release: the target encoder, saved from DistributedDataParallel with `module.` names."""
    sd = _state_dict(obj, "msn")
    return _drop_unused({k.removeprefix("module."): v for k, v in sd.items()}, "msn")


def convert_mae(obj):
    """MAE release: {'model': state dict}, with the pixel decoder in the visualisation files."""
    return _drop_unused(_state_dict(obj, "mae"), "mae")


CONVERTERS = {
    "dino": convert_dino,
    "dinov2": convert_dinov2,
    "dinov2_reg": convert_dinov2_reg,
    "dinov3": convert_dinov3,
    "ibot": convert_ibot,
    "msn": convert_msn,
    "mae": convert_mae,
}


def convert_checkpoint(family, obj):
    """ViTBackbone's state dict from the object a `family` release file holds."""
    if family not in CONVERTERS:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {tuple(CONVERTERS)}")
    return CONVERTERS[family](obj)


def _first(what, items, shown=5):
    listed = ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")
    return f"{len(items)} {what} ({listed})"


def _check_fits(sd, backbone, path):
    """Strict loading's checks, with a message that says what to look at."""
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    problems = [_first(what, items) for what, items in found if items]
    if problems:
        family = backbone.family
        raise CheckpointError(
            f"{path} does not fit {backbone.arch} ({family} family): {'; '.join(problems)}. "
            f"{family} release files hold {LAYOUTS[family]}; of the keys a release carries beyond the backbone "
            f"only those starting with {UNUSED_KEYS[family]} are dropped. Check the file or pass the right --arch."
        )


def load_backbone(ckpt_path, arch=None, dino_small_heads=12):
    """The frozen backbone with the weights of a release file.

    arch: the file's arch when its name is not `<arch>.pth`. dino_small_heads: see build_backbone.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"backbone checkpoint {path} not found; release files are expected at checkpoint/<arch>.pth, "
            f"e.g. checkpoint/dino_vit_base_8.pth"
        )
    arch = resolve_arch(path, arch)
    family = ARCHS[arch].family
    try:
        # safe_load: MAE releases also pickle their training options (an argparse.Namespace), which it
        # reads as a dict; a file naming anything outside its allow-list is refused, nothing in it runs.
        sd = convert_checkpoint(family, safe_load(path))
    except CheckpointError as err:
        raise CheckpointError(f"{path} cannot be the {arch} backbone: {err}") from None
    # Built on the meta device and given the file's tensors: a random init would be thrown away,
    # and takes seconds for a ViT-B. float() brings half-precision releases to the model's dtype.
    with torch.device("meta"):
        backbone = build_backbone(arch, dino_small_heads)
    _check_fits(sd, backbone, path)
    backbone.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return backbone
