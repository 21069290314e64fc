"""The archives each data set is published in, and where their members go in the layout the steps read.

One Layout per data set root folder (cocostuff27, coco81 and coco171 share `cocostuff/`): the parts the
layout is made of, the archives that supply each part (the names their authors ship them under, their
public addresses, or the page behind a login), and rules that place archive members by the end of their
path, so an archive's own top folder (STEGO's `cocostuff/`, IIC's `COCO/CocoStuff164k/`) does not matter.
Only what the steps read is extracted: train and val, Cityscapes' `_labelIds` labels, VOC's images,
class labels and segmentation lists. utils/engine/prepare_data.py does the extracting.

Sources: the COCO-Stuff README (nightrome/cocostuff: the three COCO-Stuff 2017 archives and their
sizes), IIC's datasets/README.txt (xu-ji/IIC: the curated image lists STEGO uses, and its Potsdam
archive), STEGO's src/download_datasets.py (mhamilton723/STEGO: `cocostuff.zip` and `potsdam.zip`),
the Pascal VOC 2012 page, with torchvision's mirror of its archive, and the Cityscapes download page.
"""
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    name: str  # the file name its authors ship
    content: str
    size: str  # as its page publishes it, for the user's disk planning
    urls: tuple = ()  # public addresses, tried in order; () = behind a login, never downloaded
    page: str = ""  # where a person gets it

    @property
    def downloadable(self):
        return bool(self.urls)


@dataclass(frozen=True)
class Part:
    """One part of a layout: folders under the root that one archive fills."""
    content: str
    folders: tuple  # present and non-empty once the part is in place
    archives: tuple  # names of the archives holding it, the one --download fetches first


@dataclass(frozen=True)
class Rule:
    """Members whose path ends as `pattern` matches go to `target` (its fields filled from the match)."""
    pattern: re.Pattern
    target: str


@dataclass(frozen=True)
class Layout:
    root: str
    parts: tuple
    archives: dict  # name -> Archive
    rules: tuple
    # Paths under the root that tell the steps what a split holds (lists, or Cityscapes' image folders);
    # moved into place last, so a layout being completed is never read half-way.
    index: tuple


def _rule(pattern, target):
    return Rule(re.compile(r"(?:^|/)" + pattern + "$"), target)


def _archives(*archives):
    return {archive.name: archive for archive in archives}


_COCO_URL = "http://images.cocodataset.org/zips"
_COCOSTUFF_URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset"
_STEGO_URL = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data"
_IIC_URL = "https://www.robots.ox.ac.uk/~xuji/datasets"
_STEGO_COCO = "cocostuff.zip"

