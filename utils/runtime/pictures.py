"""Colour palettes, the prediction pictures of the test step and predict.py (docs/cause.md §6), and the
figures of every evaluation: each class's IoU, and the matched confusion matrix."""
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


# The evaluation figures: drawn on their own Agg canvas (no pyplot, no display, no global state), at
# least 800 px a side, with room for every class name.
FIGURE_DPI = 100
_SMALLEST_SIDE = 8  # inches


def _class_axis_layout(n_classes):
    """(inches per class, font size of the class names): names stay readable up to COCO-171's."""
    return (0.3, 9) if n_classes <= 40 else (0.13, 5)


def per_class_iou_figure(names, ious, title):
    """Bars of each class's IoU (%), one group per class (`names`, by class id) and in it one bar per entry
    of `ious` ({legend label: [IoU or None, by class id]}; None, an IoU the split leaves undefined, gets
    no bar)."""
    step, font = _class_axis_layout(len(names))
    figure = Figure(figsize=(max(_SMALLEST_SIDE, step * len(names) + 2), 7), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    width = 0.8 / len(ious)
    for k, (label, values) in enumerate(ious.items()):
        if len(values) != len(names):
            raise ValueError(f"{label}: {len(values)} IoUs for {len(names)} classes")
        heights = [np.nan if value is None else value for value in values]
        axes.bar(positions + (k - (len(ious) - 1) / 2) * width, heights, width, label=label)
    axes.set_xticks(positions, names, rotation=90, fontsize=font)
    axes.set_xlim(-0.6, len(names) - 0.4)
    axes.set_ylim(0, 100)
    axes.set_ylabel("IoU (%) after the Hungarian matching")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def confusion_figure(names, confusion, title):
    """The matched confusion matrix: `confusion` [true class, predicted class] pixel counts, each row
    divided by its sum (a class absent from the labels: a row of zeros), class names on both axes."""
    counts = np.asarray(confusion, dtype=np.float64)
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"a confusion matrix of shape {counts.shape} for {len(names)} classes")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    step, font = _class_axis_layout(len(names))
    side = max(_SMALLEST_SIDE, step * len(names) + 3)
    figure = Figure(figsize=(side, side), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    positions = np.arange(len(names))
    axes.set_xticks(positions, names, rotation=90, fontsize=font)
    axes.set_yticks(positions, names, fontsize=font)
    axes.set_xlabel("predicted class (clusters matched to classes)")
    axes.set_ylabel("true class")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    figure.tight_layout()
    return figure


def figure_rgb(figure):
    """A figure drawn: uint8 [H,W,3]."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
