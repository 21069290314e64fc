"""The registry of steps: each step is declared once, here, and everything that lists steps is derived
from these declarations — the step scripts' parsers and `--help`, `bash run`'s chains and option
routing, the engine each script runs, which steps train and resume, what a step's identity ("already
done") holds, the record written beside its artifacts and the command named when one is missing.

A step is an engine module (`work(ctx)` does the step in one process, `show_result(cfg, paths)`
prints the result of an up-to-date evaluation) and one `Step` entry. README, "The code", shows how
to add one; `CAUSE_EXTRA_STEPS` names modules (comma-separated) that register steps of their own
(`load_extra_steps`, which the entry points call), so a project built on this one adds steps without
editing it.
"""
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from utils.runtime.options import OPTIONS, SOTA_MODES
from utils.runtime.records import read_record


@dataclass(frozen=True)
class Upstream:
    """An earlier step's artifact that a step reads, and the step that makes it; or (step None) a released
    file the user gives, `given` saying how (the option)."""
    path: Path
    step: str | None
    given: str = ""


def _no_upstream(cfg, paths):
    return {}


def _nothing(values):
    return ()


def _always(values):
    return True


CAUSE_RESIZE = {"train": "nearest", "val": "nearest"}
# PriMaPs' own (docs/primaps.md §1, §3): training images bilinear on PIL, the official test's resizing
# of tensors for evaluation.
PRIMAPS_RESIZE = {"train": "bilinear", "val": "tensor_bilinear"}


@dataclass(frozen=True)
class Step:
    """One step of the pipeline (see the module's doc)."""
    name: str
    # The module whose `work(ctx)` does the step in each process; an evaluation's also has
    # `show_result(cfg, paths)`, which prints the result of an up-to-date run.
    engine: str
    # The file users run, with {head} for steps with one script per head; None for a step that
    # another step's script runs first (`runs_first`); any step also runs as `python -m utils.cli.steps NAME`.
    script: str | None
    options: tuple  # the names of the options it takes (utils/runtime/options.py)
    # outputs(paths) -> its artifacts; the first one's record says whether the step is done. An empty
    # list: nothing to make for this data set.
    outputs: Callable
    upstream: Callable = _no_upstream  # upstream(cfg, paths) -> {name: Upstream} of the artifacts it reads
    data: tuple = ()  # the splits whose files it reads
    train_set: str = "crops"  # which train files (loader.TRAIN_SETS)
    # How its train and val images and labels are resized (loader/transforms.RESIZES): part of its identity.
    resize: dict = field(default_factory=lambda: dict(CAUSE_RESIZE))
    drop_last: bool = False  # training leaves out the short last batch of each epoch
    head: str | None = None  # "script": one script per head; "option": --head; None: no head
    # Default epochs ({head: n} when they depend on the head), read from `epochs_option`; None for a
    # step that does not train (and so neither resumes nor logs).
    epochs: int | dict | None = None
    epochs_option: str = "epochs"
    runs_first: tuple = ()  # steps its script runs before it, each where its `when` holds
    when: Callable = _always  # when(values of the options given): whether a runner runs it first
    # unused(values) -> options that play no part given the others' values: None in its Config, so
    # they are no part of its identity.
    unused: Callable = _nothing
    neutral: tuple = ()  # options it takes that do not change its result (diagnostics only)
    overrides: dict = field(default_factory=dict)  # {option: argparse settings that differ for this step}
    fixed: dict = field(default_factory=dict)  # {option: value} it always runs with
    # {head: training resolution} where it differs from the backbone's default (docs/cause.md §2).
    trains_at: dict = field(default_factory=dict)
    pipeline: str | None = None  # the `bash run` chain it belongs to: "cause", "primaps"
    # Its data fingerprint also covers the files' modification times (the crop step: a source image
    # replaced by another of the same size is cropped again).
    timed_sources: bool = False
    # How many GPUs the paper's run trained on, each alone on its shard: the paper recipe
    # reproduces rank 0's (utils/runtime/recipe.py).
    paper_gpus: int = 1
    description: str = ""

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


STEPS = {}


def register(step):
    """Add a step to the registry (at the end of its pipeline's chain)."""
    if step.name in STEPS:
        raise ValueError(f"a step named {step.name!r} is registered already")
    unknown = [name for name in (*step.options, *step.overrides, *step.fixed) if name not in OPTIONS]
    if unknown:
        raise ValueError(f"step {step.name!r} names unknown options {unknown} (utils/runtime/options.py)")
    STEPS[step.name] = step
    return step


def pipeline_steps(*pipelines):
    """The steps of the named `bash run` chains, in registry order."""
    return tuple(step for step in STEPS.values() if step.pipeline in pipelines)


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
    if "mode" in step.options:
        command += f" --mode {cfg.mode}"
    if step.head == "option" and head:
        command += f" --head {head}"
    return command


