"""Cropped training sets (docs/cause.md §2) and the synthetic COCO-Stuff set built on the same loaders."""
import json
import os
import socket

import datagen
import numpy as np
import pytest
from conftest import dead_pid
from PIL import Image

from loader import DATASETS, DataError, build_dataset, build_source_dataset
from loader.synthetic import PLANTED_FINE_IDS, make_synthetic_cocostuff
from utils.cli.steps import main
from utils.engine.crop import write_cropped_dataset

# cocostuff27 classes of the synthetic set's planted fine ids, from the official map.
PLANTED_CLASSES_27 = {0: 9, 2: 11, 16: 7, 105: 23, 124: 21, 147: 26, 43: 5, 61: 3}
RATIOS = {"five": [0.5], "double": [0.5, 0.8], "super": [0.3, 0.4, 0.5, 0.6, 0.7]}


def expected_crops(array, crop_type):
    """docs/cause.md §2 crops by plain slicing: per ratio tl, tr, bl, br, centre (five-crop), and for
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


@pytest.mark.parametrize("name", [name for name, info in DATASETS.items() if info.crops])
def test_crop_counts_sizes_order_and_labels(data_dir, name):
    info = DATASETS[name]
    crop_dir = data_dir / info.crops.folder
    source = build_source_dataset(name, data_dir, "train")
    per_image = {"five": 5, "double": 20, "super": 50}[info.crops.kind]
    n_crops = len(source) * per_image
    assert sorted(p.name for p in (crop_dir / "img" / "train").iterdir()) == sorted(f"{i}.jpg" for i in range(n_crops))
    assert len(list((crop_dir / "label" / "train").iterdir())) == n_crops
    index = 0
    for image, label in source:
        for image_crop, label_crop in zip(expected_crops(np.asarray(image), info.crops.kind),
                                          expected_crops(label, info.crops.kind), strict=True):
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
    crop_dir = data_dir / DATASETS["pascalvoc"].crops.folder / "img" / "train"
    assert crop_shapes(crop_dir, (0, 9, 40, 49)) == [(12, 18), (12, 18), (28, 42), (28, 42)]  # VOC is 40×60
    crop_dir = data_dir / DATASETS["coco81"].crops.folder / "img" / "train"
    assert crop_shapes(crop_dir, (0, 10, 19, 40, 59)) == [
        (20, 28), (32, 44), (32, 44), (28, 20), (44, 32)]  # the third image is portrait 56×40


def test_ignore_and_class_zero_in_crop_labels(data_dir):
    labels = np.concatenate([np.array(Image.open(p)).ravel() for p in
                             (data_dir / DATASETS["coco81"].crops.folder / "label" / "train").iterdir()])
    assert labels.min() == 0 and 1 in labels and labels.max() <= 81


def test_interrupted_write_leaves_no_crop_dir(tmp_path):
    ids = datagen.write_cocostuff(tmp_path)
    image = tmp_path / "cocostuff" / "images" / "train2017" / f"{ids['train2017'][2]}.jpg"
    image.write_bytes(image.read_bytes()[:200])  # the third image fails after two were written
    with pytest.raises(DataError, match="cannot read image file"):
        write_cropped_dataset("coco171", tmp_path)
    assert list(tmp_path.glob("cocostuff/cropped/*")) == [], "no crop folder is left, whole or partial"


def test_rewrite_replaces_an_existing_crop_set(tmp_path):
    datagen.write_cityscapes(tmp_path)
    crop_dir = write_cropped_dataset("cityscapes", tmp_path)
    (crop_dir / "img" / "train" / "99.jpg").write_bytes(b"stale")
    assert write_cropped_dataset("cityscapes", tmp_path, num_workers=1) == crop_dir
    assert len(list((crop_dir / "img" / "train").iterdir())) == 20
    assert [p.name for p in crop_dir.parent.iterdir()] == [crop_dir.name]


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    datagen.write_cityscapes(tmp_path)
    target = tmp_path / DATASETS["cityscapes"].crops.folder
    host, pid = socket.gethostname(), dead_pid()
    killed = [target.with_name(f".{target.name}.{kind}-{host}-{pid}") for kind in ("partial", "old")]
    running = target.with_name(f".{target.name}.partial-{host}-{os.getppid()}")
    elsewhere = target.with_name(f".{target.name}.partial-another-host-{pid}")
    for folder in killed + [running, elsewhere]:
        (folder / "img" / "train").mkdir(parents=True)
    write_cropped_dataset("cityscapes", tmp_path)
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
    write_cropped_dataset("cocostuff27", data_dir, num_workers=2)
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
    assert "nothing to make for potsdam3" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "potsdam").iterdir()) == ["gt", "imgs", "labelled_test.txt",
                                                                        "labelled_train.txt"]


def test_the_crop_step_crops_again_when_a_source_image_is_added_removed_or_replaced(tmp_path, capsys):
    stems = datagen.write_cityscapes(tmp_path)["train"]
    crop_dir = write_cropped_dataset("cityscapes", tmp_path)
    record = json.loads((crop_dir / "record.json").read_text())
    assert record["step"] == "crop" and record["complete"] and record["identity"]["data"]["train"]["files"] == 8
    assert len(list((crop_dir / "img" / "train").iterdir())) == 20
    capsys.readouterr()
    write_cropped_dataset("cityscapes", tmp_path)
    assert "up to date" in capsys.readouterr().out

    images = tmp_path / "cityscapes" / "leftImg8bit" / "train"
    labels = tmp_path / "cityscapes" / "gtFine" / "train"
    first = images / "aachen" / f"{stems[0]}_leftImg8bit.png"
    second = images / "aachen" / f"{stems[1]}_leftImg8bit.png"

    def crops_again():
        write_cropped_dataset("cityscapes", tmp_path)
        out = capsys.readouterr().out
        assert "data.train.fingerprint" in out and "running the step again" in out, out
        return sorted((crop_dir / "img" / "train").iterdir())

    # Replaced by another image: its crops change.
    before = (crop_dir / "img" / "train" / "0.jpg").read_bytes()
    pixels = np.array(Image.open(first))
    Image.fromarray(pixels[:, ::-1].copy()).save(first)
    crops_again()
    assert (crop_dir / "img" / "train" / "0.jpg").read_bytes() != before
    # Rewritten with a file of the same name and size: the modification time tells.
    stamp = second.stat().st_mtime_ns + 10**9
    second.write_bytes(second.read_bytes())
    os.utime(second, ns=(stamp, stamp))
    assert len(crops_again()) == 20
    # Removed: its five crops go.
    first.unlink()
    (labels / "aachen" / f"{stems[0]}_gtFine_labelIds.png").unlink()
    assert len(crops_again()) == 15
    # Added: five crops more.
    Image.fromarray(pixels).save(first)
    Image.fromarray(np.zeros(pixels.shape[:2], np.uint8)).save(labels / "aachen" / f"{stems[0]}_gtFine_labelIds.png")
    assert len(crops_again()) == 20
    assert json.loads((crop_dir / "record.json").read_text())["identity"]["data"]["train"]["files"] == 8


def test_a_crop_set_without_its_record_is_taken_as_made_elsewhere(tmp_path, capsys):
    datagen.write_cityscapes(tmp_path)
    crop_dir = write_cropped_dataset("cityscapes", tmp_path)
    (crop_dir / "record.json").unlink()
    capsys.readouterr()
    write_cropped_dataset("cityscapes", tmp_path)
    assert "exists without a record of how it was made" in capsys.readouterr().out
    main("crop", None, ["--dataset", "cityscapes", "--data_dir", str(tmp_path), "--restart"])
    assert (crop_dir / "record.json").is_file(), "--restart makes the crops again, with their record"
