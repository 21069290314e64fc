"""modules/tiling.py: windows that cover any image, seamless blending, bounded batches, output sizes."""
import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from modules.tiling import (
    dense_feature_grid, to_working_scale, upsampled_bands, window_boxes, working_size,
)


def _patch_features(patch, channels=5, seed=0):
    """A feature_fn that commutes with shifts by whole patches, as a ViT would ideally: a fixed per-pixel
    linear map of the colours, averaged over each patch. Tiled or whole, it must give the same map."""
    mixing = torch.randn(channels, 3, 1, 1, generator=torch.Generator().manual_seed(seed))

    def feature_fn(windows):
        return F.avg_pool2d(F.conv2d(windows, mixing), patch)
    return feature_fn


class CallLog:
    """Wraps a feature_fn, recording the shape of every batch it is given."""

    def __init__(self, feature_fn):
        self.feature_fn = feature_fn
        self.shapes = []

    def __call__(self, windows):
        self.shapes.append(tuple(windows.shape))
        return self.feature_fn(windows)


@pytest.mark.parametrize("height, width, res, stride", [
    (320, 320, 320, 160), (320, 4800, 320, 160), (432, 320, 320, 160), (333, 1001, 64, 48), (100, 64, 64, 64),
    (97, 80, 32, 7),
])
def test_windows_cover_every_pixel_inside_the_image_with_the_fewest_windows(height, width, res, stride):
    boxes = window_boxes(height, width, res, stride)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for top, left in boxes:
        assert 0 <= top <= height - res and 0 <= left <= width - res
        covered[top:top + res, left:left + res] += 1
    assert covered.min() >= 1
    assert len(set(boxes)) == len(boxes)
    # Neighbours start at most a stride apart (so they overlap by res - stride at least), and no
    # fewer windows can do that from one edge to the other.
    for starts in (sorted({top for top, _ in boxes}), sorted({left for _, left in boxes})):
        assert all(later - earlier <= stride for earlier, later in pairwise(starts))
    per_side = [math.ceil((side - res) / stride) + 1 for side in (height, width)]
    assert len(boxes) == per_side[0] * per_side[1]


def test_window_boxes_refuse_gaps_and_undersized_images():
    assert window_boxes(320, 320, 320, 160) == [(0, 0)]
    with pytest.raises(ValueError, match="no gap"):
        window_boxes(640, 640, 320, 321)
    with pytest.raises(ValueError, match="no gap"):
        window_boxes(640, 640, 320, 0)
    with pytest.raises(ValueError, match="smaller than one 320×320 window"):
        window_boxes(200, 3000, 320, 160)


@pytest.mark.parametrize("height, width, short_side, expected", [
    (3000, 4000, 320, (320, 432)),  # 426.7 rounded to a multiple of 16
    (4000, 3000, 320, (432, 320)),
    (20, 20, 320, (320, 320)),  # tiny images are scaled up
    (200, 3000, 320, (320, 4800)),
    (500, 500, 640, (640, 640)),
])
def test_working_size_scales_the_shorter_side_and_keeps_the_aspect(height, width, short_side, expected):
    h, w = working_size(height, width, short_side, patch=16)
    assert (h, w) == expected
    assert abs(max(h, w) - max(height, width) * short_side / min(height, width)) <= 8


@pytest.mark.parametrize("height, width, short_side, stride", [
    (50, 70, 32, None),  # one row of windows, default stride
    (61, 47, 80, 16),  # overlaps along both sides
    (61, 47, 80, 8),  # every cell under up to 16 windows
    (30, 400, 32, 32),  # a strip, windows side by side
    (123, 77, 56, 24),
])
def test_tiled_features_equal_whole_image_features(height, width, short_side, stride):
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    feature_fn = _patch_features(patch=8)
    tiled = dense_feature_grid(image, feature_fn, res=32, patch=8, stride=stride, batch=3, short_side=short_side)
    whole = feature_fn(to_working_scale(image, short_side, patch=8)[None])[0]
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_blending_is_smooth_where_window_features_disagree():
    """Windows that each give a different constant: the blend changes gradually, with no jump at window edges."""
    counter = iter(range(1000))

    def window_index(windows):
        return torch.stack([torch.full((1, 4, 4), float(next(counter))) for _ in windows])

    blended = dense_feature_grid(torch.rand(3, 32, 160), window_index, res=32, patch=8, stride=16, batch=2)[0]
    assert blended.shape == (4, 20)
    # Tents at half-window stride cross-fade linearly: half an index per cell between window centres
    # (a stride is 2 cells), where a hard cut would jump by a whole index at some cell.
    steps = blended[0].diff()
    torch.testing.assert_close(steps[2:-2], torch.full((15,), 0.5))
    assert steps.min() >= 0 and steps.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("height, width", [(200, 3000), (3000, 4000)])
