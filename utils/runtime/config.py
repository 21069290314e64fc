"""One table of options for every step, the parser each step builds from it, and the rules that derive the rest.

A step's parser holds only the options that step reads (`python train_mediator.py --help` lists
them), so `run` can route each option to the steps that know it. Nothing is guessed from file names
except what the official release naming fixes (the backbone arch from `checkpoint/<arch>.pth`,
overridable with --arch); everything derived (class count, feature width, resolutions, TR query
count, the recipe's batch and learning rate) is computed here, once.
"""
import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError
from loader import DATASETS
from models import ARCHS, resolve_arch

_CAUSE_TRAINING = ("mediator", "front_door", "fine_tune")
TRAINING = (*_CAUSE_TRAINING, "primaps")
STEPS = ("crop", *TRAINING, "test", "test_primaps")
HEADS = ("mlp", "tr")
PRIMAPS_STEPS = ("primaps", "test_primaps")  # PRIMAPS.md; they take the head as an option (--head)
PRIMAPS_MODES = ("cause", "backbone")
# PriMaPs' backbone-mode initialisation runs as a step of its own inside train_primaps.py (no script).
PRIMAPS_INIT = "primaps_init"
_HEAD_STEPS = ("front_door", "fine_tune", "test", *PRIMAPS_STEPS)
_MODEL_STEPS = (*TRAINING, "test", "test_primaps")
_ALL = STEPS
# predict.py is no pipeline step: it takes the options below that name "predict" (the model of
# earlier steps, as the test step reads it) and adds its own (utils/engine/predict.py).
PREDICT = "predict"
_ALL_AND_PREDICT = (*_ALL, PREDICT)
_MODEL_AND_PREDICT = (*_MODEL_STEPS, PREDICT)
_HEAD_AND_PREDICT = (*_HEAD_STEPS, PREDICT)
_TEST_AND_PREDICT = ("test", PREDICT)

# Epochs of each step (SPEC §3-§5, PRIMAPS.md §2); the mediator's and front door's do not depend on the head.
DEFAULT_EPOCHS = {"mediator": 1, "front_door": 2, ("fine_tune", "tr"): 5, ("fine_tune", "mlp"): 1, "primaps": 50}

# The recipes (README, "Reproduce a table row"). The released models come from 4 GPUs that each
# trained alone on rank 0..3's quarter of the crops, batch 16, lr 1e-3 × 4; only rank 0's was kept.
# PriMaPs trained on one GPU (batch 32, lr 5e-3, every image each epoch).
OFFICIAL_GPUS = 4
PRIMAPS_GPUS = 1
RECIPES = ("paper", "scaled")


class ConfigError(UserError):
    """Options that cannot work together."""


@dataclass(frozen=True)
class Option:
    flags: tuple
    steps: tuple
    group: str
    kwargs: dict
    per_step: dict = field(default_factory=dict)  # {step: kwargs that differ there (default, help)}

    def kwargs_of(self, step):
        return {**self.kwargs, **self.per_step.get(step, {})}


