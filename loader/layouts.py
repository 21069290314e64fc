"""Where each source format keeps its files, how its labels become classes, and how a pair is read
(docs/cause.md §2, docs/primaps.md §5): one class per format, COCO-Stuff, Cityscapes, Pascal VOC and
STEGO's Potsdam. A data set (loader/datasets.py) is one of these with its own settings.

Every layout problem is reported with the file that is missing and the layout that was expected.
"""
import json
import os
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from scipy.io import loadmat
from torchvision.transforms.functional import to_pil_image

from errors import UserError
from loader.image_files import UndecodableImage, decode, to_rgb

LABEL_MAPS = Path(__file__).with_name("label_maps.json")
COCO_LIST = "Coco164kFull_Stuff_Coarse.txt"
COCO_LIST_7 = "Coco164kFull_Stuff_Coarse_7.txt"  # the cocostuff27 val subset, and PriMaPs' train list


class DataError(UserError):
    """A data file cannot be read, or holds values the data set does not have."""


class DatasetLayoutError(DataError):
    """A data set's files are not where docs/cause.md §2 puts them."""


@lru_cache(maxsize=None)
def label_maps():
    return json.loads(LABEL_MAPS.read_text())


def _require_dir(folder, what, fail):
    if not folder.is_dir():
        raise fail(f"{what} {folder} is missing.")


