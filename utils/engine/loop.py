"""What every step shares: deciding whether to run, checking inputs, launching, and the training loop.

A step script calls `run_step(cfg, spec)`. That checks the step's inputs before anything starts,
fingerprints them, decides from the record beside the step's artifact whether it is already done
(utils/runtime/records.py), and launches the step's worker in every process. Training steps give
`fit` a Training object (one per step, in utils/engine/<step>.py) whose `losses` and `update` are
one optimiser step: the loop around them (data, randomness, resume states, progress, logs,
artifacts and their records) is written once, here.
"""
import json
import math
import sys
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from errors import UserError
from loader import DATASETS, build_dataset, split_files, verify_readable
from loader.samplers import GlobalBatchSampler, evaluation_loader, share_of, training_loader
from models import CheckpointError, load_backbone
from modules.randomness import BatchRandom, mixed_seed
from utils.runtime.config import PRIMAPS_INIT, TRAINING, ConfigError, recipe_for, step_label
from utils.runtime.distributed import (Dist, barrier, communication_device, launch, launch_single, process_count,
                                       requested_gpus, torchrun_rank, world_size)
from utils.runtime.io import save_torch, save_text
from utils.runtime.paths import ArtifactPaths, paths_of
from utils.runtime.records import (FingerprintCache, StaleInputError, check_complete, differences, identity_of,
                                   now, project_version, read_record, upstream_entry, write_record)


class NonFiniteLossError(UserError):
    pass


@dataclass(frozen=True)
class Upstream:
    """An earlier step's artifact that a step reads, and the command that makes it."""
    path: Path
    produced_by: str


@dataclass(frozen=True)
class StepSpec:
    """What `run_step` needs to know of a step.

    outputs: the artifacts it writes (the first one's record says whether the step is done);
    upstream: {name: Upstream} of the earlier artifacts it reads; data: the splits whose files it
    reads ("train", "val"); settings: the options its result depends on (part of its identity);
    worker: the work of one process; single_process: runs in one process whatever --gpu says;
    on_skip: prints the result of an up-to-date step.
    """
    outputs: Callable
    upstream: Callable
    data: tuple
    settings: Callable
    worker: Callable
    single_process: bool = False
    on_skip: Callable = None
    curated_7: bool = False


@dataclass
class StepContext:
    cfg: object
    dist: Dist
    paths: ArtifactPaths
    recipe: object
    identity: dict
    upstream: dict
    warnings: list = field(default_factory=list)
    run_id: str = ""  # names this run in its records: a later step's inputs change when an earlier step reruns
    samples_per_epoch: int | None = None  # set by fit: what the records say of the recipe
    steps_per_epoch: int | None = None

    @property
    def device(self):
        return self.dist.device

    @property
    def dataset_info(self):
        return DATASETS[self.cfg.dataset]


def artifact_paths(cfg):
    return paths_of(cfg)


def _label(cfg):
    return step_label(cfg.step, cfg.head)


def _say(text):
    if torchrun_rank() == 0:
        print(text)


def run_step(cfg, spec):
    """Check inputs, decide, and run `spec`'s worker in every process; returns rank 0's result."""
    paths = artifact_paths(cfg)
    require_backbone_file(cfg)
    processes = 1 if spec.single_process else process_count(cfg)
    recipe = None if spec.single_process else recipe_for(cfg, processes)
    fingerprints = FingerprintCache(paths.fingerprint_cache)
    # Listing a split's files checks its layout (DatasetLayoutError naming what is missing) too.
    data_files = {split: _data_files(cfg, spec, split) for split in spec.data}
    upstream = upstream_inputs(cfg, spec, paths, fingerprints)
    warnings = check_complete(upstream, cfg.accept_partial)
    identity = {
        "settings": spec.settings(cfg, recipe, _resolved_precision(cfg)),
        "backbone": {"arch": cfg.arch, "fingerprint": fingerprints.file(cfg.ckpt)},
        "data": {split: fingerprints.file_list(files, cfg.data_dir) for split, files in data_files.items()},
        "upstream": {name: identity_of(entry) for name, entry in upstream.items()},
    }
    if not _decide_to_run(cfg, spec, paths, identity, fingerprints):
        _keep(fingerprints)
        return spec.on_skip(cfg, paths) if spec.on_skip else None
    if "val" in spec.data:
        # Every val file is decoded before the run starts (the train crops are this project's own
        # output, their sources checked when cropping).
        verify_readable(cfg.dataset, cfg.data_dir, "val", num_workers=cfg.num_workers)
    if recipe is not None:
        _say(f"[{_label(cfg)}] {recipe.describe()}; precision {identity['settings']['precision']}, "
             f"seed {cfg.seed}, {cfg.epochs} epoch(s)")
    worker = _StepWorker(spec.worker, paths, recipe, identity, upstream, warnings, uuid.uuid4().hex)
    result = (launch_single if spec.single_process else launch)(worker, cfg)
    _keep(fingerprints)
    return result


