"""Loading the five data sets (docs/cause.md §2): layouts, label mapping, transforms, errors and loaders."""
import json
import re

import datagen
import numpy as np
import pytest
import torch
from conftest import GOLDEN, ROOT
from PIL import Image
from scipy.io import loadmat, savemat
from torch.utils.data.distributed import DistributedSampler

from errors import UserError
from loader import (DATASETS, DataError, DatasetLayoutError, build_dataset, build_source_dataset, class_names,
                    split_files)
from loader.datasets import _class_name_table
from loader.layouts import label_maps
from loader.samplers import GlobalBatchSampler, evaluation_loader, share_of, training_loader
from utils.engine.crop import write_cropped_dataset
from utils.runtime.recipe import CAUSE_OPTIMISATION

MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
GOLDEN_MAPS = json.loads((GOLDEN / "label_maps.json").read_text())
COCO_MAP_KEYS = {"cocostuff27": "cocostuff27_fine_to_coarse", "coco81": "coco81_fine_to_class",
                 "coco171": "coco171_fine_to_class"}

# Classes of the planted stored values, read off docs/cause.md §2 and the official maps by hand.
COCO_EXPECTED = {
    "cocostuff27": {11: 8, 95: 20, 200: 0, 255: -1, 181: 24},
    "coco81": {11: 0, 95: 0, 200: 0, 255: -1, 181: 0},  # 11, 200 unmapped -> 0; stuff -> 0
    "coco171": {11: 0, 95: 84, 200: 0, 255: -1, 181: 170},
}
CITYSCAPES_EXPECTED = {3: -1, 7: 0, 33: 26, 0: -1}
VOC_EXPECTED = {255: -1, 20: 20, 0: 0, 100: -1}


def reference_class(name, stored):
    """Class of one stored label value, straight from docs/cause.md §2 and the golden maps."""
    stored = int(stored)
    if name in COCO_MAP_KEYS:
        return -1 if stored == 255 else GOLDEN_MAPS[COCO_MAP_KEYS[name]].get(str(stored), 0)
    if name == "cityscapes":
        return stored - 7 if stored >= 7 else -1
    if name == "potsdam3":
        return datagen.POTSDAM_EXPECTED.get(stored, -1)
    return stored if stored <= 20 else -1


def reference_resize(array, res, square):
    """Nearest-neighbour resize by pixel centres, then centre crop, for ratios that are exact in floats."""
    height, width = array.shape[:2]
    if square:
        new_h = new_w = res
    elif height <= width:
        new_h, new_w = res, int(res * width / height)
    else:
        new_h, new_w = int(res * height / width), res
    rows = ((np.arange(new_h) + 0.5) * height / new_h).astype(int)
    cols = ((np.arange(new_w) + 0.5) * width / new_w).astype(int)
    top, left = int(round((new_h - res) / 2)), int(round((new_w - res) / 2))
    return array[rows][:, cols][top:top + res, left:left + res]


