"""Released STEGO, HP and PriMaPs files (docs/sota.md §1, §2, §3b): recognise them, check them, load them
strictly into this project's modules.

Every file is read with `models.safe_load.safe_load` (no code from the file runs; OmegaConf configs and
argparse options come back as plain dicts) and recognised by its layout (`identify`): a file of another
kind (a CAUSE file, a backbone release, a PriMaPs file given as STEGO, ...) is refused in one line
naming what it is and what was expected. Every size is read from the tensors, never from the stored
options, and the stored options are then checked against them: a disagreement is refused with both
values, as are the variants this project does not compute (`dino_feat_type` other than `feat`,
`extra_clusters > 0`, PriMaPs features of a block other than the last).

STEGO and HP (`SotaModel`, modules/sota.py):
- `read_sota_file(path, options_path=None) -> SotaFile(family, arch, cfg, sizes, state, path, options_path)`:
  family "stego" (a Lightning .ckpt) or "hp" (`ckpt.pth`, with its `option.json`: `options_path`, or
  found beside the file or one folder up, where PriMaPs' HP downloads keep it); `arch` the project's
  backbone arch (`dino_vit_small_8`, ...); `cfg` the stored STEGO cfg (plus `n_classes`) or HP options,
  as plain data; `sizes` a `HeadSizes`; `state` the `SotaModel` state dict, float32 (the DINO ViT
  inside the file under `backbone.`, DINO's release names).
- `load_sota_model(path, options_path=None)` / `build_sota_model(sota_file)`: the `SotaModel`, strictly
  loaded, the DINO ViT built as DINO defines it (`build_backbone(arch, dino_small_heads=6)`).

PriMaPs (`modules.primaps.PriMaPsModel`; models/released_primaps.py):
- `read_primaps_checkpoint(path) -> PriMaPsCheckpoint`: the stored options (plain dict), the mode
  (backbone, or +SotA on "stego" / "hp" with the SotA file's stored path), the arch of the plain DINO
  backbone (the masks'; and the features' in backbone mode), the `PriMaPsModel` state dict (θ_R from
  `seghead`, θ_M from `cluster_probe.ema_model`, its update count from `cluster_probe.step`, the linear
  probe), and the backbone's state dict (backbone mode only: +SotA files do not hold the SotA model).
  Released files do not hold the prototypes θ_R started from (PriMaPs kept them in a separate
  initialisation file); `initial` is zeros and `initial_known` False until `with_initial(directions)`
  gives them (for +SotA: the SotA file's cluster centres, which is how official PriMaPs starts).
- `load_primaps_model(checkpoint)`, `load_primaps_backbone(checkpoint)`: the modules, strictly loaded.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from modules.sota import CodeHead, SotaModel

from .registry import ARCHS, DINO_MODEL_TYPES, CheckpointError
from .safe_load import safe_load
from .vit import build_backbone


class SotaFileError(CheckpointError):
    """A STEGO, HP or PriMaPs file that is not one, does not fit its stored options, or asks for what
    this project does not compute."""


# What each kind of file holds, as the refusals say it.
LAYOUTS = {
    "stego": "a STEGO file is a Lightning .ckpt whose state_dict holds net.model.* (its DINO ViT), "
             "net.cluster1.*, cluster_probe.clusters and linear_probe.*, and whose hyper_parameters hold cfg",
    "hp": "an HP file is a torch.save dict of net_model_state_dict (model.*, cluster1.*, cluster2.*, "
          "ema_model1.*, ema_model2.*), linear_model_state_dict and cluster_model_state_dict, with its option.json",
    "primaps": "a PriMaPs file is a Lightning .ckpt whose state_dict holds seghead.*, cluster_probe.ema_model.* "
               "and linear_probe.* (and net.model.*, its DINO backbone, in backbone mode), and whose "
               "hyper_parameters hold opts",
}
NAMES = {"stego": "a STEGO checkpoint", "hp": "an HP checkpoint", "primaps": "a PriMaPs checkpoint"}

DINO_SMALL_HEADS = 6  # STEGO, HP and PriMaPs use DINO's own ViT-S (docs/sota.md §1)

# File names -> SotaModel names, as (file prefix, model prefix); keys not listed are unexpected.
STEGO_NAMES = (("net.model.", "backbone."), ("net.cluster1.", "head.cluster1."), ("net.cluster2.", "head.cluster2."),
               ("cluster_probe.clusters", "cluster_probe.clusters"), ("linear_probe.", "linear_probe."))
STEGO_UNUSED = ("train_cluster_probe.clusters", "decoder.weight", "decoder.bias")  # not part of evaluation
HP_NAMES = {
    "net_model_state_dict": (("model.", "backbone."), ("cluster1.", "head.cluster1."), ("cluster2.", "head.cluster2."),
                             ("ema_model1.", "head.ema_model1."), ("ema_model2.", "head.ema_model2.")),
    "linear_model_state_dict": (("", "linear_probe."),),
    "cluster_model_state_dict": (("", "cluster_probe."),),
}



def _listed(items, shown=5):
    items = list(items)
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _tensor_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def identify(obj):
    """'stego', 'hp' or 'primaps' for an object in that layout, else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("net_model_state_dict"), dict):
        return "hp"
    state = obj.get("state_dict")
    if not (isinstance(state, dict) and isinstance(obj.get("hyper_parameters"), dict)):
        return None
    if "seghead.weight_v" in state or "cluster_probe.ema_model.weight_v" in state:
        return "primaps"
    if "net.cluster1.0.weight" in state:
        return "stego"
    return None


