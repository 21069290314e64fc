"""Cropped training sets (SPEC §2) and the synthetic COCO-Stuff set built on the same loaders."""
import os
import socket

import datagen
import numpy as np
import pytest
from conftest import dead_pid
from PIL import Image

from loader import DATASETS, DataError, build_dataset, build_source_dataset
from loader.synthetic import PLANTED_FINE_IDS, make_synthetic_cocostuff
from utils.engine.crop import write_cropped_dataset
from utils.runtime.cli import main

# cocostuff27 classes of the synthetic set's planted fine ids, from the official map.
PLANTED_CLASSES_27 = {0: 9, 2: 11, 16: 7, 105: 23, 124: 21, 147: 26, 43: 5, 61: 3}
RATIOS = {"five": [0.5], "double": [0.5, 0.8], "super": [0.3, 0.4, 0.5, 0.6, 0.7]}


def expected_crops(array, crop_type):
    """SPEC §2 crops by plain slicing: per ratio tl, tr, bl, br, centre (five-crop), and for
    ten-crop the same five again on the horizontally flipped array."""
    flips = [False] if crop_type == "five" else [False, True]
    crops = []
    for ratio in RATIOS[crop_type]:
        for flip in flips:
            a = array[:, ::-1] if flip else array
            height, width = a.shape[:2]
            h, w = int(height * ratio), int(width * ratio)
            top, left = int(round((height - h) / 2)), int(round((width - w) / 2))
            crops += [a[:h, :w], a[:h, width - w:], a[height - h:, :w], a[height - h:, width - w:],
                      a[top:top + h, left:left + w]]
    return crops


def crop_shapes(folder, indices):
    return [np.array(Image.open(folder / f"{i}.jpg")).shape[:2] for i in indices]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return datagen.write_all_cropped(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", [name for name, info in DATASETS.items() if info.crop_type])
def test_crop_counts_sizes_order_and_labels(data_dir, name):
    info = DATASETS[name]
    crop_dir = data_dir / info.crop_dir
    source = build_source_dataset(name, data_dir, "train")
    per_image = {"five": 5, "double": 20, "super": 50}[info.crop_type]
    n_crops = len(source) * per_image
    assert sorted(p.name for p in (crop_dir / "img" / "train").iterdir()) == sorted(f"{i}.jpg" for i in range(n_crops))
    assert len(list((crop_dir / "label" / "train").iterdir())) == n_crops
    index = 0
    for image, label in source:
        for image_crop, label_crop in zip(expected_crops(np.asarray(image), info.crop_type),
                                          expected_crops(label, info.crop_type), strict=True):
            stored = np.array(Image.open(crop_dir / "label" / "train" / f"{index}.png"))
            assert stored.dtype == np.uint8 and stored.shape == label_crop.shape
            np.testing.assert_array_equal(stored, label_crop + 1)  # class + 1, 0 = ignore
            written = np.array(Image.open(crop_dir / "img" / "train" / f"{index}.jpg").convert("RGB"))
            assert written.shape == image_crop.shape
            # JPEG is lossy; the gradients make any other crop differ by tens of levels.
            assert np.abs(written.astype(float) - image_crop).mean() < 4, index
            index += 1
    assert index == n_crops


def test_crop_sizes_are_truncated_ratios(data_dir):
    # Sizes are [int(H·r), int(W·r)]; flipped crops have the same size.
    crop_dir = data_dir / DATASETS["pascalvoc"].crop_dir / "img" / "train"
    assert crop_shapes(crop_dir, (0, 9, 40, 49)) == [(12, 18), (12, 18), (28, 42), (28, 42)]  # VOC is 40×60
    crop_dir = data_dir / DATASETS["coco81"].crop_dir / "img" / "train"
    assert crop_shapes(crop_dir, (0, 10, 19, 40, 59)) == [
        (20, 28), (32, 44), (32, 44), (28, 20), (44, 32)]  # the third image is portrait 56×40


def test_ignore_and_class_zero_in_crop_labels(data_dir):
    labels = np.concatenate([np.array(Image.open(p)).ravel() for p in
                             (data_dir / DATASETS["coco81"].crop_dir / "label" / "train").iterdir()])
    assert labels.min() == 0 and 1 in labels and labels.max() <= 81


def test_interrupted_write_leaves_no_crop_dir(tmp_path):
    ids = datagen.write_cocostuff(tmp_path)
    image = tmp_path / "cocostuff" / "images" / "train2017" / f"{ids['train2017'][2]}.jpg"
    image.write_bytes(image.read_bytes()[:200])  # the third image fails after two were written
    with pytest.raises(DataError, match="cannot read image file"):
        write_cropped_dataset("coco171", tmp_path, progress=False)
    assert list((tmp_path / "cocostuff" / "cropped").iterdir()) == []


def test_rewrite_replaces_an_existing_crop_set(tmp_path):
    datagen.write_cityscapes(tmp_path)
    crop_dir = write_cropped_dataset("cityscapes", tmp_path, progress=False)
    (crop_dir / "img" / "train" / "99.jpg").write_bytes(b"stale")
    assert write_cropped_dataset("cityscapes", tmp_path, num_workers=1, progress=False) == crop_dir
    assert len(list((crop_dir / "img" / "train").iterdir())) == 20
    assert [p.name for p in crop_dir.parent.iterdir()] == [crop_dir.name]


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    datagen.write_cityscapes(tmp_path)
    target = tmp_path / DATASETS["cityscapes"].crop_dir
    host, pid = socket.gethostname(), dead_pid()
    killed = [target.with_name(f".{target.name}.{kind}-{host}-{pid}") for kind in ("partial", "old")]
    running = target.with_name(f".{target.name}.partial-{host}-{os.getppid()}")
    elsewhere = target.with_name(f".{target.name}.partial-another-host-{pid}")
    for folder in killed + [running, elsewhere]:
        (folder / "img" / "train").mkdir(parents=True)
    write_cropped_dataset("cityscapes", tmp_path, progress=False)
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, running.name, elsewhere.name])


