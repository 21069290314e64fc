"""Released STEGO, HP and PriMaPs files (models/released.py) and the safe loading of foreign pickles
(models/safe_load.py): real OmegaConf pickles read without omegaconf, the stand-in writer's bytes equal
to OmegaConf's, refusals (foreign globals, truncated files, other kinds of files, options that disagree
with the tensors), sizes read from the tensors, and the PriMaPs conversion.

Everything here runs on the ViT-Tiny stand-ins (tests/test_sota_numerics.py holds the ViT-S/8 golden
cases). tests/fixtures/omegaconf_*.ckpt were written once with the real omegaconf 2.0.6, 2.1.2 and 2.3.0
(tests/fixtures/README.md); neither omegaconf nor Lightning is installed where the tests run.
"""
import argparse
import builtins
import collections
import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_helpers import ema_code, eval_log_probs, head_sizes
from stand_ins import (STAND_IN_EMA_CALLS, omegaconf_config, save_foreign, stand_in_hp, stand_in_primaps,
                       stand_in_stego, write_stand_in_hp)

from errors import UserError
from models import convert_checkpoint, load_backbone
from models.registry import ARCHS
from models.released import SotaFileError, load_sota_model, read_sota_file
from models.released_primaps import load_primaps_backbone, load_primaps_model, read_primaps_checkpoint
from models.safe_load import STAND_INS, FileLoadError, RefusedGlobalError, foreign_class, safe_load
from models.stand_in import release_keys, stand_in_release, stand_in_state_dict
from modules.heads import SegmentModule
from modules.sota import channel_dropout

FIXTURES = Path(__file__).parent / "fixtures"
OMEGACONF_VERSIONS = ("2.0.6", "2.1.2", "2.3.0")
TINY = "dino_vit_tiny_8"
K, DIM = 3, 16
IMAGES = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
# What tests/fixtures/omegaconf_*.ckpt hold (README there): the cfg, pickled by each omegaconf version.
FIXTURE_CFG = {
    "arch": "dino", "model_type": "vit_small", "dino_patch_size": 8, "dino_feat_type": "feat",
    "projection_type": "nonlinear", "dim": 70, "continuous": True, "dropout": True, "extra_clusters": 0,
    "pretrained_weights": None, "lr": 5e-4, "res": 224,
    "nested": {"lst": [1, "x", None, 2.5, {"b": True}], "empty": {}}, "interp": "${dim}", "missing": "???"}
MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def fixture_object(cfg, checkpoint_class):
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.4.9",
            "state_dict": collections.OrderedDict(w=torch.ones(2)), "hparams_name": "kwargs",
            "hyper_parameters": {"n_classes": 3, "cfg": cfg},
            "callbacks": {checkpoint_class: {"monitor": "test/cluster/mIoU", "best_model_score": torch.tensor(1.5),
                                             "best_model_path": "x.ckpt", "current_score": None, "dirpath": "/ck"}},
            "args": argparse.Namespace(lr=0.1, gpu_ids=[0])}


