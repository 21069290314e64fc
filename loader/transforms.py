"""Resizing of image/label pairs, and ImageNet normalisation both ways (docs/cause.md §2, §6).

Both the image and its label are resized with nearest-neighbour sampling on PIL images,
through torchvision's functional ops, so the pixel grid matches the official transforms
exactly (torchvision's shorter-side rule `long = int(res * long / short)` and its
centre-crop offset `int(round((size - res) / 2))`).
"""
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResizePair:
    """Resize an (image, label) pair of PIL images to `resolution`×`resolution`.

    square=True stretches to res×res (Pascal VOC); otherwise the shorter side becomes
    res and the centre res×res is kept (COCO, Cityscapes, Potsdam).
    """

    def __init__(self, resolution, square):
        self.resolution = int(resolution)
        self.square = square

    def __call__(self, image, label):
        return self.one(image), self.one(label)

    def one(self, picture):
        res = self.resolution
        if self.square:
            return TF.resize(picture, [res, res], interpolation=InterpolationMode.NEAREST)
        picture = TF.resize(picture, [res], interpolation=InterpolationMode.NEAREST)
        return TF.center_crop(picture, [res, res])


def normalise(image):
    """PIL RGB image -> float32 [3,H,W] tensor in [0,1], then ImageNet mean/std normalised."""
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(image):
    """Undo ImageNet normalisation of a [3,H,W] tensor.

    Written as torchvision's two Normalize steps (divide by 1/std, subtract -mean) rather
    than x*std + mean, so that the CRF's 8-bit image is bit-identical to the official one.
    """
    inv_std = torch.tensor([1 / s for s in IMAGENET_STD], dtype=image.dtype, device=image.device)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)
    return image / inv_std[:, None, None] + mean[:, None, None]
