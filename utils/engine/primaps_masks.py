"""PriMaPs' pseudo masks (docs/primaps.md §1), computed once per data set, backbone and mask settings.

One 8-bit PNG per training image (named after the image's file stem) in a folder named after the
settings, CAUSE/{dataset}/primaps_masks/{backbone}_{resolution}px_threshold{ψ}_seed{seed}/, with
masks.json beside the PNGs saying what made them. Each process of a training run computes the
masks of its share of the images (every world_size-th), and only those that are not already
there, whole and readable at the right size: an interrupted computation resumes where it stopped,
and a damaged mask is computed again. The features and principal directions are computed on the
run's device; the CRF, which dominates the cost, on a pool of CPU worker processes, while the
device works on the next batch. Each image's random draws (torch.pca_lowrank) come from a
generator seeded with (run seed, image index), so a rerun writes the same masks.

An image whose mask proposals come out NaN (features without any direction, e.g. constant
patches: the official code divides 0 by 0 there) gets no mask: every pixel 255, so it adds nothing
to training. masks.json lists the images without any mask pixel, whatever the reason. The folder is
shared by the runs of every mode on the same backbone weights and data: one computes its masks at a time
(a lock beside it), the other then finds them made.
"""
import json
import shutil
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from loader.pseudo_masks import read_mask
from modules.crf import crf_inputs
from modules.features import backbone_map
from modules.primaps import NO_MASK, mask_log_probs, pseudo_mask_job
from modules.randomness import mixed_seed
from utils.runtime.distributed import barrier, is_initialized
from utils.runtime.io import save_png, save_text
from utils.runtime.locks import exclusive
from utils.runtime.records import StaleInputError, differences, now, project_version

INFO = "masks.json"


def masks_name(cfg, weights):
    """The folder name of a run's masks: what a user tells them apart by (masks.json holds the rest).
    `weights`: the backbone's weights_fingerprint, so that every run on the same weights shares the
    masks, whichever file held them (a backbone release, or the DINO ViT inside a STEGO or HP file)."""
    return f"{cfg.arch}_{weights.split(':')[-1][:8]}_{cfg.train_resolution}px_threshold{cfg.threshold:g}_seed{cfg.seed}"


def masks_identity(ctx, mask_heads, weights):
    """Everything the masks depend on. The features are computed in float32 whatever --precision says."""
    cfg = ctx.cfg
    return {"arch": cfg.arch, "attention_heads_of_dino_vit_small": mask_heads,
            "backbone_weights": weights, "train_images": ctx.identity["data"]["train"],
            "resolution": cfg.train_resolution, "resize": ctx.step.resize["train"], "threshold": cfg.threshold,
            "seed": cfg.seed}


