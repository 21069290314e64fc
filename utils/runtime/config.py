"""A step's parser and Config, built from its registry entry (utils/runtime/steps.py) and the option
catalogue (utils/runtime/options.py), and the rules that derive the rest.

A step's parser holds only the options its script reads (`python train_mediator.py --help` lists
them), so `bash run` can route each option to the steps that know it. Nothing is guessed from file
names except what the official release naming fixes (the backbone arch from `checkpoint/<arch>.pth`,
overridable with --arch); everything derived (class count, feature width, resolutions, TR query
count, epochs, the precision on this machine) is computed here, once. `result_settings` is the part
of a step's identity that comes from its options: what "up to date" compares.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from loader import DATASETS
from models import ARCHS, resolve_arch
from utils.runtime.distributed import requested_gpus
from utils.runtime.options import OPTIONS, POSITIVE
from utils.runtime.steps import STEPS, script_options


class ConfigError(UserError):
    """Options that cannot work together."""


def option_kwargs(step, name):
    """argparse settings of option `name` in `step`'s parser: the catalogue's, with the step's overrides;
    an --epochs help names the step's own default."""
    kwargs = {**OPTIONS[name].kwargs, **step.overrides.get(name, {})}
    if name == step.epochs_option and step.trains:
        defaults = step.epochs if isinstance(step.epochs, dict) else {None: step.epochs}
        told = ", ".join(f"{n} ({head.upper()})" if head else str(n) for head, n in defaults.items())
        kwargs["help"] = f"{kwargs['help']}; default {told}"
    return kwargs


def build_parser(step, options=None, **parser_options):
    """The parser of `step`'s script (its options and those of the steps it runs first), or of
    `options` (names) when given; `parser_options` go to argparse.ArgumentParser."""
    parser_options.setdefault("description", f"{step.label()}: {step.description}")
    parser = argparse.ArgumentParser(**parser_options)
    groups = {}
    for name in options or script_options(step):
        option = OPTIONS[name]
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        # An option of a step the script runs first is set up as that step declares it.
        owner = next((STEPS[f] for f in step.runs_first if name in STEPS[f].options and name not in step.options),
                     step)
        groups[option.group].add_argument(option.flag, **option_kwargs(owner, name))
    return parser


@dataclass(frozen=True)
class Config:
    step: str
    head: str | None
    dataset: str
    data_dir: Path
    ckpt: Path
    cache_dir: Path
    arch: str | None
    dino_small_heads: int | None
    output_root: Path
    results_root: Path
    logs_root: Path
    num_codebook: int | None
    reduced_dim: int | None
    projection_dim: int | None
    restart: bool
    if_changed: str
    accept_partial: bool
    recipe: str
    epochs: int | None
    batch_size: int
    lr: float
    max_steps: int | None
    grid: bool
    train_resolution: int | None
    test_resolution: int | None
    seed: int
    label_leak: bool
    precision: str  # resolved for this machine: fp16, bf16 or fp32
    gpu: str | None
    nproc: int
    port: int
    num_workers: int
    crf_workers: int
    num_pictures: int
    mode: str
    threshold: float
    init_epochs: int | None
    pca_batches: int
    keep_best_on_val: bool
    # derived
    n_classes: int
    dim: int
    patch: int
    family: str

    @property
    def baseline(self):
        """The backbone checkpoint's file stem: it names the artifact folders (docs/cause.md §3)."""
        return self.ckpt.stem

    @property
    def num_queries(self):
        """Tokens the TR head is built for: the training grid (docs/cause.md §4)."""
        return (self.train_resolution // self.patch) ** 2


def parse_config(step, head=None, argv=None):
    """The Config of `step` (a registry entry) from its script's command line."""
    return make_config(step, head, vars(build_parser(step).parse_args(argv)))


def make_config(step, head, given):
    """The Config of `step` from the options `given` ({name: value}, as a parser returns them).
    `head` is the script's head (steps with one script per head); options not given take the step's
    defaults; those the step does not use given the others become None."""
    values = {name: option.default for name, option in OPTIONS.items()}
    values.update({name: kwargs["default"] for name, kwargs in step.overrides.items() if "default" in kwargs})
    values.update(given)
    values.update(step.fixed)
    _check_counts(values)
    head_option = values.pop("head")
    if step.head == "option":
        head = head_option
    elif step.head is None:
        head = None
    for name in step.unused(values):
        if name == "head":
            head = None
        else:
            values[name] = None
    uses_model = "ckpt" in step.options
    arch = resolve_arch(values["ckpt"], values["arch"]) if uses_model else None
    spec = ARCHS[arch] if arch else None
    train_res, test_res = default_resolutions(step, head, spec.family if spec else "dino")
    epochs = values[step.epochs_option] if values[step.epochs_option] is not None else step.default_epochs(head)
    cfg = Config(
        step=step.name, head=head, **{**values, "arch": arch, "epochs": epochs,
                                      "precision": resolved_precision(values["precision"], device_type(values["gpu"])),
                                      "train_resolution": values["train_resolution"] or train_res,
                                      "test_resolution": values["test_resolution"] or test_res},
        n_classes=DATASETS[values["dataset"]].n_classes, dim=spec.dim if spec else 0,
        patch=spec.patch if spec else 1, family=spec.family if spec else "")
    if uses_model:
        _check_resolutions(cfg)
    return cfg


def result_settings(cfg):
    """The options `cfg.step`'s result depends on, with their values: every option the step takes that
    changes results (utils/runtime/options.py), except those it uses for diagnostics only."""
    step = STEPS[cfg.step]
    return {name: _plain(getattr(cfg, name)) for name in step.options
            if OPTIONS[name].changes_result and name not in step.neutral}


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def device_type(gpu_option):
    """Where a step of these options computes: "cuda" when it uses a GPU, else "cpu"."""
    return "cuda" if requested_gpus(gpu_option) else "cpu"


def resolved_precision(name, device):
    """What --precision auto means: the official CAUSE fp16 (with loss scaling) on a GPU, fp32 on a CPU."""
    if name != "auto":
        return name
    return "fp16" if device == "cuda" else "fp32"


def _check_counts(values):
    for name in POSITIVE:
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
    """(train, test) resolution of a step (docs/cause.md §2): 320 everywhere, 322 for DINOv2 (a multiple
    of its 14-px patch), except where the step trains a head at another (`Step.trains_at`: the MLP head's
    front door and fine-tuning, 224). The TR head's query count follows the train resolution, so the
    test step builds it from the same."""
    base = 322 if family == "dinov2" else 320
    return step.trains_at.get(head, base), base