def require_files(paths, what, fail, hint=""):
    """All of `paths` exist; one directory listing per folder, so 100k-file lists stay fast."""
    present = {}
    missing = []
    for path in paths:
        if path.parent not in present:
            present[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if path.name not in present[path.parent]:
            missing.append(path)
    if missing:
        shown = "\n".join(f"    {path}" for path in missing[:5])
        more = f"\n    ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise fail(f"{len(missing)} of {len(paths)} {what} files are missing:\n{shown}{more}{hint}")


def _read_list(list_file, fail):
    if not list_file.is_file():
        raise fail(f"image list {list_file} is missing.")
    ids = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if line.strip():
            ids.append(_inside(line.strip(), list_file, number))
    if not ids:
        raise fail(f"image list {list_file} names no images.")
    return ids


def _inside(entry, list_file, number):
    """`entry` of an image list, refused when it leaves the data folder: an absolute path, or a ".."
    component (a link inside the data folder may lead elsewhere: a data set kept on another disk)."""
    path = PurePosixPath(entry)
    why = "an absolute path" if path.is_absolute() else "a '..' component" if ".." in path.parts else None
    if why is not None:
        raise DataError(f"{list_file}, line {number}: {entry!r} is {why}, which would read a file outside the "
                        f"data folder; an image list names image IDs (file names without extension) inside it")
    return entry


def _listed_files(list_file, image_dir, label_dir, image_suffix, label_suffix, fail):
    """Images and labels of the IDs in `list_file`, in list order."""
    ids = _read_list(list_file, fail)
    _require_dir(image_dir, "image folder", fail)
    _require_dir(label_dir, "label folder", fail)
    images = [image_dir / f"{i}{image_suffix}" for i in ids]
    labels = [label_dir / f"{i}{label_suffix}" for i in ids]
    listed = f"\n  (named by {list_file})"
    require_files(images, "image", fail, listed)
    require_files(labels, "label", fail, listed)
    return images, labels


def open_image(path, kind):
    """Open and fully decode an image (loader/image_files.decode: as predict.py reads one) so that a
    corrupt, truncated or too large file fails here, naming itself."""
    try:
        return decode(path)
    except UndecodableImage as err:
        raise DataError(f"cannot read {kind} file {path}: {err}") from err


def read_rgb(path):
    """A data set's image as 8-bit RGB, converted as predict.py converts a user's image
    (loader/image_files.to_rgb: 16-bit grayscale scaled, not clipped to white). Not turned by its
    EXIF orientation: a data set's labels are drawn on the stored pixel grid."""
    picture = open_image(path, "image")
    try:
        return to_rgb(picture)
    except ValueError as err:  # a colour mode PIL cannot convert, e.g. LAB
        raise DataError(f"cannot read image file {path}: colour mode {picture.mode} does not convert to RGB "
                        f"({err})") from err


# Label images hold one class id per pixel: 8-bit grayscale (L) or palette (P, whose indices are the
# ids, as in Pascal VOC) as stored; 1-bit (ids 0 and 1) and 16-bit or 32-bit integer grayscale (ids up
# to 255) are read as those ids.
LABEL_MODES = ("L", "P")
WIDE_LABEL_MODES = ("1", "I;16", "I;16L", "I;16B", "I;16N", "I")


def read_label(path):
    """A data set's label image as stored class ids (PIL mode L or P); DataError for an image that holds
    no class ids (colour, alpha, float) or ids over 255."""
    picture = open_image(path, "label")
    if picture.mode in LABEL_MODES:
        return picture
    if picture.mode not in WIDE_LABEL_MODES:
        raise DataError(f"label file {path} is a {picture.mode} image; expected one channel of class ids "
                        f"(an 8-bit grayscale or palette PNG: PIL mode L or P; 1-bit and 16-bit grayscale are "
                        f"read too)")
    ids = np.asarray(picture).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise DataError(f"label file {path} holds values outside 0..255 ({ids.min()}..{ids.max()})")
    return Image.fromarray(ids.astype(np.uint8), mode="L")


class Layout:
    """A source format. `files(data_dir, split, curated, fail)` -> (image files, label files) of the
    uncropped split in dataset order (`curated`: PriMaPs' curated train list where the format has one;
    `fail(problem)` makes the error to raise); `expected()`: the layout's lines for an error message;
    `lut()`: 256-entry table from stored label value to class (-1 = ignore); `read_pair(image, label)`:
    (PIL RGB image, PIL label image of stored values), decoded in full."""
    root = ""

    def read_pair(self, image_file, label_file):
        return read_rgb(image_file), read_label(label_file)


class CocoStuff(Layout):
    """COCO-Stuff in STEGO's layout: images and fine-label PNGs listed by the curated lists; classes
    through a map of the fine ids (tests/golden/label_maps.json), zero-initialised as the official
    loader's: fine ids absent from the map become class 0."""
    root = "cocostuff"
    SPLITS = {"train": "train2017", "val": "val2017"}

    def __init__(self, label_map, val_list=COCO_LIST, curated_list=COCO_LIST):
        self.label_map, self.val_list, self.curated_list = label_map, val_list, curated_list

    def list_name(self, split, curated):
        if split == "val":
            return self.val_list
        return self.curated_list if curated else COCO_LIST

    def files(self, data_dir, split, curated, fail):
        folder = self.SPLITS[split]
        base = data_dir / "cocostuff"
        return _listed_files(base / "curated" / folder / self.list_name(split, curated), base / "images" / folder,
                             base / "annotations" / folder, ".jpg", ".png", fail)

    def expected(self):
        return ["cocostuff/images/{train2017,val2017}/ID.jpg",
                "cocostuff/annotations/{train2017,val2017}/ID.png   (COCO-Stuff fine label ids, 255 = unlabelled)",
                f"cocostuff/curated/train2017/{COCO_LIST}   (one ID per line)",
                f"cocostuff/curated/val2017/{self.val_list}"]

    def lut(self):
        lut = np.zeros(256, dtype=np.int64)
        for fine, cls in label_maps()[self.label_map].items():
            lut[int(fine)] = cls
        lut[255] = -1
        return lut


class Cityscapes(Layout):
    """Cityscapes' leftImg8bit and gtFine folders; label = labelId − 7, below 0 ignored (27 classes)."""
    root = "cityscapes"

    def files(self, data_dir, split, curated, fail):
        image_dir = data_dir / "cityscapes" / "leftImg8bit" / split
        label_dir = data_dir / "cityscapes" / "gtFine" / split
        _require_dir(image_dir, "image folder", fail)
        _require_dir(label_dir, "label folder", fail)
        # Sorted by city, then file name: a fixed order (os.listdir's is not).
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"), key=lambda p: (p.parent.name, p.name))
        if not images:
            raise fail(f"no CITY/*_leftImg8bit.png images in {image_dir}.")
        labels = [label_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                  for p in images]
        require_files(labels, "label", fail)
        return images, labels

    def expected(self):
        return ["cityscapes/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png",
                "cityscapes/gtFine/{train,val}/CITY/*_gtFine_labelIds.png"]

    def lut(self):
        lut = np.arange(256, dtype=np.int64) - 7  # labelIds 0..6 are void
        lut[lut < 0] = -1
        return lut


class PascalVoc(Layout):
    """VOC 2012's JPEGImages and palette PNGs listed by ImageSets/Segmentation; values over 20 ignored."""
    root = "pascalvoc"

    def files(self, data_dir, split, curated, fail):
        voc = data_dir / "pascalvoc" / "VOCdevkit" / "VOC2012"
        return _listed_files(voc / "ImageSets" / "Segmentation" / f"{split}.txt", voc / "JPEGImages",
                             voc / "SegmentationClass", ".jpg", ".png", fail)

    def expected(self):
        return ["pascalvoc/VOCdevkit/VOC2012/JPEGImages/ID.jpg",
                "pascalvoc/VOCdevkit/VOC2012/SegmentationClass/ID.png   (palette PNG, 255 = ignore)",
                "pascalvoc/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   (one ID per line)"]

    def lut(self):
        lut = np.arange(256, dtype=np.int64)
        lut[21:] = -1  # 255 marks object borders and unlabelled pixels
        return lut


class Potsdam(Layout):
    """STEGO's Potsdam-3: MATLAB files of RGB-IR images (the first 3 channels are read) and ISPRS labels,
    listed by labelled_train.txt / labelled_test.txt; road + car, building + clutter, vegetation + tree."""
    root = "potsdam"
    LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
    TO_3 = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}  # ISPRS classes 0..5 -> Potsdam-3

    def files(self, data_dir, split, curated, fail):
        base = data_dir / "potsdam"
        return _listed_files(base / self.LISTS[split], base / "imgs", base / "gt", ".mat", ".mat", fail)

    def expected(self):
        return ["potsdam/imgs/ID.mat   (key 'img': H×W×4 RGB-IR; the first 3 channels are read)",
                "potsdam/gt/ID.mat   (key 'gt': H×W ISPRS class ids 0..5)",
                f"potsdam/{self.LISTS['train']}, potsdam/{self.LISTS['val']}   (one ID per line)"]

    def lut(self):
        lut = np.full(256, -1, dtype=np.int64)
        for fine, coarse in self.TO_3.items():
            lut[fine] = coarse
        return lut

    def read_pair(self, image_file, label_file):
        return self._image(image_file), self._label(label_file)

    @staticmethod
    def _load_mat(path, key, kind):
        """The array under `key` of a MATLAB file."""
        try:
            content = loadmat(path)
        except FileNotFoundError:
            raise
        except Exception as err:  # scipy raises several types for damaged files; all mean "unreadable"
            raise DataError(f"cannot read {kind} file {path}: {err}") from err
        if key not in content:
            found = sorted(k for k in content if not k.startswith("__"))
            raise DataError(f"{kind} file {path} has no variable {key!r} (found {found}); STEGO's Potsdam "
                            f"files hold 'img' (images) and 'gt' (labels)")
        return content[key]

    def _image(self, path):
        """RGB of an RGB-IR image, converted as the official loader does (to_pil_image of 3 channels)."""
        array = self._load_mat(path, "img", "image")
        if array.ndim != 3 or array.shape[2] < 3:
            raise DataError(f"image file {path} holds an array of shape {array.shape}; expected H×W×C with C ≥ 3")
        return to_pil_image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[:3])

    def _label(self, path):
        array = self._load_mat(path, "gt", "label")
        if array.ndim != 2:
            raise DataError(f"label file {path} holds an array of shape {array.shape}; expected H×W class ids")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"label file {path} holds values outside 0..255 ({array.min()}..{array.max()})")
        return Image.fromarray(array.astype(np.uint8))
