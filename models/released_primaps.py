"""Released PriMaPs checkpoints (docs/sota.md §3b): recognised, checked and converted to this project's
`PriMaPsModel` (see models/released.py, whose checks and refusals they share)."""
from pathlib import Path
from typing import NamedTuple

import torch

from modules.primaps import PriMaPsModel

from .checkpoints import convert_checkpoint
from .registry import ARCHS, PRIMAPS_BACKBONES
from .released import (DINO_SMALL_HEADS, LAYOUTS, NAMES, SotaFileError, _check_keys, _get, _load, _refuse_mismatch,
                       _shape, _unsupported)
from .vit import build_backbone

# PriMaPs file names -> PriMaPsModel names; the backbone (net.model.*) is returned apart. A file also
# holds the EMA wrapper's copy of θ_R (cluster_probe.online_model.*, the seghead tensors) and its flag
# cluster_probe.initted.
PRIMAPS_NAMES = {"seghead.weight_g": "online.weight_g", "seghead.weight_v": "online.weight_v",
                 "cluster_probe.ema_model.weight_g": "momentum.prototypes.weight_g",
                 "cluster_probe.ema_model.weight_v": "momentum.prototypes.weight_v",
                 "cluster_probe.step": "momentum.calls",
                 "linear_probe.weight": "linear.weight", "linear_probe.bias": "linear.bias"}


