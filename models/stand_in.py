"""Deterministic stand-in weights for every backbone arch, in each family's release layout, and stand-in
STEGO, HP and PriMaPs files on them (below; docs/sota.md §4).

No pretrained weights can be downloaded where the tests and the demo run, so they use files made
here. The rule is the one the golden numbers were computed with (tests/golden/README.md), so a
stand-in loaded by this project must give the golden tokens:

  for each key of the backbone's own state dict (before any release wrapper or `module.` prefix),
  x = numpy Generator(PCG64(crc32(key))).standard_normal(shape) as float32, then
  LayerNorm weights (`norm1`, `norm2`, the final `norm`) 1 + 0.1·x, layer-scale gammas 0.5 + 0.1·x,
  everything else 0.02·x;
  except DINOv3's two buffers, which a release holds as its init computes them: `rope_embed.periods`
  (vit.rope_periods) and each block's `attn.qkv.bias_mask` (vit.key_bias_mask).

Seeding per key makes every tensor independent of the others and of the torch version.

STEGO, HP and PriMaPs files (`stand_in_stego`, `stand_in_hp` / `write_stand_in_hp`, `stand_in_primaps`;
written with `save_foreign`, HP's with torch.save) follow the same rule: the DINO ViT inside a file is
`stand_in_state_dict(arch)`, and every other tensor is `stand_in_tensor(f"{family}/{key}", shape)` with
`key` the file's name for it (see the section below).
"""
import argparse
import collections
import json
import pickle
import typing
import zlib
from pathlib import Path

import numpy as np
import torch

from .checkpoints import WRAPPERS
from .registry import ARCHS, dino_model_type, primaps_backbone_arch
from .safe_load import STAND_INS
from .vit import build_backbone, key_bias_mask, rope_periods

_NORM_WEIGHTS = ("norm1.weight", "norm2.weight", "norm.weight")


