"""The training loop the training steps share, and the Training objects it drives.

A training step's work builds a Training object (one class per step, in utils/engine/<step>.py) whose
`losses` and `update` are one optimiser step, and hands it to `fit`: the loop around them (data,
randomness, resume states, progress, logs, artifacts and their records) is written once, here.
"""
import math

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from errors import UserError
from loader import build_dataset
from loader.samplers import GlobalBatchSampler, evaluation_loader, share_of, training_loader
from models import load_backbone
from modules.randomness import BatchRandom, mixed_seed
from utils.engine.resume import ResumeState, commit_path
from utils.engine.status import step_record
from utils.runtime.distributed import barrier, communication_device, world_size


class NonFiniteLossError(UserError):
    pass


class Training:
    """One optimiser step of a training step, and what its resume state holds.

    A subclass computes `losses(batch, random)` -> {name: tensor} for a batch {"img", "label", ...}
    (this process's part of each global-batch loss; "loss" the one to back-propagate, plus
    "correct"/"counted" for a labelled probe's accuracy where there is one) and makes the step in
    `update(losses, random)`, which may return {name: value} to log (gradient norms). It names what
    its resume state holds in `parts()` ({name: object with state_dict/load_state_dict}: modules,
    optimisers, schedulers, the loss scaler); `steps_done` (optimiser steps so far) travels with them.
    `schedulers` step at the end of every epoch; `validation(epoch)` gives the epoch's diagnostics.
    A concept bank, one per process, is its `process_state`.
    """
    schedulers = ()
    validation = None

    def __init__(self):
        self.steps_done = 0

    def parts(self):
        raise NotImplementedError

    def end_epoch(self):
        for scheduler in self.schedulers:
            scheduler.step()

    def validate(self, epoch):
        return self.validation(epoch) if self.validation is not None else {}

    def state_dict(self):
        return {"steps_done": self.steps_done, **{name: part.state_dict() for name, part in self.parts().items()}}

    def load_state_dict(self, state):
        self.steps_done = state["steps_done"]
        for name, part in self.parts().items():
            part.load_state_dict(state[name])

    def process_state(self):
        return None

    def load_process_state(self, state):
        raise ValueError("this step keeps no per-process state")


def make_backbone(cfg, device, heads=None):
    """The frozen backbone of `cfg` on `device` (`heads`: DINO ViT-S's head count when it is not the
    step's --dino_small_heads)."""
    return load_backbone(cfg.ckpt, cfg.arch, heads or cfg.dino_small_heads).to(device)


@torch.no_grad()
def backbone_tokens(backbone, images, precision):
    """Patch tokens of the frozen backbone under the step's autocast; no graph is kept."""
    with precision.autocast():
        return backbone(images)


def training_data(ctx, resolution, dataset=None):
    """The training loader of this process and its sampler (loader/samplers.py); `dataset`: the
    training items when they are not the step's usual train set at `resolution`."""
    cfg, recipe, rank = ctx.cfg, ctx.recipe, ctx.dist.rank
    if dataset is None:
        dataset = training_set(ctx, resolution)
    drop_last = ctx.step.drop_last
    if recipe.shared_batch:
        sampler = GlobalBatchSampler(len(dataset), recipe.global_batch, shards=recipe.shards, shard=0,
                                     processes=recipe.processes, rank=rank, seed=cfg.seed, drop_last=drop_last)
    else:
        sampler = GlobalBatchSampler(len(dataset), recipe.batch_per_process, shards=recipe.shards, shard=rank,
                                     processes=1, rank=0, seed=cfg.seed, drop_last=drop_last)
    return training_loader(dataset, sampler, cfg.num_workers), sampler


def training_set(ctx, resolution):
    """The step's training items at `resolution`: its train set, resized as the step declares."""
    cfg = ctx.cfg
    return build_dataset(cfg.dataset, cfg.data_dir, "train", resolution, ctx.step.train_set, ctx.step.resize["train"])


def validation_loader(ctx, resolution, resize=None):
    """The val split at `resolution`, resized as the step declares (or by `resize`, loader/transforms.RESIZES)."""
    dataset = build_dataset(ctx.cfg.dataset, ctx.cfg.data_dir, "val", resolution,
                            resize=resize or ctx.step.resize["val"])
    return evaluation_loader(dataset, ctx.cfg.batch_size, ctx.dist.rank, ctx.dist.world_size, ctx.cfg.num_workers)


def progress(ctx, loader, desc, limit=None):
    """(index, bar, batch on the device) over a loader, with a progress bar on rank 0."""
    total = len(loader) if limit is None else min(len(loader), limit)
    bar = tqdm(loader, total=total, desc=desc, disable=not ctx.dist.is_main, leave=True, dynamic_ncols=True)
    for index, batch in enumerate(bar):
        if index >= total:
            break
        yield index, bar, {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v
                           for k, v in batch.items()}
    bar.close()