def describe(obj):
    """What a loaded object is, in a few words, for the refusals."""
    family = identify(obj)
    if family is not None:
        return NAMES[family]
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    state = obj.get("state_dict")
    if isinstance(state, dict) and "cluster_probe.cluster_centers.weight_v" in state:
        return "a PriMaPs initialisation checkpoint (the k-means probe of --train-state baseline), not a trained model"
    if isinstance(state, dict) and "hyper_parameters" in obj:
        return f"a Lightning checkpoint of another model (state_dict keys {_listed(state)})"
    if _tensor_dict(obj):
        if any(k.startswith(("head_ema.", "projection_head.")) for k in obj):
            return "a CAUSE segment file (segment_{mlp,tr}.pth: head, head_ema, projection_head, linear)"
        if "codebook" in obj and "cluster_probe" in obj:
            return "a CAUSE cluster file (cluster_{mlp,tr}.pth: codebook, cluster_probe)"
        if any(k.startswith("blocks.") for k in obj):
            return "a backbone release (a flat ViT state dict)"
        return f"a state dict ({_listed(obj)})"
    return f"a dict with keys {_listed(map(str, obj))}"


def _load(path, family):
    """The file's object, refused unless it is in `family`'s layout ('stego' and 'hp' for `family` 'sota')."""
    path = Path(path)
    wanted = ("stego", "hp") if family == "sota" else (family,)
    expected = " or ".join(NAMES[f] for f in wanted)
    layouts = "; ".join(LAYOUTS[f] for f in wanted)
    if not path.is_file():
        raise SotaFileError(f"{path} not found: expected {expected} there ({layouts})")
    obj = safe_load(path)
    found = identify(obj)
    if found not in wanted:
        raise SotaFileError(f"{path} is {describe(obj)}, not {expected}: {layouts}")
    return obj, found


def _rename(tensors, names, where):
    """(renamed tensors, keys no name of `names` covers), with `names` (file prefix, model prefix) pairs."""
    renamed, unexpected = {}, []
    for key, value in tensors.items():
        for file_prefix, model_prefix in names:
            if key.startswith(file_prefix):
                renamed[model_prefix + key[len(file_prefix):]] = value
                break
        else:
            unexpected.append(where + key)
    return renamed, unexpected


def _sota_state(obj, family):
    """(SotaModel-named tensors, file keys that are neither mapped nor unused by rule), float32."""
    if family == "stego":
        tensors = {k: v for k, v in obj["state_dict"].items() if k not in STEGO_UNUSED}
        state, unexpected = _rename(tensors, STEGO_NAMES, "")
    else:
        state, unexpected = {}, []
        for part, names in HP_NAMES.items():
            tensors = obj.get(part)
            if not isinstance(tensors, dict):
                raise SotaFileError(f"the HP file has no {part} (an HP file holds {', '.join(HP_NAMES)})")
            renamed, extra = _rename(tensors, names, f"{part}/")
            state.update(renamed)
            unexpected += extra
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, unexpected


@dataclass(frozen=True)
class HeadSizes:
    """The sizes of a STEGO or HP model, read from its tensors."""

    width: int  # D, the ViT's width
    code_dim: int  # d
    n_classes: int  # K, the linear probe's classes
    n_clusters: int  # the cluster probe's centres (K + extra_clusters)
    patch: int
    pretrain_grid: int  # side of the stored positional-embedding grid
    nonlinear: bool  # projection_type 'nonlinear' (cluster2 present) or 'linear'
    ema: bool  # HP's EMA branches present


def _shape(state, key, what, file_name=lambda key: key):
    if key not in state:
        raise SotaFileError(f"{what} lacks {file_name(key)}, which every such file holds (a damaged or other file?)")
    return tuple(state[key].shape)


