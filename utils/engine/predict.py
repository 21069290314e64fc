"""predict.py: segment a user's own images with a trained (or released) model.

Each image goes through the test step's prediction (docs/cause.md §6) at any size: read as RGB
(loader/user_images.py), resized so that its shorter side is the working scale (--short_side,
default the test resolution), covered by overlapping windows of the test resolution whose
flip-averaged features are blended on the patch grid (modules/tiling.py), upsampled bilinearly
to the image's own size band by band, and reduced to the nearest cluster; --crf refines with the
dense CRF first. An image of the test resolution takes exactly the test step's path (one window,
the same features, the same upsampling), so its predictions are the test step's.

Memory is bounded by the window batch and the bands, whatever the image size and count: images
are read ahead by --num_workers processes a few at a time, and at most 2 × --crf_workers CRFs wait.

Outputs, under --output, for an input named NAME (its path under a folder given, without extension):
    ids/NAME.png       uint8 ids at the image's size: the data set's classes when the test step has
                       matched the clusters to them (its metrics.json), else cluster ids
    color/NAME.png     the ids in the data set's palette
    overlay/NAME.jpg   the colours over the image, half and half
    classes.json       what each id is (name, colour), which model and settings made them
"""
import argparse
import json
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from errors import UserError
from loader import DATASETS, class_names
from loader.transforms import normalise
from loader.user_images import MAX_ASPECT, RejectedImage, check_processable, list_inputs, read_image
from modules.crf import crf_inference_job, crf_inputs, crf_pool
from modules.features import upsample
from modules.tiling import dense_feature_grid, resized, upsampled_bands, working_size
from utils.engine.evaluate_primaps import PRIMAPS_CKPT
from utils.engine.optim import Precision
from utils.engine.predictors import LOADERS
from utils.engine.status import fingerprint_cache, uses_backbone, with_backbone_file
from utils.runtime.config import ConfigError, build_parser, make_config
from utils.runtime.options import HEADS
from utils.runtime.steps import BACKBONE, HEAD_MODEL, SOTA, STEPS
from utils.runtime.distributed import launch_single
from utils.runtime.io import save_jpeg, save_png, save_text
from utils.runtime.pictures import colorize, palette
from utils.runtime.records import identity_of

# Values of one band of upsampled features, scores or CRF marginals (64 MB in float32): the 27
# scores of a 4000-pixel-wide image are reduced to ids 155 rows at a time.
BAND_VALUES = 1 << 24
# The CRF runs at the working scale, shrunk further past this many pixels (8 times a 4:3 photo at
# 320 pixels): its memory grows with pixels × classes.
CRF_MAX_PIXELS = 1 << 20
FOLDERS = {"ids": ".png", "color": ".png", "overlay": ".jpg"}
CLASSES_FILE = "classes.json"
# The options predict.py shares with the evaluations, whose model it reads (and its own, below).
PREDICT = ("dataset", *BACKBONE, "output_root", "results_root", "num_codebook", *HEAD_MODEL, "train_resolution",
           "batch_size", "precision", "gpu", "num_workers", "crf_workers", "accept_partial", "mode", *SOTA,
           PRIMAPS_CKPT.name)
EXIT_SOME_FAILED = 1

DESCRIPTION = ("Segment your own images with a trained (or released) CAUSE model, a PriMaPs-EM model, or a released "
               "STEGO or HP model.")
EPILOG = f"""\
outputs, under --output, for each input NAME (its path under a folder given, without extension):
  ids/NAME.png      class ids (uint8) at the image's own width and height (after its EXIF rotation):
                    the data set's classes when the test step has matched the clusters to them
                    (results/.../metrics.json), else the model's cluster ids
  color/NAME.png    the ids in the data set's palette
  overlay/NAME.jpg  the colours over the image
  {CLASSES_FILE}      the name and colour of each id, the model and settings that made them
Images whose three outputs exist are skipped (--overwrite redoes them); every file is written to a
temporary file and renamed, so none is ever half-written.

inputs: JPEG, PNG, WebP, BMP, TIFF; grayscale, palette, 16-bit and transparent images are
converted to RGB (transparency over white), the EXIF orientation is applied. Images whose shorter
side is below one patch, or whose longer side is over {MAX_ASPECT} times the shorter, are refused.
A file that cannot be read or is refused is named with the reason and skipped; the others are
still written.

exit status: 0 every image written or skipped; {EXIT_SOME_FAILED} some images failed (the summary names them),
the others written; 2 a problem with the options, inputs or model files (one line names it and
the fix), nothing segmented.
"""


