"""Machinery shared by the step engines (mediator, front door, fine-tune, test).

A step script builds a Config and calls `run_step`; that skips finished work, checks
its inputs before anything starts, and launches the step's worker in every process.
The worker gets a StepContext (config, process info, artifact paths, precision) and uses
the helpers below for the parts every training loop has: data, backbone features,
a synchronised optimiser step, resume states, logs and progress bars.
"""
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from loader import DATASETS, build_dataset, build_loader, check_layout, verify_readable
from models import load_backbone
from utils.distributed import Dist, all_reduce_gradients, barrier, launch
from utils.io import save_torch
from utils.paths import ArtifactPaths


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepContext:
    cfg: object
    dist: Dist
    paths: ArtifactPaths

    @property
    def device(self):
        return self.dist.device

    @property
    def dataset_info(self):
        return DATASETS[self.cfg.dataset]


def artifact_paths(cfg):
    return ArtifactPaths(cfg.dataset, cfg.baseline, cfg.num_codebook, cfg.head,
                         cfg.output_root, cfg.results_root, cfg.logs_root)


def run_step(cfg, worker, *, is_complete, preflight):
    """Skip the step if its output is complete; else check inputs and run `worker` in every process."""
    paths = artifact_paths(cfg)
    if not cfg.restart and is_complete(cfg, paths):
        print(f"[{cfg.step}] complete output found ({_describe_outputs(cfg, paths)}); skipping. "
              f"Pass --restart to redo it.")
        return None
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"backbone checkpoint {cfg.ckpt} does not exist: put the release file at "
                                f"checkpoint/<arch>.pth (e.g. checkpoint/dino_vit_base_8.pth) or pass --ckpt")
    preflight(cfg, paths)
    return launch(_StepWorker(worker), cfg)


class _StepWorker:
    """Picklable wrapper (spawned processes receive it) that hands the worker its StepContext."""

    def __init__(self, worker):
        self.worker = worker

    def __call__(self, cfg, dist):
        return self.worker(StepContext(cfg, dist, artifact_paths(cfg)))


def _describe_outputs(cfg, paths):
    return {"mediator": paths.modular, "front_door": paths.segment if cfg.head else None,
            "fine_tune": paths.cluster if cfg.head else None,
            "test": paths.metrics if cfg.head else None}.get(cfg.step)


def check_data(cfg, splits):
    """Stop before any work if the data cannot be read: layout for every split, and every val file
    decoded (the train crops are this project's own output, their sources checked when cropping)."""
    for split in splits:
        check_layout(cfg.dataset, cfg.data_dir, split)
    if "val" in splits:
        verify_readable(cfg.dataset, cfg.data_dir, "val", num_workers=cfg.num_workers)


def seed_everything(seed, rank):
    """Seed every generator a step uses; ranks differ so their dropout and sampling differ."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class Precision:
    """Autocast and loss scaling as the official code (fp16 + GradScaler) on GPU; fp32 on CPU."""

    def __init__(self, name, device):
        self.enabled = device.type == "cuda" and name != "fp32"
        self.dtype = torch.bfloat16 if name == "bf16" else torch.float16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled and name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()


def make_backbone(ctx):
    cfg = ctx.cfg
    return load_backbone(cfg.ckpt, cfg.arch, cfg.dino_small_heads).to(ctx.device)


@torch.no_grad()
def backbone_tokens(backbone, images):
    """Patch tokens of the frozen backbone; no graph is kept."""
    return backbone(images)


def train_loader(ctx, resolution):
    cfg = ctx.cfg
    dataset = build_dataset(cfg.dataset, cfg.data_dir, "train", resolution)
    return build_loader(dataset, cfg.batch_size, shuffle=True, rank=ctx.dist.rank, world_size=ctx.dist.world_size,
                        num_workers=cfg.num_workers, seed=cfg.seed)


def val_loader(ctx, resolution, distributed=True):
    cfg = ctx.cfg
    dataset = build_dataset(cfg.dataset, cfg.data_dir, "val", resolution)
    rank, world = (ctx.dist.rank, ctx.dist.world_size) if distributed else (0, 1)
    return build_loader(dataset, cfg.batch_size, shuffle=False, rank=rank, world_size=world,
                        num_workers=cfg.num_workers)


def batches(ctx, loader, epoch, desc):
    """Iterate a loader for one epoch with a progress bar on rank 0, honouring --max_steps."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    total = len(loader) if ctx.cfg.max_steps is None else min(len(loader), ctx.cfg.max_steps)
    bar = tqdm(loader, total=total, desc=desc, disable=not ctx.dist.is_main, leave=True, dynamic_ncols=True)
    for index, batch in enumerate(bar):
        if index >= total:
            break
        yield index, bar, {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v
                           for k, v in batch.items()}
    bar.close()