def pickled_object(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Stand-in files of each kind on the tiny ViT, written once."""
    root = tmp_path_factory.mktemp("sota_files")
    paths = {"stego": root / "stego.ckpt", "stego_linear": root / "stego_linear.ckpt",
             "primaps": root / "primaps.ckpt", "primaps_hp": root / "primaps_hp.ckpt",
             "primaps_stego": root / "primaps_stego.ckpt"}
    save_foreign(stand_in_stego(TINY, K, DIM), paths["stego"])
    save_foreign(stand_in_stego(TINY, K, DIM, projection="linear"), paths["stego_linear"])
    paths["hp"] = write_stand_in_hp(root / "hp", TINY, K, DIM)
    save_foreign(stand_in_primaps(TINY, K), paths["primaps"])
    for sota in ("hp", "stego"):
        save_foreign(stand_in_primaps(TINY, K, sota=sota, sota_path=str(paths[sota]), code_dim=DIM),
                     paths[f"primaps_{sota}"])
    return paths


# --- safe loading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", OMEGACONF_VERSIONS)
def test_real_omegaconf_pickles_read_as_plain_data(version):
    loaded = safe_load(FIXTURES / f"omegaconf_{version}.ckpt")
    assert loaded["hyper_parameters"] == {"n_classes": 3, "cfg": FIXTURE_CFG}
    assert type(loaded["hyper_parameters"]["cfg"]["nested"]["lst"]) is list
    # Lightning 1.4 keys its callbacks by class: the class reference becomes its name.
    assert list(loaded["callbacks"]) == [MODEL_CHECKPOINT]
    assert loaded["callbacks"][MODEL_CHECKPOINT]["best_model_score"].item() == 1.5
    assert loaded["args"] == {"lr": 0.1, "gpu_ids": [0]}
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_stand_in_writer_writes_omegaconfs_bytes(tmp_path):
    """The stand-in cfg and callback class pickle to exactly the bytes omegaconf 2.1.2 wrote."""
    save_foreign(fixture_object(omegaconf_config(FIXTURE_CFG), STAND_INS[MODEL_CHECKPOINT]), tmp_path / "mine.ckpt")
    assert pickled_object(tmp_path / "mine.ckpt") == pickled_object(FIXTURES / "omegaconf_2.1.2.ckpt")


def test_foreign_files_load_without_omegaconf_or_lightning(files, monkeypatch):
    for name in ("omegaconf", "pytorch_lightning", "lightning"):
        assert importlib.util.find_spec(name) is None
    attempts = []

    class Guard:
        """Records, and fails, every import of the foreign packages during the loads."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in ("omegaconf", "pytorch_lightning", "lightning"):
                attempts.append(name)
                raise ImportError(f"{name} must not be imported")
            return None

    monkeypatch.setattr(sys, "meta_path", [Guard(), *sys.meta_path])
    with pytest.raises(ImportError):
        import omegaconf  # noqa: F401
    attempts.clear()
    assert safe_load(FIXTURES / "omegaconf_2.3.0.ckpt")["hyper_parameters"]["cfg"] == FIXTURE_CFG
    assert read_sota_file(files["stego"]).cfg["model_type"] == "vit_tiny"
    assert read_primaps_checkpoint(files["primaps"]).opts["backbone_arch"] == "dino_vitt"
    assert attempts == []


class Reducing:
    """An object that pickles as a call of `function` on `argument` (the classic malicious pickle)."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("function, name", [(os.system, os.system.__module__ + ".system"),
                                            (builtins.eval, "builtins.eval"),
                                            (getattr, "builtins.getattr")])
def test_file_naming_a_dangerous_global_is_refused_without_running_it(tmp_path, function, name, zip_format):
    marker = tmp_path / "ran"
    argument = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": Reducing(function, argument)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(RefusedGlobalError) as err:
        safe_load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"the global {name}," in message
    assert not marker.exists()


def test_file_naming_os_system_by_that_name_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    save_foreign({"hyper_parameters": {"cfg": STAND_INS["omegaconf.dictconfig.DictConfig"].with_state(
        {"_content": {}}), "hook": foreign_class("os.system")}}, path)
    with pytest.raises(RefusedGlobalError, match=r"evil\.ckpt names the global os\.system,"):
        safe_load(path)


def test_mae_release_with_pickled_namespace_loads_and_a_dangerous_one_is_refused(tmp_path):
    """MAE releases pickle their arguments (tests/test_backbones.py loads a whole ViT-B one); a release
    whose pickle names a dangerous global is refused before anything is built."""
    path = tmp_path / "mae_vit_base_16.pth"
    weights = {"cls_token": torch.ones(1, 1, 768), "decoder_embed.weight": torch.zeros(2, 768)}
    torch.save({"model": weights, "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)}, path)
    loaded = safe_load(path)
    assert loaded["args"] == {"model": "mae_vit_base_patch16", "norm_pix_loss": True}
    assert convert_checkpoint("mae", loaded).keys() == {"cls_token"}
    legacy = tmp_path / "legacy.pth"  # torch < 1.6's format
    torch.save({"model": weights, "args": argparse.Namespace(lr=1.0)}, legacy, _use_new_zipfile_serialization=False)
    assert safe_load(legacy)["args"] == {"lr": 1.0}
    torch.save({"model": weights, "args": Reducing(builtins.eval, "1 + 1")}, path)
    with pytest.raises(RefusedGlobalError, match=r"mae_vit_base_16\.pth names the global builtins\.eval,"):
        load_backbone(path)


def test_truncated_and_foreign_format_files_refused(tmp_path, files):
    data = files["stego"].read_bytes()
    truncated = tmp_path / "stego.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileLoadError, match=r"stego\.ckpt is not a complete torch file \(truncated or damaged\?\)"):
        read_sota_file(truncated)
    not_torch = tmp_path / "modular.npy"
    not_torch.write_bytes(b"\x93NUMPY\x01\x00" + bytes(64))
    with pytest.raises(FileLoadError, match=r"modular\.npy cannot be read as a torch file"):
        read_sota_file(not_torch)


def test_unknown_layout_of_an_allowed_class_refused(tmp_path):
    path = tmp_path / "odd.ckpt"
    save_foreign({"cfg": STAND_INS["omegaconf.dictconfig.DictConfig"].with_state({"_values": {}})}, path)
    with pytest.raises(FileLoadError, match="odd.ckpt holds a pickled omegaconf.dictconfig.DictConfig without its "
                                            "'_content' entry"):
        safe_load(path)


# --- STEGO and HP files --------------------------------------------------------------------------------

def test_stego_file_read_from_its_tensors(files):
    sota = read_sota_file(files["stego"])
    assert (sota.family, sota.arch) == ("stego", TINY)
    assert (sota.sizes.width, sota.sizes.code_dim, sota.sizes.n_classes, sota.sizes.patch, sota.sizes.nonlinear) == (
        192, DIM, K, 8, True)
    assert sota.cfg["dim"] == DIM and sota.cfg["n_classes"] == K and sota.cfg["dataset_name"] == "potsdam"
    # The DINO ViT inside the file, DINO's names, and nothing unused (train_cluster_probe, decoder).
    backbone = {k.removeprefix("backbone."): v for k, v in sota.state.items() if k.startswith("backbone.")}
    assert backbone.keys() == stand_in_state_dict(TINY).keys()
    assert not any(k.startswith(("decoder", "train_cluster_probe")) for k in sota.state)
    assert read_sota_file(files["stego_linear"]).sizes.nonlinear is False


def test_stego_model_computes_the_official_code_and_probes(files):
    """The loaded model against the official formulas written out on the file's own tensors."""
    raw = safe_load(files["stego"])["state_dict"]
    model = load_sota_model(files["stego"])
    assert model.backbone.blocks[0].attn.num_heads == ARCHS[TINY].heads

    def conv(x, name):
        return F.conv2d(x, raw[f"{name}.weight"], raw[f"{name}.bias"])

    with torch.no_grad():
        feat = model.features(IMAGES)
        code = conv(feat, "net.cluster1.0") + conv(F.relu(conv(feat, "net.cluster2.0")), "net.cluster2.2")
        torch.testing.assert_close(model.code(IMAGES), code, rtol=1e-5, atol=1e-6)
        flipped = model.code(IMAGES.flip(-1)).flip(-1)
        up = F.interpolate((code + flipped) / 2, IMAGES.shape[-2:], mode="bilinear", align_corners=False)
        log_probs = eval_log_probs(model, IMAGES)
        centres = F.normalize(raw["cluster_probe.clusters"], dim=1)
        cosine = torch.einsum("bchw,nc->bnhw", F.normalize(up, dim=1), centres)
        torch.testing.assert_close(log_probs.cluster, torch.log_softmax(2 * cosine, dim=1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_probs.linear, torch.log_softmax(conv(up, "linear_probe"), dim=1),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.features_for_primaps(IMAGES), code, rtol=1e-5, atol=1e-6)
        linear_model = load_sota_model(files["stego_linear"])
        torch.testing.assert_close(linear_model.code(IMAGES), conv(linear_model.features(IMAGES), "net.cluster1.0"),
                                   rtol=0, atol=0)


def test_official_dropout_draws_one_mask_per_branch(files):
    model = load_sota_model(files["stego"])
    head = model.head
    with torch.no_grad():
        feat = model.features(IMAGES)
        torch.manual_seed(3)
        dropped = model.code(IMAGES, channel_dropout)
        torch.manual_seed(3)
        expected = head.cluster1(F.dropout2d(feat, 0.1, True)) + head.cluster2(F.dropout2d(feat, 0.1, True))
        torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-6)
        assert (dropped - model.code(IMAGES)).abs().max() > 1e-3


def test_hp_file_and_its_options(files, tmp_path):
    sota = read_sota_file(files["hp"])
    assert (sota.family, sota.arch, sota.sizes.ema, sota.cfg["model"]["dim"]) == ("hp", TINY, True, DIM)
    model = load_sota_model(files["hp"])
    with torch.no_grad():
        assert not torch.allclose(model.code(IMAGES), ema_code(model, IMAGES))
        # HP evaluates the online code of the image alone.
        torch.testing.assert_close(model.eval_patch_code(IMAGES), model.code(IMAGES), rtol=0, atol=0)
    # The options found one folder up (PriMaPs' HP downloads), or given; refused when absent.
    lone = tmp_path / "ckpt.pth"
    lone.write_bytes(files["hp"].read_bytes())
    with pytest.raises(SotaFileError, match="whose feature type only its options JSON says.*pass the option.json"):
        read_sota_file(lone)
    assert read_sota_file(lone, files["hp"].parent.parent / "option.json").sizes == sota.sizes


def write_hp_with_options(tmp_path, change):
    checkpoint, options = stand_in_hp(TINY, K, DIM)
    change(options)
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    (tmp_path / "option.json").write_text(json.dumps(options))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda o: o["model"].update(dim=32), r"model\.dim = 32, but its tensors say 16"),
    (lambda o: o["model"]["pretrained"].update(model_type="vit_small"),
     r"model\.pretrained\.model_type = 'vit_small', but its tensors say 'vit_tiny'"),
    (lambda o: o["model"]["pretrained"].update(dino_feat_type="KK"), r"dino_feat_type = 'KK': only 'feat'"),
    (lambda o: o["model"].update(extra_clusters=1), r"model\.extra_clusters = 1: extra clusters are not supported"),
    (lambda o: o["eval"].update(is_direct=True), r"eval\.is_direct = True"),
])
def test_hp_options_disagreeing_with_the_tensors_refused(tmp_path, change, message):
    with pytest.raises(SotaFileError, match=message):
        read_sota_file(write_hp_with_options(tmp_path, change))


