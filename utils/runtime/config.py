"""A step's parser and Config, built from its registry entry (utils/runtime/steps.py) and the option
catalogue (utils/runtime/options.py, and the options steps declare themselves), and the rules that
derive the rest. A Config holds the options its step takes, and no other.

A step's parser holds only the options its script reads (`python train_mediator.py --help` lists
them), so `bash run` can route each option to the steps that know it. Nothing is guessed from file
names except what the official release naming fixes (the backbone arch from `checkpoint/<arch>.pth`,
overridable with --arch); everything derived (class count, feature width, resolutions, TR query
count, epochs, the precision on this machine) is computed here, once. `result_settings` is the part
of a step's identity that comes from its options: what "up to date" compares.
"""
import argparse
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from errors import UserError
from loader import DATASETS
from models import ARCHS, resolve_arch
from models.released import read_sota_file
from utils.runtime.distributed import requested_gpus
from utils.runtime.options import OPTIONS, SOTA_MODES
from utils.runtime.steps import STEPS, script_options


class ConfigError(UserError):
    """Options that cannot work together."""


def option_kwargs(step, name):
    """argparse settings of option `name` in `step`'s parser: the catalogue's, with the step's overrides;
    an --epochs help names the step's own default."""
    kwargs = {**OPTIONS[name].kwargs, **step.overrides.get(name, {})}
    if name == "epochs" and step.trains and not callable(step.epochs):
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