def read(path):
    if path.suffix == ".mat":
        content = loadmat(path)
        return content["img"][:, :, :3] if "img" in content else content["gt"]
    return np.array(Image.open(path).convert("RGB") if path.suffix == ".jpg" else Image.open(path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return datagen.write_all_cropped(tmp_path_factory.mktemp("data"))


def test_label_maps_in_repo_are_the_golden_ones():
    assert json.loads((ROOT / "loader" / "label_maps.json").read_text()) == GOLDEN_MAPS


def test_dataset_table():
    assert {name: info.n_classes for name, info in DATASETS.items()} == {
        "cocostuff27": 27, "cityscapes": 27, "pascalvoc": 21, "coco81": 81, "coco171": 171, "potsdam3": 3}
    assert [name for name, info in DATASETS.items() if info.crops is None] == ["potsdam3"]
    assert [name for name, info in DATASETS.items() if info.square_resize] == ["pascalvoc"]
    assert DATASETS["cityscapes"].palette == "cityscapes" and CAUSE_OPTIMISATION["cityscapes"].weight_decay == 0.0
    assert CAUSE_OPTIMISATION["pascalvoc"].fine_tune_clip is None
    assert CAUSE_OPTIMISATION["cocostuff27"].fine_tune_clip == {"tr": 2.0, "mlp": 0.1}
    assert [name for name, optimisation in CAUSE_OPTIMISATION.items() if optimisation.official] == [
        "cocostuff27", "cityscapes"]


@pytest.mark.parametrize("name", ["cocostuff27", "coco81", "coco171"])
def test_coco_planted_pixels(data_dir, name):
    dataset = build_dataset(name, data_dir, "val", 40)
    for index in range(len(dataset)):
        label = dataset[index]["label"]
        for (row, col), stored in datagen.COCO_PLANTED_OUT.items():
            assert label[row, col] == COCO_EXPECTED[name][stored], (index, stored)


def test_cityscapes_and_voc_planted_pixels(data_dir):
    label = build_dataset("cityscapes", data_dir, "val", 40)[0]["label"]
    for (row, col), stored in datagen.CITYSCAPES_PLANTED_OUT.items():
        assert label[row, col] == CITYSCAPES_EXPECTED[stored]
    label = build_dataset("pascalvoc", data_dir, "val", 20)[0]["label"]
    for (row, col), stored in datagen.VOC_PLANTED_OUT.items():
        assert label[row, col] == VOC_EXPECTED[stored]


@pytest.mark.parametrize("name", list(DATASETS))
def test_val_items_match_reference(data_dir, name):
    info = DATASETS[name]
    dataset = build_dataset(name, data_dir, "val", 20)
    source = build_source_dataset(name, data_dir, "val")
    assert len(dataset) == len(source)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["ind"] == index
        assert item["img"].dtype == torch.float32 and item["img"].shape == (3, 20, 20)
        assert item["label"].dtype == torch.int64 and item["label"].shape == (20, 20)
        stored = read(source.label_files[index])
        expected = np.vectorize(lambda v: reference_class(name, v))(reference_resize(stored, 20, info.square_resize))
        np.testing.assert_array_equal(item["label"].numpy(), expected)
        pixels = reference_resize(read(source.image_files[index]), 20, info.square_resize)
        normalised = (pixels.transpose(2, 0, 1) / 255 - MEAN) / STD
        np.testing.assert_allclose(item["img"].numpy(), normalised, atol=1e-5)


def test_val_lists_and_order(data_dir):
    # cocostuff27 val reads the _7 list (one portrait image); coco81/171 the full list.
    assert len(build_dataset("cocostuff27", data_dir, "val", 20)) == 1
    assert len(build_dataset("coco81", data_dir, "val", 20)) == 2
    files = build_source_dataset("cityscapes", data_dir, "train").image_files
    assert [f.parent.name for f in files] == ["aachen", "aachen", "bonn", "bonn"]
    assert files == sorted(files)


def test_source_dataset_is_full_resolution_and_mapped(data_dir):
    image, label = build_source_dataset("coco171", data_dir, "train")[2]
    assert image.mode == "RGB" and image.size == (40, 56)
    assert label.dtype == np.int64 and label.shape == (56, 40)
    assert label[8, 1] == 84 and label[9, 0] == -1


@pytest.mark.parametrize("name,index", [("cocostuff27", 0), ("cityscapes", 4), ("coco81", 0), ("pascalvoc", 20)])
def test_train_reads_crops(data_dir, name, index):
    info = DATASETS[name]
    dataset = build_dataset(name, data_dir, "train", 10)
    per_image = {"five": 5, "double": 20, "super": 50}[info.crops.kind]
    assert len(dataset) == len(build_source_dataset(name, data_dir, "train")) * per_image
    item = dataset[index]  # a crop at ratio 0.5 of a landscape image: 20×28 (VOC 20×30)
    stored = read(data_dir / info.crops.folder / "label" / "train" / f"{index}.png")
    expected = reference_resize(stored.astype(np.int64), 10, info.square_resize) - 1
    np.testing.assert_array_equal(item["label"].numpy(), expected)
    assert item["label"].min() >= -1 and item["label"].max() < info.n_classes


def test_legacy_stego_crop_dir_is_read_when_alone(tmp_path):
    datagen.write_cocostuff(tmp_path)
    info = DATASETS["cocostuff27"]
    crops = write_cropped_dataset("cocostuff27", tmp_path)
    legacy = tmp_path / info.crops.stego_folder
    legacy.parent.mkdir(parents=True)
    crops.rename(legacy)
    split_files("cocostuff27", tmp_path, "train")
    dataset = build_dataset("cocostuff27", tmp_path, "train", 16)
    assert len(dataset) == 15 and dataset.source.image_files[0].is_relative_to(legacy)


def test_unknown_names():
    with pytest.raises(UserError, match="cocostuff27.*cityscapes.*pascalvoc.*coco81.*coco171.*potsdam3"):
        split_files("coco", "data", "val")
    with pytest.raises(ValueError, match="split"):
        build_dataset("coco81", "data", "test", 20)


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist") as err:
        split_files("cocostuff27", tmp_path / "nowhere", "val")
    assert "cocostuff/images/{train2017,val2017}/ID.jpg" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="is empty"):
        build_dataset("pascalvoc", tmp_path, "val", 20)


def test_missing_list_names_it(tmp_path):
    datagen.write_cocostuff(tmp_path)
    list_7 = tmp_path / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    list_7.unlink()
    split_files("coco81", tmp_path, "val")  # coco81 val does not use the _7 list
    with pytest.raises(DatasetLayoutError, match="Coco164kFull_Stuff_Coarse_7.txt is missing") as err:
        split_files("cocostuff27", tmp_path, "val")
    assert "Expected layout" in str(err.value)


def test_list_naming_absent_images(tmp_path):
    datagen.write_pascalvoc(tmp_path)
    val_list = tmp_path / "pascalvoc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    val_list.write_text(val_list.read_text() + "".join(f"2099_{i:06d}\n" for i in range(7)))
    with pytest.raises(DatasetLayoutError) as err:
        split_files("pascalvoc", tmp_path, "val")
    message = str(err.value)
    assert "7 of 8 image files are missing" in message and "2099_000000.jpg" in message
    assert "and 2 more" in message and "2099_000006" not in message and str(val_list) in message


def test_missing_cityscapes_label(tmp_path):
    datagen.write_cityscapes(tmp_path)
    label = tmp_path / "cityscapes" / "gtFine" / "val" / "bonn" / "bonn_000000_000000_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(DatasetLayoutError, match="bonn_000000_000000_gtFine_labelIds.png"):
        build_dataset("cityscapes", tmp_path, "val", 20)


def test_missing_crops_name_the_crop_command(tmp_path):
    datagen.write_cocostuff(tmp_path)
    for name in ("cocostuff27", "coco81"):
        with pytest.raises(DatasetLayoutError) as err:
            build_dataset(name, tmp_path, "train", 20)
        assert f"python crop_dataset.py --dataset {name} --data_dir {tmp_path}" in str(err.value)
        assert DATASETS[name].crops.folder in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, damage):
    ids = datagen.write_cocostuff(tmp_path)
    image = tmp_path / "cocostuff" / "images" / "val2017" / f"{ids['val2017'][0]}.jpg"
    image.write_bytes(b"not an image" if damage == "garbage" else image.read_bytes()[:300])
    dataset = build_dataset("coco81", tmp_path, "val", 20)
    with pytest.raises(DataError, match=re.escape(f"cannot read image file {image}")):
        dataset[0]