class PredictError(UserError):
    pass


def build_predict_parser():
    """predict.py's parser: the options it shares with the evaluations (PREDICT), then
    its own."""
    parser = build_parser(STEPS["test"], options=PREDICT, description=DESCRIPTION, epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    own = parser.add_argument_group("predict")
    own.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image files, folders (searched recursively for image files, in sorted order) and .txt "
                          "lists of paths (one per line, relative to the list's folder; # starts a comment)")
    own.add_argument("--output", "-o", type=Path, required=True,
                     help="folder for the outputs (below); folders given as inputs are mirrored in it")
    own.add_argument("--head", choices=HEADS, default="tr",
                     help="the segmentation head whose trained (or released) files segment (default tr)")
    own.add_argument("--model", choices=sorted(LOADERS), default="cause",
                     help="the method whose model segments: cause, CAUSE's nearest-centroid prediction; primaps, "
                          "PriMaPs-EM's momentum prototypes θ_M, as its test step predicts, in the --mode it was "
                          "trained in (cause: on the --head's CAUSE features; backbone: on the plain backbone; "
                          "stego, hp: on the code of --sota_ckpt), or a released --primaps_ckpt; sota, the released "
                          "STEGO or HP model --sota_ckpt alone, as its own evaluation predicts")
    own.add_argument("--crf", action="store_true",
                     help="refine with the test step's dense CRF. It runs on the image at the working scale "
                          f"(--short_side), shrunk further to at most {CRF_MAX_PIXELS} pixels; its class "
                          "probabilities are then upsampled bilinearly to the image's size")
    own.add_argument("--short_side", type=int, default=None,
                     help="working scale: each image is resized (bilinear, antialiased) so that its shorter side "
                          "is this many pixels, a multiple of the patch size, at least --test_resolution "
                          "(the default: the test step's geometry), then covered by overlapping windows of "
                          "--test_resolution pixels. Larger: finer detail in large photos, at about "
                          "(short_side / test_resolution)^2 the time")
    own.add_argument("--stride", type=int, default=None,
                     help="pixels between neighbouring windows at the working scale: a multiple of the patch "
                          "size, at most one window (default: half a window)")
    own.add_argument("--overwrite", action="store_true",
                     help="redo images whose outputs exist, and write into a folder whose classes.json comes "
                          "from another model or other settings")
    return parser


