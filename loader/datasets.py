"""The data sets of SPEC §2 and PRIMAPS.md §5: where their files lie, how labels become classes.

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
from PIL import Image
from scipy.io import loadmat
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from errors import UserError
from loader.transforms import ResizePair, normalise

SPLITS = ("train", "val")
LABEL_MAPS = Path(__file__).with_name("label_maps.json")
CLASS_NAMES = Path(__file__).with_name("class_names.json")


class DataError(UserError):
    """A data file cannot be read, or holds values the data set does not have."""


class DatasetLayoutError(DataError):
    """A data set's files are not where SPEC §2 puts them."""


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the project knows about one data set, in one row of DATASETS."""
    name: str
    n_classes: int
    root: str  # folder under data_dir holding the source data
    crop_type: str | None  # "five" | "double" | "super" (loader/crops.py); None: train reads the images as they are
    crop_dir: str | None  # cropped train set, relative to data_dir
    legacy_crop_dir: str | None  # STEGO's name of the same crops, read when only it exists
    square_resize: bool  # resize to res×res instead of shorter side + centre crop
    palette: str
    front_door_clip: dict  # gradient-norm clip of the segment module per head, step 2
    fine_tune_clip: dict | None  # the same for step 3; None: no clipping
    weight_decay: float
    official_clip: bool  # False: the official code has no values here; these are the project's


# The official scripts clip only for cocostuff27 and cityscapes; elsewhere step 2 raises there,
# so the project reuses the cocostuff27 values in step 2 and does not clip in step 3.
# Each entry gets its own copy, so changing one data set's values cannot change another's.
_COCO_CLIP = {"tr": 2.0, "mlp": 0.1}
_CITY_CLIP = {"tr": 1.0, "mlp": 1.0}

DATASETS = {
    "cocostuff27": DatasetInfo(
        "cocostuff27", 27, "cocostuff", "five", "cocostuff/cropped/cocostuff_five_crop_0.5",
        "cocostuff27/cropped/cocostuff27_five_crop_0.5", False, "pascal", dict(_COCO_CLIP), dict(_COCO_CLIP),
        1e-4, True),
    "cityscapes": DatasetInfo(
        "cityscapes", 27, "cityscapes", "five", "cityscapes/cropped/cityscapes_five_crop_0.5",
        None, False, "cityscapes", dict(_CITY_CLIP), dict(_CITY_CLIP), 0.0, True),
    "pascalvoc": DatasetInfo(
        "pascalvoc", 21, "pascalvoc", "super", "pascalvoc/cropped/pascalvoc_super_crop_0",
        None, True, "pascal", dict(_COCO_CLIP), None, 1e-4, False),
    "coco81": DatasetInfo(
        "coco81", 81, "cocostuff", "double", "cocostuff/cropped/coco81_double_crop_0",
        None, False, "pascal", dict(_COCO_CLIP), None, 1e-4, False),
    "coco171": DatasetInfo(
        "coco171", 171, "cocostuff", "double", "cocostuff/cropped/coco171_double_crop_0",
        None, False, "pascal", dict(_COCO_CLIP), None, 1e-4, False),
    # STEGO's Potsdam-3 (PRIMAPS.md §5); CAUSE never trained on it, so its clipping is the project's.
    "potsdam3": DatasetInfo(
        "potsdam3", 3, "potsdam", None, None, None, False, "potsdam", dict(_COCO_CLIP), None, 1e-4, False),
}

_LABEL_MAP_KEYS = {"cocostuff27": "cocostuff27_fine_to_coarse", "coco81": "coco81_fine_to_class",
                   "coco171": "coco171_fine_to_class"}
COCO_LIST = "Coco164kFull_Stuff_Coarse.txt"
COCO_LIST_7 = "Coco164kFull_Stuff_Coarse_7.txt"  # the cocostuff27 val subset, and PriMaPs' train list
_COCO_SPLITS = {"train": "train2017", "val": "val2017"}
POTSDAM_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
# ISPRS Potsdam classes 0..5 -> Potsdam-3: road + car, building + clutter, vegetation + tree.
POTSDAM_TO_3 = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _coco_list(info, split, curated_7):
    return COCO_LIST_7 if info.name == "cocostuff27" and (split == "val" or curated_7) else COCO_LIST


def crop_command(name, data_dir):
    return f"python crop_dataset.py --dataset {name} --data_dir {data_dir}"


def expected_layout(info, data_dir):
    """The SPEC §2 layout of one data set, as told to a user whose files are elsewhere."""
    if info.root == "cocostuff":
        source = [
            "cocostuff/images/{train2017,val2017}/ID.jpg",
            "cocostuff/annotations/{train2017,val2017}/ID.png   (COCO-Stuff fine label ids, 255 = unlabelled)",
            f"cocostuff/curated/train2017/{COCO_LIST}   (one ID per line)",
            f"cocostuff/curated/val2017/{_coco_list(info, 'val', False)}",
        ]
    elif info.root == "cityscapes":
        source = [
            "cityscapes/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png",
            "cityscapes/gtFine/{train,val}/CITY/*_gtFine_labelIds.png",
        ]
    elif info.root == "potsdam":
        source = [
            "potsdam/imgs/ID.mat   (key 'img': H×W×4 RGB-IR; the first 3 channels are read)",
            "potsdam/gt/ID.mat   (key 'gt': H×W ISPRS class ids 0..5)",
            f"potsdam/{POTSDAM_LISTS['train']}, potsdam/{POTSDAM_LISTS['val']}   (one ID per line)",
        ]
    else:
        source = [
            "pascalvoc/VOCdevkit/VOC2012/JPEGImages/ID.jpg",
            "pascalvoc/VOCdevkit/VOC2012/SegmentationClass/ID.png   (palette PNG, 255 = ignore)",
            "pascalvoc/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   (one ID per line)",
        ]
    crops = [] if info.crop_type is None else [
        f"{info.crop_dir}/{{img,label}}/train/{{0,1,...}}.{{jpg,png}}   "
        f"(training crops; make them with: {crop_command(info.name, data_dir)})"]
    lines = "\n".join(f"  {line}" for line in source + crops)
    return f"Expected layout under --data_dir {data_dir}:\n{lines}"


def _layout_error(info, data_dir, problem):
    return DatasetLayoutError(f"{info.name}: {problem}\n{expected_layout(info, data_dir)}")


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_data_dir(info, data_dir):
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise _layout_error(info, data_dir, f"--data_dir {data_dir} does not exist or is not a folder.")
    if not any(data_dir.iterdir()):
        raise _layout_error(info, data_dir, f"--data_dir {data_dir} is empty.")
    return data_dir


def _require_dir(info, data_dir, folder, what):
    if not folder.is_dir():
        raise _layout_error(info, data_dir, f"{what} {folder} is missing.")


def _require_files(info, data_dir, paths, what, hint=""):
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
        raise _layout_error(info, data_dir, f"{len(missing)} of {len(paths)} {what} files are missing:\n"
                                            f"{shown}{more}{hint}")


def _read_list(info, data_dir, list_file):
    if not list_file.is_file():
        raise _layout_error(info, data_dir, f"image list {list_file} is missing.")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise _layout_error(info, data_dir, f"image list {list_file} names no images.")
    return ids


def _listed_files(info, data_dir, list_file, image_dir, label_dir, image_suffix, label_suffix):
    """Images and labels of the IDs in `list_file`, in list order."""
    ids = _read_list(info, data_dir, list_file)
    _require_dir(info, data_dir, image_dir, "image folder")
    _require_dir(info, data_dir, label_dir, "label folder")
    images = [image_dir / f"{i}{image_suffix}" for i in ids]
    labels = [label_dir / f"{i}{label_suffix}" for i in ids]
    listed = f"\n  (named by {list_file})"
    _require_files(info, data_dir, images, "image", listed)
    _require_files(info, data_dir, labels, "label", listed)
    return images, labels


def _cityscapes_files(info, data_dir, split):
    image_dir = data_dir / "cityscapes" / "leftImg8bit" / split
    label_dir = data_dir / "cityscapes" / "gtFine" / split
    _require_dir(info, data_dir, image_dir, "image folder")
    _require_dir(info, data_dir, label_dir, "label folder")
    # Sorted by city, then file name: a fixed order (os.listdir's is not).
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"), key=lambda p: (p.parent.name, p.name))
    if not images:
        raise _layout_error(info, data_dir, f"no CITY/*_leftImg8bit.png images in {image_dir}.")
    labels = [label_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
              for p in images]
    _require_files(info, data_dir, labels, "label")
    return images, labels


def _source_files(info, data_dir, split, curated_7=False):
    """(image files, label files) of the uncropped `split`, in dataset order."""
    if info.root == "cocostuff":
        folder = _COCO_SPLITS[split]
        list_file = data_dir / "cocostuff" / "curated" / folder / _coco_list(info, split, curated_7)
        return _listed_files(info, data_dir, list_file, data_dir / "cocostuff" / "images" / folder,
                             data_dir / "cocostuff" / "annotations" / folder, ".jpg", ".png")
    if info.root == "cityscapes":
        return _cityscapes_files(info, data_dir, split)
    if info.root == "potsdam":
        base = data_dir / "potsdam"
        return _listed_files(info, data_dir, base / POTSDAM_LISTS[split], base / "imgs", base / "gt", ".mat", ".mat")
    voc = data_dir / "pascalvoc" / "VOCdevkit" / "VOC2012"
    return _listed_files(info, data_dir, voc / "ImageSets" / "Segmentation" / f"{split}.txt",
                         voc / "JPEGImages", voc / "SegmentationClass", ".jpg", ".png")


def existing_crop_dir(info, data_dir):
    """The cropped train set training reads: crop_dir, else STEGO's legacy folder; None when neither exists."""
    for name in (info.crop_dir, info.legacy_crop_dir):
        if name and (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    return None


def _crop_files(info, data_dir):
    """(image files, label files) of the cropped train set: {i}.jpg / {i}.png for i = 0..n-1."""
    root = existing_crop_dir(info, data_dir)
    remake = f"\nMake the crops with: {crop_command(info.name, data_dir)}"
    if root is None:
        root = data_dir / info.crop_dir
        legacy = data_dir / info.legacy_crop_dir if info.legacy_crop_dir else None
        also = f" (and so is STEGO's name for it, {legacy})" if legacy is not None else ""
        raise _layout_error(info, data_dir, f"the cropped training set {root} is missing{also}.{remake}")
    image_dir, label_dir = root / "img" / "train", root / "label" / "train"
    _require_dir(info, data_dir, image_dir, "crop image folder")
    _require_dir(info, data_dir, label_dir, "crop label folder")
    count = sum(1 for name in os.listdir(image_dir) if name.endswith(".jpg"))
    if count == 0:
        raise _layout_error(info, data_dir, f"the crop image folder {image_dir} holds no crops.{remake}")
    images = [image_dir / f"{i}.jpg" for i in range(count)]
    labels = [label_dir / f"{i}.png" for i in range(count)]
    _require_files(info, data_dir, images, "crop image", remake)
    _require_files(info, data_dir, labels, "crop label", remake)
    return images, labels


def training_files(name, data_dir, curated_7=False):
    """(image files, label files) that training reads: the crops where the data set has them."""
    info = dataset_info(name)
    data_dir = _check_data_dir(info, data_dir)
    if info.crop_type is None or curated_7:
        return _source_files(info, data_dir, "train", curated_7)
    return _crop_files(info, data_dir)


def split_files(name, data_dir, split, cropped=True, curated_7=False):
    """(image files, label files) of `split` as the steps read it (see training_files for train)."""
    info = dataset_info(name)
    _check_split(split)
    if split == "train" and cropped:
        return training_files(name, data_dir, curated_7)
    return _source_files(info, _check_data_dir(info, data_dir), split, curated_7)


@lru_cache(maxsize=None)
def _label_maps():
    return json.loads(LABEL_MAPS.read_text())


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
    for fine, cls in _label_maps()[_LABEL_MAP_KEYS[name]].items():
        if cls >= 0:
            members.setdefault(cls, []).append(int(fine))
    fine_names = table["cocostuff_fine"]
    names = []
    for cls in range(info.n_classes):
        ids = members[cls]
        names.append(fine_names[ids[0]] if len(ids) == 1 else "stuff")
    return names


def source_lut(info):
    """256-entry table: stored label value -> class (-1 = ignore) for the uncropped data."""
    if info.root == "cocostuff":
        # Zero-initialised as in the official loader: fine ids absent from a map become class 0.
        lut = np.zeros(256, dtype=np.int64)
        for fine, cls in _label_maps()[_LABEL_MAP_KEYS[info.name]].items():
            lut[int(fine)] = cls
        lut[255] = -1
    elif info.root == "cityscapes":
        lut = np.arange(256, dtype=np.int64) - 7  # labelIds 0..6 are void
        lut[lut < 0] = -1
    elif info.root == "potsdam":
        lut = np.full(256, -1, dtype=np.int64)
        for fine, coarse in POTSDAM_TO_3.items():
            lut[fine] = coarse
    else:
        lut = np.arange(256, dtype=np.int64)
        lut[21:] = -1  # 255 marks object borders and unlabelled pixels
    return lut


# Crops store class + 1, so 0 is ignore.
CROP_LUT = np.arange(256, dtype=np.int64) - 1


def _open(path, kind):
    """Open and fully decode an image so a corrupt or truncated file fails here, naming itself."""
    picture = None
    try:
        picture = Image.open(path)
        picture.load()  # also closes the file: the pixels are in memory now
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        if picture is not None:
            picture.close()
        raise DataError(f"cannot read {kind} file {path}: {err}") from err
    return picture


def _load_mat(path, key, kind):
    """The array under `key` of a MATLAB file (STEGO's Potsdam layout)."""
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


def _potsdam_image(path):
    """RGB of an RGB-IR .mat image, converted as the official loader does (to_pil_image of 3 channels)."""
    array = _load_mat(path, "img", "image")
    if array.ndim != 3 or array.shape[2] < 3:
        raise DataError(f"image file {path} holds an array of shape {array.shape}; expected H×W×C with C ≥ 3")
    return to_pil_image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[:3])