def stand_in_tensor(key, shape):
    """The stand-in value of one state-dict entry (float32 CPU tensor)."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    x = rng.standard_normal(tuple(shape)).astype(np.float32)
    if key.endswith(_NORM_WEIGHTS):
        x = np.float32(1.0) + np.float32(0.1) * x
    elif key.endswith("gamma"):
        x = np.float32(0.5) + np.float32(0.1) * x
    else:
        x = np.float32(0.02) * x
    return torch.from_numpy(x)


def release_keys(arch):
    """{key: shape} of what `arch`'s release file holds for the backbone: the model's own entries,
    plus the mask token of DINOv2 (with or without registers) and DINOv3, which the release carries and
    the model drops on loading."""
    with torch.device("meta"):
        backbone = build_backbone(arch)
    keys = {name: tuple(tensor.shape) for name, tensor in backbone.state_dict().items()}
    if ARCHS[arch].family in ("dinov2", "dinov2_reg", "dinov3"):
        keys["mask_token"] = (1, ARCHS[arch].dim)
    return keys


def _computed(key, arch):
    """DINOv3's two buffers are not drawn: a release holds what its init computes (the RoPE periods,
    the key-bias mask), and so does the stand-in."""
    spec = ARCHS[arch]
    if key == "rope_embed.periods":
        return rope_periods(spec.dim // spec.heads)
    if key.endswith("attn.qkv.bias_mask"):
        return key_bias_mask(spec.dim)
    return None


def stand_in_state_dict(arch):
    """The stand-in backbone state dict of `arch` (release key names, before any wrapper)."""
    state = {}
    for key, shape in release_keys(arch).items():
        computed = _computed(key, arch) if ARCHS[arch].family == "dinov3" else None
        state[key] = stand_in_tensor(key, shape) if computed is None else computed
    return state


def stand_in_release(arch):
    """The object a release file of `arch` holds, filled with stand-in weights (torch.save it)."""
    family = ARCHS[arch].family
    state = stand_in_state_dict(arch)
    if family == "msn":  # saved from DistributedDataParallel: every key carries `module.`
        state = {"module." + key: tensor for key, tensor in state.items()}
    wrapper = WRAPPERS.get(family)
    return {wrapper: state} if wrapper else state


def stand_in_image(side, seed=0):
    """A normalised input batch [1, 3, side, side] drawn from PCG64(seed) (the golden files' input)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.standard_normal((1, 3, side, side)).astype(np.float32))


# --- Stand-in STEGO, HP and PriMaPs files (docs/sota.md §4) -------------------------------------------
#
# The layouts of docs/sota.md §1, §2 and §3b, key for key and in the official order, filled by the same
# rule: the DINO ViT inside a file is `stand_in_state_dict(arch)` (so it equals the backbone stand-in),
# and every other tensor is `stand_in_tensor(f"{family}/{key}", shape)`, `family` being "stego", "hp" or
# "primaps" and `key` the file's name for the tensor (HP's: "<part>/<key>", e.g.
# "hp/net_model_state_dict/cluster1.0.weight"). PriMaPs' EMA step count is STAND_IN_EMA_CALLS.
# The STEGO cfg and the PriMaPs options are pickled as the real files pickle them (an OmegaConf 2.1
# DictConfig; an argparse.Namespace), without omegaconf: see `save_foreign`.

STAND_IN_EMA_CALLS = 7


class _ForeignNamePickler(pickle._Pickler):
    """The pure-Python pickler, writing the stand-in classes of models/safe_load.py under the foreign
    names they stand for (the C pickler looks every class up in its module, which is not installed)."""

    def save_global(self, obj, name=None):
        foreign = getattr(obj, "foreign_name", "") if isinstance(obj, type) else ""
        if not foreign:
            super().save_global(obj, name)
            return
        module, _, qualname = foreign.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


class _ForeignNamePickle:
    """The `pickle_module` torch.save is given: its Pickler is _ForeignNamePickler."""

    Pickler = _ForeignNamePickler


def save_foreign(obj, path):
    """torch.save(obj, path), writing stand-ins (`models.safe_load.STAND_INS`) as the foreign objects
    they stand for: the bytes a file written with omegaconf / Lightning installed holds."""
    torch.save(obj, path, pickle_module=_ForeignNamePickle)


def _omegaconf_metadata(key, container, object_type=None, key_type=typing.Any):
    """An OmegaConf 2.1 metadata record (ContainerMetadata for a container, Metadata for a value node)."""
    state = {"ref_type": typing.Any, "object_type": object_type, "optional": True, "key": key, "flags": {},
             "flags_root": False, "resolver_cache": collections.defaultdict(dict)}
    if container:
        state.update(key_type=key_type, element_type=typing.Any)
    return STAND_INS[f"omegaconf.base.{'ContainerMetadata' if container else 'Metadata'}"].with_state(state)


def _omegaconf_node(value, key, parent):
    if isinstance(value, dict):
        node = STAND_INS["omegaconf.dictconfig.DictConfig"].with_state(None)
        content = {}
        node.state = {"_metadata": _omegaconf_metadata(key, True), "_parent": parent, "_content": content}
        for child_key, child in value.items():
            content[child_key] = _omegaconf_node(child, child_key, node)
    elif isinstance(value, list):
        node = STAND_INS["omegaconf.listconfig.ListConfig"].with_state(None)
        node.state = {"_metadata": _omegaconf_metadata(key, True, list, int), "_parent": parent,
                      "_content": [_omegaconf_node(child, index, node) for index, child in enumerate(value)]}
    else:
        node = STAND_INS["omegaconf.nodes.AnyNode"].with_state(
            {"_metadata": _omegaconf_metadata(key, False), "_parent": parent, "_val": value})
    return node


def omegaconf_config(mapping):
    """The stand-in of `OmegaConf.create(mapping)` with its struct flag set (as hydra hands a cfg over),
    in OmegaConf 2.1's pickled layout."""
    config = _omegaconf_node(mapping, None, None)
    config.state["_metadata"].state["flags"] = {"struct": True}
    return config


def _dino_spec(arch, family):
    if arch not in ARCHS or ARCHS[arch].family != "dino":
        raise ValueError(f"{family} files hold a DINO ViT; {arch!r} is not a DINO arch")
    return ARCHS[arch]


def _filled(family, layout):
    return {key: stand_in_tensor(f"{family}/{key}", shape) for key, shape in layout.items()}


def _code_head_layout(prefixes, width, dim, nonlinear=True):
    layout = {}
    for linear, second in prefixes:
        layout.update({f"{linear}0.weight": (dim, width, 1, 1), f"{linear}0.bias": (dim,)})
        if nonlinear:
            layout.update({f"{second}0.weight": (width, width, 1, 1), f"{second}0.bias": (width,),
                           f"{second}2.weight": (dim, width, 1, 1), f"{second}2.bias": (dim,)})
    return layout


def stego_train_config(arch, dim, dataset="potsdam", projection="nonlinear"):
    """STEGO's train_config.yml as its hydra cfg holds it, for a DINO `arch` and code dim `dim`."""
    spec = _dino_spec(arch, "STEGO")
    return {
        "output_root": "../", "pytorch_data_dir": "/datadrive/pytorch-data/", "experiment_name": "stand_in",
        "log_dir": dataset, "azureml_logging": True, "submitting_to_aml": False, "num_workers": 24, "max_steps": 5000,
        "batch_size": 16, "num_neighbors": 7, "dataset_name": dataset, "dir_dataset_name": None,
        "dir_dataset_n_classes": 5, "has_labels": False, "crop_type": "five", "crop_ratio": 0.5, "res": 224,
        "loader_crop_type": "center", "extra_clusters": 0, "use_true_labels": False, "use_recalibrator": False,
        "model_type": dino_model_type(arch), "arch": "dino", "use_fit_model": False, "dino_feat_type": "feat",
        "projection_type": projection, "dino_patch_size": spec.patch, "granularity": 1, "continuous": True,
        "dim": dim, "dropout": True, "zero_clamp": True, "lr": 0.0005, "pretrained_weights": None,
        "use_salience": False, "stabalize": False, "stop_at_zero": True, "pointwise": True, "feature_samples": 11,
        "neg_samples": 5, "aug_alignment_weight": 0.0, "correspondence_weight": 1.0, "neg_inter_weight": 0.63,
        "pos_inter_weight": 0.25, "pos_intra_weight": 0.67, "neg_inter_shift": 0.46, "pos_inter_shift": 0.12,
        "pos_intra_shift": 0.18, "rec_weight": 0.0, "repulsion_weight": 0.0, "crf_weight": 0.0, "alpha": 0.5,
        "beta": 0.15, "gamma": 0.05, "w1": 10.0, "w2": 3.0, "shift": 0.0, "crf_samples": 1000,
        "color_space": "rgb", "reset_probe_steps": None, "n_images": 5, "scalar_log_freq": 10,
        "checkpoint_freq": 50, "val_freq": 100, "hist_freq": 100,
    }


def stand_in_stego(arch, n_classes=3, dim=70, projection="nonlinear"):
    """The object a STEGO .ckpt of a DINO `arch` holds (docs/sota.md §1), for `save_foreign`: Lightning
    1.4's layout, its cfg an OmegaConf DictConfig, `callbacks` keyed by the ModelCheckpoint class."""
    width = _dino_spec(arch, "STEGO").dim
    state = {f"net.model.{k}": v for k, v in stand_in_state_dict(arch).items()}
    layout = _code_head_layout([("net.cluster1.", "net.cluster2.")], width, dim, projection == "nonlinear")
    layout.update({"train_cluster_probe.clusters": (n_classes, dim), "cluster_probe.clusters": (n_classes, dim),
                   "linear_probe.weight": (n_classes, dim, 1, 1), "linear_probe.bias": (n_classes,),
                   "decoder.weight": (width, dim, 1, 1), "decoder.bias": (width,)})
    state.update(_filled("stego", layout))
    checkpoint_class = STAND_INS["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    return {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.4.9",
        "state_dict": collections.OrderedDict(state),
        "callbacks": {checkpoint_class: {"monitor": "test/cluster/mIoU", "best_model_score": torch.tensor(0.0),
                                         "best_model_path": "", "current_score": None, "dirpath": "checkpoints"}},
        "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": {"n_classes": n_classes,
                             "cfg": omegaconf_config(stego_train_config(arch, dim, projection=projection))},
    }


def hp_options(arch, dim):
    """HP's json/server/potsdam.json options (as parse() writes them to option.json) for a DINO `arch`."""
    spec = _dino_spec(arch, "HP")
    return {
        "gpu_ids": [0], "output_dir": "./output/", "checkpoint": "",
        "wandb": {"project": "Project_name", "entity": "your_ID", "name": "experiment_name", "mode": "online"},
        "dataset": {"data_type": "potsdam", "data_path": "/DATA/seg/potsdam", "loader_crop_type": "center",
                    "crop_type": "five", "crop_ratio": 0.5, "res": 224, "num_neighbors": 7},
        "dataloader": {"batch_size": 64, "num_workers": 8},
        "tau": 0.4, "alpha": 0.0, "rho": 1.0, "loss_version": 1, "reweighting": 1, "renew_interval": 20,
        "model": {"pool_size": 1024, "ema_m": 0.999, "warmup": 100, "spatial_size": 28, "name": "STEGO",
                  "arch": "dino", "continuous": True, "dim": dim, "extra_clusters": 0, "bn_momentum": None,
                  "bn_eps": None,
                  "pretrained": {"name": "dino", "model_type": dino_model_type(arch), "dino_patch_size": spec.patch,
                                 "dino_feat_type": "feat", "pretrained_weights": None,
                                 "projection_type": "nonlinear", "dropout": True}},
        "loss": {"name": "stego", "zero_clamp": True, "pointwise": True, "stabilize": False, "feature_samples": 11,
                 "neg_samples": 5, "correspondence_weight": 0.0,
                 "corr_loss": {"neg_inter_weight": 0.63, "pos_inter_weight": 0.25, "pos_intra_weight": 0.67,
                               "neg_inter_shift": 0.66, "pos_inter_shift": 0.02, "pos_intra_shift": 0.08}},
        "optimizer": {"net": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.1},
                      "linear": {"name": "adam", "lr": 1e-3}, "cluster": {"name": "adam", "lr": 5e-3}},
        "scheduler": {},
        "train": {"print_freq": 25, "valid_freq": 50, "epoch": 10, "freeze_encoder_bn": False, "freeze_all_bn": -1,
                  "num_accum": 1, "grad_norm": 10.0},
        "eval": {"extra_clusters": 0, "n_images": 5, "is_crf": True, "is_visualize": False, "is_direct": False,
                 "is_diff": False},
        "num_gpus": 1,
    }