def _yes_no(value):
    lowered = value.lower()
    if lowered in ("yes", "true", "y", "1", "on"):
        return True
    if lowered in ("no", "false", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


OPTIONS = (
    Option(("--dataset",), _ALL_AND_PREDICT, "data and backbone", dict(
        default="cocostuff27", choices=sorted(DATASETS),
        help="the data set trained on and tested on (predict.py: its classes' names and palette)")),
    Option(("--data_dir",), _ALL, "data and backbone", dict(
        type=Path, default=Path(os.environ.get("CAUSE_DATA_DIR", "data")),
        help="folder holding cocostuff/, cityscapes/, pascalvoc/, potsdam/ (README, Data)")),
    Option(("--ckpt",), _MODEL_AND_PREDICT, "data and backbone", dict(
        type=Path, default=Path("checkpoint/dino_vit_base_8.pth"),
        help="backbone release file; its name gives the arch unless --arch is given")),
    Option(("--arch",), _MODEL_AND_PREDICT, "data and backbone", dict(
        default=None, choices=sorted(ARCHS), help="arch of --ckpt when its file name is not <arch>.pth")),
    Option(("--dino_small_heads",), _MODEL_AND_PREDICT, "data and backbone", dict(
        type=int, default=12, choices=(6, 12),
        help="attention heads of DINO ViT-S: 12 as the official CAUSE code and its released heads, "
             "6 as DINO defines it")),
    Option(("--output_root",), _MODEL_AND_PREDICT, "artifacts", dict(
        type=Path, default=Path("CAUSE"), help="folder of the trained (or released) CAUSE files (README)")),
    Option(("--results_root",), (*_TEST_AND_PREDICT, "test_primaps"), "artifacts", dict(
        type=Path, default=Path("results"), help="folder of the test steps' metrics.json and pictures")),
    Option(("--logs_root",), TRAINING, "artifacts", dict(type=Path, default=Path("logs"))),
    Option(("--num_codebook",), _MODEL_AND_PREDICT, "artifacts", dict(
        type=int, default=2048, help="prototypes of the mediator's concept clusterbook")),
    Option(("--reduced_dim",), _HEAD_AND_PREDICT, "artifacts", dict(
        type=int, default=90, help="width of the segmentation head's features")),
    Option(("--projection_dim",), _HEAD_AND_PREDICT, "artifacts", dict(
        type=int, default=2048, help="width of the front door's projection head")),
    Option(("--restart",), _ALL, "artifacts", dict(
        action="store_true", help="redo this step from scratch: ignore its resume state and finished output")),
    Option(("--if_changed",), _MODEL_STEPS, "artifacts", dict(
        default="rerun", choices=("rerun", "refuse"),
        help="when an input of this step's earlier output changed (backbone, data, an earlier step's "
             "artifact, settings): rerun the step (default), or stop and say what changed")),
    Option(("--accept_partial",), ("front_door", "fine_tune", "test", *PRIMAPS_STEPS, PREDICT), "artifacts", dict(
        action="store_true",
        help="use an earlier step's artifact written by an interrupted run (recorded as such) instead of "
             "stopping")),
    Option(("--recipe",), TRAINING, "training", dict(
        default="paper", choices=RECIPES,
        help="paper: the released models' optimisation on any process count (global batch 16 split over "
             "the processes, lr 1e-3 × 4, each epoch the quarter of the crops the official rank 0 saw); "
             "scaled: every crop each epoch, batch 16 per process, lr 1e-3 × processes (not the paper's)"),
        per_step={"primaps": dict(help="paper: PriMaPs' optimisation on any process count (global batch 32 split "
                                       "over the processes, lr 5e-3, every image each epoch); scaled: batch 32 "
                                       "per process, lr 5e-3 × processes")}),
    Option(("--epochs",), TRAINING, "training", dict(
        type=int, default=None, help="default: 1 mediator, 2 front door, fine-tune 5 (TR) / 1 (MLP), 50 PriMaPs")),
    Option(("--batch_size",), _MODEL_AND_PREDICT, "training", dict(
        type=int, default=16, help="training: the global batch (paper recipe) or the batch per process "
                                   "(scaled); test: images per forward pass; predict.py: windows per "
                                   "forward pass"),
        per_step={"primaps": dict(default=32, help="the global batch (paper recipe) or the batch per process "
                                                   "(scaled); also the images per forward pass of the masks")}),
    Option(("--lr",), TRAINING, "training", dict(
        type=float, default=1e-3, help="base learning rate of one official GPU; the paper recipe multiplies "
                                       "it by 4, the scaled one by the number of processes"),
        per_step={"primaps": dict(default=5e-3, help="Adam's learning rate of the prototypes, the linear probe and "
                                                     "the k-means initialisation (the scaled recipe multiplies it "
                                                     "by the number of processes)")}),
    Option(("--max_steps",), TRAINING, "training", dict(
        type=int, default=None, help="stop each epoch after this many batches (smoke runs; recorded, so a "
                                     "later full run does not take the result for complete)")),
    Option(("--grid",), _CAUSE_TRAINING, "training", dict(
        type=_yes_no, default=True, help="stochastic grid sampling (yes/no)")),
    Option(("--train_resolution",), _MODEL_AND_PREDICT, "training", dict(
        type=int, default=None,
        help="default 320 (322 for DINOv2); the MLP head's front door and fine-tuning train at 224"),
        per_step={"primaps": dict(help="training and pseudo-mask resolution, default 320 (322 for DINOv2); in "
                                       "cause mode with the TR head, the one the CAUSE steps trained at")}),
    Option(("--test_resolution",), _HEAD_AND_PREDICT, "training", dict(
        type=int, default=None, help="default 320 (322 for DINOv2); predict.py's window size")),
    Option(("--seed",), TRAINING, "training", dict(type=int, default=0)),
    Option(("--label_leak",), ("fine_tune",), "training", dict(
        action="store_true",
        help="let the labelled probe's loss train head_ema as the official code does (uses ground-truth "
             "labels; only for comparing with the paper)")),
    Option(("--precision",), _MODEL_AND_PREDICT, "processes", dict(
        default="auto", choices=("auto", "fp16", "bf16", "fp32"),
        help="autocast precision; auto: fp16 with loss scaling on GPU (as the official code), fp32 on CPU")),
    Option(("--gpu",), _MODEL_AND_PREDICT, "processes", dict(
        default=None, help="GPUs to use, e.g. 0,1,2,3 (one process each; the test step and predict.py use the "
                           "first); default: all visible, or the CPU")),
    Option(("--nproc",), TRAINING, "processes", dict(
        type=int, default=1, help="CPU processes (gloo) when no GPU is used")),
    Option(("--port",), TRAINING, "processes", dict(
        type=int, default=12355, help="rendezvous port of a --gpu/--nproc spawn")),
    Option(("--num_workers",), _ALL_AND_PREDICT, "processes", dict(
        type=int, default=min(4, os.cpu_count() or 1), help="processes that read the images")),
    Option(("--crf_workers",), (*_TEST_AND_PREDICT, *PRIMAPS_STEPS), "evaluation", dict(
        type=int, default=min(8, os.cpu_count() or 1), help="processes that run the dense CRF")),
    Option(("--num_pictures",), ("test", "test_primaps"), "evaluation", dict(
        type=int, default=100, help="val images whose predictions are saved as pictures (-1: all of them)")),
    Option(("--mode",), (*PRIMAPS_STEPS, PREDICT), "PriMaPs", dict(
        default="cause", choices=PRIMAPS_MODES,
        help="cause: fit the prototypes to CAUSE's own features (head_ema of the trained segment module, "
             "prototypes initialised from its cluster probe; needs the CAUSE steps' artifacts); backbone: "
             "PriMaPs-EM on the plain backbone (DINO's 6-head ViT-S), initialised by PCA and k-means "
             "(predict.py: the mode of the PriMaPs model --model primaps reads)")),
    Option(("--head",), PRIMAPS_STEPS, "PriMaPs", dict(
        default="tr", choices=HEADS, help="cause mode: the CAUSE head whose features are used")),
    Option(("--threshold",), ("primaps",), "PriMaPs", dict(
        type=float, default=0.4, help="mask proposal threshold ψ: a proposal keeps the patches whose cosine to its "
                                      "anchor reaches ψ times the best one")),
    Option(("--init_epochs",), ("primaps",), "PriMaPs", dict(
        type=int, default=2, help="backbone mode: epochs of the cosine k-means initialisation")),
    Option(("--pca_batches",), ("primaps",), "PriMaPs", dict(
        type=int, default=93, help="backbone mode: global batches whose patch features the initial PCA reads")),
    Option(("--keep_best_on_val",), ("primaps",), "PriMaPs", dict(
        action="store_true",
        help="keep the epoch whose θ_M scores the best val mIoU, as the official code does, instead of the last "
             "one: this selects the model with the val labels")),
)


def step_label(step, head=None):
    """How messages name a step: "front door TR", "mediator"."""
    return step.replace("_", " ") + (f" {head.upper()}" if head else "")


def options_of(step):
    return [option for option in OPTIONS if step in option.steps]


def option_names(step):
    """The option names (without dashes) that `step`'s parser accepts."""
    return {option.flags[0][2:] for option in options_of(step)}


def build_parser(step, head=None, **parser_options):
    """The parser of one step (or of predict.py's shared options), from OPTIONS; `head` only changes
    the description; `parser_options` go to argparse.ArgumentParser."""
    if step not in (*STEPS, PREDICT):
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS} or {PREDICT!r}")
    title = "PriMaPs-EM step" if step in PRIMAPS_STEPS else "CAUSE step"
    parser_options.setdefault("description", f"{title}: {step}" + (f" ({head.upper()} head)" if head else ""))
    parser = argparse.ArgumentParser(**parser_options)
    groups = {}
    for option in options_of(step):
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        groups[option.group].add_argument(*option.flags, **option.kwargs_of(step))
    return parser