def parse_options(argv=None):
    """(cfg, options): the Config of the evaluation whose model segments (the test step's, or PriMaPs-EM's),
    and predict's own options."""
    given = vars(build_predict_parser().parse_args(argv))
    own = argparse.Namespace(**{name: given.pop(name) for name in
                                ("inputs", "output", "head", "model", "crf", "short_side", "stride", "overwrite")})
    _, evaluation = LOADERS[own.model]
    cfg = make_config(STEPS[evaluation], own.head, {**given, "head": own.head})
    res, patch = cfg.test_resolution, cfg.patch
    own.short_side = res if own.short_side is None else own.short_side
    own.stride = max(patch, res // 2 // patch * patch) if own.stride is None else own.stride
    if own.short_side % patch or own.short_side < res:
        raise ConfigError(f"--short_side {own.short_side} must be a multiple of {cfg.arch}'s patch size {patch} "
                          f"and at least the window, --test_resolution {res}")
    if own.stride % patch or not 0 < own.stride <= res:
        raise ConfigError(f"--stride {own.stride} must be a multiple of the patch size {patch} from {patch} to "
                          f"the window, {res}")
    return cfg, own


def main(argv=None):
    """Run predict.py; returns its exit status (user errors are raised, for utils/cli/steps.guarded)."""
    cfg, options = parse_options(argv)
    return launch_single(lambda cfg, dist: predict(cfg, options, dist.device), cfg)


def output_paths(output, name):
    return {folder: Path(output) / folder / f"{name}{suffix}" for folder, suffix in FOLDERS.items()}


@torch.no_grad()
def predict(cfg, options, device):
    images = list_inputs(options.inputs, skip_folder=options.output)
    if not images:
        raise PredictError(f"no image files in {', '.join(map(str, options.inputs))} (looked for .jpg, .jpeg, .png, "
                           f".webp, .bmp, .tif, .tiff)")
    if uses_backbone(cfg):
        cfg = with_backbone_file(cfg)  # once the inputs are known to hold images: it may download
    with crf_pool(cfg.crf_workers if options.crf else 1) as pool:  # before the model reaches a GPU (modules/crf.py)
        fingerprints = fingerprint_cache(cfg)
        load, _ = LOADERS[options.model]
        model = load(cfg, device, fingerprints)
        cluster_to_class, matched_by = matching(cfg, model, fingerprints)
        fingerprints.save()
        classes = classes_record(cfg, options, model, cluster_to_class, matched_by, Precision(cfg.precision, device))
        claim_output(options, classes)
        todo = [image for image in images if options.overwrite
                or not all(path.is_file() for path in output_paths(options.output, image.name).values())]
        print(f"[predict] {len(images)} image(s), {len(images) - len(todo)} already done; {matched_by}")
        lut = np.arange(256, dtype=np.uint8)
        if cluster_to_class is not None:
            lut[:len(cluster_to_class)] = cluster_to_class
        writer = Writer(options.output, lut, DATASETS[cfg.dataset].palette)
        segmenter = Segmenter(model.predictor, options, device, cfg.batch_size, pool)
        failed = run_images(todo, segmenter, writer, cfg.num_workers, options.crf, 2 * cfg.crf_workers)
    return summarise(len(images) - len(todo), writer, failed, options.output)


def matching(cfg, model, fingerprints):
    """(cluster_to_class or None, a sentence saying which): the evaluation's Hungarian matching, when its
    metrics.json was made from the very files the model was loaded from."""
    path, evaluation = model.metrics, model.evaluation
    unmatched = f"cluster ids, not {cfg.dataset}'s classes"
    if not path.is_file():
        return None, f"{unmatched}: {path} does not exist (run {evaluation} with the same options to match them)"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{unmatched}: {path} cannot be read ({err}); rerun {evaluation} with --restart"
    made = report.get("identity", {})
    current = {"backbone": fingerprints.file(cfg.ckpt) if uses_backbone(cfg) else None,
               "sota": fingerprints.file(cfg.sota_ckpt) if cfg.sota_family is not None else None,
               "upstream": {name: identity_of(entry) for name, entry in model.upstream.items()}}
    if (report.get("dataset") != cfg.dataset or made.get("backbone", {}).get("fingerprint") != current["backbone"]
            or made.get("sota", {}).get("fingerprint") != current["sota"]
            or made.get("upstream") != current["upstream"]):
        return None, (f"{unmatched}: {path} was made from other model files than these; rerun {evaluation} with the "
                      f"same options to match them")
    if "cluster_to_class" not in report:
        return None, f"{unmatched}: {path} predates saved matchings; rerun {evaluation} with --restart"
    return report["cluster_to_class"], (f"{cfg.dataset}'s classes, by the Hungarian matching of {path} (the test "
                                        f"step's, of its CRF predictions)")


def classes_record(cfg, options, model, cluster_to_class, matched_by, precision):
    """What classes.json holds: each id's name and colour, and what made the outputs (the model, by
    the fingerprints of its files, and the settings: claim_output compares them, not the paths)."""
    colours = palette(DATASETS[cfg.dataset].palette)
    n = model.predictor.n_clusters
    names = class_names(cfg.dataset) if cluster_to_class is not None else [None] * n
    return {
        "ids": "classes" if cluster_to_class is not None else "clusters",
        "dataset": cfg.dataset,
        "meaning": matched_by,
        "classes": [{"id": i, "name": names[i], "color": colours[i].tolist()} for i in range(n)],
        "cluster_to_class": cluster_to_class,
        "model": model.description,
        "settings": {"window": cfg.test_resolution, "short_side": options.short_side, "stride": options.stride,
                     "crf": options.crf, "crf_max_pixels": CRF_MAX_PIXELS if options.crf else None,
                     "precision": precision.name},
        "files": model.files,
    }


def claim_output(options, classes):
    """Write classes.json; refuse a folder another model or other settings wrote, unless --overwrite."""
    path = Path(options.output) / CLASSES_FILE
    if path.is_file() and not options.overwrite:
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = {}
        changed = [key for key in ("ids", "cluster_to_class", "model", "settings")
                   if before.get(key) != classes[key]]
        if changed:
            raise PredictError(f"{options.output} holds predictions of another model or other settings "
                               f"({', '.join(changed)} differ in {path}): choose another --output, or pass "
                               f"--overwrite to redo them all")
    save_text(json.dumps(classes, indent=2), path)


class Segmenter:
    """Cluster ids of one image, computed on `device`; with a CRF, in `pool` (or at once without one)."""

    def __init__(self, predictor, options, device, batch, pool):
        self.predictor, self.device, self.batch, self.pool = predictor, device, batch, pool
        self.short_side, self.stride = options.short_side, options.stride

    def feature_grid(self, image):
        """Blended features [R, h, w] on the patch grid of the working scale of normalised [3, H, W]."""
        p = self.predictor
        return dense_feature_grid(image.to(self.device), p.features, p.resolution, p.patch, self.stride, self.batch,
                                  self.short_side)

    def clusters(self, grid, size):
        """Nearest cluster [H, W] (uint8, CPU) of `grid`'s features upsampled to `size`."""
        p = self.predictor
        if _rows(grid.shape[0], p.n_clusters, size) >= size[0]:
            # Small enough at once: the test step's own computation, bit for bit.
            return p.logits(upsample(grid[None], size))[0].argmax(0).to(torch.uint8).cpu()
        # Larger: the scores, a linear map of the features with the logits' arg-max, upsampled band by
        # band: n_clusters channels instead of R, and no per-pixel normalisation (5x faster on a CPU).
        scores = p.scores(grid[None])[0]
        out = torch.empty(size, dtype=torch.uint8)
        for top, band in upsampled_bands(scores, size, _rows(scores.shape[0], 0, size)):
            out[top:top + band.shape[1]] = band.argmax(0).to(torch.uint8).cpu()
        return out

    def crf_job(self, image, grid):
        """The CRF of normalised `image` at crf_size, started in the pool (or run now): its .get() gives
        the marginals."""
        size = crf_size(image.shape[-2:], self.short_side, self.predictor.patch)
        log_probs = torch.empty((self.predictor.n_clusters, *size))
        for top, band in upsampled_bands(grid, size, _rows(grid.shape[0], self.predictor.n_clusters, size)):
            logits = self.predictor.logits(band[None])
            log_probs[:, top:top + band.shape[1]] = self.predictor.crf_log_probs(logits)[0].cpu()
        inputs = crf_inputs(resized(image, size), log_probs)
        if self.pool is None:
            return _Done(crf_inference_job(inputs))
        return self.pool.apply_async(crf_inference_job, (inputs,))

    @staticmethod
    def crf_clusters(marginals, size):
        """Arg-max [H, W] (uint8) of the CRF's marginals [K, h, w] upsampled to `size`."""
        marginals = torch.from_numpy(marginals)
        out = torch.empty(size, dtype=torch.uint8)
        for top, band in upsampled_bands(marginals, size, _rows(marginals.shape[0], 0, size)):
            out[top:top + band.shape[1]] = band.argmax(0).to(torch.uint8)
        return out


class _Done:
    """A result already computed, read as a pool's AsyncResult is."""

    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def get(self):
        return self.value


def _rows(channels, classes, size):
    """Output rows per band: at most BAND_VALUES values of the widest of features and logits."""
    return max(1, BAND_VALUES // (max(channels, classes) * size[1]))


def crf_size(image_size, short_side, patch):
    """(h, w) the CRF runs at: the working scale, shrunk to CRF_MAX_PIXELS pixels when larger."""
    height, width = working_size(*image_size, short_side, patch)
    shrink = min(1.0, math.sqrt(CRF_MAX_PIXELS / (height * width)))
    return max(1, round(height * shrink)), max(1, round(width * shrink))


class _Reader(Dataset):
    """Reads and checks one image per item, in loader workers; a refused image is an item too."""

    def __init__(self, images, min_side):
        self.images = images
        self.min_side = min_side

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        source = self.images[index].source
        try:
            picture = read_image(source)
            check_processable(picture.size, self.min_side, path=source)
        except RejectedImage as err:
            return {"index": index, "error": err.reason}
        return {"index": index, "rgb": torch.from_numpy(np.array(picture))}


class Writer:
    """Writes the three outputs of one image from its cluster ids; counts what it wrote."""

    def __init__(self, output, lut, palette_name):
        self.output, self.lut, self.palette_name = Path(output), lut, palette_name
        self.written = 0
        self.started = time.perf_counter()

    def write(self, image, rgb, clusters):
        ids = self.lut[clusters.numpy()]
        colour = colorize(ids, self.palette_name)
        overlay = ((rgb.astype(np.uint16) + colour) // 2).astype(np.uint8)
        paths = output_paths(self.output, image.name)
        save_png(colour, paths["color"])
        save_jpeg(overlay, paths["overlay"])
        save_png(ids, paths["ids"])
        self.written += 1


def run_images(todo, segmenter, writer, num_workers, crf, crf_slots):
    """Segment and write every image of `todo`; returns [(source, reason)] of those that failed.

    With `crf`, an image's CRF runs in the pool while the next images' features are computed; at
    most `crf_slots` wait, each holding its image and the CRF's inputs."""
    failed = []
    pending = deque()  # (image, rgb, CRF job), in input order
    reader = DataLoader(_Reader(todo, segmenter.predictor.patch), batch_size=None, num_workers=num_workers)
    bar = tqdm(total=len(todo), desc="[predict]", unit="image", dynamic_ncols=True)

    def write(image, rgb, clusters):
        try:
            writer.write(image, rgb, clusters)
        except OSError as err:  # a full disk, a folder without write permission: named, as a bad image is
            fail(image, f"cannot write its outputs ({err})")
            return
        bar.update()

    def fail(image, reason):
        failed.append((image.source, reason))
        bar.write(f"[predict] failed: {image.source}: {reason}")
        bar.update()

    def finish_crf(image, rgb, job):
        write(image, rgb, segmenter.crf_clusters(job.get(), rgb.shape[:2]))

    for item in reader:
        image = todo[item["index"]]
        if "error" in item:
            fail(image, item["error"])
            continue
        rgb = item["rgb"].numpy()
        normalised = normalise(rgb)
        try:
            grid = segmenter.feature_grid(normalised)
            if not crf:
                write(image, rgb, segmenter.clusters(grid, rgb.shape[:2]))
                continue
            pending.append((image, rgb, segmenter.crf_job(normalised, grid)))
        except torch.OutOfMemoryError as err:
            raise PredictError(f"out of GPU memory on {image.source}: lower --batch_size (windows per forward "
                               f"pass)") from err
        while pending and (len(pending) > crf_slots or pending[0][2].ready()):
            finish_crf(*pending.popleft())
    while pending:
        finish_crf(*pending.popleft())
    bar.close()
    return failed


def summarise(skipped, writer, failed, output):
    """Print what was done; the exit status."""
    seconds = time.perf_counter() - writer.started
    rate = f"{writer.written / seconds:.2f} images/s ({writer.written} in {seconds:.1f} s)" if writer.written else ""
    print(f"[predict] {writer.written} written, {skipped} skipped (outputs exist; --overwrite redoes them), "
          f"{len(failed)} failed" + (f"; {rate}" if rate else "") + f"; outputs in {output}")
    for source, reason in failed:
        print(f"[predict] failed: {source}: {reason}")
    return EXIT_SOME_FAILED if failed else 0
