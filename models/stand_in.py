"""Deterministic stand-in weights for every backbone arch, in each family's release layout.

No pretrained weights can be downloaded where the tests and the demo run, so they use files made
here. The rule is the one the golden numbers were computed with (tests/golden/README.md), so a
stand-in loaded by this project must give the golden tokens:

  for each key of the backbone's own state dict (before any release wrapper or `module.` prefix),
  x = numpy Generator(PCG64(crc32(key))).standard_normal(shape) as float32, then
  LayerNorm weights (`norm1`, `norm2`, the final `norm`) 1 + 0.1·x, layer-scale gammas 0.5 + 0.1·x,
  everything else 0.02·x;
  except DINOv3's two buffers, which a release holds as its init computes them: `rope_embed.periods`
  (vit.rope_periods) and each block's `attn.qkv.bias_mask` (vit.key_bias_mask).

Seeding per key makes every tensor independent of the others and of the torch version.

The tests' stand-in STEGO, HP and PriMaPs files (tests/stand_ins.py, docs/sota.md §4) follow the same rule.
"""
import zlib

import numpy as np
import torch

from .checkpoints import WRAPPERS
from .registry import ARCHS
from .vit import build_backbone, key_bias_mask, rope_periods

_NORM_WEIGHTS = ("norm1.weight", "norm2.weight", "norm.weight")


def stand_in_tensor(key, shape):
    """The stand-in value of one state-dict entry (float32 CPU tensor)."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    x = rng.standard_normal(tuple(shape)).astype(np.float32)
    if key.endswith(_NORM_WEIGHTS):
        x = np.float32(1.0) + np.float32(0.1) * x
    elif key.endswith("gamma"):
        x = np.float32(0.5) + np.float32(0.1) * x
    else:
        x = np.float32(0.02) * x
    return torch.from_numpy(x)


def release_keys(arch):
    """{key: shape} of what `arch`'s release file holds for the backbone: the model's own entries,
    plus the mask token of DINOv2 (with or without registers) and DINOv3, which the release carries and
    the model drops on loading."""
    with torch.device("meta"):
        backbone = build_backbone(arch)
    keys = {name: tuple(tensor.shape) for name, tensor in backbone.state_dict().items()}
    if ARCHS[arch].family in ("dinov2", "dinov2_reg", "dinov3"):
        keys["mask_token"] = (1, ARCHS[arch].dim)
    return keys


def _computed(key, arch):
    """DINOv3's two buffers are not drawn: a release holds what its init computes (the RoPE periods,
    the key-bias mask), and so does the stand-in."""
    spec = ARCHS[arch]
    if key == "rope_embed.periods":
        return rope_periods(spec.dim // spec.heads)
    if key.endswith("attn.qkv.bias_mask"):
        return key_bias_mask(spec.dim)
    return None


def stand_in_state_dict(arch):
    """The stand-in backbone state dict of `arch` (release key names, before any wrapper)."""
    state = {}
    for key, shape in release_keys(arch).items():
        computed = _computed(key, arch) if ARCHS[arch].family == "dinov3" else None
        state[key] = stand_in_tensor(key, shape) if computed is None else computed
    return state


def stand_in_release(arch):
    """The object a release file of `arch` holds, filled with stand-in weights (torch.save it)."""
    family = ARCHS[arch].family
    state = stand_in_state_dict(arch)
    if family == "msn":  # saved from DistributedDataParallel: every key carries `module.`
        state = {"module." + key: tensor for key, tensor in state.items()}
    wrapper = WRAPPERS.get(family)
    return {wrapper: state} if wrapper else state