class PriMaPsCheckpoint(NamedTuple):
    opts: dict  # the stored training options (argparse.Namespace), as a dict
    sota: str | None  # None (backbone mode), "stego" or "hp" (+SotA: the features are that model's code)
    sota_path: str | None  # +SotA: the SotA file's path as stored (on the machine that trained it)
    sota_options_path: str | None  # +HP: its options JSON's path as stored
    arch: str  # the plain DINO backbone's arch: the pseudo masks' (and backbone mode's features)
    n_classes: int
    in_channels: int  # C: the backbone's width (backbone mode) or the SotA code's dim (+SotA)
    max_decay: float  # θ_M's EMA decay cap (opts.ema_decay)
    resolution: int  # opts.validation_resize: the evaluation's shorter side and centre crop
    crop_size: int  # opts.crop_size: the training crop
    model_state: dict  # the PriMaPsModel state dict
    initial_known: bool  # False: model_state["initial"] is zeros (module docstring)
    backbone_state: dict | None  # backbone mode: the ViTBackbone state dict (DINO's release names); +SotA: None

    def with_initial(self, directions):
        """The same checkpoint with the prototypes θ_R started from, [K, C] (e.g. a SotA file's
        cluster centres, `SotaModel.cluster_probe.clusters`)."""
        initial = self.model_state["initial"]
        if tuple(directions.shape) != tuple(initial.shape):
            raise SotaFileError(f"initial prototypes of shape {tuple(directions.shape)} do not fit this PriMaPs "
                                f"model's {tuple(initial.shape)} (K classes × C channels)")
        state = {**self.model_state, "initial": directions.detach().float().cpu().clone()}
        return self._replace(model_state=state, initial_known=True)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def read_primaps_checkpoint(path):
    """A released PriMaPs `.ckpt`, recognised, checked and converted (module docstring)."""
    path = Path(path)
    obj, _ = _load(path, "primaps")
    what = f"{path} ({NAMES['primaps']})"
    opts = obj["hyper_parameters"].get("opts")
    if not isinstance(opts, dict):
        raise SotaFileError(f"{path}: its hyper_parameters hold no opts; {LAYOUTS['primaps']}")
    source = "stored opts"
    get = lambda name: _get(opts, name, path, source)  # noqa: E731
    stego, hp = opts.get("stego_ckpt") or None, opts.get("hp_ckpt") or None
    sota = "stego" if stego else "hp" if hp else None
    backbone_name = get("backbone_arch")
    arch = f"{PRIMAPS_BACKBONES.get(backbone_name)}_{get('backbone_patch')}"
    if backbone_name not in PRIMAPS_BACKBONES or arch not in ARCHS:
        _unsupported(path, source, "backbone_arch/backbone_patch", (backbone_name, get("backbone_patch")),
                     f"not a ViT this project builds (backbone_arch {', '.join(PRIMAPS_BACKBONES)})")
    if get("dino_block") != 1:
        _unsupported(path, source, "dino_block", get("dino_block"), "only the last block's features are supported")

    file_state = obj["state_dict"]
    backbone_file = {k.removeprefix("net.model."): v.float() for k, v in file_state.items()
                     if k.startswith("net.model.")}
    others = {k: v for k, v in file_state.items() if not k.startswith("net.model.")}
    n_classes, in_channels = _shape(others, "seghead.weight_v", what)[:2]
    max_decay = float(get("ema_decay"))
    with torch.device("meta"):
        model_layout = PriMaPsModel(in_channels, n_classes, max_decay).state_dict()
    # The file's layout in its own names: the model's shapes; the EMA wrapper's buffers are [1].
    file_layout = {file: model_layout[model] for file, model in PRIMAPS_NAMES.items()}
    file_layout.update({"cluster_probe.step": torch.empty(1, device="meta"),
                        "cluster_probe.initted": torch.empty(1, device="meta"),
                        "cluster_probe.online_model.weight_g": model_layout["online.weight_g"],
                        "cluster_probe.online_model.weight_v": model_layout["online.weight_v"]})
    _check_keys(file_layout, others, [], what, LAYOUTS["primaps"])
    for name in ("weight_g", "weight_v"):
        if not torch.equal(others[f"cluster_probe.online_model.{name}"], others[f"seghead.{name}"]):
            raise SotaFileError(f"{what}: cluster_probe.online_model.{name} differs from seghead.{name}, which "
                                f"PriMaPs saves as the same tensor (θ_R)")
    model_state = {model: others[file].float() for file, model in PRIMAPS_NAMES.items()}
    model_state["momentum.calls"] = others["cluster_probe.step"].reshape(()).long()
    model_state["initial"] = torch.zeros(n_classes, in_channels)

    backbone_state = None
    if sota is None:
        if not backbone_file:
            raise SotaFileError(f"{what} holds no net.model.* (its DINO backbone) and its opts name no "
                                f"stego_ckpt or hp_ckpt: {LAYOUTS['primaps']}")
        backbone_state = convert_checkpoint(ARCHS[arch].family, backbone_file)
        with torch.device("meta"):
            backbone = build_backbone(arch, dino_small_heads=DINO_SMALL_HEADS)
        _check_keys(backbone.state_dict(), backbone_state, [], f"{what}, its backbone net.model.*",
                    f"a backbone-mode PriMaPs file holds the {arch} DINO ViT under net.model.")
        width = ARCHS[arch].dim
        if in_channels != width:
            raise SotaFileError(f"{what}: its prototypes act on {in_channels} channels, its {arch} backbone "
                                f"gives {width}")
    elif backbone_file:
        raise SotaFileError(f"{what}: its opts name a {sota.upper()} model underneath (+SotA), whose features "
                            f"are not the DINO backbone it holds under net.model.*; the file and its opts disagree")
    _refuse_mismatch(path, source, [("num_classes", get("num_classes"), n_classes),
                                    ("backbone_dim", get("backbone_dim"), in_channels)])
    return PriMaPsCheckpoint(
        opts=opts, sota=sota, sota_path=stego or hp, sota_options_path=opts.get("hp_opt") if sota == "hp" else None,
        arch=arch, n_classes=n_classes, in_channels=in_channels, max_decay=max_decay,
        resolution=int(_first(get("validation_resize"))), crop_size=int(_first(get("crop_size"))),
        model_state=model_state, initial_known=False, backbone_state=backbone_state)


def load_primaps_model(checkpoint):
    """The PriMaPsModel of a `PriMaPsCheckpoint`, strictly loaded."""
    model = PriMaPsModel(checkpoint.in_channels, checkpoint.n_classes, checkpoint.max_decay)
    model.load_state_dict(checkpoint.model_state)
    return model


def load_primaps_backbone(checkpoint):
    """The frozen DINO backbone a backbone-mode PriMaPs checkpoint holds (DINO's ViT-S: 6 heads)."""
    if checkpoint.backbone_state is None:
        raise SotaFileError(f"a +{checkpoint.sota.upper()} PriMaPs checkpoint holds no backbone: its features "
                            f"come from the {checkpoint.sota.upper()} file at {checkpoint.sota_path}")
    with torch.device("meta"):
        backbone = build_backbone(checkpoint.arch, dino_small_heads=DINO_SMALL_HEADS)
    backbone.load_state_dict(checkpoint.backbone_state, assign=True)
    return backbone
