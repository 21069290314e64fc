"""The evaluation protocols, in words and values, as each metrics.json states them: how the val images
are resized and cropped, whether features are averaged with the mirrored image's, the dense CRF, the
matching and which classes count (docs/cause.md §6, docs/primaps.md §3, docs/sota.md §1-§2).

A result compares with another, or with a paper's figure, only under the same protocol: the report
(utils/tools/report.py) puts only one protocol's results in a table.
"""
import inspect

from modules.crf import (BILATERAL_COMPAT, BILATERAL_SRGB, BILATERAL_SXY, GAUSSIAN_COMPAT, GAUSSIAN_SXY,
                         dense_crf_batch)
from utils.runtime.steps import PRIMAPS_RESIZE, STEPS

CRF = {"iterations": inspect.signature(dense_crf_batch).parameters["max_iter"].default,
       "gaussian": {"sxy": GAUSSIAN_SXY, "compat": GAUSSIAN_COMPAT},
       "bilateral": {"sxy": BILATERAL_SXY, "srgb": BILATERAL_SRGB, "compat": BILATERAL_COMPAT},
       "image": "8-bit, channels reversed, as the official code hands it over (docs/cause.md §6)"}
MATCHING = ("one histogram H[prediction, class] over the whole val split, then one Hungarian matching of the "
            "clusters to the classes maximising the matched pixels")
SCORED = ("every class of the data set whose IoU is defined on the split (in the labels or the predictions); "
          "pixels labelled ignore are not counted; mIoU: the mean of the defined IoUs; pixel accuracy: matched "
          "pixels / counted pixels")
UNMATCHED = ("none: as many clusters as classes, each matched to one class (a prediction outside the classes "
             "is not counted)")
UNMATCHED_PROBE = "no matching: the labelled linear probe predicts classes, each kept as its own"

# What each resize of loader/transforms.RESIZES does to the val split, at the test resolution.
_RESIZES = {
    "nearest": "image and label: the shorter side to {res} px by nearest neighbour (PIL), then the centre "
               "{res}×{res} crop",
    "tensor_bilinear": "image: a float tensor, the shorter side to {res} px bilinearly without antialiasing; label: "
                       "nearest on the tensor; then the centre {res}×{res} crop",
}


def _resize(method, resolution):
    return {"method": method, "resolution": resolution, "words": _RESIZES[method].format(res=resolution)}


def _cause(cfg, variants):
    return {
        "name": "CAUSE",
        "words": "CAUSE's test (docs/cause.md §6): head_ema flip-averaged, the nearest cluster centroid by cosine, "
                 "the CRF fed log_softmax(3 · cosine)",
        "resize": _resize(STEPS[cfg.step].resize["val"], cfg.test_resolution),
        "flip_averaged": {name: name != "no_crf_no_flip" for name in variants},
        "crf": CRF, "crf_input": "log_softmax(3 · cosine)", "matching": MATCHING, "classes_scored": SCORED,
        "unmatched_clusters": UNMATCHED, "variants": list(variants),
    }


def _primaps(cfg, variants):
    """PriMaPs-EM's test: its own, and test_sota's scoring of a released model's cluster centres, described
    alike, so that both share the report's tables."""
    return {
        "name": "PriMaPs-EM",
        "words": "PriMaPs-EM's test (docs/primaps.md §3): features flip-averaged, the logits upsampled to the labels",
        "resize": _resize(PRIMAPS_RESIZE["val"], cfg.test_resolution),
        "flip_averaged": {name: True for name in variants},
        "crf": CRF, "crf_input": "log_softmax of the logits (θ_M, θ_R: dot products; initial prototypes: cosine)",
        "matching": MATCHING, "classes_scored": SCORED, "unmatched_clusters": UNMATCHED, "variants": list(variants),
    }


def _sota_own(cfg, variants):
    family = cfg.sota_family.upper()
    return {
        "name": family,
        "words": f"{family}'s own evaluation script (docs/sota.md §1-§2): eval mode, "
                 + ("the code flip-averaged" if cfg.sota_family == "stego" else "the online code, not flip-averaged")
                 + ", upsampled bilinearly to the labels, the cluster probe at temperature 2",
        "resize": _resize(STEPS[cfg.step].resize["val"], cfg.test_resolution),
        "flip_averaged": {name: cfg.sota_family == "stego" for name in variants},
        "crf": CRF, "crf_input": "the probes' log-probabilities (cluster probe: temperature 2)",
        "matching": MATCHING + " (the cluster probe; the linear probe is not matched)", "classes_scored": SCORED,
        "unmatched_clusters": f"{UNMATCHED}; linear_*: {UNMATCHED_PROBE}", "variants": list(variants),
    }


def protocols_of(cfg, variants):
    """{protocol key: its description} of an evaluation step's `variants`, each variant under one protocol."""
    if cfg.step == "test":
        return {"cause": _cause(cfg, variants)}
    if cfg.step == "test_primaps":
        return {"primaps": _primaps(cfg, variants)}
    if cfg.step == "test_sota":
        own = [name for name in variants if not name.startswith("primaps_protocol_")]
        theirs = [name for name in variants if name.startswith("primaps_protocol_")]
        return {cfg.sota_family: _sota_own(cfg, own),
                "primaps": _primaps(cfg, theirs)}
    raise ValueError(f"{cfg.step!r} is not an evaluation step")
