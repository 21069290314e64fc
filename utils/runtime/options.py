"""The command-line options many steps share, declared once: flag, group, argparse settings, whether it
changes a step's result, and which values it refuses. An option one step alone takes is declared with
that step, in its engine module (an `Option` in its `options`, utils/runtime/steps.py), and joins
OPTIONS when the step is registered.

Which steps take an option is said by the steps themselves, and so are the defaults that differ for
one step (PriMaPs' batch of 32, for instance). `changes_result` is what
makes an artifact "up to date": a step's identity holds the value of every option it takes that
changes its result (utils/runtime/config.result_settings), and nothing else. Options marked False
say where or how a step runs (folders, processes, workers, ports) or what it does with a finished
result (--restart, --if_changed); what they point at (the backbone file, the data) enters the
identity by its fingerprint instead.
"""
import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loader import DATASETS
from models import ARCHS
from utils.runtime.backbone_files import default_cache_dir

HEADS = ("mlp", "tr")
RECIPES = ("paper", "scaled")
PRIMAPS_MODES = ("cause", "backbone", "stego", "hp")
SOTA_MODES = ("stego", "hp")  # PriMaPs-EM on a released STEGO or HP model (+SotA+PriMaPs, docs/sota.md §3)
SOTA_DROPOUT = ("official", "eval")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Option:
    name: str
    group: str
    kwargs: dict  # argparse's add_argument settings
    changes_result: bool = True
    # refused(value) -> why a given value is refused ("must be at least 1, got 0"), None when accepted.
    refused: Callable | None = None

    @property
    def flag(self):
        return f"--{self.name}"

    @property
    def is_switch(self):
        return self.kwargs.get("action") == "store_true"

    @property
    def default(self):
        return self.kwargs.get("default", False if self.is_switch else None)


