"""Tiny data sets in each on-disk layout of docs/cause.md §2, with content the tests can predict.

Images are smooth gradients (red follows the row, green the column), so a crop's position
can be read back even after JPEG compression. Labels are random per pixel from a pool of
stored values, with a few planted pixels whose classes differ from one data set to
another. Sizes are (height, width); the default 40×56 is not square on purpose.
"""
import io
import struct
import tarfile
import zipfile
import zlib

import numpy as np
from PIL import Image
from scipy.io import savemat

from loader import DATASETS
from utils.engine.crop import write_cropped_dataset

LANDSCAPE = (40, 56)
PORTRAIT = (56, 40)

# COCO-Stuff fine ids: 11 and 25 are absent from the coco81/coco171 maps (class 0 there),
# 200 is absent from every map (class 0), 255 is unlabelled (-1); the rest map differently per set.
COCO_FINE_POOL = (0, 2, 11, 16, 25, 43, 61, 95, 105, 124, 147, 181, 200, 255)
# Stored value that each listed (row, column) of a 40-px item shows: a 40×56 (56×40) image
# keeps its 40 rows (columns) and loses 8 on each side of the other axis to the centre crop,
# so the values are planted at both (row, column + 8) and (row + 8, column).
COCO_PLANTED_OUT = {(0, 0): 11, (0, 1): 95, (0, 2): 200, (1, 0): 255, (2, 0): 181}
CITYSCAPES_PLANTED_OUT = {(0, 0): 3, (0, 1): 7, (0, 2): 33, (1, 0): 0}  # labelIds; 0..6 are void
# Stored value that each (row, column) of a 20-px VOC item shows: a square resize of 40×60
# samples source pixel (2·row + 1, 3·column + 1). VOC values over 20 are ignored.
VOC_PLANTED_OUT = {(0, 0): 255, (0, 1): 20, (0, 2): 0, (0, 3): 100}
VOC_SIZE = (40, 60)


def _landscape_and_portrait(planted_out):
    planted = {(row, col + 8): value for (row, col), value in planted_out.items()}
    planted.update({(row + 8, col): value for (row, col), value in planted_out.items()})
    return planted


COCO_PLANTED = _landscape_and_portrait(COCO_PLANTED_OUT)
CITYSCAPES_PLANTED = _landscape_and_portrait(CITYSCAPES_PLANTED_OUT)
VOC_PLANTED = {(2 * row + 1, 3 * col + 1): value for (row, col), value in VOC_PLANTED_OUT.items()}


def gradient_image(size, shade=0):
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows * 4, cols * 4, np.full_like(rows, 40 + 50 * shade)], axis=-1)
    return image.astype(np.uint8)


def random_label(rng, size, pool, planted):
    label = rng.choice(np.asarray(pool, dtype=np.uint8), size=size)
    for (row, col), value in planted.items():
        label[row, col] = value
    return label


def _write_image(array, path, quality=95):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        Image.fromarray(array).save(path, quality=quality)
    else:
        Image.fromarray(array).save(path)


