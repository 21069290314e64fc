"""PriMaPs-EM's test step (docs/primaps.md §3): θ_M (the headline, as PriMaPs reports it), θ_R and the
prototypes they started from, each without and with the dense CRF, scored as the CAUSE test step
scores (evaluate.score: Hungarian-matched mIoU, pixel accuracy, per-class IoU, pictures).

The features are averaged with the mirrored image's; the logits are upsampled to the label size and
the CRF is fed their log_softmax. The initial prototypes predict by cosine, as the official k-means
probe does: in backbone mode they are PriMaPs' "baseline" row, in cause mode CAUSE's own
prediction (its cluster probe; CAUSE's CRF input is log_softmax(3 · cosine), this one log_softmax(cosine)),
in stego and hp modes the released model's cluster probe. A released PriMaPs checkpoint (--primaps_ckpt)
is evaluated as the official test.py does (docs/sota.md §3b); a backbone-mode one holds no initial
prototypes, so its evaluation has no init_* variants.
"""
from pathlib import Path

import torch

from models.released_primaps import read_primaps_checkpoint
from modules.crf import crf_pool
from modules.features import flip_averaged, upsample
from utils.engine import evaluate
from utils.engine.loop import validation_loader
from utils.engine.optim import Precision
from utils.engine.primaps import PRIMAPS_PRECISION, choices, primaps_unused
from utils.engine.status import uses_backbone
from utils.engine.trained import evaluated_primaps
from utils.runtime.config import ConfigError, check_classes
from utils.runtime.options import Option
from utils.runtime.steps import (DATA, EVALUATION, HEAD_MODEL, MODEL, PRIMAPS_RESIZE, SOTA, ReleasedFile, Step,
                                 Upstream, register)

# The headline's variants keep the CAUSE test step's names, so both metrics.json read alike.
VARIANTS = {
    "crf": "θ_M (the momentum prototypes: PriMaPs' reported model) after the CRF",
    "no_crf": "θ_M without the CRF",
    "theta_r_crf": "θ_R (the prototypes the focal loss trains) after the CRF",
    "theta_r_no_crf": "θ_R without the CRF",
    "init_crf": "the initial prototypes (backbone mode: PCA + k-means, PriMaPs' baseline; cause mode: CAUSE's "
                "cluster probe; stego, hp: the released model's cluster probe) by cosine, after the CRF",
    "init_no_crf": "the initial prototypes by cosine, without the CRF",
}
_PREFIXES = {"": "momentum", "theta_r_": "online", "init_": "initial_cosine"}


def _label(cfg):
    return f"[test primaps {cfg.head.upper() if cfg.head else cfg.mode}]"


@torch.no_grad()
def work(ctx):
    cfg = ctx.cfg
    with crf_pool(cfg.crf_workers) as pool:  # before the models reach a GPU (modules/crf.py)
        torch.manual_seed(0)  # also STEGO's dropout draws, with --sota_dropout official
        features, model, initial_known = evaluated_primaps(cfg, ctx.upstream, ctx.device,
                                                           Precision(cfg.precision, ctx.device))
        prefixes = {prefix: name for prefix, name in _PREFIXES.items() if initial_known or prefix != "init_"}
        variants = {name: text for name, text in VARIANTS.items() if initial_known or not name.startswith("init_")}

        def predict(images, labels):
            _, averaged = flip_averaged(features, images)
            maps, crf_inputs = {}, {}
            for prefix, predictor in prefixes.items():
                logits = upsample(getattr(model, predictor)(averaged), labels.shape[-2:])
                maps[prefix + "no_crf"] = logits.argmax(dim=1)
                crf_inputs[prefix + "crf"] = logits.log_softmax(dim=1)
            return maps, crf_inputs, model.linear(averaged)

        results, probe = evaluate.score(ctx, pool, validation_loader(ctx, cfg.test_resolution), predict, variants,
                                        ctx.paths.primaps_results, f"{_label(cfg)} {cfg.dataset}")
    report = evaluate.save_report(ctx, ctx.paths.primaps_metrics, results, probe, variants, dataset=cfg.dataset,
                                  mode=cfg.mode, head=cfg.head, backbone=cfg.arch,
                                  checkpoint=str(cfg.ckpt) if uses_backbone(cfg) else None,
                                  released_primaps=str(cfg.primaps_ckpt) if cfg.primaps_ckpt else None,
                                  **choices(ctx, cfg.mode))
    print_report(cfg, ctx.paths, report)
    return report


