"""PriMaPs-EM's training views (docs/primaps.md §2), made on the device from a step's uniform draws.

A horizontal flip (p 0.5) is shared by the image, its cached mask and its label. The student view
adds a Gaussian blur (kernel 21, σ ~ U[0.1, 2]), then with p 0.5 a colour jitter (applied with p
0.3: brightness, contrast, saturation ~ U[0.9, 1.1], hue ~ U[−0.1, 0.1], in a random order, as
torchvision's ColorJitter) and otherwise a grayscale (applied with p 0.1). The photometric part
acts on the image in [0, 1] and the result is normalised again: the official code jitters the
normalised tensor, where torchvision's colour operations clamp every negative value away.

Every draw is a column of `draws` [rows, VIEW_DRAWS] (BatchRandom.uniform), so one process or
several draw the same views for a global batch.

`AugmentedViews` makes a training step's views from its batch and draws; a PriMaPs-EM step takes any
object of its form (batch, random) -> Views, e.g. one holding given student views and no flip.
"""
from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF

from loader.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

FLIP, SIGMA, BRANCH, APPLY = 0, 1, 2, 3
FACTORS = slice(4, 8)  # brightness, contrast, saturation, hue
ORDER = slice(8, 12)  # sort keys: a uniformly random order of the four jitter operations
VIEW_DRAWS = 12

BLUR_KERNEL = 21
SIGMA_RANGE = (0.1, 2.0)
JITTER_BRANCH, JITTER_P, GRAY_P = 0.5, 0.3, 0.1
JITTER_STRENGTH = 0.1


def flip_rows(x, flips):
    """x [B, ..., W] with the rows where `flips` [B] is true mirrored left-right."""
    return torch.where(flips.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def _jitter(rgb, factors, order):
    strength = JITTER_STRENGTH
    brightness, contrast, saturation = (1 - strength + 2 * strength * f for f in factors[:3].tolist())
    hue = -strength + 2 * strength * factors[3].item()
    operations = (lambda x: TF.adjust_brightness(x, brightness), lambda x: TF.adjust_contrast(x, contrast),
                  lambda x: TF.adjust_saturation(x, saturation), lambda x: TF.adjust_hue(x, hue))
    for index in order.argsort().tolist():
        rgb = operations[index](rgb)
    return rgb


def student_view(images, draws):
    """Normalised images [B, 3, H, W] -> the student's views, normalised, from draws [B, VIEW_DRAWS]."""
    views = []
    for image, draw in zip(images, draws, strict=True):
        rgb = denormalize(image).clamp(0, 1)
        sigma = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * draw[SIGMA].item()
        rgb = TF.gaussian_blur(rgb, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
        if draw[BRANCH] < JITTER_BRANCH:
            if draw[APPLY] < JITTER_P:
                rgb = _jitter(rgb, draw[FACTORS], draw[ORDER])
        elif draw[APPLY] < GRAY_P:
            rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
        views.append(TF.normalize(rgb, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(views) if views else images.clone()


class Views(NamedTuple):
    """What one PriMaPs-EM step sees of its batch: the (flipped) image, label and cached mask, and the
    student view of the image, normalised."""
    image: torch.Tensor  # [B, 3, H, W]
    label: torch.Tensor  # [B, H, W]
    mask: torch.Tensor  # [B, H, W]
    student: torch.Tensor  # [B, 3, H, W]


class AugmentedViews:
    """The training views of docs/primaps.md §2 from the step's draws (a modules.randomness.BatchRandom):
    the flip shared by image, label and mask, and the student view of the flipped image."""

    def __call__(self, batch, random):
        draws = random.uniform((VIEW_DRAWS,))
        flips = draws[:, FLIP] < 0.5
        image, label, mask = (flip_rows(batch[name], flips) for name in ("img", "label", "mask"))
        return Views(image, label, mask, student_view(image, draws))