def stego_with(tmp_path, change_cfg=None, change_state=None):
    obj = stand_in_stego(TINY, K, DIM)
    if change_cfg is not None:
        change_cfg(obj["hyper_parameters"]["cfg"].state["_content"])
    if change_state is not None:
        change_state(obj["state_dict"])
    path = tmp_path / "stego.ckpt"
    save_foreign(obj, path)
    return path


def set_value(key, value):
    return lambda content: content[key].state.update(_val=value)


@pytest.mark.parametrize("key, value, message", [
    ("dim", 70, r"its stored cfg says dim = 70, but its tensors say 16: the file and its options disagree"),
    ("dino_patch_size", 16, r"dino_patch_size = 16, but its tensors say 8"),
    ("model_type", "vit_base", r"model_type = 'vit_base', but its tensors say 'vit_tiny'"),
    ("projection_type", "linear", r"projection_type = 'linear', but its tensors say 'nonlinear'"),
    ("dino_feat_type", "KK", r"dino_feat_type = 'KK': only 'feat'"),
    ("extra_clusters", 2, r"extra_clusters = 2: extra clusters are not supported"),
    ("arch", "feature-pyramid", r"arch = 'feature-pyramid': only STEGO's DINO models"),
])
def test_stego_cfg_disagreeing_with_the_tensors_refused(tmp_path, key, value, message):
    with pytest.raises(SotaFileError, match=message) as err:
        read_sota_file(stego_with(tmp_path, set_value(key, value)))
    assert "\n" not in str(err.value)


