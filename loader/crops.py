"""Cropped training sets (SPEC §2), written once by crop_dataset.py and read by training.

Each full-resolution train image and its class map are cut into fixed crops with
torchvision's five_crop / ten_crop (size [int(H·r), int(W·r)]; order tl, tr, bl, br,
centre, then the same on the horizontally flipped pair for ten_crop):

    five   five-crop at 0.5                      5 crops per image
    double ten-crop at 0.5, then at 0.8          20
    super  ten-crop at 0.3, 0.4, 0.5, 0.6, 0.7   50

Crops are numbered from 0 over the whole set in dataset order and stored as
{crop_dir}/img/train/{i}.jpg and {crop_dir}/label/train/{i}.png (class + 1, 0 = ignore).
"""
import io
import shutil
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from loader.datasets import build_source_dataset, dataset_info
from utils.io import owned_sibling, remove_abandoned_siblings

CROP_SCHEDULES = {
    "five": [(0.5, TF.five_crop)],
    "double": [(0.5, TF.ten_crop), (0.8, TF.ten_crop)],
    "super": [(ratio, TF.ten_crop) for ratio in (0.3, 0.4, 0.5, 0.6, 0.7)],
}


def crop_pair(image, label, crop_type):
    """All crops of one pair: image uint8 [H,W,3], label int64 [H,W] -> list of (image, label) arrays."""
    image_t = torch.tensor(image).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    label_t = torch.tensor(label)
    height, width = label.shape
    pairs = []
    for ratio, crop in CROP_SCHEDULES[crop_type]:
        size = [int(height * ratio), int(width * ratio)]  # the official rounding: truncation
        for image_crop, label_crop in zip(crop(image_t, size), crop(label_t, size), strict=True):
            pairs.append((image_crop.permute(1, 2, 0).numpy(), label_crop.numpy()))
    return pairs


def _encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, fmt)
    return buffer.getvalue()


class EncodedCrops(Dataset):
    """Per source image, its crops already encoded (JPEG image, PNG label), so workers do the encoding."""

    def __init__(self, source, crop_type):
        self.source = source
        self.crop_type = crop_type

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source[index]
        return [(_encode(image_crop, "JPEG"), _encode((label_crop + 1).astype(np.uint8), "PNG"))
                for image_crop, label_crop in crop_pair(np.asarray(image), label, self.crop_type)]


def _replace_dir(staging, target):
    """Rename the finished `staging` folder to `target`, replacing an older crop set there."""
    if target.exists():
        old = owned_sibling(target, "old")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def write_cropped_dataset(name, data_dir, num_workers=0, progress=True):
    """Write the cropped train set of `name` to data_dir/crop_dir and return that folder.

    The crops are written to a hidden sibling folder which is renamed to crop_dir only once
    complete, so an interrupted run never leaves a partial set that training would accept.
    """
    info = dataset_info(name)
    data_dir = Path(data_dir)
    source = build_source_dataset(name, data_dir, "train")
    target = data_dir / info.crop_dir
    for kind in ("partial", "old"):
        for path in remove_abandoned_siblings(target, kind):
            print(f"[crop] removed {path}, left by a crop run that was killed")
    staging = owned_sibling(target, "partial")
    if staging.exists():
        shutil.rmtree(staging)
    image_dir, label_dir = staging / "img" / "train", staging / "label" / "train"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    # batch_size=None: one item (all crops of one source image) at a time, in dataset order.
    loader = DataLoader(EncodedCrops(source, info.crop_type), batch_size=None, num_workers=num_workers)
    try:
        count = 0
        for crops in tqdm(loader, total=len(source), desc=f"[crop] {name}", disable=not progress):
            for jpeg, png in crops:
                (image_dir / f"{count}.jpg").write_bytes(jpeg)
                (label_dir / f"{count}.png").write_bytes(png)
                count += 1
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