def write_cocostuff(data_dir, seed=0):
    """cocostuff/ with 3 train and 2 val images; the _7 list (cocostuff27 val) names only the
    second, portrait val image. Returns {split folder: [ids]}."""
    rng = np.random.default_rng(seed)
    base = data_dir / "cocostuff"
    splits = {"train2017": [("000000000001", LANDSCAPE), ("000000000002", LANDSCAPE), ("000000000003", PORTRAIT)],
              "val2017": [("000000000101", LANDSCAPE), ("000000000102", PORTRAIT)]}
    for folder, entries in splits.items():
        for shade, (image_id, size) in enumerate(entries):
            _write_image(gradient_image(size, shade), base / "images" / folder / f"{image_id}.jpg")
            _write_image(random_label(rng, size, COCO_FINE_POOL, COCO_PLANTED),
                         base / "annotations" / folder / f"{image_id}.png")
        curated = base / "curated" / folder
        curated.mkdir(parents=True, exist_ok=True)
        (curated / "Coco164kFull_Stuff_Coarse.txt").write_text("".join(f"{i}\n" for i, _ in entries))
    (base / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000102\n")
    return {folder: [image_id for image_id, _ in entries] for folder, entries in splits.items()}


def cityscapes_stem(city, index):
    return f"{city}_000000_{index:06d}"


def write_cityscapes(data_dir, seed=0):
    """cityscapes/ with two cities per split, written in reverse order of their sorted names
    (aachen sorts first). PNG images, so the pixels are exact. Returns {split: [stems in sorted order]}."""
    rng = np.random.default_rng(seed)
    base = data_dir / "cityscapes"
    stems = {}
    for split, per_city in (("train", 2), ("val", 1)):
        stems[split] = []
        for shade, city in enumerate(("bonn", "aachen")):
            for index in range(per_city):
                stem = cityscapes_stem(city, index)
                _write_image(gradient_image(LANDSCAPE, shade),
                             base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                _write_image(random_label(rng, LANDSCAPE, range(34), CITYSCAPES_PLANTED),
                             base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                stems[split].append(stem)
        stems[split].sort()
    return stems


def voc_palette():
    """The usual VOC colour map (bit-interleaved class index), 256 entries."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette


def write_pascalvoc(data_dir, seed=0):
    """pascalvoc/VOCdevkit/VOC2012 with 2 train and 1 val image, palette PNG labels. Returns {split: [ids]}."""
    rng = np.random.default_rng(seed)
    base = data_dir / "pascalvoc" / "VOCdevkit" / "VOC2012"
    splits = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000101"]}
    for split, ids in splits.items():
        for shade, image_id in enumerate(ids):
            _write_image(gradient_image(VOC_SIZE, shade), base / "JPEGImages" / f"{image_id}.jpg")
            label = Image.fromarray(random_label(rng, VOC_SIZE, range(21), VOC_PLANTED))
            label.putpalette(voc_palette())  # turns the "L" image into a palette ("P") image
            path = base / "SegmentationClass" / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            label.save(path)
        lists = base / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return splits


# ISPRS class ids of Potsdam's ground truth (0..5, and 6 = none of them) and their Potsdam-3 classes.
POTSDAM_PLANTED_OUT = {(0, 0): 0, (0, 1): 4, (0, 2): 1, (0, 3): 5, (1, 0): 2, (1, 1): 3, (1, 2): 6}
POTSDAM_EXPECTED = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 6: -1}
POTSDAM_SIZE = (40, 40)


def write_potsdam(data_dir, seed=0, n_train=2, n_val=1):
    """potsdam/ in STEGO's layout: imgs/ID.mat ('img': H×W×4 uint8 RGB-IR), gt/ID.mat ('gt': H×W ISPRS
    class ids), labelled_train.txt and labelled_test.txt. Returns {split: [ids]}."""
    rng = np.random.default_rng(seed)
    base = data_dir / "potsdam"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    splits = {"train": [f"tile_{i}" for i in range(n_train)], "val": [f"test_{i}" for i in range(n_val)]}
    for split, ids in splits.items():
        for shade, image_id in enumerate(ids):
            rgb = gradient_image(POTSDAM_SIZE, shade)
            infrared = rng.integers(0, 256, POTSDAM_SIZE + (1,), dtype=np.uint8)
            savemat(base / "imgs" / f"{image_id}.mat", {"img": np.concatenate([rgb, infrared], axis=-1)})
            savemat(base / "gt" / f"{image_id}.mat", {"gt": random_label(rng, POTSDAM_SIZE, range(7),
                                                                         POTSDAM_PLANTED_OUT)})
        listing = "labelled_train.txt" if split == "train" else "labelled_test.txt"
        (base / listing).write_text("".join(f"{i}\n" for i in ids))
    return splits


def write_all(data_dir, seed=0):
    """All four layouts under one data_dir (the six data sets read from them)."""
    return {"cocostuff": write_cocostuff(data_dir, seed), "cityscapes": write_cityscapes(data_dir, seed),
            "pascalvoc": write_pascalvoc(data_dir, seed), "potsdam": write_potsdam(data_dir, seed)}


def write_all_cropped(data_dir, seed=0):
    """write_all, then the cropped training set of every data set that has one; returns data_dir."""
    write_all(data_dir, seed)
    for name, info in DATASETS.items():
        if info.crops is not None:
            write_cropped_dataset(name, data_dir)
    return data_dir


def _files(folder):
    """{path relative to folder, with '/': path} of every file under folder."""
    return {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}


def pack_archive(archive, members):
    """A zip or tar (.tar, .tar.gz) archive holding `members` ({member name: file or bytes}) in their order."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for name, source in members.items():
                if isinstance(source, bytes):
                    zipped.writestr(name, source)
                else:
                    zipped.write(source, name)
        return archive
    with tarfile.open(archive, "w:gz" if archive.suffix == ".gz" else "w") as tarred:
        for name, source in members.items():
            if isinstance(source, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(source)
                tarred.addfile(info, io.BytesIO(source))
            else:
                tarred.add(source, name)
    return archive


def write_archives(folder, seed=0):
    """Every data set's published archives (loader/archives.py), in the real member layouts, holding the
    files write_all writes under folder/"expected", with some of the files the real archives hold that
    the steps never read (test splits, other label kinds, a Mac zip's resource forks).
    Returns ({archive name: path}, the expected data_dir)."""
    expected = folder / "expected"
    write_all(expected, seed)
    coco, city, voc, potsdam = (expected / root for root in ("cocostuff", "cityscapes", "pascalvoc", "potsdam"))
    stem = cityscapes_stem("berlin", 0)
    unread = b"not read by the steps"
    archives = {
        "train2017.zip": {f"train2017/{name}": path for name, path in _files(coco / "images" / "train2017").items()},
        "val2017.zip": {f"val2017/{name}": path for name, path in _files(coco / "images" / "val2017").items()},
        "stuffthingmaps_trainval2017.zip": _files(coco / "annotations"),
        "COCOStuff164kCurated.tar.gz": {f"COCO/CocoStuff164k/curated/{name}": path
                                        for name, path in _files(coco / "curated").items()},
        "cocostuff.zip": {f"cocostuff/{name}": path for name, path in _files(coco).items()},
        "leftImg8bit_trainvaltest.zip": {
            "README": unread, "license.txt": unread, f"leftImg8bit/test/berlin/{stem}_leftImg8bit.png": unread,
            **{f"leftImg8bit/{name}": path for name, path in _files(city / "leftImg8bit").items()}},
        "gtFine_trainvaltest.zip": {
            f"gtFine/test/berlin/{stem}_gtFine_labelIds.png": unread,
            **{f"gtFine/{name.replace('_labelIds.png', suffix)}": (path if suffix == "_labelIds.png" else unread)
               for name, path in _files(city / "gtFine").items()
               for suffix in ("_color.png", "_instanceIds.png", "_labelIds.png", "_polygons.json")}},
        "VOCtrainval_11-May-2012.tar": {
            "VOCdevkit/VOC2012/Annotations/2007_000001.xml": unread,
            "VOCdevkit/VOC2012/ImageSets/Main/train.txt": unread,
            "VOCdevkit/VOC2012/SegmentationObject/2007_000001.png": unread,
            **{f"VOCdevkit/{name}": path for name, path in _files(voc / "VOCdevkit").items()}},
        "potsdam.zip": {"__MACOSX/potsdam/imgs/._tile_0.mat": unread,
                        **{f"potsdam/{name}": path for name, path in _files(potsdam).items()}},
    }
    return {name: pack_archive(folder / "archives" / name, members) for name, members in archives.items()}, expected


def declared_size_png(path, width, height):
    """A PNG of a few dozen bytes whose header declares width×height 8-bit grayscale pixels and that holds
    no pixel data: how a decompression bomb looks to a reader before it decodes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path