# ----------------------------------------------------------------------------------------- options
# Groups of options, as the steps take them.
DATA = ("dataset", "data_dir", "num_workers")
BACKBONE = ("ckpt", "cache_dir", "arch", "dino_small_heads")
MODEL = (*BACKBONE, "output_root", "num_codebook", "precision", "gpu", "batch_size", "train_resolution",
         "if_changed")
HEAD_MODEL = ("reduced_dim", "projection_dim", "test_resolution")
TRAINING = ("logs_root", "restart", "recipe", "lr", "max_steps", "seed", "nproc", "port")
EVALUATION = ("results_root", "restart", "accept_partial", "crf_workers", "num_pictures")
PRIMAPS = ("mode", "head", "threshold", "keep_best_on_val")
SOTA = ("sota_ckpt", "sota_options", "sota_dropout")  # a released STEGO or HP model (docs/sota.md)
# What PriMaPs-EM takes only in cause mode (CAUSE's features); in the other modes they play no part.
CAUSE_FEATURES = ("head", "dino_small_heads", "num_codebook", "reduced_dim", "projection_dim")
# predict.py reads the model an evaluation reads, with these of its options (and its own).
PREDICT = ("dataset", *BACKBONE, "output_root", "results_root", "num_codebook", *HEAD_MODEL, "train_resolution",
           "batch_size", "precision", "gpu", "num_workers", "crf_workers", "accept_partial", "mode", *SOTA,
           "primaps_ckpt")

MLP_AT_224 = {"mlp": 224}  # the MLP head's front door and fine-tuning (docs/cause.md §2)
PRIMAPS_BATCH = dict(default=32, help="the global batch (paper recipe) or the batch per process (scaled); also the "
                                      "images per forward pass of the masks")
PRIMAPS_LR = dict(default=5e-3, help="Adam's learning rate of the prototypes, the linear probe and the k-means "
                                     "initialisation (the scaled recipe multiplies it by the number of processes)")
PRIMAPS_PRECISION = dict(default="fp32", help="autocast precision; default fp32, as the official PriMaPs-EM runs "
                                               "(its Trainer is given none); fp16 (with loss scaling) or bf16 "
                                               "on request; auto: fp16 on GPU, fp32 on CPU")
SOTA_PRECISION = dict(default="fp32", help="autocast precision; default fp32, as STEGO's evaluation runs (HP's runs "
                                            "its forward pass under fp16 autocast on a GPU: fp16 for that); "
                                            "auto: fp16 on GPU, fp32 on CPU")
PRIMAPS_RECIPE = dict(help="paper: PriMaPs' optimisation on any process count (global batch 32 split over the "
                           "processes, lr 5e-3, every image each epoch); scaled: batch 32 per process, lr 5e-3 × "
                           "processes")


def _primaps_unused(values):
    """Cause mode: the SotA options; backbone mode: CAUSE's too; a STEGO or HP model (or a released PriMaPs
    checkpoint, whose backbone is inside) also makes the backbone options idle: its own ViT is used."""
    mode = values["mode"]
    if mode == "cause":
        return SOTA
    own_backbone = mode in SOTA_MODES or values.get("primaps_ckpt") is not None
    idle_sota = SOTA if mode == "backbone" else ("sota_dropout",) if mode == "hp" else ()
    return (*CAUSE_FEATURES, *idle_sota, *(("ckpt", "cache_dir", "arch") if own_backbone else ()))


def _sota_unused(values):
    return ("sota_dropout",)  # STEGO's and HP's own evaluations run in eval mode


def _test_upstream(cfg, paths):
    """The modules the CAUSE test step evaluates: the segment module the cluster probe was fitted with
    (fine-tuning's own file when the probe was trained here, the front door's for a released one)."""
    fine_tuned = read_record(paths.cluster) is not None
    return {"modular": Upstream(paths.modular, "mediator"),
            "segment": Upstream(paths.fine_tuned_segment, "fine_tune") if fine_tuned
            else Upstream(paths.segment, "front_door"),
            "cluster": Upstream(paths.cluster, "fine_tune")}


def _primaps_upstream(cfg, paths):
    """Cause mode: the CAUSE modules whose features it fits (as the CAUSE test step reads them);
    backbone mode: its initial prototypes; stego, hp: nothing but the released file (its identity's "sota")."""
    if cfg.mode == "cause":
        return _test_upstream(cfg, paths)
    if cfg.mode == "backbone":
        return {"init": Upstream(paths.primaps_init, "primaps_init")}
    return {}


def _test_primaps_upstream(cfg, paths):
    """The features' modules as PriMaPs-EM reads them, and its prototypes: trained here, or a released file."""
    if cfg.primaps_ckpt is not None:
        return {"primaps": Upstream(cfg.primaps_ckpt, None, "--primaps_ckpt")}
    cause = _test_upstream(cfg, paths) if cfg.mode == "cause" else {}
    return {**cause, "primaps": Upstream(paths.primaps, "primaps")}


def _crops(paths):
    return [paths.crops] if paths.crops is not None else []


