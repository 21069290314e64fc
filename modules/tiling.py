"""Dense features of an image of any size in bounded memory, by overlapping square windows.

The model takes res×res inputs and gives features on their patch grid. An image of any size
(a 4000×3000 photo, a 20×20 icon, a 3000×200 strip) is first resized to a *working scale*
whose shorter side is `short_side` (default res: the test step's geometry, docs/cause.md §2), then
covered by res×res windows; the windows' patch-grid features are blended where they overlap
into one patch-grid map of the whole working image, and that map is upsampled bilinearly to
the size asked for, as evaluation upsamples its patch-grid features to the label size (docs/cause.md §6).

Contract of `feature_fn`: [b, 3, res, res] -> [b, R, res/patch, res/patch], the features on the
patch grid (e.g. the mean of head_ema of the window and of its mirror, docs/cause.md §6). Blending on the
patch grid, not on pixels, keeps the accumulator small (R × h/patch × w/patch) and upsamples once,
as evaluation does, instead of twice. For the grids of neighbouring windows to line up, every
window starts on a multiple of the patch size: the working size, the stride and res are multiples
of it.

Memory: the working image (3 × short_side × long side at that scale), `batch` windows with their
features, and the [R, h/patch, w/patch] accumulator; never one map per window.
"""
import torch
import torch.nn.functional as F


def working_size(height, width, short_side, patch):
    """(h, w) of the working image: the shorter side becomes `short_side`, the longer one keeps the
    aspect ratio, rounded to a multiple of `patch` (a stretch of at most patch/2 pixels)."""
    if short_side % patch:
        raise ValueError(f"short_side {short_side} is not a multiple of the patch size {patch}")
    scale = short_side / min(height, width)

    def scaled(side):
        return round(side * scale / patch) * patch

    return (short_side, scaled(width)) if height <= width else (scaled(height), short_side)


def to_working_scale(image, short_side, patch):
    """Float [3, H, W] -> [3, h, w] at `working_size`: bilinear, antialiased when shrinking.

    The test step resizes with nearest neighbour (docs/cause.md §2), from val images about twice res; a
    user's photo may shrink ten times, where nearest sampling would alias fine texture.
    """
    return resized(image, working_size(*image.shape[-2:], short_side, patch))


def resized(image, size):
    """Float [3, H, W] -> [3, *size]: bilinear, antialiased when shrinking (see to_working_scale);
    the image itself, bit for bit, at its own size."""
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def window_boxes(height, width, res, stride):
    """(top, left) of res×res windows covering a height×width image, row-major.

    Along each side the windows start every `stride` pixels, and the last one is moved back to
    end at the edge, so every pixel is covered without padding and each side needs the fewest
    windows a stride allows: ceil((side - res) / stride) + 1.
    """
    if not 0 < stride <= res:
        raise ValueError(f"stride {stride} must be in 1..res ({res}) for windows to leave no gap")
    if min(height, width) < res:
        raise ValueError(f"a {height}×{width} image is smaller than one {res}×{res} window")
    tops, lefts = (_starts(side, res, stride) for side in (height, width))
    return [(top, left) for top in tops for left in lefts]


def _starts(side, res, stride):
    starts = list(range(0, side - res, stride))
    return starts + [side - res]


def window_weight(grid_side):
    """[g, g] blending weight of one window's patch grid: a separable tent, highest at the centre.

    Overlapping windows then cross-fade linearly, so the blended features change smoothly from one
    window to the next (no seams), and each cell leans on the window that sees most context around
    it. Cell centres are sampled (i + 0.5), so even border cells keep a positive weight: at the
    image border they are the only cover.
    """
    centres = (torch.arange(grid_side, dtype=torch.float32) + 0.5) / grid_side
    tent = 1 - (2 * centres - 1).abs()
    return tent[:, None] * tent[None, :]


