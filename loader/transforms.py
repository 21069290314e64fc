"""Resizing of image/label pairs, and ImageNet normalisation both ways (docs/cause.md §2, §6;
docs/primaps.md §1, §3).

Three resizings, each the official one of the code that reads the data, all through torchvision's
functional ops, so the pixel grid matches the official transforms exactly (torchvision's
shorter-side rule `long = int(res * long / short)` and its centre-crop offset
`int(round((size - res) / 2))`):

    nearest          image and label nearest-neighbour on PIL images: CAUSE's, every CAUSE step
    bilinear         image bilinear on the PIL image (PIL's filter, antialiased), label nearest on
                     PIL: PriMaPs' training images, from which its pseudo masks are made too
    tensor_bilinear  PriMaPs' evaluation: the image made a float tensor first, then resized bilinearly
                     without antialiasing (its torchvision 0.11 resized tensors so), the label nearest
                     on the tensor (torch's nearest, which picks other pixels than PIL's)
"""
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

RESIZES = ("nearest", "bilinear", "tensor_bilinear")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResizePair:
    """Resize an (image, label) pair of PIL images to `resolution`×`resolution` by `method` (RESIZES):
    (PIL image, PIL label), or with tensor_bilinear (float [3, res, res] image in [0, 1], uint8
    [res, res] label tensor).

    square=True stretches to res×res (Pascal VOC); otherwise the shorter side becomes
    res and the centre res×res is kept (COCO, Cityscapes, Potsdam).
    """

    def __init__(self, resolution, square, method="nearest"):
        if method not in RESIZES:
            raise ValueError(f"unknown resize {method!r}; expected one of {RESIZES}")
        self.resolution = int(resolution)
        self.square = square
        self.method = method

    def __call__(self, image, label):
        if self.method == "tensor_bilinear":
            image, label = TF.to_tensor(image), torch.from_numpy(np.array(label))[None]
        image_mode = InterpolationMode.NEAREST if self.method == "nearest" else InterpolationMode.BILINEAR
        image = self.one(image, image_mode)
        label = self.one(label, InterpolationMode.NEAREST)
        return (image, label[0]) if self.method == "tensor_bilinear" else (image, label)

    def one(self, picture, mode):
        res = self.resolution
        size = [res, res] if self.square else [res]
        picture = TF.resize(picture, size, interpolation=mode, antialias=self.method != "tensor_bilinear")
        return picture if self.square else TF.center_crop(picture, [res, res])


def normalise(image):
    """PIL RGB image (or its float [3,H,W] tensor in [0,1]) -> float32 tensor, ImageNet mean/std normalised."""
    tensor = image if torch.is_tensor(image) else TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(image):
    """Undo ImageNet normalisation of a [3,H,W] tensor.

    Written as torchvision's two Normalize steps (divide by 1/std, subtract -mean) rather
    than x*std + mean, so that the CRF's 8-bit image is bit-identical to the official one.
    """
    inv_std = torch.tensor([1 / s for s in IMAGENET_STD], dtype=image.dtype, device=image.device)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)
    return image / inv_std[:, None, None] + mean[:, None, None]
