"""Trained models loaded from explicit files: CAUSE's modules, PriMaPs-EM's features and prototypes.

Shared by the test steps, PriMaPs-EM (which fits prototypes to CAUSE's features in cause mode) and
predict.py, so that each reads the same files the same way. `upstream` arguments are the entries of
utils/engine/status.upstream_inputs ({name: {"file", "produced_by", ...}}): the files, with the
command that makes each, named when one does not fit.
"""
import torch

from modules.features import backbone_map, head_map
from modules.heads import build_segment
from modules.primaps import MASK_BACKBONE_HEADS, PriMaPsModel
from modules.probe import ClusterModule
from utils.engine.loop import make_backbone
from utils.runtime.artifacts import load_modular, load_state_strict


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
    def __call__(self, images):
        if self.segment is None:
            return backbone_map(self.backbone, images, self.precision.autocast)
        return head_map(self.backbone, self.segment, images, self.precision.autocast)


def feature_dim(cfg):
    """The width of PriMaPs-EM's features: CAUSE's head (cause mode) or the backbone's."""
    return cfg.reduced_dim if cfg.mode == "cause" else cfg.dim


def mask_backbone(cfg, device):
    """The plain backbone as the official PriMaPs code builds it (DINO's 6-head ViT-S): its pseudo masks,
    and backbone mode's features."""
    return make_backbone(cfg, device, heads=MASK_BACKBONE_HEADS)


def primaps_features(cfg, upstream, device, precision):
    """The features of `cfg.mode`, and (cause mode) CAUSE's cluster probe [K, 90] the prototypes start
    from; None in backbone mode."""
    if cfg.mode == "cause":
        backbone, segment, cluster = cause_modules(cfg, upstream, device)
        return Features(backbone, segment, precision), cluster.cluster_probe.detach()
    return Features(mask_backbone(cfg, device), None, precision), None


def primaps_model(cfg, upstream, device):
    """The PriMaPs-EM model of upstream "primaps", loaded strictly."""
    model = PriMaPsModel(feature_dim(cfg), cfg.n_classes).to(device)
    return load_state_strict(model, upstream["primaps"]["file"], "PriMaPs model", upstream["primaps"]["produced_by"])
