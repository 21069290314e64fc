"""Step 4 — evaluation: nearest-centroid prediction, dense CRF, Hungarian-matched mIoU (docs/cause.md §6).

One process (the first GPU of --gpu, else the first visible one, else the CPU), as the official
test scripts: the CRF runs on CPU workers anyway. metrics.json holds the figures, the record of
what made them (its own identity and the records of the artifacts it read), and is its own record.
"""
import json

import torch
from torch.utils.tensorboard import SummaryWriter

from loader import DATASETS, class_names
from modules.crf import crf_pool, dense_crf_batch
from modules.features import head_features, upsample
from modules.grid import map_to_tokens
from modules.metrics import MatchedMetrics
from modules.probe import crf_log_probs
from utils.engine.loop import progress, validation_loader
from utils.engine.optim import Precision
from utils.engine.protocols import protocols_of
from utils.engine.status import step_record
from utils.engine.trained import cause_modules
from utils.runtime.io import save_png, save_text
from utils.runtime.pictures import (colorize, confusion_figure, figure_rgb, per_class_iou_figure, prediction_pictures,
                                    save_pictures)
from utils.runtime.records import read_record
from utils.runtime.steps import DATA, EVALUATION, HEAD_MODEL, MODEL, Step, Upstream, register

# The figure the paper's tables report, and the others metrics.json holds beside it.
VARIANTS = {
    "crf": "after the CRF, features averaged with the mirrored image's (the paper's figure)",
    "no_crf": "without the CRF, the same features",
    "no_crf_no_flip": "without the CRF and without flip averaging: the official test script's no-CRF figure",
}


def summary(result):
    """The part of MatchedMetrics.compute()'s result that metrics.json reports."""
    return {"mIoU": result["mIoU"], "pAcc": result["Acc"], "per_class_iou": result["per_class_iou"]}


def final_line(metrics):
    return f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"


def score(ctx, pool, loader, predict, variants, pictures_dir, desc, unmatched=()):
    """Predict every val image and score each variant; shared by the test steps.

    predict(images, labels) -> ({variant: class map [B,H,W]}, {variant: the CRF's input, log-probabilities
    [B,K,H,W]}, the linear probe's logits [B,n,h,w]); the CRF runs here, on `pool`. The pictures (imgs,
    labels, raw, crf, matched) show the variants "no_crf" and "crf". Returns ({variant: MatchedMetrics
    result}, the linear probe's MatchedMetrics result: its own classes, no matching). The variants named in
    `unmatched` predict classes already (a labelled probe's) and are scored without matching.
    """
    cfg = ctx.cfg
    metrics = {name: MatchedMetrics(cfg.n_classes, ctx.device, matched=name not in unmatched) for name in variants}
    probe = MatchedMetrics(cfg.n_classes, ctx.device, matched=False)
    palette = DATASETS[cfg.dataset].palette
    wanted_pictures = len(loader.dataset) if cfg.num_pictures < 0 else cfg.num_pictures
    # The matched pictures need the final Hungarian matching, so only their CRF maps are kept,
    # as bytes; every other picture is written as soon as it is predicted.
    kept_crf = []
    for _, _, batch in progress(ctx, loader, desc):
        images, labels = batch["img"], batch["label"]
        maps, crf_inputs, probe_logits = predict(images, labels)
        for name, log_probs in crf_inputs.items():
            maps[name] = dense_crf_batch(images, log_probs, pool=pool).argmax(1)
        for name, prediction in maps.items():
            metrics[name].update(prediction, labels)
        probe.update(upsample(probe_logits.float(), labels.shape[-2:]).argmax(1), labels)
        for i in range(min(len(images), wanted_pictures - len(kept_crf))):
            index = int(batch["ind"][i])
            save_pictures(pictures_dir, index, prediction_pictures(images[i], labels[i], maps["no_crf"][i],
                                                                   maps["crf"][i], palette))
            kept_crf.append((index, maps["crf"][i].to(torch.uint8).cpu()))  # at most 171 clusters (coco171)

    results = {name: metric.compute() for name, metric in metrics.items()}  # each Hungarian matching once
    for index, crf in kept_crf:
        save_pictures(pictures_dir, index, {"matched": colorize(results["crf"]["assignment"][crf.long()], palette)})
    return results, probe.compute()


def save_report(ctx, path, results, probe, variants, **description):
    """Write and return a test step's metrics.json: `description`, each variant's figures, the
    Hungarian matching of the headline ("crf": the class each cluster stands for, which predict.py
    uses), the linear probe's pixel accuracy and mIoU, and how it was made: a metrics.json is its own
    record, and holds the records of the artifacts it was computed from."""
    report = {
        **description,
        **{name: summary(result) for name, result in results.items()},
        "variants": variants,
        "cluster_to_class": results["crf"]["assignment"].tolist(),
        "linear_probe_pixel_accuracy_uses_labels": probe["Acc"], "linear_probe_mIoU_uses_labels": probe["mIoU"],
        "evaluation_protocols": protocols_of(ctx.cfg, variants),
        **step_record(ctx, None), "upstream": ctx.upstream,
    }
    save_figures(ctx.cfg, path.parent, results)
    save_text(json.dumps(report, indent=2, default=str), path)
    return report


def figure_pairs(variants):
    """{prefix: (variant after the CRF, the same without)} of the variants that come in such a pair
    ("": crf and no_crf, the headline; "theta_r_": theta_r_crf and theta_r_no_crf; ...)."""
    return {name[:-len("crf")]: (name, name[:-len("crf")] + "no_crf") for name in variants
            if name.endswith("crf") and not name.endswith("no_crf") and name[:-len("crf")] + "no_crf" in variants}


