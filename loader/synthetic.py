"""A small synthetic data set in the real COCO-Stuff layout (docs/cause.md §2), for the demo and tests.

Each image is a Voronoi partition into a few regions; each region shows one of K planted
classes, painted with that class's own colour and stripe texture (period and orientation)
plus a little noise, so even the patch features of a randomly initialised ViT separate
the classes. Labels are COCO-Stuff fine ids whose cocostuff27 classes are all distinct, so
the set goes through the same loading, mapping and cropping as the real one.
"""
import colorsys
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from loader.layouts import COCO_LIST, COCO_LIST_7

# Fine ids with distinct cocostuff27 classes (9, 11, 7, 23, 21, 26, 5, 3), all mapped in coco81/171 too.
PLANTED_FINE_IDS = (0, 2, 16, 105, 124, 147, 43, 61)
STRIPE_PERIODS = (5, 7, 9, 11, 13, 6, 8, 10)  # pixels


def class_colours(n_classes):
    """Evenly spaced hues, so every class differs from every other in colour."""
    return np.array([colorsys.hsv_to_rgb(c / n_classes, 0.7, 0.8) for c in range(n_classes)]) * 255


def synthetic_pair(rng, image_size, n_classes):
    """One (uint8 RGB image [S,S,3], uint8 fine-id label [S,S]) with 3-5 regions of distinct classes."""
    n_regions = min(int(rng.integers(3, 6)), n_classes)
    classes = rng.permutation(n_classes)[:n_regions]
    centres = rng.uniform(0, image_size, size=(n_regions, 2))
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    distance = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    class_map = classes[distance.argmin(-1)]

    colours = class_colours(n_classes)
    image = np.zeros((image_size, image_size, 3))
    for c in np.unique(class_map):
        angle = np.pi * c / n_classes
        phase = 2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / STRIPE_PERIODS[c]
        texture = 1 + 0.3 * np.sign(np.sin(phase))
        image[class_map == c] = (colours[c] * texture[..., None])[class_map == c]
    image += rng.normal(0, 6, size=image.shape)
    label = np.asarray(PLANTED_FINE_IDS, dtype=np.uint8)[class_map]
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_synthetic_cocostuff(data_dir, n_train=48, n_val=16, image_size=96, seed=0, n_classes=5):
    """Write data_dir/cocostuff with `n_classes` planted classes; deterministic given `seed`.

    The folder is assembled beside its final name and renamed at the end, so an interrupted
    run leaves no half-written data set behind. Returns data_dir.
    """
    if not 2 <= n_classes <= len(PLANTED_FINE_IDS):
        raise ValueError(f"n_classes must be in 2..{len(PLANTED_FINE_IDS)}, got {n_classes}")
    data_dir = Path(data_dir)
    target = data_dir / "cocostuff"
    if target.exists():
        raise FileExistsError(f"{target} already exists; the synthetic data set is only written into a fresh place")
    staging = data_dir / f".cocostuff.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    rng = np.random.default_rng(seed)
    # Distinct ids across splits, as in COCO; 12 digits like the real file names.
    splits = {"train2017": range(1, n_train + 1), "val2017": range(100001, 100001 + n_val)}
    try:
        for folder, numbers in splits.items():
            ids = [f"{number:012d}" for number in numbers]
            for kind in ("images", "annotations", "curated"):
                (staging / kind / folder).mkdir(parents=True)
            for image_id in ids:
                image, label = synthetic_pair(rng, image_size, n_classes)
                Image.fromarray(image).save(staging / "images" / folder / f"{image_id}.jpg", quality=95)
                Image.fromarray(label).save(staging / "annotations" / folder / f"{image_id}.png")
            listing = "".join(f"{image_id}\n" for image_id in ids)
            # The _7 lists: COCO-Stuff-27's val set, and the train list PriMaPs reads (docs/primaps.md §1).
            for name in (COCO_LIST, COCO_LIST_7):
                (staging / "curated" / folder / name).write_text(listing)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return data_dir