class Logger:
    """TensorBoard scalars and the run's record (as hparams) from rank 0 only."""

    def __init__(self, ctx):
        self.writer = SummaryWriter(str(ctx.files.logs)) if ctx.dist.is_main else None
        self.step = 0

    def scalars(self, values, step=None):
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), self.step if step is None else step)
        if step is None:
            self.step += 1

    def record(self, record):
        """The run's settings as TensorBoard hparams, so runs can be told apart and compared there."""
        if self.writer is None:
            return
        flat = {}
        for group in ("recipe", "identity"):
            _flatten(record.get(group, {}), group, flat)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
        self.writer.add_hparams(hparams, {}, run_name=".")

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _flatten(value, prefix, into):
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(inner, f"{prefix}/{key}", into)
    else:
        into[prefix] = value


def fit(ctx, training, resolution, save_artifacts, dataset=None):
    """Train `training` (a Training) for the step's epochs, resuming a saved state, and call
    `save_artifacts(ctx, epochs_done)` on rank 0 after every epoch: it writes the step's artifacts and
    their records. `dataset`: see training_data."""
    cfg, recipe = ctx.cfg, ctx.recipe
    loader, sampler = training_data(ctx, resolution, dataset)
    ctx.samples_per_epoch = sampler.samples_per_epoch()
    ctx.steps_per_epoch = len(sampler) if cfg.max_steps is None else min(len(sampler), cfg.max_steps)
    group = training.group
    logger = Logger(ctx)
    logger.record(step_record(ctx, 0))
    resume = ResumeState(ctx, recipe.shared_batch)
    # Under torchrun every process decided on its own; rank 0 discarded a stale or --restart-ed state
    # before it started: wait for it, so that no process resumes from what rank 0 dropped.
    barrier()
    resume.load(training)
    for epoch in range(resume.first_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        for index, bar, batch in progress(ctx, loader, f"[{ctx.label}] epoch {epoch + 1}/{cfg.epochs}",
                                          cfg.max_steps):
            share = sampler.share(index)
            group.set_rows(row_counts(recipe, share))
            seed = mixed_seed(cfg.seed, epoch, index, -1 if recipe.shared_batch else ctx.dist.rank)
            random = BatchRandom(seed, share, ctx.device)
            losses = training.losses(batch, random)
            shown = _global_values(group, losses)
            check_finite(shown["loss"], ctx, epoch, index)
            measured = training.update(losses, random) or {}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if k not in ("correct", "counted")})
            logger.scalars({f"{cfg.step}/{k}": v for k, v in {**shown, **measured}.items() if v is not None})
        training.end_epoch()
        check_processes_agree(training.state_dict())
        diagnostics = training.validate(epoch)
        logger.scalars({f"{cfg.step}/val_{k}": v for k, v in diagnostics.items()}, step=epoch)
        if ctx.dist.is_main and diagnostics:
            print(f"[{ctx.label}] epoch {epoch + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in diagnostics.items()))
        resume.save(epoch, training)
        if ctx.dist.is_main:
            save_artifacts(ctx, epoch + 1)
    if resume.nothing_left() and ctx.dist.is_main:
        save_artifacts(ctx, cfg.epochs)
    resume.finish()
    logger.close()


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _tensors(inner)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            yield from _tensors(inner)


def check_processes_agree(state):
    """Every process must end an epoch with the same trained state (the same reduced gradients, the
    same draws): compare float64 sums of every tensor of `state` across processes. A difference is a
    bug, not a user error: it keeps its traceback."""
    if world_size() == 1:
        return
    sums = torch.tensor([[t.double().sum().item(), t.double().square().sum().item()] for t in _tensors(state)],
                        dtype=torch.float64, device=communication_device())
    gathered = [torch.empty_like(sums) for _ in range(world_size())]
    torch.distributed.all_gather(gathered, sums)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(f"processes {differing} hold other weights than process 0 after an epoch: their "
                           f"updates diverged")


def row_counts(recipe, share):
    """The rows of the current global batch each process of the batch group holds, in rank order."""
    if not recipe.shared_batch:
        return [share.rows]
    return [share_of(share.global_rows, recipe.processes, rank).rows for rank in range(recipe.processes)]


def _global_values(group, losses):
    """{name: float} over the whole global batch (one reduction); the probe's accuracy as a percentage."""
    names = list(losses)
    values = group.sum(torch.stack([losses[name].detach().float() for name in names])).tolist()
    shown = dict(zip(names, values, strict=True))
    if "counted" in shown:
        shown["probe_accuracy"] = 100 * shown["correct"] / max(shown["counted"], 1)
    return shown


def check_finite(value, ctx, epoch, batch_index):
    """A NaN or infinite loss stops the run before it touches any weight."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"[{ctx.label}] loss is {value} at epoch {epoch + 1}, batch {batch_index}; stopping. "
            f"The artifacts and resume state of the last finished epoch are untouched "
            f"({commit_path(ctx.files)}); lower --lr or check the data before resuming.")