def require_backbone_file(cfg):
    if not Path(cfg.ckpt).is_file():
        raise CheckpointError(f"backbone checkpoint {cfg.ckpt} does not exist: put the release file at "
                              f"checkpoint/<arch>.pth (e.g. checkpoint/dino_vit_base_8.pth) or pass --ckpt")


def upstream_inputs(cfg, spec, paths, fingerprints):
    """{name: upstream entry} of the earlier artifacts `spec` reads (utils/runtime/records.py); stops
    at a missing one, naming the step that makes it (run_step, and predict.py for the test step's)."""
    upstream = {}
    for name, wanted in spec.upstream(cfg, paths).items():
        if not wanted.path.is_file():
            raise StaleInputError(f"{wanted.path} does not exist: run {wanted.produced_by} first "
                                  f"(or place the released CAUSE file there)")
        upstream[name] = upstream_entry(wanted.path, wanted.produced_by, fingerprints)
    return upstream


def _keep(fingerprints):
    """Save the hashes taken, once the step has done its work: a run refused at its start writes nothing."""
    if torchrun_rank() == 0:
        fingerprints.save()


def _data_files(cfg, spec, split):
    """The image and label files a step reads of `split`: what its data fingerprint covers."""
    images, labels = split_files(cfg.dataset, cfg.data_dir, split, curated_7=spec.curated_7 and split == "train")
    return images + labels


def _resolved_precision(cfg):
    """The precision a step of `cfg` will run at, before it is launched on its devices."""
    return resolved_precision(cfg.precision, "cuda" if requested_gpus(cfg.gpu) else "cpu")


def resolved_precision(name, device_type):
    """What --precision auto means: the official fp16 (with loss scaling) on a GPU, fp32 on a CPU."""
    if name != "auto":
        return name
    return "fp16" if device_type == "cuda" else "fp32"


def _decide_to_run(cfg, spec, paths, identity, fingerprints):
    """False when the step's output is up to date; prints why a step runs again."""
    label = _label(cfg)
    main = Path(spec.outputs(paths)[0])
    resume = ResumeState.describe(paths, cfg)
    if cfg.restart:
        ResumeState.discard(paths, cfg)
        return True
    if resume is not None:
        changed_settings = differences(resume["identity"]["settings"], identity["settings"])
        if changed_settings:
            raise ConfigError(
                f"[{label}] the unfinished run saved in {resume['path']} used other settings "
                f"({'; '.join(changed_settings)}): rerun with those settings to resume it, or pass --restart "
                f"to start over")
        changed_inputs = _changed_inputs(resume["identity"], identity)
        if not changed_inputs:
            return True
        _stale(cfg, label, f"the unfinished run in {resume['path']}", changed_inputs)
        ResumeState.discard(paths, cfg)
        return True
    if not main.is_file():
        return True
    record = read_record(main)
    if record is None:
        _say(f"[{label}] {main} exists without a record of how it was made (a released file?): using it as it "
             f"is. Pass --restart to make it again.")
        return False
    changed = differences(record.get("identity", {}), identity)
    recorded = record.get("artifacts", {})
    damaged = [str(p) for p in spec.outputs(paths)
               if not Path(p).is_file() or (str(p) in recorded and fingerprints.file(p) != recorded[str(p)])]
    if damaged:
        _say(f"[{label}] {', '.join(damaged)} is not what its run wrote (missing, damaged or replaced); running the "
             f"step again")
        return True
    if record.get("complete") and not changed:
        _say(f"[{label}] {main} is up to date (made from the same inputs and settings); skipping. "
             f"Pass --restart to make it again.")
        return False
    if record.get("complete"):
        _stale(cfg, label, str(main), changed)
    else:
        _say(f"[{label}] {main} comes from an unfinished run without a resume state; starting over")
    return True


