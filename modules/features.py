"""The features every prediction reads: head_ema on the frozen backbone's tokens (SPEC §6).

Shared by the fine-tune step's validation, the test step and predict.py, so that all three
predict from the same features the same way.
"""
from contextlib import nullcontext

import torch.nn.functional as F

from modules.grid import tokens_to_map


def head_features(backbone, segment, images, flip=False, autocast=nullcontext):
    """head_ema features on the patch grid, [B,R,h,w]: (the image's, their mean with the mirrored image's).

    The second is None without `flip`. The backbone runs under `autocast`, the head in float32, as
    the official test scripts do; call under torch.no_grad().
    """
    with autocast():
        tokens = backbone(images)
    plain = tokens_to_map(segment.head_ema(tokens.float()))
    if not flip:
        return plain, None
    with autocast():
        mirrored_tokens = backbone(images.flip(-1))
    mirrored = tokens_to_map(segment.head_ema(mirrored_tokens.float())).flip(-1)
    return plain, (plain + mirrored) / 2


def upsample(features, size):
    """Bilinear upsampling of [B,C,h,w] features or logits to `size` (the labels' or the image's)."""
    return F.interpolate(features, size, mode="bilinear", align_corners=False)