def stand_in_hp(arch, n_classes=3, dim=64):
    """(the object an HP ckpt.pth of a DINO `arch` holds, its options), docs/sota.md §2."""
    width = _dino_spec(arch, "HP").dim
    net = {f"model.{k}": v for k, v in stand_in_state_dict(arch).items()}
    net.update(_filled("hp/net_model_state_dict",
                       _code_head_layout([("cluster1.", "cluster2."), ("ema_model1.", "ema_model2.")], width, dim)))
    checkpoint = {
        "epoch": 9, "iter": 1000, "best_epoch": 9, "best_iter": 1000,
        "net_model_state_dict": collections.OrderedDict(net), "net_optimizer_state_dict": None,
        "linear_model_state_dict": collections.OrderedDict(_filled(
            "hp/linear_model_state_dict", {"weight": (n_classes, dim, 1, 1), "bias": (n_classes,)})),
        "linear_optimizer_state_dict": None,
        "cluster_model_state_dict": collections.OrderedDict(_filled(
            "hp/cluster_model_state_dict", {"clusters": (n_classes, dim)})),
        "cluster_optimizer_state_dict": None, "best": 50.0,
    }
    return checkpoint, hp_options(arch, dim)


def write_stand_in_hp(folder, arch, n_classes=3, dim=64):
    """An HP download as PriMaPs keeps it: folder/option.json and folder/experiment_name/ckpt.pth (returned)."""
    checkpoint, options = stand_in_hp(arch, n_classes, dim)
    path = Path(folder) / "experiment_name" / "ckpt.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    (Path(folder) / "option.json").write_text(json.dumps(options, indent=4))
    return path