def _changed_inputs(old, new):
    return differences({k: v for k, v in old.items() if k != "settings"},
                       {k: v for k, v in new.items() if k != "settings"})


def _stale(cfg, label, what, changed):
    message = f"[{label}] {what} was made from other inputs or settings: {'; '.join(changed)}"
    if cfg.if_changed == "refuse":
        raise StaleInputError(message + ". Rerun without --if_changed refuse to make it again.")
    _say(message + "; running the step again.")


class _StepWorker:
    """Picklable wrapper (spawned processes receive it) that hands the worker its StepContext."""

    def __init__(self, worker, *context):
        self.worker = worker
        self.context = context  # StepContext's fields after the config and the process

    def __call__(self, cfg, dist):
        ctx = StepContext(cfg, dist, *self.context)
        return self.worker(ctx)


def step_record(ctx, epochs_done, artifact_fingerprints=None):
    """The record written beside a step's artifacts (utils/runtime/records.py)."""
    cfg, recipe = ctx.cfg, ctx.recipe
    record = {
        "step": cfg.step, "head": cfg.head, "dataset": cfg.dataset,
        "complete": epochs_done >= cfg.epochs, "epochs_done": epochs_done, "epochs": cfg.epochs,
        "identity": ctx.identity,
        "precision": ctx.identity["settings"]["precision"], "seed": cfg.seed,
        "label_leak": cfg.label_leak, "backbone": {"file": str(cfg.ckpt), **ctx.identity["backbone"]},
        "upstream": {name: {k: v for k, v in entry.items() if k != "record"} for name, entry in ctx.upstream.items()},
        "accepted_partial": ctx.warnings, "version": project_version(), "written": now(), "run_id": ctx.run_id,
        "command": " ".join(sys.argv),
    }
    if recipe is not None:
        record["recipe"] = {"name": recipe.name, "processes": recipe.processes,
                            "batch_per_process": recipe.batch_per_process, "global_batch": recipe.global_batch,
                            "lr": recipe.lr, "samples_per_epoch": ctx.samples_per_epoch,
                            "optimizer_steps_per_epoch": ctx.steps_per_epoch}
    if artifact_fingerprints:
        record["artifacts"] = artifact_fingerprints
    return record


class Precision:
    """Autocast and loss scaling. auto: fp16 with a GradScaler on GPU, as the official code, and fp32
    on CPU; fp16 and bf16 are honoured on CPU too (CPU autocast, the same GradScaler path)."""

    def __init__(self, name, device):
        name = resolved_precision(name, device.type)
        self.name = name
        self.enabled = name != "fp32"
        self.dtype = torch.bfloat16 if name == "bf16" else torch.float16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()


def make_backbone(ctx):
    cfg = ctx.cfg
    return load_backbone(cfg.ckpt, cfg.arch, cfg.dino_small_heads).to(ctx.device)


def optimizer_step(loss, optimizers, precision, group, trained, clip=None):
    """Backward, reduce gradients over the processes, clip, step every optimiser: one training step.

    `trained` lists every parameter that learns; `clip` is (parameters, max_norm) or None.
    Returns the total gradient norm the clipping saw (None without clipping).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    group.reduce_gradients(trained)
    total_norm = None
    if clip is not None:
        for optimizer in optimizers:
            precision.scaler.unscale_(optimizer)
        total_norm = torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    for optimizer in optimizers:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    return total_norm


class Logger:
    """TensorBoard scalars and the run's record (as hparams) from rank 0 only."""

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


