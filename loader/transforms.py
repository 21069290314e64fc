"""Resizing of image/label pairs and image normalisation (SPEC §2).

Both the image and its label are resized with nearest-neighbour sampling on PIL images,
through torchvision's functional ops, so the pixel grid matches the official transforms
exactly (torchvision's shorter-side rule `long = int(res * long / short)` and its
centre-crop offset `int(round((size - res) / 2))`).
"""
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResizePair:
    """Resize an (image, label) pair of PIL images to `resolution`×`resolution`.

    square=True stretches to res×res (Pascal VOC); otherwise the shorter side becomes
    res and the centre res×res is kept (COCO, Cityscapes).
    """

    def __init__(self, resolution, square):
        self.resolution = int(resolution)
        self.square = square

    def __call__(self, image, label):
        return self._one(image), self._one(label)

    def _one(self, picture):
        res = self.resolution
        if self.square:
            return TF.resize(picture, [res, res], interpolation=InterpolationMode.NEAREST)
        picture = TF.resize(picture, [res], interpolation=InterpolationMode.NEAREST)
        return TF.center_crop(picture, [res, res])


def normalise(image):
    """PIL RGB image -> float32 [3,H,W] tensor in [0,1], then ImageNet mean/std normalised."""
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)