def _read_sizes(state, family, what):
    def shape(key):
        return _shape(state, key, what, lambda k: _file_name(family, k))

    patch_shape = shape("backbone.patch_embed.proj.weight")
    tokens = shape("backbone.pos_embed")[-2] - 1
    grid = round(tokens ** 0.5)
    code_dim, code_in = shape("head.cluster1.0.weight")[:2]
    width = patch_shape[0]
    if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3] or grid * grid != tokens or code_in != width:
        raise SotaFileError(f"{what} holds a ViT whose patch embedding is {patch_shape}, with {tokens} positions, "
                            f"and a code head on {code_in} channels: not a DINO ViT with a STEGO head")
    return HeadSizes(width, code_dim, n_classes=shape("linear_probe.weight")[0],
                     n_clusters=shape("cluster_probe.clusters")[0], patch=patch_shape[-1], pretrain_grid=grid,
                     nonlinear="head.cluster2.0.weight" in state, ema="head.ema_model1.0.weight" in state)


def dino_arch(width, patch, what):
    """This project's arch of a DINO ViT of `width` and `patch` (e.g. dino_vit_small_8)."""
    size = {dim: name for name, dim in DINO_MODEL_TYPES.items()}.get(width)
    arch = f"dino_{size}_{patch}" if size else None
    if arch not in ARCHS:
        raise SotaFileError(f"{what} holds a {width}-wide ViT with patch {patch}, not a DINO ViT this project builds "
                            f"(widths {sorted(DINO_MODEL_TYPES.values())}, patches 8 and 16)")
    return arch


def _refuse_mismatch(path, source, checks):
    """checks: (option name, stored value, the value the tensors give, or a set of allowed values)."""
    for name, stored, expected in checks:
        allowed = expected if isinstance(expected, (set, frozenset)) else {expected}
        if stored not in allowed:
            wanted = " or ".join(repr(v) for v in sorted(allowed, key=repr))
            raise SotaFileError(f"{path}: its {source} says {name} = {stored!r}, but its tensors say {wanted}: the "
                                f"file and its options disagree")


def _check_cluster_rows(path, sizes, clusters, linear):
    if sizes.n_clusters != sizes.n_classes:
        raise SotaFileError(f"{path}: {clusters} has {sizes.n_clusters} rows but {linear} {sizes.n_classes} classes: "
                            f"extra clusters are not supported (docs/sota.md §3)")


def _get(options, dotted, path, source):
    value = options
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SotaFileError(f"{path}: its {source} has no {dotted}, which the official code reads")
        value = value[part]
    return value


def _unsupported(path, source, name, value, why):
    raise SotaFileError(f"{path}: its {source} says {name} = {value!r}: {why}")


def _check_variant(path, source, get, feat_type, extra_clusters):
    """Refuse the variants this project does not compute, named as the options store them."""
    if get(feat_type) != "feat":
        _unsupported(path, source, feat_type, get(feat_type),
                     "only 'feat' (the last block's tokens) is supported (docs/sota.md §3)")
    if get(extra_clusters) != 0:
        _unsupported(path, source, extra_clusters, get(extra_clusters),
                     "extra clusters are not supported (docs/sota.md §3)")


def _check_stego(path, obj, sizes, arch):
    hyper = obj["hyper_parameters"]
    cfg = hyper.get("cfg")
    if not isinstance(cfg, dict):
        raise SotaFileError(f"{path}: its hyper_parameters hold no cfg; {LAYOUTS['stego']}")
    source = "stored cfg"
    get = lambda name: _get(cfg, name, path, source)  # noqa: E731
    if get("arch") != "dino":
        _unsupported(path, source, "arch", get("arch"), "only STEGO's DINO models are supported")
    _check_variant(path, source, get, "dino_feat_type", "extra_clusters")
    continuous = get("continuous")
    dim_name, dim = ("dim", get("dim")) if continuous else ("n_classes (continuous false)", hyper.get("n_classes"))
    _refuse_mismatch(path, source, [
        ("model_type", get("model_type"), {t for t, w in DINO_MODEL_TYPES.items() if w == sizes.width}),
        ("dino_patch_size", get("dino_patch_size"), sizes.patch),
        ("projection_type", get("projection_type"), "nonlinear" if sizes.nonlinear else "linear"),
        (dim_name, dim, sizes.code_dim),
        ("n_classes", hyper.get("n_classes"), sizes.n_classes),
    ])
    _check_cluster_rows(path, sizes, "cluster_probe.clusters", "linear_probe")
    return {**cfg, "n_classes": hyper.get("n_classes")}