# The steps that train, and so save resume states.
RESUMABLE = (*TRAINING, PRIMAPS_INIT)


class ResumeState:
    """Per-epoch training state of an unfinished step (model, optimisers, schedulers, scaler, and each
    process's concept bank), written atomically after every finished epoch and removed when the step
    completes. Its presence marks the step unfinished; a small JSON beside it holds the identity
    (settings and inputs) it was made with, which `run_step` checks before resuming.

    Nothing random is saved: every draw of a step comes from a generator seeded by (seed, epoch,
    batch), and the data order depends only on (seed, epoch).
    """

    def __init__(self, ctx, shared_process_state):
        self.ctx = ctx
        self.path = ctx.paths.resume_state(ctx.cfg.step)
        # The paper recipe's processes hold the same bank: rank 0's file serves all of them.
        self.shared = shared_process_state
        self.first_epoch = 0

    @staticmethod
    def describe(paths, cfg):
        """{path, epoch, identity} of a saved state, or None."""
        path = paths.resume_state(cfg.step) if cfg.step in RESUMABLE else None
        if path is None or not path.is_file():
            return None
        try:
            info = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None  # written before its identity: cannot be trusted, start over
        return {"path": path, **info}

    @staticmethod
    def discard(paths, cfg):
        if torchrun_rank() != 0 or cfg.step not in RESUMABLE:
            return
        path = paths.resume_state(cfg.step)
        for stale in [path, path.with_suffix(".json"), *path.parent.glob(path.stem + ".bank*.pt")]:
            if stale.is_file():
                stale.unlink()

    def _bank_path(self):
        rank = 0 if self.shared else self.ctx.dist.rank
        return self.ctx.paths.resume_bank(self.ctx.cfg.step, rank)

    def load(self, training):
        """Restore `training` from the saved state, if any; sets first_epoch."""
        if not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        training.load_state_dict(state["training"])
        bank = self._bank_path()
        if bank.is_file():
            training.load_process_state(torch.load(bank, map_location="cpu", weights_only=True))
        self.first_epoch = state["epoch"] + 1
        if self.ctx.dist.is_main:
            print(f"[{_label(self.ctx.cfg)}] resuming after epoch {self.first_epoch} from {self.path}")

    def nothing_left(self):
        """True when the saved state is of the last epoch: killed after it, before the artifacts."""
        return self.first_epoch == self.ctx.cfg.epochs

    def save(self, epoch, training):
        process_state = training.process_state()
        if process_state is not None and (self.ctx.dist.is_main or not self.shared):
            save_torch({k: v.cpu() for k, v in process_state.items()}, self._bank_path())
        if self.ctx.dist.is_main:
            save_torch({"epoch": epoch, "training": training.state_dict()}, self.path)
            save_text(json.dumps({"epoch": epoch, "identity": self.ctx.identity}, indent=2),
                      self.path.with_suffix(".json"))
        barrier()

    def finish(self):
        barrier()
        if self.ctx.dist.is_main:
            ResumeState.discard(self.ctx.paths, self.ctx.cfg)


def training_data(ctx, resolution, dataset=None):
    """The training loader of this process and its sampler (loader/samplers.py); `dataset`: the
    training items when they are not the step's usual train set at `resolution`."""
    cfg, recipe, rank = ctx.cfg, ctx.recipe, ctx.dist.rank
    if dataset is None:
        dataset = build_dataset(cfg.dataset, cfg.data_dir, "train", resolution)
    if recipe.shared_batch:
        sampler = GlobalBatchSampler(len(dataset), recipe.global_batch, shards=recipe.shards, shard=0,
                                     processes=recipe.processes, rank=rank, seed=cfg.seed)
    else:
        sampler = GlobalBatchSampler(len(dataset), recipe.batch_per_process, shards=recipe.shards, shard=rank,
                                     processes=1, rank=0, seed=cfg.seed)
    return training_loader(dataset, sampler, cfg.num_workers), sampler