LAYOUTS = {layout.root: layout for layout in (
    Layout(
        "cocostuff",
        parts=(
            Part("COCO 2017 train images", ("images/train2017",), ("train2017.zip", _STEGO_COCO)),
            Part("COCO 2017 val images", ("images/val2017",), ("val2017.zip", _STEGO_COCO)),
            Part("COCO-Stuff label maps", ("annotations/train2017", "annotations/val2017"),
                 ("stuffthingmaps_trainval2017.zip", _STEGO_COCO)),
            Part("curated image lists", ("curated/train2017", "curated/val2017"),
                 ("COCOStuff164kCurated.tar.gz", _STEGO_COCO)),
        ),
        archives=_archives(
            Archive("train2017.zip", "COCO 2017 train images", "18 GB", (f"{_COCO_URL}/train2017.zip",),
                    "https://cocodataset.org/#download"),
            Archive("val2017.zip", "COCO 2017 val images", "1 GB", (f"{_COCO_URL}/val2017.zip",),
                    "https://cocodataset.org/#download"),
            Archive("stuffthingmaps_trainval2017.zip", "COCO-Stuff PNG label maps of train and val 2017", "659 MB",
                    (f"{_COCOSTUFF_URL}/stuffthingmaps_trainval2017.zip",), "https://github.com/nightrome/cocostuff"),
            Archive("COCOStuff164kCurated.tar.gz", "IIC's curated image lists (curated/{train2017,val2017})",
                    "size not published", (f"{_IIC_URL}/COCOStuff164kCurated.tar.gz",),
                    "https://github.com/xu-ji/IIC/blob/master/datasets/README.txt"),
            Archive(_STEGO_COCO, "STEGO's prepared COCO-Stuff: images, label maps and curated lists",
                    "size not published", (f"{_STEGO_URL}/cocostuff.zip",), "https://github.com/mhamilton723/STEGO"),
        ),
        rules=(
            _rule(r"(?P<split>train2017|val2017)/(?P<name>[^/]+\.jpg)", "images/{split}/{name}"),
            _rule(r"(?P<split>train2017|val2017)/(?P<name>[^/]+\.png)", "annotations/{split}/{name}"),
            _rule(r"curated/(?P<split>train2017|val2017)/(?P<name>[^/]+\.txt)", "curated/{split}/{name}"),
        ),
        index=("curated",),
    ),
    Layout(
        "cityscapes",
        parts=(
            Part("Cityscapes images", ("leftImg8bit/train", "leftImg8bit/val"), ("leftImg8bit_trainvaltest.zip",)),
            Part("Cityscapes fine labels", ("gtFine/train", "gtFine/val"), ("gtFine_trainvaltest.zip",)),
        ),
        archives=_archives(
            Archive("leftImg8bit_trainvaltest.zip", "Cityscapes left 8-bit images", "11 GB",
                    page="https://www.cityscapes-dataset.com/downloads/ (after registering)"),
            Archive("gtFine_trainvaltest.zip", "Cityscapes fine annotations", "241 MB",
                    page="https://www.cityscapes-dataset.com/downloads/ (after registering)"),
        ),
        rules=(
            _rule(r"leftImg8bit/(?P<split>train|val)/(?P<city>[^/]+)/(?P<name>[^/]+_leftImg8bit\.png)",
                  "leftImg8bit/{split}/{city}/{name}"),
            _rule(r"gtFine/(?P<split>train|val)/(?P<city>[^/]+)/(?P<name>[^/]+_gtFine_labelIds\.png)",
                  "gtFine/{split}/{city}/{name}"),
        ),
        index=("leftImg8bit",),
    ),
    Layout(
        "pascalvoc",
        parts=(
            Part("Pascal VOC 2012 images, labels and lists",
                 ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/SegmentationClass",
                  "VOCdevkit/VOC2012/ImageSets/Segmentation"), ("VOCtrainval_11-May-2012.tar",)),
        ),
        archives=_archives(
            Archive("VOCtrainval_11-May-2012.tar", "Pascal VOC 2012 train and val", "2 GB",
                    ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                     "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"),
                    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"),
        ),
        rules=(
            _rule(r"VOC2012/(?P<path>JPEGImages/[^/]+\.jpg|SegmentationClass/[^/]+\.png"
                  r"|ImageSets/Segmentation/[^/]+\.txt)", "VOCdevkit/VOC2012/{path}"),
        ),
        index=("VOCdevkit/VOC2012/ImageSets",),
    ),
    Layout(
        "potsdam",
        parts=(
            Part("Potsdam tiles and lists", ("imgs", "gt"), ("potsdam.zip", "Potsdam.tar.gz")),
        ),
        archives=_archives(
            Archive("potsdam.zip", "STEGO's Potsdam: .mat tiles and their lists", "size not published",
                    (f"{_STEGO_URL}/potsdam.zip",), "https://github.com/mhamilton723/STEGO"),
            Archive("Potsdam.tar.gz", "IIC's Potsdam: the same tiles and lists", "size not published",
                    (f"{_IIC_URL}/Potsdam.tar.gz",), "https://github.com/xu-ji/IIC/blob/master/datasets/README.txt"),
        ),
        rules=(
            _rule(r"(?P<kind>imgs|gt)/(?P<name>[^/]+\.mat)", "{kind}/{name}"),
            _rule(r"(?P<name>labelled_train|labelled_test|unlabelled_train|all)\.txt", "{name}.txt"),
        ),
        index=("labelled_train.txt", "labelled_test.txt", "unlabelled_train.txt", "all.txt"),
    ),
)}


def prepare_command(name, data_dir):
    """The command that makes data set `name`'s layout under `data_dir` from its archives."""
    return f"python prepare_data.py --dataset {name} --data_dir {data_dir}"