def test_stego_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    def damage(state):
        del state["net.model.blocks.11.mlp.fc2.bias"]
        state["net.extra.weight"] = torch.zeros(1)

    with pytest.raises(SotaFileError) as err:
        read_sota_file(stego_with(tmp_path, change_state=damage))
    message = str(err.value)
    assert "1 missing keys (net.model.blocks.11.mlp.fc2.bias)" in message
    assert "1 unexpected keys (net.extra.weight)" in message


def test_stego_extra_cluster_rows_refused(tmp_path):
    def more_rows(state):
        state["cluster_probe.clusters"] = torch.zeros(K + 1, DIM)

    with pytest.raises(SotaFileError, match=r"cluster_probe\.clusters has 4 rows but linear_probe 3 classes"):
        read_sota_file(stego_with(tmp_path, change_state=more_rows))


def test_another_arch_refused(tmp_path):
    def dinov2_like(state):  # a ViT with DINOv2's patch 14 and 37x37 grid
        state["net.model.patch_embed.proj.weight"] = torch.zeros(192, 3, 14, 14)
        state["net.model.pos_embed"] = torch.zeros(1, 1 + 37 * 37, 192)

    with pytest.raises(SotaFileError, match=r"holds a 192-wide ViT with patch 14, not a DINO ViT this project builds"):
        read_sota_file(stego_with(tmp_path, change_state=dinov2_like))


