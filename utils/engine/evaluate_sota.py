"""test_sota.py — a released STEGO or HP model evaluated (docs/sota.md §1, §2).

Two protocols in one run, each named in metrics.json:
- the method's own (the headline, `crf`): its evaluation script's, so that the numbers its authors
  publish for their file are reproduced: the val images and labels resized by nearest neighbour
  (shorter side, then the centre square), the model in eval mode, STEGO's code averaged with the
  mirrored image's (HP: the online code alone), upsampled bilinearly to the labels, the cluster probe at
  temperature 2 and the linear probe, each with and without the dense CRF (`linear_*`: the probe's own
  classes, unmatched);
- PriMaPs-EM's (`primaps_protocol_*`): the evaluation test_primaps.py gives the same model's cluster
  centres as its initial prototypes (the images resized as PriMaPs' test does, the code always averaged
  with the mirrored image's, cosine logits, the CRF fed their log_softmax), so that a "+SotA+PriMaPs"
  result compares with the SotA model under one protocol.
"""
from dataclasses import asdict

import torch

from modules.crf import crf_pool
from modules.features import flip_averaged, upsample
from modules.primaps import cosine_inner_products
from utils.engine import evaluate
from utils.engine.loop import validation_loader
from utils.engine.optim import Precision
from utils.engine.trained import sota_model
from utils.runtime.steps import DATA, EVALUATION, PRIMAPS_RESIZE, Step, register

OWN = {
    "crf": "the method's own evaluation: the cluster probe (temperature 2) after the CRF, the figure its "
           "authors publish",
    "no_crf": "the method's own evaluation: the cluster probe without the CRF",
    "linear_crf": "the method's own evaluation: the labelled linear probe after the CRF (its classes, unmatched)",
    "linear_no_crf": "the method's own evaluation: the labelled linear probe without the CRF",
}
PRIMAPS_PROTOCOL = {
    "primaps_protocol_crf": "PriMaPs-EM's evaluation of the cluster centres (test_primaps.py's init_crf for "
                            "this model): cosine, flip-averaged, after the CRF",
    "primaps_protocol_no_crf": "PriMaPs-EM's evaluation of the cluster centres, without the CRF",
}
_UNMATCHED = ("linear_crf", "linear_no_crf")


def _label(cfg):
    return f"[test {cfg.sota_family}]"


@torch.no_grad()
def work(ctx):
    cfg = ctx.cfg
    precision = Precision(cfg.precision, ctx.device)
    with crf_pool(cfg.crf_workers) as pool:  # before the model reaches a GPU (modules/crf.py)
        model = sota_model(cfg, ctx.device)

        def own(images, labels):
            with precision.autocast():
                code = model.eval_patch_code(images)
            code = code.float()
            log_probs = model.log_probs_of(code, labels.shape[-2:])
            maps = {"no_crf": log_probs.cluster.argmax(dim=1), "linear_no_crf": log_probs.linear.argmax(dim=1)}
            return maps, {"crf": log_probs.cluster, "linear_crf": log_probs.linear}, model.linear_probe(code)

        def primaps_protocol(images, labels):
            with precision.autocast():
                _, averaged = flip_averaged(model.code, images)
            cosine = upsample(cosine_inner_products(averaged.float(), model.cluster_probe.clusters[:, :, None, None]),
                              labels.shape[-2:])
            return {"no_crf": cosine.argmax(dim=1)}, {"crf": cosine.log_softmax(dim=1)}, model.linear_probe(averaged)

        label = f"{_label(cfg)} {cfg.dataset}"
        results, probe = evaluate.score(ctx, pool, validation_loader(ctx, cfg.test_resolution), own, OWN,
                                        ctx.paths.sota_results, f"{label} (its own evaluation)", unmatched=_UNMATCHED)
        theirs, _ = evaluate.score(ctx, pool, validation_loader(ctx, cfg.test_resolution, PRIMAPS_RESIZE["val"]),
                                   primaps_protocol, {"crf": "", "no_crf": ""},
                                   ctx.paths.sota_results / "primaps_protocol", f"{label} (PriMaPs-EM's evaluation)")
    results.update({f"primaps_protocol_{name}": result for name, result in theirs.items()})
    report = evaluate.save_report(ctx, ctx.paths.sota_metrics, results, probe, {**OWN, **PRIMAPS_PROTOCOL},
                                  dataset=cfg.dataset, method=cfg.sota_family, backbone=cfg.arch,
                                  checkpoint=str(cfg.sota_ckpt),
                                  protocol=asdict(model.protocol))
    print_report(cfg, ctx.paths, report)
    return report


def print_report(cfg, paths, report):
    label = _label(cfg)
    evaluate.print_variants(label, report)
    evaluate.print_where(label, paths.sota_metrics, paths.sota_results, report)


def show_result(cfg, paths):
    """An up-to-date evaluation still ends with its result's numbers."""
    return evaluate.reprinted(print_report, cfg, paths, paths.sota_metrics)


SOTA_PRECISION = dict(default="fp32", help="autocast precision; default fp32, as STEGO's evaluation runs (HP's runs "
                                            "its forward pass under fp16 autocast on a GPU: fp16 for that); "
                                            "auto: fp16 on GPU, fp32 on CPU")


register(Step(
    name="test_sota", engine=__name__, script="test_sota.py",
    options=(*DATA, "sota_ckpt", "sota_options", "output_root", "precision", "gpu", "batch_size",
             "test_resolution", *EVALUATION),
    outputs=lambda paths: [paths.sota_metrics], data=("val",), resize={"val": "nearest"},
    neutral=("batch_size",), overrides={"precision": SOTA_PRECISION}, pipeline="sota",
    description="a released STEGO or HP model, by its own evaluation and by PriMaPs-EM's (docs/sota.md §1-§2)"))