def test_label_out_of_range_names_file_and_value(tmp_path):
    datagen.write_cityscapes(tmp_path)
    label = tmp_path / "cityscapes" / "gtFine" / "val" / "aachen" / "aachen_000000_000000_gtFine_labelIds.png"
    stored = read(label)
    stored[5, 20] = 40  # labelId 40 -> class 33 of 27
    Image.fromarray(stored).save(label)
    with pytest.raises(DataError, match=re.escape(str(label)) + r".*\[40\].*\[33\].*27 classes"):
        build_dataset("cityscapes", tmp_path, "val", 40)[0]


def test_crop_label_out_of_range(tmp_path):
    datagen.write_pascalvoc(tmp_path)
    crops = write_cropped_dataset("pascalvoc", tmp_path)
    label = crops / "label" / "train" / "3.png"
    stored = read(label)
    stored[0, 0] = 22  # class 21 of 21
    Image.fromarray(stored).save(label)
    with pytest.raises(DataError, match=re.escape(str(label)) + r".*\[22\].*\[21\]"):
        build_dataset("pascalvoc", tmp_path, "train", 8)[3]


def test_crop_set_with_missing_label(tmp_path):
    datagen.write_pascalvoc(tmp_path)
    crops = write_cropped_dataset("pascalvoc", tmp_path)
    (crops / "label" / "train" / "7.png").unlink()
    with pytest.raises(DatasetLayoutError, match="7.png.*\n.*Make the crops with: python crop_dataset.py"):
        split_files("pascalvoc", tmp_path, "train")