register(Step(
    "crop", "utils.engine.crop", "crop_dataset.py", (*DATA, "restart"), _crops, data=("train",),
    train_set="images", timed_sources=True, pipeline="cause",
    description="the cropped training set (docs/cause.md §2)"))
register(Step(
    "mediator", "utils.engine.mediator", "train_mediator.py", (*DATA, *MODEL, *TRAINING, "epochs", "grid"),
    lambda paths: [paths.modular], data=("train",), epochs=1, paper_gpus=4, pipeline="cause",
    description="the concept clusterbook (docs/cause.md §3)"))
register(Step(
    "front_door", "utils.engine.front_door", "train_front_door_{head}.py",
    (*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", "grid", "accept_partial"), lambda paths: [paths.segment],
    lambda cfg, paths: {"modular": Upstream(paths.modular, "mediator")}, data=("train", "val"), head="script",
    epochs=2, neutral=("test_resolution",), trains_at=MLP_AT_224, paper_gpus=4, pipeline="cause",
    description="the segmentation head (docs/cause.md §4)"))
register(Step(
    "fine_tune", "utils.engine.fine_tune", "fine_tuning_{head}.py",
    (*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", "grid", "label_leak", "accept_partial"),
    lambda paths: [paths.cluster, paths.fine_tuned_segment],
    lambda cfg, paths: {"modular": Upstream(paths.modular, "mediator"),
                        "segment": Upstream(paths.segment, "front_door")},
    data=("train", "val"), head="script", epochs={"tr": 5, "mlp": 1}, neutral=("test_resolution",),
    trains_at=MLP_AT_224, paper_gpus=4, pipeline="cause", description="the cluster probe (docs/cause.md §5)"))
register(Step(
    "test", "utils.engine.evaluate", "test_{head}.py", (*DATA, *MODEL, *HEAD_MODEL, *EVALUATION),
    lambda paths: [paths.metrics], _test_upstream, data=("val",), head="script", neutral=("batch_size",),
    pipeline="cause", description="prediction, CRF, metrics (docs/cause.md §6)"))
register(Step(
    "primaps_init", "utils.engine.primaps_init", None,
    (*DATA, *MODEL, *TRAINING, "init_epochs", "pca_batches"), lambda paths: [paths.primaps_init], data=("train",),
    train_set="curated", resize=PRIMAPS_RESIZE, drop_last=True, epochs=2, epochs_option="init_epochs",
    when=lambda values: values["mode"] == "backbone",
    overrides={"batch_size": PRIMAPS_BATCH, "lr": PRIMAPS_LR, "recipe": PRIMAPS_RECIPE, "precision": PRIMAPS_PRECISION},
    fixed={"mode": "backbone"},
    description="PriMaPs-EM's initial prototypes in backbone mode: PCA, then cosine k-means (docs/primaps.md §2)"))
register(Step(
    "test_sota", "utils.engine.evaluate_sota", "test_sota.py",
    (*DATA, "sota_ckpt", "sota_options", "output_root", "precision", "gpu", "batch_size", "test_resolution",
     *EVALUATION), lambda paths: [paths.sota_metrics], data=("val",), resize={"val": "nearest"}, unused=_sota_unused,
    neutral=("batch_size",), overrides={"precision": SOTA_PRECISION}, pipeline="sota",
    description="a released STEGO or HP model, by its own evaluation and by PriMaPs-EM's (docs/sota.md §1-§2)"))
register(Step(
    "primaps", "utils.engine.primaps", "train_primaps.py",
    (*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", *PRIMAPS, *SOTA, "crf_workers", "accept_partial"),
    lambda paths: [paths.primaps], _primaps_upstream, data=("train", "val"), train_set="curated", head="option",
    resize=PRIMAPS_RESIZE, drop_last=True, epochs=50, runs_first=("primaps_init",), unused=_primaps_unused,
    overrides={"batch_size": PRIMAPS_BATCH, "lr": PRIMAPS_LR, "recipe": PRIMAPS_RECIPE, "precision": PRIMAPS_PRECISION},
    pipeline="primaps",
    description="PriMaPs-EM's prototypes (docs/primaps.md §1-§2)"))
register(Step(
    "test_primaps", "utils.engine.evaluate_primaps", "test_primaps.py",
    (*DATA, *MODEL, *HEAD_MODEL, *EVALUATION, "mode", "head", *SOTA, "primaps_ckpt"),
    lambda paths: [paths.primaps_metrics], _test_primaps_upstream, data=("val",), head="option",
    resize=PRIMAPS_RESIZE, unused=_primaps_unused, neutral=("batch_size",),
    overrides={"precision": PRIMAPS_PRECISION}, pipeline="primaps",
    description="PriMaPs-EM's evaluation (docs/primaps.md §3)"))



def load_extra_steps():
    """Import the modules CAUSE_EXTRA_STEPS names (comma-separated), which register steps of their own.
    The entry points call it before anything else, so that such a module may import any layer."""
    for module in filter(None, os.environ.get("CAUSE_EXTRA_STEPS", "").split(",")):
        importlib.import_module(module.strip())
