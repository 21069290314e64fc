"""Step 0 — the cropped training sets (docs/cause.md §2), written once per data set and read by training.

The crops are written to a hidden sibling folder, with their record inside it (the fingerprints of
the source files: names, sizes and modification times), and renamed to their final name only once
complete: an interrupted run never leaves a partial set that training would accept, and adding,
removing or replacing a source image crops the set again. Data sets without crops (Potsdam-3) have
nothing to do here.
"""
import shutil
import sys
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from loader import build_source_dataset, dataset_info
from loader.crops import EncodedCrops
from utils.engine.runner import run_step
from utils.engine.status import say, step_record
from utils.runtime.config import make_config
from utils.runtime.io import owned_sibling, remove_abandoned_siblings
from utils.runtime.paths import paths_of
from utils.runtime.records import FingerprintCache, write_record
from utils.runtime.steps import DATA, STEPS, Step, register


def _replace_dir(staging, target):
    """Rename the finished `staging` folder to `target`, replacing an older crop set there."""
    if target.exists():
        old = owned_sibling(target, "old")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def work(ctx):
    """Write the cropped train set of the data set to its crop folder and return that folder."""
    cfg = ctx.cfg
    info = dataset_info(cfg.dataset)
    data_dir = Path(cfg.data_dir)
    source = build_source_dataset(cfg.dataset, data_dir, "train")
    target = data_dir / info.crops.folder  # ours, also when STEGO's folder is the one training read so far
    for kind in ("partial", "old"):
        for path in remove_abandoned_siblings(target, kind):
            say(f"[crop] removed {path}, left by a crop run that was killed")
    staging = owned_sibling(target, "partial")
    if staging.exists():
        shutil.rmtree(staging)
    image_dir, label_dir = staging / "img" / "train", staging / "label" / "train"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    # batch_size=None: one item (all crops of one source image) at a time, in dataset order.
    loader = DataLoader(EncodedCrops(source, info.crops.kind), batch_size=None, num_workers=cfg.num_workers)
    try:
        count = 0
        for crops in tqdm(loader, total=len(source), desc=f"[crop] {cfg.dataset}", dynamic_ncols=True):
            for jpeg, png in crops:
                (image_dir / f"{count}.jpg").write_bytes(jpeg)
                (label_dir / f"{count}.png").write_bytes(png)
                count += 1
        # The record goes in before the rename: a crop folder under its final name always has it.
        fingerprint = FingerprintCache(None).artifact(staging)  # in memory: the staging name is passing
        write_record(staging, step_record(ctx, None, {str(target): fingerprint}))
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    say(f"[crop] {count} crops of {len(source)} images in {target}")
    return target


def write_cropped_dataset(name, data_dir, num_workers=0):
    """Run the crop step for data set `name` under `data_dir` (it skips crops that are up to date) and
    return the crop folder training reads."""
    cfg = make_config(STEPS["crop"], None, {"dataset": name, "data_dir": Path(data_dir), "num_workers": num_workers})
    run_step(cfg, sys.modules[__name__])
    return paths_of(cfg).crops


def _crops(paths):
    return [paths.crops] if paths.crops is not None else []


register(Step(
    name="crop", engine=__name__, script="crop_dataset.py", options=(*DATA, "restart"), outputs=_crops,
    data=("train",), train_set="images", pipeline="cause", description="the cropped training set (docs/cause.md §2)"))
