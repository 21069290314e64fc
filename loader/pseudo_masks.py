"""PriMaPs' cached pseudo masks (docs/primaps.md §1): one 8-bit PNG per training image, read with its item."""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from loader.layouts import DataError


def read_mask(path, resolution):
    """The uint8 [res, res] mask stored in `path`, or None when it is absent, cannot be decoded in
    full (a truncated or damaged file) or is not a res×res 8-bit image: a mask to compute again."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode != "L" or picture.size != (resolution, resolution):
                return None
            return np.array(picture)
    except (OSError, SyntaxError, ValueError):  # FileNotFoundError included; PIL's decoding errors
        return None


class WithMasks(Dataset):
    """The items of a SegmentationDataset with their cached pseudo mask: "mask" uint8 [res, res]
    (mask ids 1..N, 255 where no mask is), mask_files[i] holding item i's."""

    def __init__(self, dataset, mask_files):
        if len(mask_files) != len(dataset):
            raise ValueError(f"{len(mask_files)} mask files for {len(dataset)} items")
        self.dataset = dataset
        self.mask_files = list(mask_files)
        self.resolution = dataset.resize.resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        mask = read_mask(self.mask_files[index], self.resolution)
        if mask is None:  # checked before training: only a file damaged since then gets here
            raise DataError(f"pseudo mask {self.mask_files[index]} is missing or damaged; run the step again to "
                            f"compute it anew")
        item["mask"] = torch.from_numpy(mask)
        return item

    def empty_batch(self):
        batch = self.dataset.empty_batch()
        batch["mask"] = torch.zeros(0, self.resolution, self.resolution, dtype=torch.uint8)
        return batch
