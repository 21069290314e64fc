"""Bad data input ends in one clear line, or is read as predict.py reads it: a 16-bit grayscale image,
a 1-bit label, a label that is no class-id image, a decompression bomb (a tiny file declaring a huge
image), image-list entries that leave the data folder."""
import re

import datagen
import numpy as np
import pytest
from PIL import Image
from steps import run_step

from loader import DataError, build_source_dataset, split_files
from loader.user_images import UnreadableImage, read_image

# Above PIL's limit (loader/image_files.MAX_PIXELS), where PIL only warns (up to twice it), and where it raises.
BOMB_SIDES = {"warned": 10_000, "refused": 20_000}


@pytest.fixture
def data_dir(tmp_path):
    datagen.write_all(tmp_path / "data")
    return tmp_path / "data"


def cityscapes_val(data_dir):
    """(image, label) files of the first Cityscapes val item."""
    images, labels = split_files("cityscapes", data_dir, "val", "images")
    return images[0], labels[0]


def voc_val(data_dir):
    images, labels = split_files("pascalvoc", data_dir, "val", "images")
    return images[0], labels[0]


def test_a_16_bit_grayscale_image_is_read_as_predict_reads_it_not_clipped_to_white(data_dir):
    image, _ = cityscapes_val(data_dir)
    height, width = datagen.LANDSCAPE
    values = (np.arange(height * width, dtype=np.uint32).reshape(height, width) * 29).astype(np.uint16)
    Image.fromarray(values).save(image)  # a 16-bit grayscale PNG
    with Image.open(image) as written:
        assert written.mode.startswith("I")
    read, _ = build_source_dataset("cityscapes", data_dir, "val").read(0)
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(read), np.repeat(expected[..., None], 3, axis=-1))
    assert np.array_equal(np.asarray(read), np.asarray(read_image(image)))


def test_a_1_bit_label_is_read_as_class_ids_0_and_1(data_dir):
    _, label = voc_val(data_dir)
    height, width = datagen.VOC_SIZE
    bits = (np.add.outer(np.arange(height), np.arange(width)) % 3 == 0)
    Image.fromarray(bits).save(label)
    with Image.open(label) as written:
        assert written.mode == "1"
    _, classes = build_source_dataset("pascalvoc", data_dir, "val").read(0)
    assert np.array_equal(classes, bits.astype(np.int64))  # VOC classes 0 and 1 are stored values 0 and 1


def test_a_label_that_holds_no_class_ids_is_refused_saying_what_is_expected(data_dir):
    _, label = voc_val(data_dir)
    height, width = datagen.VOC_SIZE
    Image.new("RGBA", (width, height), (1, 2, 3, 255)).save(label)
    with pytest.raises(DataError, match=re.escape(f"label file {label} is a RGBA image; expected one channel of "
                                                  f"class ids (an 8-bit grayscale or palette PNG")):
        build_source_dataset("pascalvoc", data_dir, "val").read(0)


@pytest.mark.parametrize("case", BOMB_SIDES)
def test_a_decompression_bomb_label_is_refused_naming_the_file(data_dir, case):
    _, label = voc_val(data_dir)
    side = BOMB_SIDES[case]
    assert side * side > Image.MAX_IMAGE_PIXELS
    datagen.declared_size_png(label, side, side)
    assert label.stat().st_size < 100
    with pytest.raises(DataError, match=re.escape(f"cannot read label file {label}: it declares {side * side:,} "
                                                  f"pixels, more than the")):
        build_source_dataset("pascalvoc", data_dir, "val").read(0)


def test_predict_refuses_a_decompression_bomb_as_the_steps_do(tmp_path):
    bomb = datagen.declared_size_png(tmp_path / "bomb.png", BOMB_SIDES["warned"], BOMB_SIDES["warned"])
    with pytest.raises(UnreadableImage, match="refused as a possible decompression bomb"):
        read_image(bomb)


def test_a_bomb_read_by_a_data_loader_worker_ends_the_step_in_one_line(tmp_path, capsys):
    data_dir = tmp_path / "data"
    datagen.write_cocostuff(data_dir)
    label = data_dir / "cocostuff/annotations/train2017/000000000002.png"
    datagen.declared_size_png(label, BOMB_SIDES["refused"], BOMB_SIDES["refused"])
    with pytest.raises(SystemExit) as stopped:
        run_step("crop", None, ["--dataset", "cocostuff27", "--data_dir", str(data_dir), "--num_workers", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error [") == 1, err
    assert re.search(r"error \[crop\]: cannot read label file .*000000000002\.png: it declares 400,000,000 pixels, "
                     r"more than the 89,478,485 an image may have: refused as a possible decompression bomb", err), err
    assert not list(data_dir.rglob("*.lock"))


@pytest.mark.parametrize("how", ["dots", "absolute"])
def test_an_image_list_entry_that_leaves_the_data_folder_is_refused(tmp_path, how):
    data_dir = tmp_path / "data"
    datagen.write_cocostuff(data_dir)
    # An image and label pair outside the data folder, which the entry names.
    outside = tmp_path / "outside"
    outside.mkdir()
    source = data_dir / "cocostuff"
    (outside / "secret.jpg").write_bytes((source / "images/val2017/000000000102.jpg").read_bytes())
    (outside / "secret.png").write_bytes((source / "annotations/val2017/000000000102.png").read_bytes())
    entry = "../../../../outside/secret" if how == "dots" else str(outside / "secret")
    listed = source / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
    listed.write_text(f"000000000102\n\n{entry}\n")
    with pytest.raises(DataError, match=re.escape(f"{listed}, line 3: {entry!r} is ")) as refused:
        split_files("cocostuff27", data_dir, "val")
    assert "outside the data folder" in str(refused.value) and "\n" not in str(refused.value)