def primaps_options(arch, n_classes, in_channels, sota=None, sota_path=""):
    """PriMaPs' train.py options (parser.py defaults with the README's recipe) for a run on `arch`'s DINO
    backbone, or (`sota` "stego" / "hp") on that SotA file's code."""
    patch = ARCHS[arch].patch
    resolution = 322 if ARCHS[arch].family == "dinov2" else 320
    return argparse.Namespace(
        dataset_root="/data/potsdam", num_classes=n_classes, ignore_label=255, checkpoints_root="checkpoints/",
        logg_root="logs/", backbone_dim=in_channels, backbone_arch=primaps_backbone_arch(arch), backbone_patch=patch,
        dino_block=1, batch_size=32, eval_batch_size=16, validation_resize=[resolution], crop_size=[resolution],
        num_workers=4, num_epochs=50, num_steps=7000, cluster_ckpt_path="" if sota else "init/last.ckpt",
        stop_criterion=0.95, seed=0, gpu_ids=[0], student_augs=True, augs_photometric=False,
        augs_randcrop_scale=[1.0, 1.0], augs_randcrop_ratio=[1.0, 1.0], linear_lr=5e-3, train_state="method",
        pca_iter=100, pca_q=1, threshold=0.4, gain=10.0, precomp_primaps=False, precomp_primaps_root="primaps/",
        ema_update_step=10, ema_decay=0.98, cluster_lr=5e-3, num_batch_pcainit=92, cluster_train=False,
        stego_ckpt=sota_path if sota == "stego" else "", hp_ckpt=sota_path if sota == "hp" else "",
        hp_opt=str(Path(sota_path).parent.parent / "option.json") if sota == "hp" else "json/cocostuff_eval.json",
        seghead_lr=5e-3, seghead_arch="linear", seghead_focalloss=2.0, pcainit=False,
        log_name=f"PD_{primaps_backbone_arch(arch)}{patch}_stand_in", validation_freq=1)


