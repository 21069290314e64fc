"""Step 0 — the cropped training sets (SPEC §2), written once per data set and read by training.

The crops are written to a hidden sibling folder that is renamed to its final name only once
complete, so an interrupted run never leaves a partial set that training would accept. Data sets
without crops (Potsdam-3) have nothing to do here.
"""
import shutil
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from loader import build_source_dataset, dataset_info, existing_crop_dir
from loader.crops import EncodedCrops
from utils.runtime.io import owned_sibling, remove_abandoned_siblings


def _replace_dir(staging, target):
    """Rename the finished `staging` folder to `target`, replacing an older crop set there."""
    if target.exists():
        old = owned_sibling(target, "old")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def write_cropped_dataset(name, data_dir, num_workers=0, progress=True):
    """Write the cropped train set of `name` to data_dir/crop_dir and return that folder."""
    info = dataset_info(name)
    data_dir = Path(data_dir)
    source = build_source_dataset(name, data_dir, "train")
    target = data_dir / info.crop_dir
    for kind in ("partial", "old"):
        for path in remove_abandoned_siblings(target, kind):
            print(f"[crop] removed {path}, left by a crop run that was killed")
    staging = owned_sibling(target, "partial")
    if staging.exists():
        shutil.rmtree(staging)
    image_dir, label_dir = staging / "img" / "train", staging / "label" / "train"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    # batch_size=None: one item (all crops of one source image) at a time, in dataset order.
    loader = DataLoader(EncodedCrops(source, info.crop_type), batch_size=None, num_workers=num_workers)
    try:
        count = 0
        for crops in tqdm(loader, total=len(source), desc=f"[crop] {name}", disable=not progress):
            for jpeg, png in crops:
                (image_dir / f"{count}.jpg").write_bytes(jpeg)
                (label_dir / f"{count}.png").write_bytes(png)
                count += 1
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def run(cfg):
    info = dataset_info(cfg.dataset)
    if info.crop_type is None:
        print(f"[crop] {cfg.dataset} trains on its images as they are: nothing to crop")
        return None
    # Crop sets are renamed into place only when complete; STEGO's own folder is read by training too.
    existing = existing_crop_dir(info, cfg.data_dir)
    if existing is not None and not cfg.restart:
        print(f"[crop] {existing} exists; skipping (--restart makes the crops again)")
        return existing
    return write_cropped_dataset(cfg.dataset, cfg.data_dir, num_workers=cfg.num_workers)