def print_report(cfg, paths, report):
    label = _label(cfg)
    evaluate.print_released(label, report)
    evaluate.print_variants(label, report)
    print(f"{label} linear probe (uses labels) pixel accuracy {report['linear_probe_pixel_accuracy_uses_labels']:.1f}, "
          f"mIoU {report['linear_probe_mIoU_uses_labels']:.1f}")
    evaluate.print_where(label, paths.primaps_metrics, paths.primaps_results, report)


def show_result(cfg, paths):
    """An up-to-date test step still ends with its result's numbers."""
    return evaluate.reprinted(print_report, cfg, paths, paths.primaps_metrics)


PRIMAPS_CKPT = Option("primaps_ckpt", "released models", dict(
    type=Path, default=None,
    help="a released PriMaPs .ckpt to evaluate (test_primaps.py) or segment with (predict.py): its mode, "
         "backbone and resolution are the file's (--test_resolution overrides); a +SotA file also needs the "
         "STEGO or HP file it was trained on (--sota_ckpt, else the path its options store)"),
    changes_result=False)


def adopt_released(values):
    """With --primaps_ckpt (docs/sota.md §3b): the released file decides the mode and, unless given, the test
    resolution and (+SotA) the STEGO or HP file; `values` are updated. Its ReleasedFile holds the backbone's
    arch in backbone mode (the backbone inside the file), None in +SotA modes (the STEGO or HP file's)."""
    path = values.get("primaps_ckpt")
    if path is None:
        return None
    released = read_primaps_checkpoint(path)
    mode = released.sota or "backbone"
    if values["mode"] not in ("cause", mode):  # cause: the default, which no released file has
        raise ConfigError(f"--mode {values['mode']}, but {path} is a PriMaPs checkpoint of {mode} mode")
    values["mode"] = mode
    check_classes(values, released.n_classes, path)
    if values["test_resolution"] is None:
        values["test_resolution"] = released.resolution
    name = f"released_{Path(path).stem}"
    if released.sota is None:
        return ReleasedFile(released.arch, name)
    if values["sota_ckpt"] is None:
        if not Path(released.sota_path).is_file():
            raise ConfigError(f"{path} was trained on the {mode.upper()} model {released.sota_path}, which is not "
                              f"here (a released PriMaPs file does not hold it): pass that file with --sota_ckpt")
        values["sota_ckpt"] = Path(released.sota_path)
    stored_options = released.sota_options_path
    if values["sota_options"] is None and stored_options and Path(stored_options).is_file():
        values["sota_options"] = Path(stored_options)
    return ReleasedFile(None, name)


def _upstream(cfg, paths):
    """The features' modules as PriMaPs-EM reads them, and its prototypes: trained here, or a released file."""
    if cfg.primaps_ckpt is not None:
        return {"primaps": Upstream(cfg.primaps_ckpt, None, "--primaps_ckpt")}
    cause = evaluate.test_upstream(cfg, paths) if cfg.mode == "cause" else {}
    return {**cause, "primaps": Upstream(paths.primaps, "primaps")}


register(Step(
    name="test_primaps", engine=__name__, script="test_primaps.py",
    options=(*DATA, *MODEL, *HEAD_MODEL, *EVALUATION, "mode", "head", *SOTA, PRIMAPS_CKPT),
    outputs=lambda paths: [paths.primaps_metrics], upstream=_upstream, adopt=adopt_released, data=("val",),
    head="option",
    resize=PRIMAPS_RESIZE, unused=primaps_unused, neutral=("batch_size",), overrides={"precision": PRIMAPS_PRECISION},
    pipeline="primaps", description="PriMaPs-EM's evaluation (docs/primaps.md §3)"))