def official_rank_order(length, epoch, seed=0, replicas=4, rank=0):
    sampler = DistributedSampler(list(range(length)), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_paper_batches_are_the_official_rank_0_quarter_split_over_the_processes(processes):
    length, epoch = 203, 3  # 51 items per shard: three global batches of 16, then 3 items
    samplers = [GlobalBatchSampler(length, 16, shards=4, shard=0, processes=processes, rank=rank, seed=5)
                for rank in range(processes)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [list(sampler) for sampler in samplers]
    assert {len(batches) for batches in per_rank} == {4}
    official = official_rank_order(length, epoch, seed=5)
    for index in range(4):
        global_batch = sum((batches[index] for batches in per_rank), [])
        assert global_batch == official[16 * index:16 * (index + 1)], "rank order concatenates to the global batch"
        shares = [sampler.share(index) for sampler in samplers]
        assert [share.rows for share in shares] == [len(batches[index]) for batches in per_rank]
        assert [share.offset for share in shares] == [sum(s.rows for s in shares[:r]) for r in range(processes)]
    assert samplers[0].samples_per_epoch() == 51 and len(samplers[0]) == 4


def test_a_short_last_batch_can_leave_a_process_nothing():
    assert [share_of(3, 8, rank).rows for rank in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [share_of(16, 4, rank).offset for rank in range(4)] == [0, 4, 8, 12]


def test_scaled_batches_read_every_item_once_per_epoch():
    length = 23
    seen = []
    for rank in range(2):
        sampler = GlobalBatchSampler(length, 4, shards=2, shard=rank, processes=1, rank=0, seed=0)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert sum(batches, []) == official_rank_order(length, 1, replicas=2, rank=rank)
        seen += sum(batches, [])
    assert set(seen) == set(range(length))


def test_training_loader_gives_an_empty_batch_its_shapes(data_dir):
    dataset = build_dataset("cocostuff27", data_dir, "train", 8)
    sampler = GlobalBatchSampler(len(dataset), 4, shards=4, shard=0, processes=8, rank=7, seed=0)
    batches = list(training_loader(dataset, sampler))
    assert batches and all(batch["img"].shape == (0, 3, 8, 8) for batch in batches)
    assert all(batch["label"].shape == (0, 8, 8) and batch["label"].dtype == torch.int64 for batch in batches)
    sampler = GlobalBatchSampler(len(dataset), 4, shards=1, shard=0, processes=1, rank=0, seed=7)
    first = next(iter(training_loader(dataset, sampler)))
    assert first["img"].shape == (4, 3, 8, 8) and first["ind"].tolist() == official_rank_order(15, 0, 7, 1)[:4]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_evaluation_loader_reads_every_image_once(world_size):
    dataset = list(range(11))  # not a multiple of any world size above 1: DistributedSampler would pad
    seen = [torch.cat(list(evaluation_loader(dataset, 3, rank, world_size))).tolist() for rank in range(world_size)]
    assert sorted(sum(seen, [])) == dataset
    assert all(shard == sorted(shard) for shard in seen)


def test_potsdam_reads_the_first_three_channels_and_maps_to_three_classes(data_dir):
    image, label = build_source_dataset("potsdam3", data_dir, "train")[1]
    assert image.mode == "RGB" and image.size == (40, 40)
    np.testing.assert_array_equal(np.asarray(image), datagen.gradient_image(datagen.POTSDAM_SIZE, 1))
    for (row, col), stored in datagen.POTSDAM_PLANTED_OUT.items():
        assert label[row, col] == datagen.POTSDAM_EXPECTED[stored]
    train = build_dataset("potsdam3", data_dir, "train", 20)
    assert len(train) == 2, "Potsdam-3 trains on its images as they are, without crops"


def test_malformed_potsdam_files_are_named(tmp_path):
    datagen.write_potsdam(tmp_path)
    image = tmp_path / "potsdam" / "imgs" / "test_0.mat"
    image.write_bytes(b"not a MATLAB file")
    with pytest.raises(DataError, match=re.escape(f"cannot read image file {image}")):
        build_dataset("potsdam3", tmp_path, "val", 20)[0]
    datagen.write_potsdam(tmp_path)

    savemat(tmp_path / "potsdam" / "gt" / "test_0.mat", {"labels": np.zeros((40, 40), np.uint8)})
    with pytest.raises(DataError, match="has no variable 'gt'"):
        build_dataset("potsdam3", tmp_path, "val", 20)[0]
    (tmp_path / "potsdam" / "labelled_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="labelled_test.txt is missing"):
        split_files("potsdam3", tmp_path, "val")


def test_check_layout_accepts_good_data(data_dir):
    for name in DATASETS:
        for split in ("train", "val"):
            split_files(name, data_dir, split)


def test_every_data_set_names_each_of_its_classes_once():
    for name, info in DATASETS.items():
        names = class_names(name)
        assert len(names) == info.n_classes and len(set(names)) == len(names), name
        assert all(isinstance(n, str) and n for n in names), name


# One COCO-Stuff fine class of each COCO-Stuff-27 class, and the supercategory it belongs to.
COCO_SUPERCATEGORY = {
    "tv": "electronic", "microwave": "appliance", "banana": "food", "chair": "furniture", "book": "indoor",
    "bottle": "kitchen", "backpack": "accessory", "cat": "animal", "bench": "outdoor", "person": "person",
    "kite": "sports", "car": "vehicle", "ceiling-tile": "ceiling", "floor-wood": "floor", "fruit": "food-stuff",
    "cabinet": "furniture-stuff", "cardboard": "raw-material", "banner": "textile", "wall-brick": "wall",
    "window-blind": "window", "bridge": "building", "dirt": "ground", "grass": "plant", "sky-other": "sky",
    "rock": "solid", "cage": "structural", "sea": "water",
}


def test_class_names_follow_the_label_maps_evaluation_uses():
    fine = _class_name_table()["cocostuff_fine"]
    coarse = class_names("cocostuff27")
    lut = DATASETS["cocostuff27"].layout.lut()
    assert {name: coarse[lut[fine.index(name)]] for name in COCO_SUPERCATEGORY} == COCO_SUPERCATEGORY
    assert sorted(COCO_SUPERCATEGORY.values()) == sorted(coarse), "every class is checked"
    for dataset in ("coco171", "coco81"):
        names, lut = class_names(dataset), DATASETS[dataset].layout.lut()
        things = [i for i in range(182) if lut[i] > 0 or fine[i] == "person"]
        assert all(names[lut[i]] == fine[i] for i in things), dataset
    stuff = [int(k) for k, v in label_maps()["coco81_fine_to_class"].items() if v == 0]
    assert sorted(stuff) == list(range(91, 182)) and class_names("coco81")[0] == "stuff"
    city = class_names("cityscapes")
    lut = DATASETS["cityscapes"].layout.lut()
    assert (city[lut[7]], city[lut[26]], city[lut[33]]) == ("road", "car", "bicycle")  # Cityscapes labelIds


def _resized_size(height, width, res):
    """torchvision's shorter-side rule."""
    return (res, int(res * width / height)) if height <= width else (int(res * height / width), res)


def _centre(array, res):
    height, width = array.shape[-2:]
    top, left = int(round((height - res) / 2)), int(round((width - res) / 2))
    return array[..., top:top + res, left:left + res]


def test_primaps_evaluation_resizes_as_the_official_test_and_its_training_bilinearly(data_dir):
    """PriMaPs-EM's val items: the image a float tensor first, resized bilinearly without antialiasing,
    the label by torch's nearest on the tensor, then the centre crop (docs/primaps.md §3); its training
    images bilinearly on PIL (§1)."""
    source = build_source_dataset("cityscapes", data_dir, "val")
    image, label = source.read_pair(source.image_files[0], source.label_files[0])
    size = _resized_size(image.height, image.width, 10)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    expected_image = _centre(torch.nn.functional.interpolate(pixels, size, mode="bilinear", align_corners=False), 10)
    stored = torch.from_numpy(np.array(label)).float()[None, None]
    expected_label = _centre(torch.nn.functional.interpolate(stored, size, mode="nearest"), 10)[0, 0].long()
    item = build_dataset("cityscapes", data_dir, "val", 10, resize="tensor_bilinear")[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(item["img"], (expected_image[0] - mean[:, None, None]) / std[:, None, None])
    lut = DATASETS["cityscapes"].layout.lut()
    np.testing.assert_array_equal(item["label"].numpy(), lut[expected_label.numpy()])
    # Torch's nearest and PIL's pick other pixels: the CAUSE steps' labels are not these.
    nearest = build_dataset("cityscapes", data_dir, "val", 10)[0]["label"]
    assert not torch.equal(nearest, item["label"])

    train = build_dataset("cityscapes", data_dir, "train", 10, "images", resize="bilinear")
    picture, _ = train.source.read_pair(train.source.image_files[0], train.source.label_files[0])
    bilinear = np.array(picture.resize(size[::-1], Image.BILINEAR))
    expected = torch.from_numpy(_centre(bilinear.transpose(2, 0, 1), 10).copy()).float() / 255
    torch.testing.assert_close(train[0]["img"], (expected - mean[:, None, None]) / std[:, None, None])


def test_the_short_last_batch_can_be_left_out():
    kept = GlobalBatchSampler(10, 4, shards=1, shard=0, processes=1, rank=0, seed=0)
    dropped = GlobalBatchSampler(10, 4, shards=1, shard=0, processes=1, rank=0, seed=0, drop_last=True)
    assert [len(batch) for batch in kept] == [4, 4, 2] and [len(batch) for batch in dropped] == [4, 4]
    assert list(dropped) == list(kept)[:2]
