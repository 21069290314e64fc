"""The registry of steps: each step is declared once, in its engine module (`register(Step(...))`; the
engine package registers the built-in ones, utils/engine/__init__.py), and everything that lists steps
is derived from these declarations — the step scripts' parsers and `--help`, `bash run`'s chains and
option routing, the engine each script runs, which steps train and resume, what a step's identity
("already done") holds, the record written beside its artifacts and the command named when one is
missing.

A step is an engine module (`work(ctx)` does the step in one process, `show_result(cfg, paths)`
prints the result of an up-to-date evaluation) and one `Step` entry. Its options are the names of
shared ones (utils/runtime/options.py, and the groups below) and the `Option`s it alone takes, declared
in its entry. docs/code.md shows how to add one; `CAUSE_EXTRA_STEPS` names modules
(comma-separated) that register steps of their own (`load_extra_steps`, which the entry points call),
so a project built on this one adds steps without editing it.
"""
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from utils.runtime.options import OPTIONS, Option


@dataclass(frozen=True)
class Upstream:
    """An earlier step's artifact that a step reads, and the step that makes it; or (step None) a released
    file the user gives, `given` saying how (the option)."""
    path: Path
    step: str | None
    given: str = ""


def _no_upstream(cfg, paths):
    return {}


class ReleasedFile(NamedTuple):
    """A released file that a step's own options name and that decides some of its settings."""
    arch: str | None  # the arch of the backbone inside it; None when another file holds the backbone
    name: str  # what names the step's artifact folders


def _adopts_nothing(values):
    return None


def _nothing(values):
    return ()


