"""Colour palettes and the prediction pictures of the test step and predict.py (docs/cause.md §6)."""
from pathlib import Path

import numpy as np
import torch

from loader.transforms import denormalize
from utils.runtime.io import save_png

# The official Cityscapes colours of the 27 evaluated classes, then black.
_CITYSCAPES = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32), (0, 0, 0),
)
# PriMaPs' colours of Potsdam-3's road, building and vegetation, then black.
_POTSDAM = ((58, 0, 68), (0, 130, 122), (255, 230, 0), (0, 0, 0))


def _pascal():
    """The PASCAL VOC colormap: the bits of the label index interleaved over R, G, B."""
    colormap = np.zeros((512, 3), dtype=np.int64)
    index = np.arange(512)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colormap[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colormap.astype(np.uint8)


def palette(name):
    """uint8 [C,3] colours: "pascal" (512 entries), "cityscapes" (27 classes + black) or "potsdam" (3 + black)."""
    if name == "pascal":
        return _pascal()
    if name == "cityscapes":
        return np.array(_CITYSCAPES, dtype=np.uint8)
    if name == "potsdam":
        return np.array(_POTSDAM, dtype=np.uint8)
    raise ValueError(f"unknown palette {name!r}: use 'pascal', 'cityscapes' or 'potsdam'")


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(label_map, name):
    """[H,W] integer labels -> uint8 [H,W,3]; negative labels (ignore) are black."""
    labels = _numpy(label_map).astype(np.int64)
    colours = palette(name)
    if labels.max(initial=-1) >= len(colours):
        raise ValueError(f"label {labels.max()} has no colour in the {name} palette ({len(colours)} colours)")
    out = colours[np.clip(labels, 0, None)]
    out[labels < 0] = 0
    return out


def image_to_rgb(image):
    """Normalised [3,H,W] tensor -> uint8 [H,W,3] RGB, rounded and clipped for display."""
    rgb = denormalize(image.detach().float().cpu()).permute(1, 2, 0).numpy()
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def prediction_pictures(image, label, raw_pred, crf_pred, palette_name):
    """{folder: uint8 picture} of one image: the image, its labels, the cluster maps without and with CRF."""
    return {
        "imgs": image_to_rgb(image),
        "labels": colorize(label, palette_name),
        "raw": colorize(raw_pred, palette_name),
        "crf": colorize(crf_pred, palette_name),
    }


def save_pictures(out_dir, index, pictures):
    """Write out_dir/<folder>/<index>.png for each {folder: uint8 picture}, each whole or not at all."""
    for folder, picture in pictures.items():
        save_png(picture, Path(out_dir) / folder / f"{index}.png")
