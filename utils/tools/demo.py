"""The embedded demo: synthetic data and a stand-in backbone, so `bash run` works with no downloads.

`prepare(root)` (called by `bash run demo`) writes, once,
  root/data/cocostuff/...              a synthetic data set in the real cocostuff layout (docs/cause.md §2)
  root/checkpoint/dino_vit_tiny_8.pth  a ViT-Tiny/8 with the project's stand-in weights, DINO release layout
and returns them with the options that size the run for a CPU; `predict_arguments` are predict.py's
own arguments at the end of a demo run.
The demo's numbers check the pipeline on synthetic images; they are not the paper's.
"""
from pathlib import Path

from loader.layouts import COCO_LIST, COCO_LIST_7
from loader.synthetic import make_synthetic_cocostuff
from models import stand_in_release
from utils.runtime.io import save_text, save_torch
from utils.runtime.locks import exclusive

DEMO_ARCH = "dino_vit_tiny_8"

# Sizes that keep the whole demo a few CPU minutes: 96-px inputs (12×12 tokens, 3×3 after grid
# sampling), a 64-prototype clusterbook and 128-d projections instead of 2048/2048. The demo's
# data set is tiny, so it trains on every crop each epoch (the scaled recipe) rather than on the
# paper recipe's quarter of them.
DEMO_OPTIONS = ["--recipe", "scaled", "--train_resolution", "96", "--test_resolution", "96", "--batch_size", "8",
                "--num_codebook", "64", "--projection_dim", "128", "--num_workers", "0",
                "--crf_workers", "2", "--num_pictures", "8"]


def prepare(root, n_train=24, n_val=12, image_size=192, seed=0):
    """Write what is missing of the demo under `root` (see the module's doc), one process at a time: a
    second `bash run demo` started meanwhile waits for the first to write it, then finds it there."""
    root = Path(root)
    with exclusive(root / ".prepare.lock", "writing the demo's data",
                   waiting="waiting for another `bash run demo` to write the demo's data"):
        return _prepare(root, n_train, n_val, image_size, seed)


def _prepare(root, n_train, n_val, image_size, seed):
    data_dir = root / "data"
    if not (data_dir / "cocostuff" / "curated" / "val2017").is_dir():
        make_synthetic_cocostuff(data_dir, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed)
    train_lists = data_dir / "cocostuff" / "curated" / "train2017"
    if not (train_lists / COCO_LIST_7).is_file():  # a demo written before PriMaPs, which reads this list
        save_text((train_lists / COCO_LIST).read_text(), train_lists / COCO_LIST_7)
    ckpt = root / "checkpoint" / f"{DEMO_ARCH}.pth"
    if not ckpt.is_file():
        save_torch(stand_in_release(DEMO_ARCH), ckpt)
    options = DEMO_OPTIONS + ["--output_root", str(root / "CAUSE"), "--results_root", str(root / "results"),
                              "--logs_root", str(root / "logs")]
    return data_dir, ckpt, options


def predict_arguments(root, head, model="cause", count=3):
    """predict.py's own arguments at the end of a demo run: `count` val images segmented by `model` (the
    CAUSE head, or PriMaPs-EM) with the CRF, into root/predictions_{head} (PriMaPs-EM: predictions_primaps),
    made again each run (the model may have been trained again)."""
    images = sorted((Path(root) / "data" / "cocostuff" / "images" / "val2017").glob("*.jpg"))[:count]
    output = Path(root) / (f"predictions_{head}" if model == "cause" else f"predictions_{model}")
    return ["--head", head, "--model", model, "--crf", "--overwrite", "--output", str(output), *map(str, images)]