def stand_in_primaps(arch, n_classes=3, sota=None, sota_path="", code_dim=None):
    """The object a PriMaPs .ckpt holds (docs/sota.md §3b): backbone mode on `arch`'s DINO (or DINOv2)
    backbone, whose weights it holds; or, with `sota` "stego" / "hp", +SotA on that file's code of
    `code_dim` channels, naming the file (`sota_path`) and holding no backbone. Lightning 1.5.10's layout."""
    if arch not in ARCHS or ARCHS[arch].family not in ("dino", "dinov2"):
        raise ValueError(f"PriMaPs files hold a DINO or DINOv2 backbone; {arch!r} is neither")
    in_channels = code_dim if sota else ARCHS[arch].dim
    state = {} if sota else {f"net.model.{k}": v for k, v in stand_in_state_dict(arch).items()}
    prototypes = {"weight_g": (n_classes, 1, 1, 1), "weight_v": (n_classes, in_channels, 1, 1)}
    seghead = _filled("primaps", {f"seghead.{k}": shape for k, shape in prototypes.items()})
    state.update({"cluster_probe.initted": torch.ones(1), "cluster_probe.step": torch.tensor([STAND_IN_EMA_CALLS]),
                  **{f"cluster_probe.online_model.{k}": seghead[f"seghead.{k}"] for k in prototypes},
                  **_filled("primaps", {f"cluster_probe.ema_model.{k}": shape for k, shape in prototypes.items()}),
                  **_filled("primaps", {"linear_probe.weight": (n_classes, in_channels, 1, 1),
                                        "linear_probe.bias": (n_classes,)}),
                  **seghead})
    state_key = ("ModelCheckpoint{'monitor': 'THETA_M mIoU', 'mode': 'max', 'every_n_train_steps': 0, "
                 "'every_n_epochs': 1, 'train_time_interval': None, 'save_on_train_epoch_end': True}")
    return {
        "epoch": 50, "global_step": 1000, "pytorch-lightning_version": "1.5.10",
        "state_dict": collections.OrderedDict(state),
        "callbacks": {state_key: {"monitor": "THETA_M mIoU", "best_model_score": torch.tensor(0.0),
                                  "best_model_path": "model.ckpt", "current_score": torch.tensor(0.0),
                                  "dirpath": "checkpoints/", "best_k_models": {}, "kth_best_model_path": "",
                                  "kth_value": torch.tensor(float("-inf")), "last_model_path": ""}},
        "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": {"opts": primaps_options(arch, n_classes, in_channels, sota, sota_path)},
    }
