"""The data sets of docs/cause.md §2 and docs/primaps.md §5: where their files lie, how labels become classes.

Training reads the cropped train set (loader/crops.py) where the data set has one, the
uncropped train images otherwise (Potsdam-3, and PriMaPs' pseudo masks); evaluation reads the
uncropped val set. Every layout problem is reported up front by `split_files` with the file
that is missing and the layout that was expected, so a run fails before any model is built.
"""
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from errors import UserError
from loader.archives import prepare_command
from loader.layouts import (COCO_LIST_7, Cityscapes, CocoStuff, DataError, DatasetLayoutError, Layout,
                            PascalVoc, Potsdam, label_maps, require_files)
from loader.transforms import ResizePair, normalise

SPLITS = ("train", "val")
# Which train files a step reads: the training crops where the data set has them (CAUSE), the
# uncropped train list (the crop step), or PriMaPs' list: uncropped, COCO-Stuff-27's curated subset.
TRAIN_SETS = ("crops", "images", "curated")
CLASS_NAMES = Path(__file__).with_name("class_names.json")


@dataclass(frozen=True)
class CropSet:
    """A data set's cropped training set (loader/crops.py): how it is cut and where it lies."""
    kind: str  # "five" | "double" | "super"
    folder: str  # relative to data_dir
    stego_folder: str | None = None  # STEGO's name of the same crops, read when only it exists


@dataclass(frozen=True)
class DatasetInfo:
    """The facts of one data set, in one row of DATASETS."""
    name: str
    n_classes: int
    layout: object  # its source format (loader/layouts.py)
    palette: str
    crops: CropSet | None = None  # None: training reads the images as they are
    square_resize: bool = False  # resize to res×res instead of shorter side + centre crop


DATASETS = {info.name: info for info in (
    DatasetInfo("cocostuff27", 27, CocoStuff("cocostuff27_fine_to_coarse", val_list=COCO_LIST_7,
                                             curated_list=COCO_LIST_7), "pascal",
                CropSet("five", "cocostuff/cropped/cocostuff_five_crop_0.5",
                        stego_folder="cocostuff27/cropped/cocostuff27_five_crop_0.5")),
    DatasetInfo("cityscapes", 27, Cityscapes(), "cityscapes",
                CropSet("five", "cityscapes/cropped/cityscapes_five_crop_0.5")),
    DatasetInfo("pascalvoc", 21, PascalVoc(), "pascal", CropSet("super", "pascalvoc/cropped/pascalvoc_super_crop_0"),
                square_resize=True),
    DatasetInfo("coco81", 81, CocoStuff("coco81_fine_to_class"), "pascal",
                CropSet("double", "cocostuff/cropped/coco81_double_crop_0")),
    DatasetInfo("coco171", 171, CocoStuff("coco171_fine_to_class"), "pascal",
                CropSet("double", "cocostuff/cropped/coco171_double_crop_0")),
    # STEGO's Potsdam-3 (docs/primaps.md §5): no crop step, its images are read as they are.
    DatasetInfo("potsdam3", 3, Potsdam(), "potsdam"),
)}


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def crop_command(name, data_dir):
    return f"python crop_dataset.py --dataset {name} --data_dir {data_dir}"


def expected_layout(info, data_dir):
    """The docs/cause.md §2 layout of one data set, as told to a user whose files are elsewhere."""
    crops = [] if info.crops is None else [
        f"{info.crops.folder}/{{img,label}}/train/{{0,1,...}}.{{jpg,png}}   "
        f"(training crops; make them with: {crop_command(info.name, data_dir)})"]
    lines = "\n".join(f"  {line}" for line in info.layout.expected() + crops)
    return (f"Expected layout under --data_dir {data_dir} (made from the published archives by: "
            f"{prepare_command(info.name, data_dir)}):\n{lines}")


def _layout_error(info, data_dir):
    """The error-maker for one data set: a problem, then the layout that was expected."""
    return lambda problem: DatasetLayoutError(f"{info.name}: {problem}\n{expected_layout(info, data_dir)}")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_data_dir(info, data_dir):
    data_dir = Path(data_dir)
    fail = _layout_error(info, data_dir)
    if not data_dir.is_dir():
        raise fail(f"--data_dir {data_dir} does not exist or is not a folder.")
    if not any(data_dir.iterdir()):
        raise fail(f"--data_dir {data_dir} is empty.")
    return data_dir