def evaluation_figures(cfg, results):
    """{file stem: figure} of an evaluation, for each pair of variants with and without the CRF
    (figure_pairs; the headline's without a prefix): {prefix}per_class_iou (each class's IoU after the
    matching, with and without the CRF) and {prefix}confusion (the matched confusion matrix after the CRF,
    rows normalised)."""
    names = class_names(cfg.dataset)
    figures = {}
    for prefix, (crf, no_crf) in figure_pairs(results).items():
        title = " ".join([cfg.dataset, cfg.step, *([cfg.head] if cfg.head else []), prefix.rstrip("_")]).strip()
        ious = {"after the CRF": results[crf]["per_class_iou"], "without the CRF": results[no_crf]["per_class_iou"]}
        figures[f"{prefix}per_class_iou"] = per_class_iou_figure(names, ious, f"IoU per class: {title}")
        figures[f"{prefix}confusion"] = confusion_figure(names, results[crf]["confusion"],
                                                         f"Confusion after the matching and the CRF: {title}")
    return figures


def save_figures(cfg, folder, results):
    """The evaluation's figures (evaluation_figures) as PNGs beside its metrics.json, and as images in
    TensorBoard, under the folder's tensorboard/."""
    writer = SummaryWriter(str(folder / "tensorboard"))
    try:
        for name, figure in evaluation_figures(cfg, results).items():
            picture = figure_rgb(figure)
            save_png(picture, folder / f"{name}.png")
            writer.add_image(f"{cfg.step}/{name}", picture, dataformats="HWC")
    finally:
        writer.close()


def print_variants(label, report):
    """One line per variant of a metrics.json: its figures and what it is."""
    width = max(map(len, report["variants"]))
    for name, text in report["variants"].items():
        print(f"{label} {name:<{width}} mIoU {report[name]['mIoU']:5.1f}  pAcc {report[name]['pAcc']:5.1f}  ({text})")


def print_where(label, metrics, pictures, report):
    """A test step's last lines: where its files are, then its headline."""
    print(f"{label} metrics: {metrics}; pictures: {pictures}")
    print(final_line(report))


def reprinted(print_report, cfg, paths, metrics):
    """What an up-to-date test step gives: its metrics.json, printed again with `print_report`."""
    report = json.loads(metrics.read_text())
    print_report(cfg, paths, report)
    return report


def print_released(label, report):
    """Say which of the files a result was computed from are released ones (no record of how they were made)."""
    released = [entry["file"] for entry in report["upstream"].values() if entry["origin"] == "released"]
    if released:
        print(f"{label} released files (no record of how they were made): {', '.join(released)}")


@torch.no_grad()
def work(ctx):
    cfg = ctx.cfg
    with crf_pool(cfg.crf_workers) as pool:  # before the models reach a GPU (modules/crf.py)
        torch.manual_seed(0)
        backbone, segment, cluster = cause_modules(cfg, ctx.upstream, ctx.device)
        precision = Precision(cfg.precision, ctx.device)

        def predict(images, labels):
            plain, averaged = head_features(backbone, segment, images, flip=True, autocast=precision.autocast)
            cosine = cluster.cosine_logits(upsample(averaged, labels.shape[-2:]))
            maps = {"no_crf": cosine.argmax(dim=1),
                    "no_crf_no_flip": cluster.predict(upsample(plain, labels.shape[-2:]))}
            return maps, {"crf": crf_log_probs(cosine)}, segment.linear(map_to_tokens(plain))

        results, probe = score(ctx, pool, validation_loader(ctx, cfg.test_resolution), predict, VARIANTS,
                               ctx.paths.results, f"[test {cfg.head.upper()}] {cfg.dataset}")
    report = save_report(ctx, ctx.paths.metrics, results, probe, VARIANTS, dataset=cfg.dataset, head=cfg.head,
                         backbone=cfg.arch, checkpoint=str(cfg.ckpt))
    print_report(cfg, ctx.paths, report)
    return report


def print_report(cfg, paths, report):
    label = f"[test {cfg.head.upper()}]"
    print_released(label, report)
    print(f"{label} {cfg.dataset}: without CRF mIoU {report['no_crf']['mIoU']:.1f} pAcc {report['no_crf']['pAcc']:.1f} "
          f"(without flip averaging, as the official no-CRF figure: mIoU {report['no_crf_no_flip']['mIoU']:.1f}); "
          f"linear probe (uses labels) pixel accuracy {report['linear_probe_pixel_accuracy_uses_labels']:.1f}, "
          f"mIoU {report['linear_probe_mIoU_uses_labels']:.1f}")
    print_where(label, paths.metrics, paths.results, report)


def show_result(cfg, paths):
    """An up-to-date test step still ends with its result's numbers."""
    return reprinted(print_report, cfg, paths, paths.metrics)


def test_upstream(cfg, paths):
    """The modules the CAUSE test step evaluates: the segment module the cluster probe was fitted with
    (fine-tuning's own file when the probe was trained here, the front door's for a released one)."""
    fine_tuned = read_record(paths.cluster) is not None
    return {"modular": Upstream(paths.modular, "mediator"),
            "segment": Upstream(paths.fine_tuned_segment, "fine_tune") if fine_tuned
            else Upstream(paths.segment, "front_door"),
            "cluster": Upstream(paths.cluster, "fine_tune")}


register(Step(
    name="test", engine=__name__, script="test_{head}.py", options=(*DATA, *MODEL, *HEAD_MODEL, *EVALUATION),
    outputs=lambda paths: [paths.metrics], upstream=test_upstream, data=("val",), head="script",
    neutral=("batch_size",), pipeline="cause", description="prediction, CRF, metrics (docs/cause.md §6)"))