CAUSE_RESIZE = {"train": "nearest", "val": "nearest"}
# PriMaPs' own (docs/primaps.md §1, §3): training images bilinear on PIL, the official test's resizing
# of tensors for evaluation.
PRIMAPS_RESIZE = {"train": "bilinear", "val": "tensor_bilinear"}


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of the pipeline (see the module's doc)."""
    name: str
    # The module whose `work(ctx)` does the step in each process; an evaluation's also has
    # `show_result(cfg, paths)`, which prints the result of an up-to-date run.
    engine: str
    # The file users run, with {head} for steps with one script per head; None for a step that
    # another step's script runs first (`runs_first`); any step also runs as `python -m utils.cli.steps NAME`.
    script: str | None
    # The options it takes: names of shared options (utils/runtime/options.py) and the `Option`s it alone
    # takes (registered with it); after construction, names only (its own Options are in `declared`).
    options: tuple
    # outputs(paths) -> its artifacts; the first one's record says whether the step is done. An empty
    # list: nothing to make for this data set.
    outputs: Callable
    upstream: Callable = _no_upstream  # upstream(cfg, paths) -> {name: Upstream} of the artifacts it reads
    # adopt(values) -> a ReleasedFile where the step's own options name a released file that decides some of
    # its settings (it updates `values`: test_primaps' --primaps_ckpt decides the mode and resolution); None
    # where they name none.
    adopt: Callable = _adopts_nothing
    data: tuple = ()  # the splits whose files it reads
    train_set: str = "crops"  # which train files (loader.TRAIN_SETS)
    # How its train and val images and labels are resized (loader/transforms.RESIZES): part of its identity.
    resize: dict = field(default_factory=lambda: dict(CAUSE_RESIZE))
    drop_last: bool = False  # training leaves out the short last batch of each epoch
    head: str | None = None  # "script": one script per head; "option": --head; None: no head
    # Default epochs ({head: n} when they depend on the head), the --epochs option overriding them; or
    # epochs(values of its options, head) -> its epochs, for a step that reads them from another option.
    # None for a step that does not train (and so neither resumes nor logs).
    epochs: int | dict | Callable | None = None
    # {step: needed(values of the options given)}: the script-less steps its script runs before it, each
    # where needed() holds.
    runs_first: dict = field(default_factory=dict)
    # unused(values) -> options that play no part given the others' values: None in its Config, so
    # they are no part of its identity.
    unused: Callable = _nothing
    neutral: tuple = ()  # options it takes that do not change its result (diagnostics only)
    overrides: dict = field(default_factory=dict)  # {option: argparse settings that differ for this step}
    # {head: training resolution} where it differs from the backbone's default (docs/cause.md §2).
    trains_at: dict = field(default_factory=dict)
    pipeline: str | None = None  # the `bash run` chain it belongs to: "cause", "primaps"
    # How many GPUs the paper's run trained on, each alone on its shard: the paper recipe
    # reproduces rank 0's (utils/runtime/recipe.py).
    paper_gpus: int = 1
    description: str = ""
    declared: dict = field(init=False, default_factory=dict)  # {name: Option} of the options it alone takes

    def __post_init__(self):
        object.__setattr__(self, "declared", {o.name: o for o in self.options if isinstance(o, Option)})
        object.__setattr__(self, "options", tuple(o.name if isinstance(o, Option) else o for o in self.options))

    @property
    def trains(self):
        """A step that trains runs in every process of the run (--gpu, --nproc, torchrun), resumes and
        logs; the others run in one process (the first GPU of --gpu, else the CPU)."""
        return self.epochs is not None

    def label(self, head=None):
        """How messages name the step: "front door TR", "mediator"."""
        return self.name.replace("_", " ") + (f" {head.upper()}" if head else "")

    def run_name(self, head=None):
        """Its resume state's and logs' name: "front_door_tr", "mediator"."""
        return self.name + (f"_{head}" if head else "")

    def default_epochs(self, head):
        return self.epochs.get(head) if isinstance(self.epochs, dict) else self.epochs

    def epochs_of(self, values, head):
        """Its epochs, given the values of its options: --epochs where given, else its default."""
        if callable(self.epochs):
            return self.epochs(values, head)
        return values["epochs"] if values.get("epochs") is not None else self.default_epochs(head)


STEPS = {}


def register(step):
    """Add a step to the registry (at the end of its pipeline's chain), and the options it declares to
    OPTIONS: another step may take such an option by name, but not declare it again differently."""
    if step.name in STEPS:
        raise ValueError(f"a step named {step.name!r} is registered already")
    clashing = [name for name, option in step.declared.items() if OPTIONS.get(name, option) != option]
    if clashing:
        raise ValueError(f"step {step.name!r} declares options {clashing} that are declared otherwise already")
    unknown = [name for name in (*step.options, *step.overrides) if name not in OPTIONS and name not in step.declared]
    if unknown:
        raise ValueError(f"step {step.name!r} names unknown options {unknown} (utils/runtime/options.py)")
    OPTIONS.update(step.declared)
    STEPS[step.name] = step
    return step


def pipeline_steps(*pipelines):
    """The steps of the named `bash run` chains, chain after chain, each in registry order."""
    return tuple(step for pipeline in pipelines for step in STEPS.values() if step.pipeline == pipeline)


def script_options(step):
    """The options `step`'s script takes: its own and those of the steps it runs first."""
    names = list(step.options)
    for first in step.runs_first:
        names += [name for name in STEPS[first].options if name not in names]
    return tuple(names)


def runner_of(name):
    """The step whose script runs step `name` (itself when it has a script of its own)."""
    if STEPS[name].script is not None:
        return STEPS[name]
    return next((step for step in STEPS.values() if name in step.runs_first), STEPS[name])


def command_of(name, cfg):
    """The command that makes step `name`'s artifacts for `cfg`, as messages name it."""
    step = runner_of(name)
    head = cfg.head if step.head else None
    if step.script is None:
        return f"python -m utils.cli.steps {step.name}"
    command = step.script.format(head=head)
    if "mode" in step.options and getattr(cfg, "mode", None):
        command += f" --mode {cfg.mode}"
    if step.head == "option" and head:
        command += f" --head {head}"
    return command


# ----------------------------------------------------------------------------------------- options
# Groups of shared options, as the steps take them.
DATA = ("dataset", "data_dir", "num_workers")
BACKBONE = ("ckpt", "cache_dir", "arch", "dino_small_heads")
MODEL = (*BACKBONE, "output_root", "num_codebook", "precision", "gpu", "batch_size", "train_resolution",
         "if_changed")
HEAD_MODEL = ("reduced_dim", "projection_dim", "test_resolution")
TRAINING = ("logs_root", "restart", "recipe", "lr", "max_steps", "seed", "nproc", "port")
EVALUATION = ("results_root", "restart", "accept_partial", "crf_workers", "num_pictures")
SOTA = ("sota_ckpt", "sota_options", "sota_dropout")  # a released STEGO or HP model (docs/sota.md)
# What PriMaPs-EM takes only in cause mode (CAUSE's features); in the other modes they play no part.
CAUSE_FEATURES = ("head", "dino_small_heads", "num_codebook", "reduced_dim", "projection_dim")

MLP_AT_224 = {"mlp": 224}  # the MLP head's front door and fine-tuning (docs/cause.md §2)


def load_extra_steps():
    """Import the modules CAUSE_EXTRA_STEPS names (comma-separated), which register steps of their own.
    The entry points call it before anything else, so that such a module may import any layer."""
    for module in filter(None, os.environ.get("CAUSE_EXTRA_STEPS", "").split(",")):
        importlib.import_module(module.strip())