def test_other_kinds_of_files_refused(tmp_path, files):
    segment = tmp_path / "segment_mlp.pth"
    torch.save(SegmentModule("mlp", 192, 8, 16, K).state_dict(), segment)
    with pytest.raises(SotaFileError, match=r"segment_mlp\.pth is a CAUSE segment file .*not a STEGO checkpoint or an "
                                            r"HP checkpoint: a STEGO file is a Lightning \.ckpt"):
        read_sota_file(segment)
    with pytest.raises(SotaFileError, match=r"primaps\.ckpt is a PriMaPs checkpoint, not a STEGO checkpoint or an HP"):
        read_sota_file(files["primaps"])
    with pytest.raises(SotaFileError, match=r"stego\.ckpt is a STEGO checkpoint, not a PriMaPs checkpoint"):
        read_primaps_checkpoint(files["stego"])
    backbone = tmp_path / "dino_vit_tiny_8.pth"
    torch.save(stand_in_release(TINY), backbone)
    with pytest.raises(SotaFileError, match="is a backbone release"):
        read_sota_file(backbone)
    with pytest.raises(SotaFileError, match="nowhere.ckpt not found"):
        read_sota_file(tmp_path / "nowhere.ckpt")


def meta_file(family, arch, dim, n_classes):
    """A STEGO or HP object of the official layout on `arch`, with meta tensors (shapes only)."""
    width = ARCHS[arch].dim
    head = {"cluster1.0.weight": (dim, width, 1, 1), "cluster1.0.bias": (dim,),
            "cluster2.0.weight": (width, width, 1, 1), "cluster2.0.bias": (width,),
            "cluster2.2.weight": (dim, width, 1, 1), "cluster2.2.bias": (dim,)}

    def meta(shapes):
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    if family == "stego":
        state = {**{f"net.model.{k}": s for k, s in release_keys(arch).items()},
                 **{f"net.{k}": s for k, s in head.items()},
                 "cluster_probe.clusters": (n_classes, dim), "linear_probe.weight": (n_classes, dim, 1, 1),
                 "linear_probe.bias": (n_classes,)}
        return {"state_dict": meta(state), "hyper_parameters": {}}
    net = {**{f"model.{k}": s for k, s in release_keys(arch).items()}, **head,
           **{k.replace("cluster", "ema_model"): s for k, s in head.items()}}
    return {"net_model_state_dict": meta(net),
            "linear_model_state_dict": meta({"weight": (n_classes, dim, 1, 1), "bias": (n_classes,)}),
            "cluster_model_state_dict": meta({"clusters": (n_classes, dim)})}


