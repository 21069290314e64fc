"""The features every prediction reads: head_ema on the frozen backbone's tokens (docs/cause.md §6), or the
backbone's own tokens (PriMaPs' backbone mode), and their average with the mirrored image's.

Shared by the fine-tune step's validation, the test steps and predict.py, so that all of them
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
    return flip_averaged(lambda x: head_map(backbone, segment, x, autocast), images, flip)


def head_map(backbone, segment, images, autocast=nullcontext):
    """head_ema's features of `images` on the patch grid, [B,R,h,w] float32."""
    with autocast():
        tokens = backbone(images)
    return tokens_to_map(segment.head_ema(tokens.float()))


def backbone_map(backbone, images, autocast=nullcontext):
    """The backbone's own patch tokens as a map, [B,D,h,w] float32."""
    with autocast():
        tokens = backbone(images)
    return tokens_to_map(tokens.float())


def flip_averaged(features, images, flip=True):
    """(features(images), their mean with the mirrored image's mirrored features) for any
    features(images) -> [B,C,h,w]; the second is None without `flip`."""
    plain = features(images)
    if not flip:
        return plain, None
    mirrored = features(images.flip(-1)).flip(-1)
    return plain, (plain + mirrored) / 2


def upsample(features, size):
    """Bilinear upsampling of [B,C,h,w] features or logits to `size` (the labels' or the image's)."""
    return F.interpolate(features, size, mode="bilinear", align_corners=False)
