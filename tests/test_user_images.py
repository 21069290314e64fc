"""loader/user_images.py: listing a user's inputs and reading any image file as 8-bit RGB."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from errors import UserError
from loader.user_images import (
    InputListError, MissingInput, UnprocessableImage, UnreadableImage, check_processable, list_inputs, read_image,
)

ORIENTATION = 0x0112


def _gradient(height, width, channels=3):
    """Distinct, smooth values: survives lossy JPEG well enough to locate features."""
    rows, cols = np.mgrid[0:height, 0:width]
    planes = [(rows * 7 + cols * 3 + 40 * c) % 256 for c in range(channels)]
    return np.stack(planes, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of the files a user may have, by kind."""
    root = tmp_path_factory.mktemp("photos")
    files = {}

    def save(name, picture, **options):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, **options)
        files[Path(name).stem] = path

    save("rgb.jpg", Image.new("RGB", (64, 48), (200, 30, 90)), quality=95)
    save("gray.png", Image.fromarray(_gradient(30, 40, 1)[..., 0], mode="L"))
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"))
    deep = np.array([[0, 257, 1000, 32896], [40000, 65000, 65534, 65535]], np.uint16)
    save("deep.png", Image.fromarray(deep))
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    save("palette.png", palette)
    save("palette_alpha.png", palette, transparency=1)
    # Stored 60 wide × 40 high with a red top-left corner; orientation 6 says "turn 90° clockwise to view".
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    save("rotated.jpg", stored, exif=exif, quality=95)
    save("icon.png", Image.fromarray(_gradient(20, 20)))
    save("strip.png", Image.fromarray(_gradient(200, 3000)))
    save("lossless.webp", Image.fromarray(_gradient(16, 24)), lossless=True)
    save("bitmap.bmp", Image.fromarray(_gradient(16, 24)))
    save("tagged.tiff", Image.fromarray(_gradient(16, 24)))
    save("ink.tif", Image.new("CMYK", (4, 4), (255, 0, 0, 0)))
    whole = root / "whole.jpg"
    Image.fromarray(_gradient(256, 256)).save(whole, quality=90)
    data = whole.read_bytes()
    whole.unlink()
    files["truncated"] = root / "broken" / "truncated.jpg"
    files["truncated"].parent.mkdir()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["notes"] = root / "notes.txt"
    files["notes"].write_text("not a list of images, just notes\n")
    return root, files


def _pixels(path):
    picture = read_image(path)
    assert picture.mode == "RGB"
    return np.asarray(picture).astype(int)


def test_rgb_jpeg(photos):
    pixels = _pixels(photos[1]["rgb"])
    assert pixels.shape == (48, 64, 3)
    assert np.abs(pixels - [200, 30, 90]).max() <= 3  # lossy, but the colour is kept


def test_grayscale_becomes_three_equal_channels(photos):
    pixels = _pixels(photos[1]["gray"])
    expected = _gradient(30, 40, 1)[..., 0]
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


def test_alpha_is_composited_on_white(photos):
    pixels = _pixels(photos[1]["rgba"])
    np.testing.assert_array_equal(pixels[0, 0], [10, 20, 30])  # opaque: unchanged
    np.testing.assert_array_equal(pixels[0, 1], [255, 255, 255])  # transparent: the white background
    assert np.abs(pixels[0, 2] - 127).max() <= 1  # half black over white


def test_sixteen_bit_values_scale_to_eight_bits_without_clipping(photos):
    pixels = _pixels(photos[1]["deep"])
    deep = np.array([[0, 257, 1000, 32896], [40000, 65000, 65534, 65535]])
    np.testing.assert_array_equal(pixels[..., 0], np.round(deep / 257))
    assert pixels[0, 2, 0] == 4 and pixels[0, 3, 0] == 128 and pixels[1, 3, 0] == 255
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()


def test_wide_integer_and_float_images_keep_their_range(tmp_path):
    wide = tmp_path / "wide.tiff"
    Image.fromarray(np.array([[-100, 0, 900]], np.int32)).save(wide)  # outside 0..65535: stretched
    np.testing.assert_array_equal(_pixels(wide)[0, :, 0], [0, 26, 255])
    unit = tmp_path / "unit.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(unit)  # floats in 0..1
    np.testing.assert_array_equal(_pixels(unit)[0, :, 0], [0, 128, 255])


def test_palette_with_and_without_transparency(photos):
    np.testing.assert_array_equal(_pixels(photos[1]["palette"]),
                                  [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]])
    np.testing.assert_array_equal(_pixels(photos[1]["palette_alpha"]),
                                  [[[255, 0, 0], [255, 255, 255]], [[0, 0, 255], [255, 255, 255]]])


def test_cmyk_becomes_rgb(photos):
    np.testing.assert_array_equal(_pixels(photos[1]["ink"])[0, 0], [0, 255, 255])  # full cyan ink


def test_exif_orientation_is_applied(photos):
    pixels = _pixels(photos[1]["rotated"])
    assert pixels.shape == (60, 40, 3)  # sides swapped: 40 wide, 60 high
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    # Turned 90° clockwise, the stored top-left corner is now the top-right one.
    assert np.abs(pixels[2, 37] - red).max() < 40
    for corner in (pixels[2, 2], pixels[57, 2], pixels[57, 37]):
        assert np.abs(corner - blue).max() < 40