@pytest.mark.parametrize("family, arch, dim, n_classes", [("stego", "dino_vit_small_8", 70, 3),
                                                          ("stego", "dino_vit_base_8", 90, 27),
                                                          ("hp", "dino_vit_small_8", 512, 27),
                                                          ("hp", "dino_vit_base_16", 256, 3)])
def test_sizes_read_from_the_tensors(family, arch, dim, n_classes):
    sizes = head_sizes(meta_file(family, arch, dim, n_classes))
    assert (sizes.width, sizes.code_dim, sizes.n_classes, sizes.n_clusters) == (ARCHS[arch].dim, dim, n_classes,
                                                                                n_classes)
    assert (sizes.patch, sizes.pretrain_grid, sizes.nonlinear, sizes.ema) == (
        ARCHS[arch].patch, ARCHS[arch].pretrain_grid, True, family == "hp")


# --- PriMaPs files -------------------------------------------------------------------------------------

def test_primaps_backbone_mode_checkpoint_maps_to_the_project_model(files):
    raw = safe_load(files["primaps"])["state_dict"]
    checkpoint = read_primaps_checkpoint(files["primaps"])
    assert (checkpoint.sota, checkpoint.arch, checkpoint.n_classes, checkpoint.in_channels) == (None, TINY, K, 192)
    assert (checkpoint.resolution, checkpoint.crop_size, checkpoint.max_decay) == (320, 320, 0.98)
    assert checkpoint.initial_known is False and not checkpoint.model_state["initial"].any()
    model = load_primaps_model(checkpoint)
    assert int(model.momentum.calls) == STAND_IN_EMA_CALLS
    feat = torch.randn(2, 192, 4, 6)

    def weight_normed(prefix):
        v, g = raw[f"{prefix}.weight_v"], raw[f"{prefix}.weight_g"]
        return F.conv2d(feat, g * v / v.flatten(1).norm(dim=1)[:, None, None, None])

    with torch.no_grad():
        torch.testing.assert_close(model.online(feat), weight_normed("seghead"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.momentum(feat), weight_normed("cluster_probe.ema_model"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.linear(feat), F.conv2d(feat, raw["linear_probe.weight"],
                                                                raw["linear_probe.bias"]), rtol=0, atol=0)
    backbone = load_primaps_backbone(checkpoint)
    assert backbone.blocks[0].attn.num_heads == ARCHS[TINY].heads
    assert torch.equal(backbone.state_dict()["pos_embed"], raw["net.model.pos_embed"])


@pytest.mark.parametrize("sota", ["hp", "stego"])
def test_primaps_on_sota_checkpoint_names_its_sota_file(files, sota):
    checkpoint = read_primaps_checkpoint(files[f"primaps_{sota}"])
    assert (checkpoint.sota, checkpoint.sota_path, checkpoint.in_channels) == (sota, str(files[sota]), DIM)
    assert checkpoint.sota_options_path == (str(files["hp"].parent.parent / "option.json") if sota == "hp" else None)
    assert checkpoint.backbone_state is None and checkpoint.arch == TINY  # the masks' backbone
    with pytest.raises(SotaFileError, match=f"holds no backbone: its features come from the {sota.upper()} file"):
        load_primaps_backbone(checkpoint)
    # Official PriMaPs starts θ_R from the SotA file's cluster centres: with them, `initial` is known.
    clusters = load_sota_model(checkpoint.sota_path).cluster_probe.clusters
    started = checkpoint.with_initial(clusters)
    assert started.initial_known and torch.equal(load_primaps_model(started).initial, clusters)
    with pytest.raises(SotaFileError, match="do not fit"):
        checkpoint.with_initial(torch.zeros(K, DIM + 1))


def test_primaps_dinov2_checkpoint(tmp_path):
    arch = "dinov2_vit_small_14"
    path = tmp_path / "primaps.ckpt"
    save_foreign(stand_in_primaps(arch, K), path)
    checkpoint = read_primaps_checkpoint(path)
    assert (checkpoint.arch, checkpoint.in_channels, checkpoint.resolution) == (arch, 384, 322)
    # The hub model's mask token (pretraining only) is dropped, as from a DINOv2 release.
    assert "net.model.mask_token" in safe_load(path)["state_dict"]
    assert "mask_token" not in checkpoint.backbone_state
    assert load_primaps_backbone(checkpoint).family == "dinov2"


def primaps_with(tmp_path, change_opts=None, change_state=None):
    obj = stand_in_primaps(TINY, K)
    if change_opts is not None:
        change_opts(obj["hyper_parameters"]["opts"])
    if change_state is not None:
        change_state(obj["state_dict"])
    path = tmp_path / "primaps.ckpt"
    save_foreign(obj, path)
    return path


@pytest.mark.parametrize("change_opts, message", [
    (lambda o: setattr(o, "num_classes", 27), r"num_classes = 27, but its tensors say 3"),
    (lambda o: setattr(o, "backbone_dim", 384), r"backbone_dim = 384, but its tensors say 192"),
    (lambda o: setattr(o, "dino_block", 2), r"dino_block = 2: only the last block"),
    (lambda o: setattr(o, "backbone_arch", "dino_resnet"), r"backbone_arch/backbone_patch = \('dino_resnet', 8\)"),
    (lambda o: setattr(o, "stego_ckpt", "stego.ckpt"), r"opts name a STEGO model underneath.*net\.model"),
])
def test_primaps_opts_disagreeing_with_the_tensors_refused(tmp_path, change_opts, message):
    with pytest.raises(SotaFileError, match=message):
        read_primaps_checkpoint(primaps_with(tmp_path, change_opts))


def test_primaps_strict_loading(tmp_path):
    def damage(state):
        del state["cluster_probe.ema_model.weight_g"]
        state["seghead.bias"] = torch.zeros(K)

    with pytest.raises(SotaFileError) as err:
        read_primaps_checkpoint(primaps_with(tmp_path, change_state=damage))
    assert "1 missing keys (cluster_probe.ema_model.weight_g)" in str(err.value)
    assert "1 unexpected keys (seghead.bias)" in str(err.value)

    def diverge(state):
        state["cluster_probe.online_model.weight_v"] = state["seghead.weight_v"] + 1

    with pytest.raises(SotaFileError, match="online_model.weight_v differs from seghead.weight_v"):
        read_primaps_checkpoint(primaps_with(tmp_path, change_state=diverge))


def test_errors_are_user_errors():
    assert issubclass(SotaFileError, UserError) and issubclass(RefusedGlobalError, UserError)


def test_allowed_class_called_by_the_pickle_is_refused(tmp_path):
    """A pickle may call an allowed class instead of building it from its state: nothing is built."""
    path = tmp_path / "called.ckpt"
    config_class = STAND_INS["omegaconf.dictconfig.DictConfig"]
    save_foreign({"cfg": Reducing(config_class, "x")}, path)
    with pytest.raises(FileLoadError, match="without its '_content' entry"):
        safe_load(path)