def _hp_options(path, options_path):
    candidates = [Path(options_path)] if options_path else [path.parent / "option.json",
                                                            path.parent.parent / "option.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SotaFileError(f"{candidate} (the options of {path}) is not JSON: {err}") from None
    raise SotaFileError(f"{path} is an HP checkpoint, whose feature type only its options JSON says: none at "
                        f"{' or '.join(map(str, candidates))}; pass the option.json it was trained with")


def _check_hp(path, options, where, sizes):
    source = f"options ({where})"
    get = lambda name: _get(options, name, path, source)  # noqa: E731
    if get("model.arch") != "dino" or "stego" not in str(get("model.name")).lower():
        _unsupported(path, source, "model.arch/name", (get("model.arch"), get("model.name")),
                     "HP's DINO STEGO model is the one it releases")
    _check_variant(path, source, get, "model.pretrained.dino_feat_type", "model.extra_clusters")
    if options.get("eval", {}).get("is_direct", False):
        _unsupported(path, source, "eval.is_direct", True, "HP's released evaluation reads cosines (is_direct false)")
    continuous = get("model.continuous")
    _refuse_mismatch(path, source, [
        ("model.pretrained.model_type", get("model.pretrained.model_type"),
         {t for t, w in DINO_MODEL_TYPES.items() if w == sizes.width}),
        ("model.pretrained.dino_patch_size", get("model.pretrained.dino_patch_size"), sizes.patch),
        ("model.pretrained.projection_type", get("model.pretrained.projection_type"),
         "nonlinear" if sizes.nonlinear else "linear"),
        ("model.dim" if continuous else "n_classes (model.continuous false)",
         get("model.dim") if continuous else sizes.n_classes, sizes.code_dim),
    ])
    if not sizes.nonlinear:
        raise SotaFileError(f"{path} holds no cluster2 (the nonlinear branch): HP builds it, and its EMA copy, "
                            f"always (its model cannot be built with projection_type 'linear')")
    _check_cluster_rows(path, sizes, "cluster_model_state_dict/clusters", "linear_model_state_dict")
    return options


class SotaFile(NamedTuple):
    family: str  # "stego" or "hp"
    arch: str  # the project's backbone arch, e.g. dino_vit_small_8
    cfg: dict  # STEGO: the stored cfg plus n_classes; HP: the options JSON
    sizes: HeadSizes
    state: dict  # the SotaModel state dict, float32
    path: str
    options_path: str | None  # HP: the option.json read (given, or found beside the file); STEGO: None


def read_sota_file(path, options_path=None):
    """A released STEGO `.ckpt` or HP `ckpt.pth`, recognised, checked and converted (module docstring)."""
    path = Path(path)
    obj, family = _load(path, "sota")
    state, unexpected = _sota_state(obj, family)
    what = f"{path} ({NAMES[family]})"
    sizes = _read_sizes(state, family, what)
    arch = dino_arch(sizes.width, sizes.patch, what)
    where = None
    if family == "stego":
        cfg = _check_stego(path, obj, sizes, arch)
    else:
        options, where = _hp_options(path, options_path)
        cfg = _check_hp(path, options, where, sizes)
    sota = SotaFile(family, arch, cfg, sizes, state, str(path), str(where) if where else None)
    _check_keys(_expected_sota_state(sota), state, unexpected, what, LAYOUTS[family],
                lambda key: _file_name(family, key))
    return sota


def _build_sota_model(sota):
    sizes = sota.sizes
    backbone = build_backbone(sota.arch, dino_small_heads=DINO_SMALL_HEADS)
    # The head the family's official code builds: HP always holds the EMA branches, STEGO never.
    head = CodeHead(sizes.width, sizes.code_dim, nonlinear=sizes.nonlinear, ema=sota.family == "hp")
    return SotaModel(sota.family, backbone, head, sizes.n_clusters, sizes.n_classes)


def _expected_sota_state(sota):
    with torch.device("meta"):
        return _build_sota_model(sota).state_dict()


def _file_name(family, key):
    """The name a SotaModel key has in `family`'s file (for messages)."""
    parts = {"": STEGO_NAMES} if family == "stego" else {f"{part}/": names for part, names in HP_NAMES.items()}
    for part, names in parts.items():
        for file_prefix, model_prefix in names:
            if key.startswith(model_prefix):
                return part + file_prefix + key[len(model_prefix):]
    return key


def _check_keys(expected, state, unexpected, what, layout, file_name=lambda key: key):
    """Strict loading's checks, every problem named (in the file's names) in one line."""
    missing = [file_name(k) for k in expected if k not in state]
    unexpected = unexpected + [file_name(k) for k in state if k not in expected]
    mismatched = [f"{file_name(k)}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(items)} {name} ({_listed(items)})" for name, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
    if problems:
        raise SotaFileError(f"{what} does not fit: {'; '.join(problems)}. {layout[0].upper()}{layout[1:]}")


def build_sota_model(sota):
    """The SotaModel of a `SotaFile`, its tensors loaded strictly (they were checked by read_sota_file)."""
    with torch.device("meta"):
        model = _build_sota_model(sota)
    model.load_state_dict(sota.state, assign=True)
    return model


def load_sota_model(path, options_path=None):
    """The SotaModel of a released STEGO or HP file."""
    return build_sota_model(read_sota_file(path, options_path))
