"""Cropped training sets (docs/cause.md §2): the crops of one image pair (the crop step writes them,
training reads them).

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

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

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