def test_synthetic_cocostuff_loads_crops_and_is_balanced(tmp_path):
    data_dir = make_synthetic_cocostuff(tmp_path / "data", n_train=4, n_val=12, image_size=64, seed=3)
    planted = {PLANTED_CLASSES_27[fine] for fine in PLANTED_FINE_IDS[:5]}
    val = build_dataset("cocostuff27", data_dir, "val", 32)
    labels = np.stack([val[i]["label"].numpy() for i in range(len(val))])
    assert len(val) == 12 and val[0]["img"].shape == (3, 32, 32)
    classes, counts = np.unique(labels, return_counts=True)
    assert set(classes) == planted  # every planted class present, nothing else, no ignore
    assert counts.min() > 0.05 * labels.size and counts.max() < 0.5 * labels.size
    write_cropped_dataset("cocostuff27", data_dir, num_workers=2, progress=False)
    train = build_dataset("cocostuff27", data_dir, "train", 16)
    assert len(train) == 20 and set(np.unique(train[0]["label"].numpy())) <= planted


def test_synthetic_cocostuff_is_deterministic(tmp_path):
    paths = [make_synthetic_cocostuff(tmp_path / name, n_train=2, n_val=2, image_size=32, seed=seed) / "cocostuff"
             for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    files = ["images/train2017/000000000001.jpg", "annotations/val2017/000000100001.png"]
    for file in files:
        assert (paths[0] / file).read_bytes() == (paths[1] / file).read_bytes()
        assert (paths[0] / file).read_bytes() != (paths[2] / file).read_bytes()
    with pytest.raises(FileExistsError):
        make_synthetic_cocostuff(tmp_path / "a")



def test_the_crop_step_skips_when_stego_crops_exist(tmp_path, capsys):
    legacy = tmp_path / "cocostuff27/cropped/cocostuff27_five_crop_0.5/img/train"
    legacy.mkdir(parents=True)
    main("crop", None, ["--dataset", "cocostuff27", "--data_dir", str(tmp_path)])
    assert "skipping" in capsys.readouterr().out
    assert not (tmp_path / "cocostuff").exists(), "nothing is cropped again"


def test_the_crop_step_has_nothing_to_do_for_potsdam(tmp_path, capsys):
    datagen.write_potsdam(tmp_path)
    main("crop", None, ["--dataset", "potsdam3", "--data_dir", str(tmp_path)])
    assert "nothing to crop" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "potsdam").iterdir()) == ["gt", "imgs", "labelled_test.txt",
                                                                        "labelled_train.txt"]