@pytest.mark.parametrize("name", ["lossless", "bitmap", "tagged"])
def test_lossless_formats_keep_every_value(photos, name):
    np.testing.assert_array_equal(_pixels(photos[1][name]), _gradient(16, 24))


def test_small_and_strip_images_read_at_their_size(photos):
    assert read_image(photos[1]["icon"]).size == (20, 20)
    assert read_image(photos[1]["strip"]).size == (3000, 200)


@pytest.mark.parametrize("name, reason", [("truncated", "truncated"), ("notes", "cannot identify")])
def test_unreadable_files_are_named_with_the_reason(photos, name, reason):
    path = photos[1][name]
    with pytest.raises(UnreadableImage) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert caught.value.path == path


def test_check_processable_policy(photos):
    icon, strip = read_image(photos[1]["icon"]), read_image(photos[1]["strip"])
    check_processable(icon.size, min_side=16)  # a 20×20 icon is at least one patch: scaled up, processed
    check_processable(strip.size, min_side=16)  # 15:1 is within the default ratio
    with pytest.raises(UnprocessableImage, match=r"icon\.png: 20×20 pixels: the shorter side is below one patch"):
        check_processable(icon.size, min_side=32, path=photos[1]["icon"])
    with pytest.raises(UnprocessableImage, match=r"13000×200 pixels: aspect ratio 65:1 is beyond the 64:1"):
        check_processable((13000, 200), min_side=16)


def test_folder_walk_keeps_images_sorted_with_their_relative_names(photos):
    root, _ = photos
    images = list_inputs([str(root)])
    names = [image.name for image in images]
    # notes.txt is no image extension: ignored in a folder walk. Sorted by relative path.
    assert names == ["bitmap", "broken/truncated", "deep", "gray", "icon", "ink", "lossless", "palette",
                     "palette_alpha", "rgb", "rgba", "rotated", "strip", "tagged"]
    assert all(image.source == root / (image.name + image.source.suffix) for image in images)


def test_same_file_names_in_different_places_do_not_collide(tmp_path):
    picture = Image.new("RGB", (8, 8))
    for name in ["a/x.jpg", "b/x.jpg", "b/x.PNG", "b/x_2.png", "b/.hidden.jpg", ".cache/y.jpg", "b/c/Z.TIF"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(tmp_path / name, format="PNG")
    walked = list_inputs([str(tmp_path)])
    assert [image.name for image in walked] == ["a/x", "b/c/Z", "b/x", "b/x_3", "b/x_2"]
    assert walked[3].source == tmp_path / "b/x.jpg" and walked[4].source == tmp_path / "b/x_2.png"
    single = list_inputs([tmp_path / "a/x.jpg", tmp_path / "b/x.jpg", tmp_path / "b/x.PNG"])
    assert [image.name for image in single] == ["x", "x_2", "x_3"]


def test_list_file_on_the_command_line(photos, tmp_path):
    root, files = photos
    listing = tmp_path / "lists" / "inputs.txt"
    listing.parent.mkdir()
    (tmp_path / "rgb.png").write_bytes(files["gray"].read_bytes())  # another "rgb", relative to the list
    listing.write_text(f"# my images\n\n{files['rgb']}\n  ../rgb.png  \n{root / 'broken'}\n")
    images = list_inputs([listing, files["icon"]])
    assert [(image.source, image.name) for image in images] == [
        (files["rgb"], "rgb"), (listing.parent / "../rgb.png", "rgb_2"),
        (files["truncated"], "truncated"), (files["icon"], "icon")]


def test_missing_inputs_are_named(tmp_path):
    assert issubclass(MissingInput, UserError) and issubclass(InputListError, UserError), "they stop the run"
    with pytest.raises(MissingInput, match="nowhere.jpg does not exist"):
        list_inputs([tmp_path / "nowhere.jpg"])
    listing = tmp_path / "inputs.txt"
    listing.write_text("gone.png\n")
    with pytest.raises(MissingInput, match=r"gone.png does not exist \(listed in .*inputs.txt, line 1\)"):
        list_inputs([listing])


def test_lists_do_not_nest(tmp_path):
    inner, outer = tmp_path / "inner.txt", tmp_path / "outer.txt"
    inner.write_text("")
    outer.write_text("inner.txt\n")
    with pytest.raises(InputListError, match="outer.txt, line 1: inner.txt is another list"):
        list_inputs([outer])


def test_the_output_folder_inside_an_input_folder_is_not_walked(tmp_path):
    for name in ("a.png", "out/ids/a.png", "sub/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    listing = tmp_path / "list.txt"
    listing.write_text(".\n")
    for arguments in ([tmp_path], [listing]):
        assert [image.name for image in list_inputs(arguments, skip_folder=tmp_path / "out")] == ["a", "sub/b"]
    assert [image.name for image in list_inputs([tmp_path])] == ["a", "out/ids/a", "sub/b"]