def _potsdam_label(path):
    array = _load_mat(path, "gt", "label")
    if array.ndim != 2:
        raise DataError(f"label file {path} holds an array of shape {array.shape}; expected H×W class ids")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"label file {path} holds values outside 0..255 ({array.min()}..{array.max()})")
    return Image.fromarray(array.astype(np.uint8))


def read_pair(image_file, label_file):
    """(PIL RGB image, PIL label image of stored values) of one item, decoded in full."""
    if Path(image_file).suffix == ".mat":
        return _potsdam_image(image_file), _potsdam_label(label_file)
    return _open(image_file, "image").convert("RGB"), _open(label_file, "label")


class LabelledImages(Dataset):
    """Image/label file pairs, read as (PIL RGB image, int64 class map with -1 = ignore)."""

    def __init__(self, name, image_files, label_files, lut, n_classes):
        self.name = name
        self.image_files = list(image_files)
        self.label_files = list(label_files)
        self.lut = lut
        self.n_classes = n_classes

    def __len__(self):
        return len(self.image_files)

    def __getitem__(self, index):
        return self.read(index)

    def read(self, index, resize=None):
        """The pair at `index`; `resize` acts on the stored label values, before they become classes
        (nearest-neighbour resampling commutes with the mapping, and PIL cannot hold -1)."""
        image_file, label_file = self.image_files[index], self.label_files[index]
        image, label = read_pair(image_file, label_file)
        if image.size != label.size:
            raise DataError(f"image {image_file} is {image.size[0]}×{image.size[1]} but its label "
                            f"{label_file} is {label.size[0]}×{label.size[1]}")
        # Checked at full resolution, so a bad value fails whatever pixels the resize keeps.
        stored = self._checked(np.asarray(label), label_file)
        if resize is not None:
            image, label = resize(image, label)
            stored = np.asarray(label)
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
    """Items {"ind", "img" [3,res,res] normalised, "label" [res,res] int64} as the steps read them."""

    def __init__(self, source, resolution, square):
        self.source = source
        self.resize = ResizePair(resolution, square)

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