class Config:
    """A step's configuration: `step`, `head`, the options the step takes (asking for any other is an
    AttributeError) and what follows from them: `arch` (also of a released file's ViT), `n_classes`, `dim`,
    `patch`, `family`, `sota_family` ("stego" or "hp": the released model --sota_ckpt holds, where the step
    reads one, else None), `code_dim` (the width of that model's code, else 0), `released_name` (what names
    the artifact folders of a released file the step's own options name: `Step.adopt`, else None) and, for a
    step that trains, `epochs`. `precision` is resolved for this machine (fp16, bf16 or fp32)."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"a Config is read-only: replace({name}=...) makes another")

    def replace(self, **changes):
        return Config(**{**vars(self), **changes})

    def __repr__(self):
        return f"Config({', '.join(f'{name}={value!r}' for name, value in vars(self).items())})"

    @property
    def baseline(self):
        """What names the artifact folders: the backbone checkpoint's file stem (docs/cause.md §3); the
        released STEGO or HP model's name where its code is the features; the step's own released file's
        name (a released PriMaPs checkpoint's released_<stem>)."""
        if self.released_name is not None:
            return self.released_name
        if self.sota_family is not None:
            return sota_name(self.sota_ckpt)
        return self.ckpt.stem if getattr(self, "ckpt", None) is not None else None

    @property
    def num_queries(self):
        """Tokens the TR head is built for: the training grid (docs/cause.md §4)."""
        return (self.train_resolution // self.patch) ** 2


def parse_config(step, head=None, argv=None):
    """The Config of `step` (a registry entry) from its script's command line."""
    return make_config(step, head, vars(build_parser(step).parse_args(argv)))


def make_config(step, head, given):
    """The Config of `step` from the options `given` ({name: value}, as a parser returns them; those the
    step does not take are left out). `head` is the script's head (steps with one script per head);
    options not given take the step's defaults; those that play no part given the others become None."""
    values = {name: step.overrides.get(name, {}).get("default", OPTIONS[name].default) for name in step.options}
    values.update((name, value) for name, value in given.items() if name in values)
    _check_values(values)
    released = step.adopt(values)
    head_option = values.pop("head", None)
    if step.head == "option":
        head = head_option
    elif step.head is None:
        head = None
    for name in step.unused({**values, "head": head_option}):
        if name == "head":
            head = None
        elif name in values:
            values[name] = None
    sota = _sota_file(step, values)
    arch = sota.arch if sota else released.arch if released else None
    if arch is None and values.get("ckpt") is not None:
        arch = resolve_arch(values["ckpt"], values.get("arch"))
    uses_model = arch is not None
    spec = ARCHS[arch] if arch else None
    patch = spec.patch if spec else 1
    if "precision" in values:
        values["precision"] = resolved_precision(values["precision"], device_type(values.get("gpu")))
    train_res, test_res = default_resolutions(step, head, patch)
    if "train_resolution" in values and values["train_resolution"] is None:
        values["train_resolution"] = train_res
    if "test_resolution" in values and values["test_resolution"] is None:
        # The TR head reads exactly its training grid's tokens: it is tested where it was trained.
        values["test_resolution"] = values.get("train_resolution", test_res) if head == "tr" else test_res
    derived = {"epochs": step.epochs_of(values, head)} if step.trains else {}
    cfg = Config(**{
        "step": step.name, "head": head, **values, **derived, "arch": arch,
        "n_classes": DATASETS[values["dataset"]].n_classes, "dim": spec.dim if spec else 0, "patch": patch,
        "family": spec.family if spec else "", "sota_family": sota.family if sota else None,
        "code_dim": sota.code_dim if sota else 0, "released_name": released.name if released else None})
    if uses_model:
        _check_resolutions(cfg)
    return cfg


def sota_name(path):
    """A released STEGO or HP model's name: its file's stem, or the folder of an HP ckpt.pth (its experiment)."""
    path = Path(path)
    return path.parent.name if path.stem == "ckpt" and path.parent.name else path.stem


def check_classes(values, n_classes, path):
    wanted = DATASETS[values["dataset"]].n_classes
    if n_classes != wanted:
        raise ConfigError(f"{path} predicts {n_classes} classes, but --dataset {values['dataset']} has {wanted}: "
                          f"pass the data set it was trained on")


def _sota_file(step, values):
    """The released STEGO or HP file the step reads (test_sota; PriMaPs-EM in --mode stego|hp), checked
    against the mode and the data set; None when it reads none. HP's option.json is resolved in `values`."""
    takes_mode = "mode" in step.options
    if "sota_ckpt" not in step.options or (takes_mode and values["mode"] not in SOTA_MODES):
        return None
    what = f"--mode {values['mode']} fits PriMaPs-EM to" if takes_mode else f"{step.script} evaluates"
    if values["sota_ckpt"] is None:
        raise ConfigError(f"{what} a released STEGO or HP model: pass its file with --sota_ckpt (a STEGO .ckpt, "
                          f"or HP's ckpt.pth with its option.json beside it or --sota_options)")
    sota = _sota_summary(values["sota_ckpt"], values["sota_options"])
    if takes_mode and sota.family != values["mode"]:
        kind = "an HP" if sota.family == "hp" else "a STEGO"
        raise ConfigError(f"--mode {values['mode']}, but {values['sota_ckpt']} is {kind} checkpoint: pass "
                          f"--mode {sota.family}")
    check_classes(values, sota.n_classes, values["sota_ckpt"])
    values["sota_options"] = Path(sota.options_path) if sota.options_path else None
    return sota


class SotaSummary(NamedTuple):
    """What a config needs of a released STEGO or HP file (models/released.py reads and checks it)."""
    family: str
    arch: str
    code_dim: int
    n_classes: int
    options_path: str | None


def _sota_summary(path, options_path):
    """The SotaSummary of a file, read once per content state: `bash run` and predict.py build the
    configs of several steps from the same file."""
    def state(file):
        return None if file is None or not Path(file).is_file() else (str(Path(file).resolve()),
                                                                    Path(file).stat().st_mtime_ns)
    return _read_sota_summary(str(path), str(options_path) if options_path else None, state(path), state(options_path))


@lru_cache(maxsize=4)
def _read_sota_summary(path, options_path, file_state, options_state):
    sota = read_sota_file(path, options_path)
    return SotaSummary(sota.family, sota.arch, sota.sizes.code_dim, sota.sizes.n_classes, sota.options_path)


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


def _check_values(values):
    """Refuse, before anything starts, a value its option's declaration refuses (a count below 1, a
    resolution out of range, a learning rate that is not a positive finite number...)."""
    for name, value in values.items():
        refused = OPTIONS[name].refused
        problem = refused(value) if refused is not None and value is not None else None
        if problem:
            raise ConfigError(f"--{name} {problem}")


def _check_resolutions(cfg):
    for name in ("train_resolution", "test_resolution"):
        value = getattr(cfg, name, None)
        if value is not None and value % cfg.patch:
            raise ConfigError(f"--{name} {value} is not a multiple of {cfg.arch}'s patch size {cfg.patch}")
    if cfg.head == "tr" and getattr(cfg, "test_resolution", None) not in (None, getattr(cfg, "train_resolution", None)):
        raise ConfigError(f"--test_resolution {cfg.test_resolution}: the TR head is built for the tokens of its "
                          f"training grid, --train_resolution {cfg.train_resolution}; test at that resolution (or "
                          f"give the --train_resolution the head was trained at)")


BASE_RESOLUTION = 320  # docs/cause.md §2


def default_resolutions(step, head, patch):
    """(train, test) resolution of a step (docs/cause.md §2): 320 (the next multiple of a 14-px patch above it,
    322, for such a backbone), except where the step trains a head at another (`Step.trains_at`: the MLP head's
    front door and fine-tuning, 224). The TR head's query count follows the train resolution, so the
    test step builds it from the same."""
    base = -(-BASE_RESOLUTION // patch) * patch
    return step.trains_at.get(head, base), base
