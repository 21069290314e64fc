"""The models predict.py segments with, loaded from the artifacts of earlier steps (or released files).

A model is a predictor with
    resolution, patch          the square windows it takes (pixels) and its patch size
    n_clusters                 how many clusters its logits score
    features(windows)          [b, 3, res, res] normalised -> [b, R, res/patch, res/patch], the patch grid
    logits(features)           [B, R, h, w] -> [B, n_clusters, h, w]: the arg-max is the prediction
    scores(features)           the same shape, linear in the features, with the logits' arg-max at
                               every pixel: for a large image, predict.py upsamples these (few
                               channels, a linear map commutes with the upsampling) and not the features
    crf_log_probs(logits)      the dense CRF's unary input, from the same logits
and its loader, `load(cfg, device, fingerprints)`, returns a LoadedModel: the predictor, the earlier
artifacts it read (utils/runtime/records.py entries: their fingerprints), and where the evaluation
of that model saves its Hungarian matching of clusters to the data set's classes ("cluster_to_class"
of a metrics.json). A loader is given the Config of the evaluation whose model it loads (the test
step's, or PriMaPs-EM's): a missing or interrupted artifact stops it with the evaluation's own message
(utils/engine/status.upstream_inputs, records.check_complete).

predict.py upsamples features, not logits, to the image's size, as the test step does (docs/cause.md §6):
for CAUSE's cosine logits the two differ (for a linear head they are the same). `scores` keep that
prediction while upsampling fewer channels.

Three loaders: CAUSE (its test step's prediction), PriMaPs-EM (its test step's headline, θ_M, in any
mode, trained here or released) and a released STEGO or HP model alone (its own evaluation's cluster
prediction, test_sota.py). A new model is one loader here plus its line in LOADERS (which --model lists).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.features import flip_averaged, head_features
from modules.probe import crf_log_probs
from utils.engine.optim import Precision
from utils.engine.status import upstream_inputs, uses_backbone
from utils.engine.trained import cause_modules, evaluated_primaps, sota_model
from utils.runtime.paths import paths_of
from utils.runtime.records import check_complete
from utils.runtime.steps import command_of


@dataclass(frozen=True)
class LoadedModel:
    predictor: object
    upstream: dict  # {name: upstream entry} of the artifacts it was loaded from
    metrics: Path  # the evaluation's metrics.json, holding the matching of its clusters to classes
    evaluation: str  # the command that writes `metrics`
    description: dict  # what it is, for classes.json: a folder of outputs holds one model's
    files: dict  # {name: path} of the files it was loaded from, for classes.json


class CausePredictor:
    """CAUSE's prediction (docs/cause.md §6): head_ema features averaged with the mirrored image's, nearest
    cluster-probe centroid by cosine."""

    def __init__(self, backbone, segment, cluster, precision, resolution, patch):
        self.backbone, self.segment, self.cluster = backbone, segment, cluster
        self.precision = precision
        self.resolution, self.patch = resolution, patch
        self.n_clusters = cluster.cluster_probe.shape[0]

    def features(self, windows):
        return head_features(self.backbone, self.segment, windows, flip=True, autocast=self.precision.autocast)[1]

    def logits(self, features):
        return self.cluster.cosine_logits(features)

    def scores(self, features):
        """Dot products with the unit centroids: the cosines times each pixel's positive feature norm."""
        return torch.einsum("brhw,nr->bnhw", features, F.normalize(self.cluster.cluster_probe, dim=1))

    def crf_log_probs(self, logits):
        return crf_log_probs(logits)


def evaluated_inputs(cfg, fingerprints):
    """The artifacts the evaluation `cfg` reads (its backbone file found: predict.py's main resolves
    it); stops at a missing or interrupted one with the evaluation's own message."""
    upstream = upstream_inputs(cfg, paths_of(cfg), fingerprints)
    check_complete(upstream, cfg.accept_partial)
    return upstream


def load_cause(cfg, device, fingerprints):
    """The backbone, segment module and cluster probe the test step of `cfg` would evaluate."""
    upstream = evaluated_inputs(cfg, fingerprints)
    backbone, segment, cluster = cause_modules(cfg, upstream, device)
    predictor = CausePredictor(backbone, segment, cluster, Precision(cfg.precision, device), cfg.test_resolution,
                               cfg.patch)
    description, files = _loaded_from(cfg, upstream, fingerprints, model="cause", head=cfg.head)
    return LoadedModel(predictor, upstream, paths_of(cfg).metrics, command_of(cfg.step, cfg), description, files)