def validation_loader(ctx, resolution):
    dataset = build_dataset(ctx.cfg.dataset, ctx.cfg.data_dir, "val", resolution)
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


@torch.no_grad()
def backbone_tokens(backbone, images, precision):
    """Patch tokens of the frozen backbone under the step's autocast; no graph is kept."""
    with precision.autocast():
        return backbone(images)


def fit(ctx, training, resolution, save_artifacts, dataset=None):
    """The training loop shared by the training steps.

    `training` is the step's Training object: losses(batch, random) -> {name: tensor} for a batch
    {"img", "label", ...} (this process's part of each global-batch loss, "loss" the one to back-propagate, plus
    "correct"/"counted" for the probe's accuracy where there is one), update(losses, random),
    end_epoch(), validate(epoch) -> {name: value}, state_dict()/load_state_dict(),
    process_state()/load_process_state() (the concept bank). `save_artifacts(ctx, epochs_done)`
    writes the step's artifacts and their records on rank 0. `dataset`: see training_data.
    """
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
    label = _label(cfg)
    for epoch in range(resume.first_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        for index, bar, batch in progress(ctx, loader, f"[{label}] epoch {epoch + 1}/{cfg.epochs}", cfg.max_steps):
            share = sampler.share(index)
            group.set_rows(row_counts(recipe, share))
            seed = mixed_seed(cfg.seed, epoch, index, -1 if recipe.shared_batch else ctx.dist.rank)
            random = BatchRandom(seed, share, ctx.device)
            losses = training.losses(batch, random)
            shown = _global_values(group, losses)
            check_finite(shown["loss"], ctx, epoch, index)
            training.update(losses, random)
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if k not in ("correct", "counted")})
            logger.scalars({f"{cfg.step}/{k}": v for k, v in shown.items()})
        training.end_epoch()
        check_processes_agree(training.state_dict())
        diagnostics = training.validate(epoch)
        logger.scalars({f"{cfg.step}/val_{k}": v for k, v in diagnostics.items()}, step=epoch)
        if ctx.dist.is_main and diagnostics:
            print(f"[{label}] epoch {epoch + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in diagnostics.items()))
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
            f"[{_label(ctx.cfg)}] loss is {value} at epoch {epoch + 1}, batch {batch_index}; stopping. "
            f"The artifacts and resume state of the last finished epoch are untouched "
            f"({ctx.paths.resume_state(ctx.cfg.step)}); lower --lr or check the data before resuming.")


def write_artifact_records(ctx, artifacts, epochs_done, extra=None):
    """Write the step's record beside each of its artifacts (rank 0, after the artifacts); `extra`:
    step-specific entries of the record."""
    cache = FingerprintCache(ctx.paths.fingerprint_cache)
    fingerprints = {str(path): cache.file(path) for path in artifacts}
    cache.save()
    record = {**step_record(ctx, epochs_done, fingerprints), **(extra or {})}
    for path in artifacts:
        write_record(path, record)


def training_settings(cfg, recipe, precision, **extra):
    """The options a training step's result depends on: part of its identity (and so of "up to date").

    The paper recipe's process count is left out: it trains the same on any number of processes,
    so a run can also be resumed on another number."""
    settings = {
        "dataset": cfg.dataset, "arch": cfg.arch, "dino_small_heads": cfg.dino_small_heads,
        "num_codebook": cfg.num_codebook, "epochs": cfg.epochs, "max_steps": cfg.max_steps, "grid": cfg.grid,
        "train_resolution": cfg.train_resolution, "seed": cfg.seed, "precision": precision,
    }
    return {**settings, **recipe_settings(recipe), **extra}


def recipe_settings(recipe):
    """The recipe's part of a training step's settings."""
    settings = {"recipe": recipe.name, "global_batch": recipe.global_batch, "lr": recipe.lr}
    if not recipe.shared_batch:
        settings["processes"] = recipe.processes
    return settings
