"""One argument parser for every step script, and the rules that derive the rest.

Nothing here is guessed from file names except what the official release naming
fixes (the backbone arch from `checkpoint/<arch>.pth`, overridable with --arch);
everything derived (class count, feature width, resolutions, TR query count) is
computed once, in `parse_config`, and travels in the returned Config.
"""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from loader import DATASETS
from models import ARCHS, resolve_arch

STEPS = ("crop", "mediator", "front_door", "fine_tune", "test")
HEADS = ("mlp", "tr")

# Epochs of each step (SPEC §3-§5); the mediator's and front door's do not depend on the head.
DEFAULT_EPOCHS = {"mediator": 1, "front_door": 2, ("fine_tune", "tr"): 5, ("fine_tune", "mlp"): 1}


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
    epochs: int
    batch_size: int
    num_workers: int
    train_resolution: int
    test_resolution: int
    grid: bool
    num_codebook: int
    reduced_dim: int
    projection_dim: int
    lr: float
    gpu: str | None
    nproc: int
    port: int
    precision: str
    seed: int
    restart: bool
    label_leak: bool
    crf_workers: int
    num_pictures: int
    max_steps: int | None
    # derived
    n_classes: int
    dim: int
    patch: int

    @property
    def baseline(self):
        """The backbone checkpoint's file stem: it names the artifact folders (SPEC §3)."""
        return self.ckpt.stem

    @property
    def num_queries(self):
        """Tokens the TR head is built for: the training grid (SPEC §4)."""
        return (self.train_resolution // self.patch) ** 2


def build_parser(step, head=None):
    """The shared parser; `step` and `head` only change defaults and help text."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    p = argparse.ArgumentParser(description=f"CAUSE step: {step}" + (f" ({head.upper()} head)" if head else ""))
    g = p.add_argument_group("data and backbone")
    g.add_argument("--dataset", default="cocostuff27", choices=sorted(DATASETS))
    g.add_argument("--data_dir", type=Path, default=Path(os.environ.get("CAUSE_DATA_DIR", "data")),
                   help="folder holding cocostuff/, cityscapes/, pascalvoc/ (SPEC §2 layouts)")
    g.add_argument("--ckpt", type=Path, default=Path("checkpoint/dino_vit_base_8.pth"),
                   help="backbone release file; its name gives the arch unless --arch is given")
    g.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="arch of --ckpt when its file name is not <arch>.pth")
    g.add_argument("--dino_small_heads", type=int, default=12, choices=(6, 12),
                   help="attention heads of DINO ViT-S: 12 as the official CAUSE code and its released heads, "
                        "6 as DINO defines it")
    g = p.add_argument_group("artifacts")
    g.add_argument("--output_root", type=Path, default=Path("CAUSE"))
    g.add_argument("--results_root", type=Path, default=Path("results"))
    g.add_argument("--logs_root", type=Path, default=Path("logs"))
    g.add_argument("--restart", action="store_true", help="ignore a saved resume state and start the step over")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None,
                   help="default: 1 mediator, 2 front door, fine-tune 5 (TR) / 1 (MLP)")
    g.add_argument("--batch_size", type=int, default=16, help="per process")
    g.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    g.add_argument("--train_resolution", type=int, default=None,
                   help="default 320 (322 for DINOv2); the MLP head's front door and fine-tuning train at 224")
    g.add_argument("--test_resolution", type=int, default=None, help="default 320 (322 for DINOv2)")
    g.add_argument("--grid", type=_yes_no, default=True, help="stochastic grid sampling (yes/no)")
    g.add_argument("--num_codebook", type=int, default=2048)
    g.add_argument("--reduced_dim", type=int, default=90)
    g.add_argument("--projection_dim", type=int, default=2048)
    g.add_argument("--lr", type=float, default=1e-3, help="per process; multiplied by the number of processes")
    g.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="autocast precision on GPU (fp16 uses loss scaling); CPU runs use fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max_steps", type=int, default=None, help="stop each epoch after this many batches (smoke runs)")
    g.add_argument("--label_leak", action="store_true",
                   help="fine-tuning: let the labelled probe's loss train head_ema as the official code does "
                        "(uses ground-truth labels; only for comparing with the paper)")
    g = p.add_argument_group("processes")
    g.add_argument("--gpu", default=None,
                   help="GPUs to use, e.g. 0,1,2,3 (one process each); default: all visible, or CPU")
    g.add_argument("--nproc", type=int, default=1, help="CPU processes (gloo) when no GPU is used")
    g.add_argument("--port", type=int, default=12355, help="rendezvous port of a --gpu/--nproc spawn")
    g = p.add_argument_group("evaluation")
    g.add_argument("--crf_workers", type=int, default=min(8, os.cpu_count() or 1))
    g.add_argument("--num_pictures", type=int, default=100,
                   help="val images whose predictions are saved as pictures (-1: all of them)")
    return p


def parse_config(step, head=None, argv=None):
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    args = build_parser(step, head).parse_args(argv)
    arch = resolve_arch(args.ckpt, args.arch)
    spec = ARCHS[arch]
    train_res, test_res = default_resolutions(step, head, spec.family)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(step, DEFAULT_EPOCHS.get((step, head), 1))
    return Config(
        step=step, head=head, dataset=args.dataset, data_dir=args.data_dir, ckpt=args.ckpt, arch=arch,
        dino_small_heads=args.dino_small_heads, output_root=args.output_root, results_root=args.results_root,
        logs_root=args.logs_root, epochs=epochs, batch_size=args.batch_size, num_workers=args.num_workers,
        train_resolution=args.train_resolution or train_res, test_resolution=args.test_resolution or test_res,
        grid=args.grid, num_codebook=args.num_codebook, reduced_dim=args.reduced_dim,
        projection_dim=args.projection_dim, lr=args.lr, gpu=args.gpu, nproc=args.nproc, port=args.port,
        precision=args.precision, seed=args.seed, restart=args.restart, label_leak=args.label_leak,
        crf_workers=args.crf_workers, num_pictures=args.num_pictures, max_steps=args.max_steps,
        n_classes=DATASETS[args.dataset].n_classes, dim=spec.dim, patch=spec.patch,
    )


def default_resolutions(step, head, family):
    """(train, test) resolution of a step (SPEC §2): 320 everywhere, 322 for DINOv2 (a multiple
    of its 14-px patch), except that the MLP head's front door and fine-tuning train at 224.
    The TR head's query count follows the train resolution, so test must build it from the same."""
    base = 322 if family == "dinov2" else 320
    train = 224 if head == "mlp" and step in ("front_door", "fine_tune") else base
    return train, base


def _yes_no(value):
    lowered = value.lower()
    if lowered in ("yes", "true", "y", "1", "on"):
        return True
    if lowered in ("no", "false", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")