class PriMaPsPredictor:
    """PriMaPs-EM's prediction (docs/primaps.md §3): its features (CAUSE's head_ema or the backbone's
    tokens) averaged with the mirrored image's, scored by θ_M, the momentum prototypes."""

    def __init__(self, feature_fn, model, resolution, patch):
        self.feature_fn, self.model = feature_fn, model
        self.resolution, self.patch = resolution, patch
        self.n_clusters = model.momentum.prototypes.weight_v.shape[0]

    def features(self, windows):
        return flip_averaged(self.feature_fn, windows)[1]

    def logits(self, features):
        return self.model.momentum(features)

    def scores(self, features):
        """The logits themselves: θ_M is a 1×1 convolution, linear in the features."""
        return self.logits(features)

    def crf_log_probs(self, logits):
        return logits.log_softmax(dim=1)


class SotaPredictor:
    """A released STEGO or HP model's own prediction (docs/sota.md §1, §2): its evaluated code (STEGO's
    averaged with the mirrored image's), the cluster probe's log_softmax(2 · cosine)."""

    def __init__(self, model, precision, resolution, patch):
        self.model, self.precision = model, precision
        self.resolution, self.patch = resolution, patch
        self.n_clusters = model.cluster_probe.clusters.shape[0]

    def features(self, windows):
        with self.precision.autocast():
            return self.model.eval_patch_code(windows).float()

    def logits(self, features):
        return self.model.protocol.cluster_alpha * self.model.cluster_probe.cosine(features)

    def scores(self, features):
        """Dot products with the unit centres: the cosines times each pixel's positive code norm."""
        return torch.einsum("bchw,nc->bnhw", features, F.normalize(self.model.cluster_probe.clusters, dim=1))

    def crf_log_probs(self, logits):
        return logits.log_softmax(dim=1)


def _loaded_from(cfg, upstream, fingerprints, **what):
    """(description, files) of a model for classes.json: what it is and the fingerprints of its files."""
    own = {}
    if uses_backbone(cfg):
        own["backbone"] = (str(cfg.ckpt), fingerprints.file(cfg.ckpt))
    if cfg.sota_family is not None:
        own[cfg.sota_family] = (str(cfg.sota_ckpt), fingerprints.file(cfg.sota_ckpt))
    own.update({name: (entry["file"], entry["fingerprint"]) for name, entry in upstream.items()})
    description = {**what, "dataset": cfg.dataset, "backbone": cfg.arch,
                   "fingerprints": {name: fingerprint for name, (_, fingerprint) in own.items()}}
    files = {name: file for name, (file, _) in own.items()}
    return description, files


def load_primaps(cfg, device, fingerprints):
    """The PriMaPs model (any --mode, or a released --primaps_ckpt) the PriMaPs test step of `cfg` would evaluate."""
    upstream = evaluated_inputs(cfg, fingerprints)
    feature_fn, model, _ = evaluated_primaps(cfg, upstream, device, Precision(cfg.precision, device))
    predictor = PriMaPsPredictor(feature_fn, model, cfg.test_resolution, cfg.patch)
    description, files = _loaded_from(cfg, upstream, fingerprints, model="primaps", mode=cfg.mode, head=cfg.head)
    return LoadedModel(predictor, upstream, paths_of(cfg).primaps_metrics, command_of(cfg.step, cfg), description,
                       files)


def load_sota(cfg, device, fingerprints):
    """The released STEGO or HP model of --sota_ckpt, as test_sota.py evaluates it."""
    predictor = SotaPredictor(sota_model(cfg, device), Precision(cfg.precision, device), cfg.test_resolution,
                              cfg.patch)
    description, files = _loaded_from(cfg, {}, fingerprints, model=cfg.sota_family)
    return LoadedModel(predictor, {}, paths_of(cfg).sota_metrics, command_of(cfg.step, cfg), description, files)


# {--model: (the loader, the evaluation whose model it loads)}
LOADERS = {"cause": (load_cause, "test"), "primaps": (load_primaps, "test_primaps"), "sota": (load_sota, "test_sota")}