@contextmanager
def _single_thread(device):
    """The mask proposals are hundreds of tiny operations per image: on CPU, more threads only wait on
    each other (up to 1000× slower on a busy machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_info(folder):
    try:
        return json.loads((folder / INFO).read_text())
    except (OSError, ValueError):
        return None


def _claim_folder(ctx, folder, identity):
    """Rank 0: make `folder` hold masks of `identity` only (stale ones are removed, or refused with
    --if_changed refuse), and say so in masks.json before any mask is written."""
    info = _read_info(folder)
    if info is not None and info.get("identity") == identity:
        return
    if info is not None or any(folder.glob("*.png")):
        changed = differences(info["identity"], identity) if info is not None else ["no masks.json"]
        message = f"[primaps] the pseudo masks in {folder} were made otherwise ({'; '.join(changed)})"
        if ctx.cfg.if_changed == "refuse":
            raise StaleInputError(message + ". Rerun without --if_changed refuse to compute them again.")
        print(message + "; computing them again.")
        shutil.rmtree(folder)
    save_text(json.dumps({"identity": identity, "complete": False}, indent=2), folder / INFO)


class _Writer:
    """Runs the CRF half of each mask on the pool (or here) and writes the PNGs, one batch behind the device."""

    def __init__(self, pool):
        self.pool = pool
        self.pending = None

    def submit(self, paths, inputs):
        self.finish()
        if self.pool is None:
            self.pending = (paths, [pseudo_mask_job(one) for one in inputs])
        else:
            self.pending = (paths, self.pool.map_async(pseudo_mask_job, inputs))

    def finish(self):
        if self.pending is None:
            return
        paths, masks = self.pending
        self.pending = None
        for path, mask in zip(paths, masks if isinstance(masks, list) else masks.get(), strict=True):
            save_png(mask, path)


def _compute(ctx, backbone, dataset, mask_files, indices, pool):
    """Compute and write the masks of dataset items `indices`; returns the indices whose proposals were NaN."""
    cfg, device = ctx.cfg, ctx.device
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    writer = _Writer(pool)
    without_proposals = []
    bar = tqdm(total=len(indices), desc=f"[primaps] pseudo masks of {cfg.dataset}", disable=not ctx.dist.is_main,
               dynamic_ncols=True)
    for batch in loader:
        paths, inputs = [], []
        for image, index in zip(batch["img"], batch["ind"].tolist(), strict=True):
            # One image per forward pass: a mask then does not depend on which images share its batch
            # (a resumed computation or another process count batches them otherwise). The CRF costs
            # far more than the forward pass anyway.
            feature = backbone_map(backbone, image[None].to(device))[0]
            with _single_thread(device):
                log_probs = mask_log_probs(feature, cfg.threshold, seed=mixed_seed(cfg.seed, index)).cpu()
                if torch.isfinite(log_probs).all():
                    paths.append(mask_files[index])
                    inputs.append(crf_inputs(image, log_probs))
                else:
                    without_proposals.append(index)
                    save_png(np.full(image.shape[-2:], NO_MASK, dtype=np.uint8), mask_files[index])
        writer.submit(paths, inputs)
        bar.update(len(batch["img"]))
    writer.finish()
    bar.close()
    return without_proposals


def _is_empty(path, resolution):
    """Whether the cached mask in `path` has no mask pixel; None when it must be computed (again)."""
    mask = read_mask(path, resolution)
    return None if mask is None else bool((mask == NO_MASK).all())


def _gather(values):
    """The lists of every process, concatenated."""
    if not is_initialized():
        return list(values)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(values))
    return [value for part in gathered for value in part]


@torch.no_grad()
def prepare_masks(ctx, backbone, dataset, mask_files, pool, mask_heads, weights):
    """Make sure every training image has its pseudo mask in `mask_files` (see the module's doc);
    called by every process of the run, `backbone` on the process's device, `weights` its fingerprint."""
    folder = mask_files[0].parent
    lock = folder.with_name(f".{folder.name}.lock")
    with exclusive(lock, f"[primaps] the pseudo masks in {folder}") if ctx.dist.is_main else nullcontext():
        _prepare(ctx, backbone, dataset, mask_files, pool, mask_heads, folder, weights)


def _prepare(ctx, backbone, dataset, mask_files, pool, mask_heads, folder, weights):
    identity = masks_identity(ctx, mask_heads, weights)
    if ctx.dist.is_main:
        _claim_folder(ctx, folder, identity)
    barrier()
    mine = range(ctx.dist.rank, len(dataset), ctx.dist.world_size)
    empty = {index: _is_empty(mask_files[index], ctx.cfg.train_resolution) for index in mine}
    missing = [index for index, state in empty.items() if state is None]
    without_proposals = _compute(ctx, backbone, dataset, mask_files, missing, pool) if missing else []
    empty.update({index: _is_empty(mask_files[index], ctx.cfg.train_resolution) for index in missing})
    empty = [index for index, state in empty.items() if state]
    computed, empty, without_proposals = (_gather(values) for values in (missing, empty, without_proposals))
    if ctx.dist.is_main:
        stems = [mask_files[index].stem for index in sorted(empty)]
        save_text(json.dumps({
            "identity": identity, "complete": True, "images": len(dataset), "computed_by_the_last_run": len(computed),
            "images_without_masks": stems,
            "images_without_masks_note": "no pixel in any mask: the proposals went NaN (features without any "
                                         "direction) or the CRF gave every pixel to the background; such images "
                                         "add nothing to training",
            "proposals_nan_in_the_last_run": [mask_files[index].stem for index in sorted(without_proposals)],
            "version": project_version(), "written": now()}, indent=2), folder / INFO)
        reused = len(dataset) - len(computed)
        print(f"[primaps] pseudo masks in {folder}: {len(computed)} computed, {reused} reused"
              + (f"; {len(stems)} image(s) without any mask" if stems else ""))
    barrier()
