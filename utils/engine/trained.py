"""Trained models loaded from explicit files: CAUSE's modules, PriMaPs-EM's features and prototypes,
released STEGO, HP and PriMaPs files (docs/sota.md).

Shared by the test steps, PriMaPs-EM (which fits prototypes to CAUSE's features in cause mode) and
predict.py, so that each reads the same files the same way. `upstream` arguments are the entries of
utils/engine/status.upstream_inputs ({name: {"file", "produced_by", ...}}): the files, with the
command that makes each, named when one does not fit.
"""
import torch

from models.released import SotaFileError, load_sota_model
from models.released_primaps import load_primaps_backbone, load_primaps_model, read_primaps_checkpoint
from modules.features import backbone_map, head_map
from modules.heads import build_segment
from modules.primaps import MASK_BACKBONE_HEADS, PriMaPsModel
from modules.probe import ClusterModule
from modules.sota import channel_dropout
from utils.engine.loop import make_backbone
from utils.runtime.artifacts import load_modular, load_state_strict
from utils.runtime.options import SOTA_MODES


def cause_modules(cfg, upstream, device):
    """Backbone, segment module and cluster probe of a finished run (or released files), loaded strictly
    from upstream "modular", "segment" and "cluster"."""
    backbone = make_backbone(cfg, device)
    codebook = load_modular(upstream["modular"]["file"], cfg.num_codebook, cfg.dim)
    segment = build_segment(cfg.head, cfg.dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes, cfg.num_queries,
                            codebook, device)
    load_state_strict(segment, upstream["segment"]["file"], "segment module", upstream["segment"]["produced_by"])
    cluster = ClusterModule(cfg.num_codebook, cfg.dim, cfg.reduced_dim, cfg.n_classes).to(device)
    load_state_strict(cluster, upstream["cluster"]["file"], "cluster probe", upstream["cluster"]["produced_by"])
    return backbone, segment, cluster


class Features:
    """PriMaPs-EM's Φ(x) [B, C, h, w] float32 without gradient: head_ema of a CAUSE segment module on its
    backbone (cause mode), or (segment None) the backbone's own patch tokens; the backbone runs under
    the run's autocast."""

    def __init__(self, backbone, segment, precision):
        self.backbone, self.segment, self.precision = backbone, segment, precision

    @torch.no_grad()
    def __call__(self, images, random=None):
        """`random` (a step's BatchRandom) plays no part: these features draw nothing."""
        if self.segment is None:
            return backbone_map(self.backbone, images, self.precision.autocast)
        return head_map(self.backbone, self.segment, images, self.precision.autocast)


class SotaFeatures:
    """PriMaPs-EM's Φ(x) [B, d, h, w] on a released STEGO or HP model: its online code (docs/sota.md §3),
    float32 without gradient, under the run's autocast; `dropout` (modules/sota.py) None for eval mode.
    In a training step the dropout masks come from the step's BatchRandom (modules/randomness.py), so that
    they do not depend on the process count and a resumed run draws what the uninterrupted one did;
    elsewhere (validation, test) from torch's generator."""

    def __init__(self, model, dropout, precision):
        self.model, self.dropout, self.precision = model, dropout, precision

    @torch.no_grad()
    def __call__(self, images, random=None):
        dropout = self.dropout if self.dropout is None or random is None else random.channel_dropout
        with self.precision.autocast():
            return self.model.features_for_primaps(images, dropout).float()


def sota_model(cfg, device):
    """The released STEGO or HP model of --sota_ckpt, loaded strictly (models/released.py)."""
    return load_sota_model(cfg.sota_ckpt, cfg.sota_options).to(device)


def on_sota_model(cfg, model, precision):
    """(the code of `model` as PriMaPs-EM reads it, the prototypes θ_R starts from: its cluster centres,
    g = 1; docs/sota.md §3). STEGO's dropout is active with --sota_dropout official, as the official
    wrapper leaves STEGO in train mode; HP is in eval mode, as the official code puts it."""
    official_dropout = cfg.mode == "stego" and cfg.sota_dropout == "official"
    features = SotaFeatures(model, channel_dropout if official_dropout else None, precision)
    return features, model.cluster_probe.clusters.detach()


def feature_dim(cfg):
    """The width of PriMaPs-EM's features: CAUSE's head (cause mode), the SotA code's, or the backbone's."""
    if cfg.mode == "cause":
        return cfg.reduced_dim
    return cfg.code_dim if cfg.mode in SOTA_MODES else cfg.dim


def mask_backbone(cfg, device):
    """The plain backbone as the official PriMaPs code builds it (DINO's 6-head ViT-S): its pseudo masks,
    and backbone mode's features."""
    return make_backbone(cfg, device, heads=MASK_BACKBONE_HEADS)


def primaps_features(cfg, upstream, device, precision):
    """The features of `cfg.mode`, and the prototypes they start from, [K, C]: CAUSE's cluster probe (cause
    mode), the STEGO or HP model's cluster centres (stego, hp); None in backbone mode."""
    if cfg.mode == "cause":
        backbone, segment, cluster = cause_modules(cfg, upstream, device)
        return Features(backbone, segment, precision), cluster.cluster_probe.detach()
    if cfg.mode in SOTA_MODES:
        return on_sota_model(cfg, sota_model(cfg, device), precision)
    return Features(mask_backbone(cfg, device), None, precision), None


def primaps_model(cfg, upstream, device):
    """The PriMaPs-EM model of upstream "primaps", loaded strictly."""
    model = PriMaPsModel(feature_dim(cfg), cfg.n_classes).to(device)
    return load_state_strict(model, upstream["primaps"]["file"], "PriMaPs model", upstream["primaps"]["produced_by"])


def evaluated_primaps(cfg, upstream, device, precision):
    """(features, PriMaPsModel, whether its initial prototypes are known) of the model a PriMaPs evaluation
    reads: trained here, or a released checkpoint (--primaps_ckpt, docs/sota.md §3b), which holds no
    initial prototypes except that +SotA ones started from the SotA model's cluster centres."""
    if cfg.primaps_ckpt is None:
        features, _ = primaps_features(cfg, upstream, device, precision)
        return features, primaps_model(cfg, upstream, device), True
    checkpoint = read_primaps_checkpoint(upstream["primaps"]["file"])
    if checkpoint.sota is None:
        backbone = load_primaps_backbone(checkpoint).to(device)
        return Features(backbone, None, precision), load_primaps_model(checkpoint).to(device), False
    features, start = primaps_features(cfg, upstream, device, precision)
    if checkpoint.in_channels != cfg.code_dim:
        raise SotaFileError(f"{cfg.primaps_ckpt}'s prototypes act on {checkpoint.in_channels} channels, but the "
                            f"code of {cfg.sota_ckpt} has {cfg.code_dim}: not the model it was trained on")
    return features, load_primaps_model(checkpoint.with_initial(start)).to(device), True