def test_large_and_strip_images_run_batch_windows_at_a_time(height, width):
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(2))
    log = CallLog(_patch_features(patch=16, channels=1))
    grid = dense_feature_grid(image, log, res=320, patch=16, batch=4)
    h, w = working_size(height, width, 320, 16)
    assert grid.shape == (1, h // 16, w // 16)
    assert max(shape[0] for shape in log.shapes) <= 4
    assert all(shape[1:] == (3, 320, 320) for shape in log.shapes)
    assert sum(shape[0] for shape in log.shapes) == len(window_boxes(h, w, 320, 160))


def test_a_tiny_image_is_one_window_of_its_upscaled_copy():
    image = torch.rand(3, 20, 20)
    grid = dense_feature_grid(image, _patch_features(patch=16), res=320, patch=16)
    assert grid.shape == (5, 20, 20)  # upscaled to the 320-pixel window: 20 × 20 patches
    assert [band.shape for _, band in upsampled_bands(grid, (7, 9), 100)] == [(5, 7, 9)]


@pytest.mark.parametrize("out_size, rows", [((99, 131), 10), ((99, 131), 1), ((8, 12), 3), ((3, 4), 2), ((5, 7), 50)])
def test_upsampled_bands_equal_one_bilinear_upsampling(out_size, rows):
    grid = torch.randn(6, 5, 7)
    bands = list(upsampled_bands(grid, out_size, rows))
    assert [top for top, _ in bands] == list(range(0, out_size[0], rows))
    assert all(band.shape[1] <= rows for _, band in bands)
    joined = torch.cat([band for _, band in bands], dim=1)
    torch.testing.assert_close(joined, F.interpolate(grid[None], size=out_size, mode="bilinear")[0])


def test_feature_fn_on_pixels_instead_of_the_patch_grid_is_refused():
    with pytest.raises(ValueError, match=r"feature_fn gave \(2, 3, 32, 32\) for 2 windows; expected \[2, R, 4, 4\]"):
        dense_feature_grid(torch.rand(3, 32, 48), lambda windows: windows, res=32, patch=8, batch=2)


def test_sizes_off_the_patch_grid_are_refused():
    with pytest.raises(ValueError, match="stride 12 is not a multiple of the patch size 8"):
        dense_feature_grid(torch.rand(3, 32, 48), _patch_features(8), res=32, patch=8, stride=12)
    with pytest.raises(ValueError, match="short_side 36 is not a multiple"):
        dense_feature_grid(torch.rand(3, 32, 48), _patch_features(8), res=32, patch=8, short_side=36)


def test_the_test_steps_geometry_gives_its_features_and_upsampling_bit_for_bit():
    """An image of one window at its own size: its features unblended, one band equal to F.interpolate."""
    image = torch.rand(3, 32, 32)
    feature_fn = _patch_features(patch=8)
    assert torch.equal(to_working_scale(image, 32, patch=8), image)
    assert torch.equal(dense_feature_grid(image, feature_fn, res=32, patch=8), feature_fn(image[None])[0])
    grid = torch.randn(6, 4, 4)
    [(top, band)] = upsampled_bands(grid, (32, 32), rows=32)
    assert top == 0 and torch.equal(band, F.interpolate(grid[None], size=(32, 32), mode="bilinear")[0])