@dataclass(frozen=True)
class Config:
    step: str
    head: str | None
    dataset: str
    data_dir: Path
    ckpt: Path
    arch: str
    dino_small_heads: int
    output_root: Path
    results_root: Path
    logs_root: Path
    num_codebook: int
    reduced_dim: int
    projection_dim: int
    restart: bool
    if_changed: str
    accept_partial: bool
    recipe: str
    epochs: int
    batch_size: int
    lr: float
    max_steps: int | None
    grid: bool
    train_resolution: int
    test_resolution: int
    seed: int
    label_leak: bool
    precision: str
    gpu: str | None
    nproc: int
    port: int
    num_workers: int
    crf_workers: int
    num_pictures: int
    mode: str
    threshold: float
    init_epochs: int
    pca_batches: int
    keep_best_on_val: bool
    # derived
    n_classes: int
    dim: int
    patch: int
    family: str

    @property
    def baseline(self):
        """The backbone checkpoint's file stem: it names the artifact folders (SPEC §3)."""
        return self.ckpt.stem

    @property
    def num_queries(self):
        """Tokens the TR head is built for: the training grid (SPEC §4)."""
        return (self.train_resolution // self.patch) ** 2


def parse_config(step, head=None, argv=None):
    return make_config(step, head, vars(build_parser(step, head).parse_args(argv)))


def make_config(step, head, given):
    """The Config of `step` from the options `given` ({name: value}, as its parser returns them)."""
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    # Options this step's parser lacks take their defaults (a flag not given is off).
    values = {option.flags[0][2:]: option.kwargs.get("default", False) for option in OPTIONS}
    values.update(given)
    _check_counts(values)
    # The CAUSE scripts name their head; the PriMaPs steps take it as an option, used in cause mode only.
    head_option = values.pop("head")
    if step in PRIMAPS_STEPS:
        head = head_option if values["mode"] == "cause" else None
    uses_model = step != "crop"
    arch = resolve_arch(values["ckpt"], values["arch"]) if uses_model else None
    spec = ARCHS[arch] if arch else None
    train_res, test_res = default_resolutions(step, head, spec.family if spec else "dino")
    epochs = values["epochs"] if values["epochs"] is not None else DEFAULT_EPOCHS.get(
        step, DEFAULT_EPOCHS.get((step, head), 1))
    cfg = Config(
        step=step, head=head, **{**values, "arch": arch, "epochs": epochs,
                                 "train_resolution": values["train_resolution"] or train_res,
                                 "test_resolution": values["test_resolution"] or test_res},
        n_classes=DATASETS[values["dataset"]].n_classes, dim=spec.dim if spec else 0,
        patch=spec.patch if spec else 1, family=spec.family if spec else "")
    if uses_model:
        _check_resolutions(cfg)
    return cfg


def _check_counts(values):
    for name in ("epochs", "max_steps", "nproc", "batch_size", "init_epochs", "pca_batches", "crf_workers"):
        if values[name] is not None and values[name] < 1:
            raise ConfigError(f"--{name} must be at least 1, got {values[name]}")
    if values["num_workers"] < 0:
        raise ConfigError(f"--num_workers must be 0 or more, got {values['num_workers']}")
    if not 0 < values["threshold"] <= 1:
        raise ConfigError(f"--threshold must lie in (0, 1] (a fraction of the best cosine), got {values['threshold']}")


def _check_resolutions(cfg):
    for name in ("train_resolution", "test_resolution"):
        value = getattr(cfg, name)
        if value % cfg.patch:
            raise ConfigError(f"--{name} {value} is not a multiple of {cfg.arch}'s patch size {cfg.patch}")


def default_resolutions(step, head, family):
    """(train, test) resolution of a step (SPEC §2): 320 everywhere, 322 for DINOv2 (a multiple
    of its 14-px patch), except that the MLP head's front door and fine-tuning train at 224.
    The TR head's query count follows the train resolution, so test must build it from the same."""
    base = 322 if family == "dinov2" else 320
    train = 224 if head == "mlp" and step in ("front_door", "fine_tune") else base
    return train, base


@dataclass(frozen=True)
class Recipe:
    """How a training step optimises: the same numbers go into every record of what it made."""
    name: str
    processes: int
    global_batch: int
    batch_per_process: int
    lr: float
    shards: int  # the epoch's order is DistributedSampler's for this many replicas ...
    shared_batch: bool  # ... and the processes split one global batch (paper) or read a shard each (scaled)

    def describe(self):
        if self.shared_batch and self.shards == 1:
            return (f"recipe {self.name}: global batch {self.global_batch} split over {self.processes} process(es) "
                    f"({self.batch_per_process} each), lr {self.lr:g}, every training item each epoch")
        if self.shared_batch:
            return (f"recipe {self.name}: global batch {self.global_batch} split over {self.processes} process(es) "
                    f"({self.batch_per_process} each), lr {self.lr:g}, each epoch the quarter of the training set "
                    f"that the official rank 0 of {self.shards} read")
        return (f"recipe {self.name}: batch {self.batch_per_process} per process × {self.processes} process(es), "
                f"lr {self.lr:g}, every training item each epoch")


def recipe_for(cfg, processes):
    """The recipe of a training step of `cfg` run as `processes` processes."""
    official_gpus = PRIMAPS_GPUS if cfg.step in ("primaps", PRIMAPS_INIT) else OFFICIAL_GPUS
    if cfg.recipe == "paper":
        if cfg.batch_size % processes:
            raise ConfigError(
                f"the paper recipe splits the global batch of {cfg.batch_size} over the processes, and "
                f"{processes} processes cannot share it equally: use a process count that divides "
                f"{cfg.batch_size} (1, 2, 4, 8, 16 for the paper's 16) or --recipe scaled")
        return Recipe("paper", processes, cfg.batch_size, cfg.batch_size // processes, cfg.lr * official_gpus,
                      official_gpus, True)
    return Recipe("scaled", processes, cfg.batch_size * processes, cfg.batch_size, cfg.lr * processes,
                  processes, False)