def yes_no(value):
    lowered = value.lower()
    if lowered in ("yes", "true", "y", "1", "on"):
        return True
    if lowered in ("no", "false", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def at_least(least):
    """Refuses a count below `least` (None, "not given", is accepted)."""
    def refused(value):
        if value is not None and value < least:
            return f"must be {'0 or more' if least == 0 else f'at least {least}'}, got {value}"
        return None
    return refused


def positive_finite(value):
    if not (math.isfinite(value) and value > 0):
        return f"must be a positive finite number, got {value}"
    return None


def fraction(value):
    if not 0 < value <= 1:
        return f"must lie in (0, 1] (a fraction of the best cosine), got {value}"
    return None


# The largest resolution a step accepts: 2048 px is already 65,536 tokens of an 8-px patch, whose
# attention alone needs tens of GB; a larger value is a typo, not a run.
MAX_RESOLUTION = 2048


def resolution(value):
    """A resolution given (None: the step's default) must be positive and at most MAX_RESOLUTION; that it is
    a multiple of the backbone's patch is checked once the backbone is known (utils/runtime/config.py)."""
    if value is not None and not 0 < value <= MAX_RESOLUTION:
        return f"must be a positive multiple of the backbone's patch size, at most {MAX_RESOLUTION}, got {value}"
    return None


POSITIVE = at_least(1)
RESOLUTION_HELP = (f"a multiple of the backbone's patch size, at most {MAX_RESOLUTION}; default 320 (322 for a "
                   f"14-px patch: the multiple of the patch next above 320)")

_OPTIONS = (
    # data and backbone
    Option("dataset", "data and backbone", dict(
        default="cocostuff27", choices=sorted(DATASETS),
        help="the data set trained on and tested on (predict.py: its classes' names and palette)")),
    Option("data_dir", "data and backbone", dict(
        type=Path, default=Path(os.environ.get("CAUSE_DATA_DIR", "data")),
        help="folder holding cocostuff/, cityscapes/, pascalvoc/, potsdam/ (docs/data.md)"), changes_result=False),
    Option("ckpt", "data and backbone", dict(
        type=Path, default=Path("dino_vit_base_8"),
        help="backbone: an arch name (its authors' release: checkpoint/<arch>.pth, else in --cache_dir, where it "
             "is downloaded when missing) or a release file's path (its name gives the arch unless --arch is "
             "given)"), changes_result=False),
    Option("cache_dir", "data and backbone", dict(
        type=Path, default=default_cache_dir(),
        help="where the backbone releases --ckpt names by arch are kept ($XDG_CACHE_HOME/cause or ~/.cache/cause)"),
        changes_result=False),
    Option("arch", "data and backbone", dict(
        default=None, choices=sorted(ARCHS), help="arch of --ckpt when its file name is not <arch>.pth")),
    Option("dino_small_heads", "data and backbone", dict(
        type=int, default=12, choices=(6, 12),
        help="attention heads of DINO ViT-S: 12 as the official CAUSE code and its released heads, "
             "6 as DINO defines it")),
    # artifacts
    Option("output_root", "artifacts", dict(
        type=Path, default=Path("CAUSE"), help="folder of the trained (or released) files (docs/runs.md)"),
        changes_result=False),
    Option("results_root", "artifacts", dict(
        type=Path, default=Path("results"), help="folder of the test steps' metrics.json and pictures"),
        changes_result=False),
    Option("logs_root", "artifacts", dict(type=Path, default=Path("logs"), help="folder of the TensorBoard logs"),
           changes_result=False),
    Option("num_codebook", "artifacts", dict(
        type=int, default=2048, help="prototypes of the mediator's concept clusterbook"), refused=POSITIVE),
    Option("reduced_dim", "artifacts", dict(
        type=int, default=90, help="width of the segmentation head's features"), refused=POSITIVE),
    Option("projection_dim", "artifacts", dict(
        type=int, default=2048, help="width of the front door's projection head"), refused=POSITIVE),
    Option("restart", "artifacts", dict(
        action="store_true", help="redo this step from scratch: ignore its resume state and finished output"),
        changes_result=False),
    Option("if_changed", "artifacts", dict(
        default="rerun", choices=("rerun", "refuse"),
        help="when an input of this step's earlier output changed (backbone, data, an earlier step's "
             "artifact, settings): rerun the step (default), or stop and say what changed"), changes_result=False),
    Option("accept_partial", "artifacts", dict(
        action="store_true",
        help="use an earlier step's artifact written by an interrupted run (recorded as such) instead of "
             "stopping"), changes_result=False),
    # training
    Option("recipe", "training", dict(
        default="paper", choices=RECIPES,
        help="paper: the released models' optimisation on any process count (global batch 16 split over "
             "the processes, lr 1e-3 × 4, each epoch the quarter of the crops the official rank 0 saw); "
             "scaled: every crop each epoch, batch 16 per process, lr 1e-3 × processes (not the paper's)")),
    Option("epochs", "training", dict(type=int, default=None, help="epochs of training"), refused=POSITIVE),
    Option("batch_size", "training", dict(
        type=int, default=16, help="training: the global batch (paper recipe) or the batch per process "
                                   "(scaled); test: images per forward pass; predict.py: windows per "
                                   "forward pass"), refused=POSITIVE),
    Option("lr", "training", dict(
        type=float, default=1e-3, help="base learning rate of one official GPU; the paper recipe multiplies "
                                       "it by 4, the scaled one by the number of processes"),
        refused=positive_finite),
    Option("max_steps", "training", dict(
        type=int, default=None, help="stop each epoch after this many batches (smoke runs; recorded, so a "
                                     "later full run does not take the result for complete)"), refused=POSITIVE),
    Option("grid", "training", dict(type=yes_no, default=True, help="stochastic grid sampling (yes/no)")),
    Option("train_resolution", "training", dict(
        type=int, default=None,
        help=f"{RESOLUTION_HELP}; the MLP head's front door and fine-tuning train at 224"), refused=resolution),
    Option("test_resolution", "training", dict(
        type=int, default=None,
        help=f"{RESOLUTION_HELP}, and with the TR head its --train_resolution (its queries are the tokens of the "
             f"grid it was trained at: another test resolution is refused); predict.py's window size"),
        refused=resolution),
    Option("seed", "training", dict(type=int, default=0, help="seed of every random draw")),
    # processes
    Option("precision", "processes", dict(
        default="auto", choices=PRECISIONS,
        help="autocast precision; auto: fp16 with loss scaling on GPU (as the official CAUSE code), fp32 on CPU")),
    Option("gpu", "processes", dict(
        default=None, help="GPUs to use, e.g. 0,1,2,3 (one process each; the test step and predict.py use the "
                           "first); default: all visible, or the CPU"), changes_result=False),
    Option("nproc", "processes", dict(
        type=int, default=1, help="CPU processes (gloo) when no GPU is used"), changes_result=False,
        refused=POSITIVE),
    Option("port", "processes", dict(
        type=int, default=12355, help="rendezvous port of a --gpu/--nproc spawn"), changes_result=False),
    Option("num_workers", "processes", dict(
        type=int, default=min(4, os.cpu_count() or 1), help="processes that read the images"),
        changes_result=False, refused=at_least(0)),
    # evaluation
    Option("crf_workers", "evaluation", dict(
        type=int, default=min(8, os.cpu_count() or 1), help="processes that run the dense CRF"),
        changes_result=False, refused=POSITIVE),
    Option("num_pictures", "evaluation", dict(
        type=int, default=100, help="val images whose predictions are saved as pictures (-1: all of them)"),
        refused=at_least(-1)),
    # released models of other methods
    Option("sota_ckpt", "released models", dict(
        type=Path, default=None,
        help="a released STEGO .ckpt or HP ckpt.pth (the method is read from the file; the DINO ViT inside it is "
             "used): test_sota.py evaluates it, --mode stego|hp fits PriMaPs-EM to its code"), changes_result=False),
    Option("sota_options", "released models", dict(
        type=Path, default=None,
        help="HP's option.json, when it is neither beside ckpt.pth nor one folder up"), changes_result=False),
    Option("sota_dropout", "released models", dict(
        default="official", choices=SOTA_DROPOUT,
        help="--mode stego: official (default): STEGO's Dropout2d(0.1) stays active while PriMaPs-EM trains, "
             "validates and tests, as the official PriMaPs wrapper leaves STEGO in train mode; eval: STEGO in "
             "eval mode. HP runs in eval mode either way, as the official code puts it")),
    # PriMaPs
    Option("mode", "PriMaPs", dict(
        default="cause", choices=PRIMAPS_MODES,
        help="cause: fit the prototypes to CAUSE's own features (head_ema of the trained segment module, "
             "prototypes initialised from its cluster probe; needs the CAUSE steps' artifacts); backbone: "
             "PriMaPs-EM on the plain backbone (DINO's 6-head ViT-S), initialised by PCA and k-means; stego, hp: "
             "on the code of the released STEGO or HP model --sota_ckpt, initialised from its cluster probe "
             "(+SotA+PriMaPs). A released --primaps_ckpt says its own mode. predict.py: the mode of the PriMaPs "
             "model --model primaps reads")),
    Option("head", "PriMaPs", dict(
        default="tr", choices=HEADS, help="cause mode: the CAUSE head whose features are used")),
)

OPTIONS = {option.name: option for option in _OPTIONS}
