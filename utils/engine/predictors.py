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
of a metrics.json). A missing or interrupted artifact stops the loader with the evaluation's own
message (utils/engine/loop.upstream_inputs, records.check_complete).

predict.py upsamples features, not logits, to the image's size, as the test step does (SPEC §6):
for CAUSE's cosine logits the two differ (for a linear head they are the same). `scores` keep that
prediction while upsampling fewer channels.

Adding PriMaPs (PRIMAPS.md §3), once its step has landed, is one loader here plus its line in
LOADERS (which --model lists):
  - features: CAUSE's flip-averaged head_ema features (cause mode, as CausePredictor.features) or
    the plain backbone tokens on the patch grid (backbone mode), flip-averaged likewise;
  - logits: θ_M, the momentum 1×1 convolution, applied to the features (its headline figure);
    scores: the same (it is linear);
  - crf_log_probs: log_softmax(logits) (PRIMAPS.md §3);
  - upstream: upstream_inputs of the PriMaPs evaluation's StepSpec (its artifacts and the command
    that makes each); metrics: that evaluation's metrics.json, which must save "cluster_to_class"
    as the CAUSE test step does, with the same "identity" record so `predict.matching` can check it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.features import head_features
from modules.probe import crf_log_probs
from utils.engine import evaluate
from utils.engine.loop import Precision, StepContext, artifact_paths, require_backbone_file, upstream_inputs
from utils.runtime.distributed import Dist
from utils.runtime.records import check_complete


@dataclass(frozen=True)
class LoadedModel:
    predictor: object
    upstream: dict  # {name: upstream entry} of the artifacts it was loaded from
    metrics: Path  # the evaluation's metrics.json, holding the matching of its clusters to classes
    evaluation: str  # the command that writes `metrics`
    description: dict  # what it is, for classes.json: a folder of outputs holds one model's
    files: dict  # {name: path} of the files it was loaded from, for classes.json


class CausePredictor:
    """CAUSE's prediction (SPEC §6): head_ema features averaged with the mirrored image's, nearest
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


def load_cause(cfg, device, fingerprints):
    """The backbone, segment module and cluster probe the test step of `cfg` would evaluate."""
    require_backbone_file(cfg)
    paths = artifact_paths(cfg)
    upstream = upstream_inputs(cfg, evaluate.SPEC, paths, fingerprints)
    check_complete(upstream, cfg.accept_partial)
    ctx = StepContext(cfg, Dist(0, 1, device), paths, None, {}, upstream)
    backbone, segment, cluster = evaluate.load_trained_modules(ctx, upstream["segment"]["file"])
    predictor = CausePredictor(backbone, segment, cluster, Precision(cfg.precision, device), cfg.test_resolution,
                               cfg.patch)
    description = {"model": "cause", "dataset": cfg.dataset, "head": cfg.head, "backbone": cfg.arch,
                   "fingerprints": {"backbone": fingerprints.file(cfg.ckpt),
                                    **{name: entry["fingerprint"] for name, entry in upstream.items()}}}
    files = {"backbone": str(cfg.ckpt), **{name: entry["file"] for name, entry in upstream.items()}}
    return LoadedModel(predictor, upstream, paths.metrics, f"test_{cfg.head}.py", description, files)


LOADERS = {"cause": load_cause}