def verify_readable(name, data_dir, split, num_workers=0, progress=True, curated_7=False):
    """Decode every image and label of the uncropped `split` before a run starts, so a corrupt
    file or a label outside the class range stops it at once, naming the file (the error of
    LabelledImages.read), instead of hours into training."""
    source = build_source_dataset(name, data_dir, split, curated_7)
    loader = DataLoader(_Readable(source), batch_size=16, num_workers=num_workers)
    for _ in tqdm(loader, desc=f"[check] reading {name} {split}", disable=not progress, leave=False):
        pass


def build_source_dataset(name, data_dir, split, curated_7=False):
    """The uncropped `split` at full resolution: items (PIL RGB image, int64 class map)."""
    info = dataset_info(name)
    images, labels = split_files(name, data_dir, split, cropped=False, curated_7=curated_7)
    return LabelledImages(name, images, labels, source_lut(info), info.n_classes)


def build_dataset(name, data_dir, split, resolution, curated_7=False):
    """Training ("train": the crops where the data set has them) or evaluation ("val") items at `resolution`."""
    info = dataset_info(name)
    _check_split(split)
    images, labels = split_files(name, data_dir, split, curated_7=curated_7)
    cropped = split == "train" and info.crop_type is not None and not curated_7
    source = LabelledImages(name, images, labels, CROP_LUT if cropped else source_lut(info), info.n_classes)
    return SegmentationDataset(source, resolution, info.square_resize)