def check_finite(loss, ctx, epoch, batch_index):
    """The loss as a float; a NaN or infinite one stops the run before it touches any weight."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"[{ctx.cfg.step}] loss is {value} at epoch {epoch + 1}, batch {batch_index}; stopping. "
            f"The artifacts and resume state of the last finished epoch are untouched "
            f"({ctx.paths.resume_state(ctx.cfg.step)}); lower --lr or check the data before resuming.")
    return value


def optimizer_step(loss, optimizers, precision, trained, clip=None):
    """Backward, average gradients over processes, clip, step every optimiser: one training step.

    `trained` lists every parameter that learns (their gradients are all-reduced);
    `clip` is (parameters, max_norm) or None.
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    all_reduce_gradients(trained)
    if clip is not None:
        for optimizer in optimizers:
            precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    for optimizer in optimizers:
        precision.scaler.step(optimizer)
    precision.scaler.update()


def labelled_cross_entropy(logits, labels, n_classes):
    """The linear probe's loss: logits [B,n,h,w] upsampled to the labels, CE over valid pixels."""
    logits = torch.nn.functional.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = (labels >= 0) & (labels < n_classes)
    flat_logits = logits.permute(0, 2, 3, 1)[valid]
    loss = torch.nn.functional.cross_entropy(flat_logits, labels[valid])
    correct = (flat_logits.argmax(1) == labels[valid]).sum()
    return loss, correct, valid.sum()


class Logger:
    """TensorBoard scalars from rank 0 only."""

    def __init__(self, ctx):
        self.writer = SummaryWriter(str(ctx.paths.logs(ctx.cfg.step))) if ctx.dist.is_main else None
        self.step = 0

    def scalars(self, values, step=None):
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), self.step if step is None else step)
        if step is None:
            self.step += 1

    def close(self):
        if self.writer is not None:
            self.writer.close()


class ResumeState:
    """Per-epoch training state of an unfinished step (SPEC: resumable runs).

    Written atomically after every finished epoch, removed when the step completes:
    its presence marks the step unfinished, so a later run resumes instead of skipping.
    """

    def __init__(self, ctx):
        self.path = ctx.paths.resume_state(ctx.cfg.step)
        self.ctx = ctx
        self.first_epoch = 0  # the epoch the run starts at: 0, or the one after the saved state's

    def load(self):
        """The saved state (its random-number states already restored, `first_epoch` set), or None
        when starting fresh (no state, or --restart). Call it once the modules are built: building
        them draws random numbers, which must not shift the restored streams."""
        if self.ctx.cfg.restart or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if self.ctx.dist.is_main:
            print(f"[{self.ctx.cfg.step}] resuming after epoch {state['epoch'] + 1} from {self.path}")
        self.restore_rng(state)
        self.first_epoch = state["epoch"] + 1
        return state

    def nothing_left(self):
        """True when the saved state is of the last epoch: killed after it, before the artifacts."""
        return self.first_epoch == self.ctx.cfg.epochs

    def save(self, epoch, **states):
        """Save after `epoch` finished. Every process's RNG state is gathered so a resumed run continues exactly."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if self.ctx.device.type == "cuda" else None}
        gathered = [rng]
        if self.ctx.dist.world_size > 1:
            gathered = [None] * self.ctx.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
        if self.ctx.dist.is_main:
            save_torch({"epoch": epoch, "rng": gathered, **states}, self.path)
        barrier()

    def restore_rng(self, state):
        rng = state["rng"][self.ctx.dist.rank]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])

    def finish(self):
        barrier()
        if self.ctx.dist.is_main and self.path.is_file():
            self.path.unlink()


def loads(path):
    """True when `path` is a file torch can read back (a crash never leaves a partial one, but be sure)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False
