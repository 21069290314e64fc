"""How one step runs: check its inputs, decide whether it must run, and run its engine's work in every
process (training steps) or in one (the others).

`run_step(cfg, engine)` checks the step's inputs before anything starts (the backbone file, the data
layout, the earlier artifacts, with the command that makes a missing one), holds the step's lock
(another live process on the same artifacts stops this one at once: utils/runtime/locks.py),
fingerprints the inputs, decides from the record beside the step's artifact whether it is already
done (utils/engine/status.py), decodes every val file, and launches `engine.work(ctx)` with the
step's StepContext.
"""
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field

from loader import verify_readable
from utils.engine.status import (data_files, decide_to_run, fingerprint_cache, identity, released, say,
                                 upstream_inputs, uses_backbone, with_backbone_file)
from utils.runtime.distributed import (Dist, data_loader_failures, launch, launch_single, process_count,
                                       torchrun_rank)
from utils.runtime.locks import exclusive
from utils.runtime.paths import ArtifactPaths, RunFiles, paths_of
from utils.runtime.recipe import recipe_for
from utils.runtime.records import check_complete
from utils.runtime.steps import STEPS


@dataclass
class StepContext:
    """What a step's work knows of its run in one process."""
    cfg: object
    dist: Dist
    paths: ArtifactPaths
    files: RunFiles | None  # its resume state, lock, logs
    recipe: object  # utils/runtime/recipe.Recipe of a training step, else None
    identity: dict
    upstream: dict  # {name: upstream entry} of the earlier artifacts it reads
    warnings: list = field(default_factory=list)
    run_id: str = ""  # names this run in its records: a later step's inputs change when an earlier step reruns
    samples_per_epoch: int | None = None  # set by fit: what the records say of the recipe
    steps_per_epoch: int | None = None

    @property
    def device(self):
        return self.dist.device

    @property
    def step(self):
        return STEPS[self.cfg.step]

    @property
    def label(self):
        return self.step.label(self.cfg.head)


def run_files(cfg, outputs):
    """Its resume state, lock and logs; a step that keeps no logs (no --logs_root) has only the lock that matters."""
    return RunFiles(outputs[0], STEPS[cfg.step].run_name(cfg.head), getattr(cfg, "output_root", None),
                    getattr(cfg, "logs_root", None))


def run_step(cfg, engine):
    """Run step `cfg.step` with `engine` (its module: `work(ctx)`, and `show_result(cfg, paths)` for an
    up-to-date evaluation); returns rank 0's result."""
    step = STEPS[cfg.step]
    if not step.trains and torchrun_rank() != 0:
        return None  # a step of one process: under torchrun, the first process runs it alone
    label = step.label(cfg.head)
    paths = paths_of(cfg)
    outputs = step.outputs(paths)
    if not outputs:
        say(f"[{label}] nothing to make for {cfg.dataset}")
        return None
    if released(cfg, label, outputs):
        return _show(engine, cfg, paths)
    if uses_backbone(cfg):
        cfg = with_backbone_file(cfg)
    recipe = recipe_for(cfg, step.paper_gpus, process_count(cfg)) if step.trains else None
    files = run_files(cfg, outputs)
    fingerprints = fingerprint_cache(cfg)
    # Under torchrun every process runs this; the first one holds the lock for all of them. What the
    # data-loader workers of this process meet is told as the user errors it is (a worker that died, a
    # damaged file), one line.
    with (exclusive(files.lock, f"{label} ({outputs[0]})") if torchrun_rank() == 0 else nullcontext(),
          data_loader_failures()):
        listed = {split: data_files(cfg, split) for split in step.data}
        upstream = upstream_inputs(cfg, paths, fingerprints)
        warnings = check_complete(upstream, getattr(cfg, "accept_partial", False))
        found = identity(cfg, recipe, fingerprints, listed, upstream)
        if not decide_to_run(cfg, label, outputs, files, found, fingerprints):
            _keep(fingerprints)
            return _show(engine, cfg, paths)
        if "val" in step.data:
            # Every val file is decoded before the run starts (the train crops are this project's own
            # output, their sources checked when cropping).
            verify_readable(cfg.dataset, cfg.data_dir, "val", num_workers=cfg.num_workers)
        if recipe is not None:
            say(f"[{label}] {recipe.describe()}; precision {cfg.precision}, seed {cfg.seed}, {cfg.epochs} epoch(s)")
        worker = _StepWorker(engine.work, paths, files, recipe, found, upstream, warnings, uuid.uuid4().hex)
        result = launch(worker, cfg, label) if step.trains else launch_single(worker, cfg)
        _keep(fingerprints)
    return result


def _show(engine, cfg, paths):
    """What an up-to-date step gives: an evaluation prints its result again."""
    return engine.show_result(cfg, paths) if hasattr(engine, "show_result") else None


def _keep(fingerprints):
    """Save the hashes taken, once the step has done its work: a run refused at its start writes nothing."""
    if torchrun_rank() == 0:
        fingerprints.save()


class _StepWorker:
    """Picklable wrapper (spawned processes receive it) that hands the work its StepContext."""

    def __init__(self, work, *context):
        self.work = work
        self.context = context  # StepContext's fields after the config and the process

    def __call__(self, cfg, dist):
        return self.work(StepContext(cfg, dist, *self.context))