def existing_crop_dir(info, data_dir):
    """The cropped train set training reads: the crop folder, else STEGO's; None when neither exists."""
    if info.crops is None:
        return None
    for name in (info.crops.folder, info.crops.stego_folder):
        if name and (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    return None


def _crop_files(info, data_dir):
    """(image files, label files) of the cropped train set: {i}.jpg / {i}.png for i = 0..n-1."""
    fail = _layout_error(info, data_dir)
    root = existing_crop_dir(info, data_dir)
    remake = f"\nMake the crops with: {crop_command(info.name, data_dir)}"
    if root is None:
        root = data_dir / info.crops.folder
        stego = data_dir / info.crops.stego_folder if info.crops.stego_folder else None
        also = f" (and so is STEGO's name for it, {stego})" if stego is not None else ""
        raise fail(f"the cropped training set {root} is missing{also}.{remake}")
    image_dir, label_dir = root / "img" / "train", root / "label" / "train"
    for folder, what in ((image_dir, "crop image folder"), (label_dir, "crop label folder")):
        if not folder.is_dir():
            raise fail(f"{what} {folder} is missing.")
    count = sum(1 for name in os.listdir(image_dir) if name.endswith(".jpg"))
    if count == 0:
        raise fail(f"the crop image folder {image_dir} holds no crops.{remake}")
    images = [image_dir / f"{i}.jpg" for i in range(count)]
    labels = [label_dir / f"{i}.png" for i in range(count)]
    require_files(images, "crop image", fail, remake)
    require_files(labels, "crop label", fail, remake)
    return images, labels


def reads_crops(info, split, train_set):
    """Whether `split` read as `train_set` is the cropped training set."""
    return split == "train" and train_set == "crops" and info.crops is not None


def split_files(name, data_dir, split, train_set="crops"):
    """(image files, label files) of `split` as the steps read it (`train_set`: which train files, see
    TRAIN_SETS); listing them checks the layout: DatasetLayoutError names what is missing and the
    layout that was expected."""
    info = dataset_info(name)
    _check_split(split)
    if train_set not in TRAIN_SETS:
        raise ValueError(f"unknown train set {train_set!r}; expected one of {TRAIN_SETS}")
    data_dir = _check_data_dir(info, data_dir)
    if reads_crops(info, split, train_set):
        return _crop_files(info, data_dir)
    return info.layout.files(data_dir, split, split == "train" and train_set == "curated",
                             _layout_error(info, data_dir))


@lru_cache(maxsize=None)
def _class_name_table():
    return json.loads(CLASS_NAMES.read_text())


def class_names(name):
    """The name of each class of data set `name`, by class id (class_names.json says where each list
    comes from). coco81 and coco171 name their classes through their label maps: a class holding one
    COCO-Stuff fine id takes its name; coco81's class 0, which holds every stuff id, is "stuff"."""
    info = dataset_info(name)
    table = _class_name_table()
    if name in table:
        return list(table[name])
    members = {}
    for fine, cls in label_maps()[info.layout.label_map].items():
        if cls >= 0:
            members.setdefault(cls, []).append(int(fine))
    fine_names = table["cocostuff_fine"]
    names = []
    for cls in range(info.n_classes):
        ids = members[cls]
        names.append(fine_names[ids[0]] if len(ids) == 1 else "stuff")
    return names


# Crops store class + 1, so 0 is ignore.
CROP_LUT = np.arange(256, dtype=np.int64) - 1


class LabelledImages(Dataset):
    """Image/label file pairs, read as (PIL RGB image, int64 class map with -1 = ignore) by `read_pair`
    (the layout's, loader/layouts.py) and the stored-value-to-class table `lut`."""

    def __init__(self, name, image_files, label_files, lut, n_classes, read_pair):
        self.name = name
        self.image_files = list(image_files)
        self.label_files = list(label_files)
        self.lut = lut
        self.n_classes = n_classes
        self.read_pair = read_pair

    def __len__(self):
        return len(self.image_files)

    def __getitem__(self, index):
        return self.read(index)

    def read(self, index, resize=None):
        """The pair at `index`; `resize` acts on the stored label values, before they become classes
        (nearest-neighbour resampling commutes with the mapping, and PIL cannot hold -1)."""
        image_file, label_file = self.image_files[index], self.label_files[index]
        image, label = self.read_pair(image_file, label_file)
        if image.size != label.size:
            raise DataError(f"image {image_file} is {image.size[0]}×{image.size[1]} but its label "
                            f"{label_file} is {label.size[0]}×{label.size[1]}")
        # Checked at full resolution, so a bad value fails whatever pixels the resize keeps.
        stored = self._checked(np.asarray(label), label_file)
        if resize is not None:
            image, label = resize(image, label)
            stored = label.numpy() if torch.is_tensor(label) else np.asarray(label)
        return image, self.lut[stored]

    def _checked(self, stored, label_file):
        if stored.ndim != 2:
            raise DataError(f"label file {label_file} must be single-channel (class ids), got shape {stored.shape}")
        if stored.size and (stored.min() < 0 or stored.max() > 255):
            raise DataError(f"label file {label_file} holds values outside 0..255 "
                            f"({stored.min()}..{stored.max()})")
        too_big = self.lut[stored] >= self.n_classes
        if too_big.any():
            values = np.unique(stored[too_big])
            raise DataError(f"label file {label_file} holds value(s) {values[:5].tolist()} that map to class(es) "
                            f"{self.lut[values[:5]].tolist()}, but {self.name} has "
                            f"{self.n_classes} classes (0..{self.n_classes - 1})")
        return stored


class SegmentationDataset(Dataset):
    """Items {"ind", "img" [3,res,res] normalised, "label" [res,res] int64} as the steps read them,
    resized by `resize` (loader/transforms.RESIZES)."""

    def __init__(self, source, resolution, square, resize="nearest"):
        self.source = source
        self.resize = ResizePair(resolution, square, resize)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source.read(index, self.resize)
        return {"ind": index, "img": normalise(image), "label": torch.from_numpy(label)}

    def empty_batch(self):
        """A batch of no items, with the shapes a batch of this data set has (see loader.samplers)."""
        res = self.resize.resolution
        return {"ind": torch.zeros(0, dtype=torch.int64), "img": torch.zeros(0, 3, res, res),
                "label": torch.zeros(0, res, res, dtype=torch.int64)}


class _Readable(Dataset):
    """Reads each pair of a LabelledImages and returns nothing: reading is the check."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.source.read(index)
        return 0


def verify_readable(name, data_dir, split, num_workers=0, progress=True, curated=False):
    """Decode every image and label of the uncropped `split` before a run starts, so a corrupt
    file or a label outside the class range stops it at once, naming the file (the error of
    LabelledImages.read), instead of hours into training."""
    source = build_source_dataset(name, data_dir, split, curated)
    loader = DataLoader(_Readable(source), batch_size=16, num_workers=num_workers)
    for _ in tqdm(loader, desc=f"[check] reading {name} {split}", disable=not progress, leave=False):
        pass


def _images(info, image_files, label_files, cropped):
    if cropped:  # crops are JPEG images and PNG labels whatever the source format
        return LabelledImages(info.name, image_files, label_files, CROP_LUT, info.n_classes, Layout().read_pair)
    return LabelledImages(info.name, image_files, label_files, info.layout.lut(), info.n_classes,
                          info.layout.read_pair)


def build_source_dataset(name, data_dir, split, curated=False):
    """The uncropped `split` at full resolution: items (PIL RGB image, int64 class map); `curated`:
    PriMaPs' curated train list."""
    images, labels = split_files(name, data_dir, split, "curated" if curated else "images")
    return _images(dataset_info(name), images, labels, cropped=False)


def build_dataset(name, data_dir, split, resolution, train_set="crops", resize="nearest"):
    """Training or evaluation ("val") items at `resolution` (`train_set`: which train files, TRAIN_SETS;
    `resize`: how, loader/transforms.RESIZES)."""
    info = dataset_info(name)
    images, labels = split_files(name, data_dir, split, train_set)
    return SegmentationDataset(_images(info, images, labels, reads_crops(info, split, train_set)), resolution,
                               info.square_resize, resize)