@torch.no_grad()
def dense_feature_grid(image, feature_fn, res, patch, stride=None, batch=8, short_side=None):
    """Blended patch-grid features [R, h/patch, w/patch] of float `image` [3, H, W] (normalised as the
    model expects) at the working scale.

    `stride` (default: half a window, rounded down to a multiple of the patch) sets the overlap;
    half a window means every interior cell is seen by two windows per axis, once well inside one
    of them. `batch` windows go through `feature_fn` at a time. `short_side` defaults to res.
    Runs without autograd, which would otherwise keep every window's activations.
    """
    short_side = res if short_side is None else short_side
    stride = max(patch, res // 2 // patch * patch) if stride is None else stride
    for name, value in (("res", res), ("stride", stride)):
        if value % patch:
            raise ValueError(f"{name} {value} is not a multiple of the patch size {patch}")
    if short_side < res:
        raise ValueError(f"short_side {short_side} is smaller than one {res}-pixel window")
    working = to_working_scale(image, short_side, patch)
    grid = res // patch
    boxes = window_boxes(*working.shape[-2:], res, stride)
    total = weights = weight = None
    for first in range(0, len(boxes), batch):
        chunk = boxes[first:first + batch]
        windows = torch.stack([working[:, top:top + res, left:left + res] for top, left in chunk])
        features = feature_fn(windows)
        if features.dim() != 4 or features.shape[0] != len(chunk) or features.shape[-2:] != (grid, grid):
            raise ValueError(f"feature_fn gave {tuple(features.shape)} for {len(chunk)} windows; "
                             f"expected [{len(chunk)}, R, {grid}, {grid}] (the patch grid of {res}-pixel windows)")
        if len(boxes) == 1:
            # One window covers the image (the test step's geometry): its features as they are, as
            # dividing the tent-weighted sum by the weight would round them.
            return features[0].float()
        if total is None:  # R and the device are known once feature_fn has answered
            cells = (working.shape[-2] // patch, working.shape[-1] // patch)
            total = features.new_zeros((features.shape[1],) + cells, dtype=torch.float32)
            weights = torch.zeros(cells, device=features.device)
            weight = window_weight(grid).to(features.device)
        for (top, left), window_features in zip(chunk, features.float(), strict=True):
            rows, cols = slice(top // patch, top // patch + grid), slice(left // patch, left // patch + grid)
            total[:, rows, cols] += weight * window_features
            weights[rows, cols] += weight
    return total / weights


def upsampled_bands(feature_grid, out_size, rows):
    """Yield (top, [R, ≤rows, out_W]): the bilinear upsampling of `feature_grid` [R, h, w] to
    `out_size`, `rows` output rows at a time, equal to F.interpolate's (align_corners=False).

    Lets a caller reduce features to labels band by band, holding R × rows × out_W values at once.
    When one band covers every row, it is F.interpolate's own result, bit for bit (the bands agree
    with it to float rounding only).
    """
    out_height, out_width = out_size
    if rows >= out_height:
        yield 0, F.interpolate(feature_grid[None], size=out_size, mode="bilinear", align_corners=False)[0]
        return
    height = feature_grid.shape[-2]
    # Widths first, for all h grid rows (small: R × h × out_W); then rows, as F.interpolate maps
    # output row y to source row (y + 0.5) * h / out_H - 0.5, clamped at 0, between two grid rows.
    wide = F.interpolate(feature_grid[None], size=(height, out_width), mode="bilinear", align_corners=False)[0]
    for top in range(0, out_height, rows):
        y = torch.arange(top, min(top + rows, out_height), device=feature_grid.device, dtype=torch.float32)
        source = ((y + 0.5) * (height / out_height) - 0.5).clamp(min=0)
        lower = source.floor().long().clamp(max=height - 1)
        upper = (lower + 1).clamp(max=height - 1)
        fraction = (source - lower)[:, None]
        yield top, wide[:, lower] * (1 - fraction) + wide[:, upper] * fraction
