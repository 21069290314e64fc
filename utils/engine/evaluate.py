"""Step 4 — evaluation: nearest-centroid prediction, dense CRF, Hungarian-matched mIoU (SPEC §6).

One process (the first GPU of --gpu, else the first visible one, else the CPU), as the official
test scripts: the CRF runs on CPU workers anyway. metrics.json holds the figures, the record of
what made them (its own identity and the records of the artifacts it read), and is its own record.
"""
import json

import torch

from modules.crf import crf_pool, dense_crf_batch
from modules.features import head_features, upsample
from modules.grid import map_to_tokens
from modules.heads import build_segment
from modules.losses import probe_cross_entropy
from modules.metrics import MatchedMetrics
from modules.probe import ClusterModule, crf_log_probs
from utils.engine.loop import Precision, StepSpec, Upstream, make_backbone, progress, run_step, validation_loader
from utils.runtime.artifacts import load_modular, load_state_strict
from utils.runtime.io import save_text
from utils.runtime.pictures import colorize, prediction_pictures, save_pictures
from utils.runtime.records import now, project_version, read_record

# The figure the paper's tables report, and the others metrics.json holds beside it.
VARIANTS = {
    "crf": "after the CRF, features averaged with the mirrored image's (the paper's figure)",
    "no_crf": "without the CRF, the same features",
    "no_crf_no_flip": "without the CRF and without flip averaging: the official test script's no-CRF figure",
}


def segment_file(cfg, paths):
    """The segment module the cluster probe was fitted with: fine-tuning's own file when the probe
    was trained here, the front door's (the released layout) for a released cluster file."""
    return paths.fine_tuned_segment if read_record(paths.cluster) is not None else paths.segment


def load_trained_modules(ctx, segment_path):
    """Backbone, segment module and cluster probe of a finished run (or released files), loaded strictly."""
    cfg = ctx.cfg
    backbone = make_backbone(ctx)
    codebook = load_modular(ctx.paths.modular, cfg.num_codebook, cfg.dim)
    segment = build_segment(cfg.head, cfg.dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes, cfg.num_queries,
                            codebook, ctx.device)
    load_state_strict(segment, segment_path, "segment module", f"train_front_door_{cfg.head}.py")
    cluster = ClusterModule(cfg.num_codebook, cfg.dim, cfg.reduced_dim, cfg.n_classes).to(ctx.device)
    load_state_strict(cluster, ctx.paths.cluster, "cluster probe", f"fine_tuning_{cfg.head}.py")
    return backbone, segment, cluster


def summary(result):
    """The part of MatchedMetrics.compute()'s result that metrics.json reports."""
    return {"mIoU": result["mIoU"], "pAcc": result["Acc"], "per_class_iou": result["per_class_iou"]}


def final_line(metrics):
    return f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"


def score(ctx, pool, loader, predict, variants, pictures_dir, desc):
    """Predict every val image and score each variant; shared by the test steps.

    predict(images, labels) -> ({variant: class map [B,H,W]}, {variant: the CRF's input, log-probabilities
    [B,K,H,W]}, (linear probe's correct pixels, labelled pixels)); the CRF runs here, on `pool`. The
    pictures (imgs, labels, raw, crf, matched) show the variants "no_crf" and "crf". Returns
    ({variant: MatchedMetrics result}, the linear probe's pixel accuracy in %).
    """
    cfg = ctx.cfg
    metrics = {name: MatchedMetrics(cfg.n_classes, ctx.device) for name in variants}
    probe = torch.zeros(2, device=ctx.device)
    palette = ctx.dataset_info.palette
    wanted_pictures = len(loader.dataset) if cfg.num_pictures < 0 else cfg.num_pictures
    # The matched pictures need the final Hungarian matching, so only their CRF maps are kept,
    # as bytes; every other picture is written as soon as it is predicted.
    kept_crf = []
    for _, _, batch in progress(ctx, loader, desc):
        images, labels = batch["img"], batch["label"]
        maps, crf_inputs, (correct, counted) = predict(images, labels)
        for name, log_probs in crf_inputs.items():
            maps[name] = dense_crf_batch(images, log_probs, pool=pool).argmax(1)
        for name, prediction in maps.items():
            metrics[name].update(prediction, labels)
        probe += torch.stack([correct, counted]).float()
        for i in range(min(len(images), wanted_pictures - len(kept_crf))):
            index = int(batch["ind"][i])
            save_pictures(pictures_dir, index, prediction_pictures(images[i], labels[i], maps["no_crf"][i],
                                                                   maps["crf"][i], palette))
            kept_crf.append((index, maps["crf"][i].to(torch.uint8).cpu()))  # at most 171 clusters (coco171)

    results = {name: metric.compute() for name, metric in metrics.items()}  # each Hungarian matching once
    for index, crf in kept_crf:
        save_pictures(pictures_dir, index, {"matched": colorize(results["crf"]["assignment"][crf.long()], palette)})
    return results, 100 * (probe[0] / probe[1].clamp(min=1)).item()


def save_report(ctx, path, results, probe, variants, **description):
    """Write and return a test step's metrics.json: `description`, each variant's figures, the
    Hungarian matching of the headline ("crf": the class each cluster stands for, which predict.py
    uses), the linear probe's accuracy, and how it was made (a metrics.json is its own record)."""
    report = {
        **description,
        **{name: summary(result) for name, result in results.items()},
        "variants": variants,
        "cluster_to_class": results["crf"]["assignment"].tolist(),
        "linear_probe_pixel_accuracy_uses_labels": probe,
        "complete": True, "identity": ctx.identity, "upstream": ctx.upstream, "accepted_partial": ctx.warnings,
        "version": project_version(), "written": now(), "run_id": ctx.run_id,
    }
    save_text(json.dumps(report, indent=2, default=str), path)
    return report


def print_released(label, report):
    """Say which of the files a result was computed from are released ones (no record of how they were made)."""
    released = [entry["file"] for entry in report["upstream"].values() if entry["origin"] == "released"]
    if released:
        print(f"{label} released files (no record of how they were made): {', '.join(released)}")


@torch.no_grad()
def evaluate(ctx):
    cfg = ctx.cfg
    with crf_pool(cfg.crf_workers) as pool:  # before the models reach a GPU (modules/crf.py)
        torch.manual_seed(0)
        backbone, segment, cluster = load_trained_modules(ctx, ctx.upstream["segment"]["file"])
        precision = Precision(cfg.precision, ctx.device)

        def predict(images, labels):
            plain, averaged = head_features(backbone, segment, images, flip=True, autocast=precision.autocast)
            cosine = cluster.cosine_logits(upsample(averaged, labels.shape[-2:]))
            maps = {"no_crf": cosine.argmax(dim=1),
                    "no_crf_no_flip": cluster.predict(upsample(plain, labels.shape[-2:]))}
            _, correct, counted = probe_cross_entropy(segment.linear(map_to_tokens(plain)), labels, cfg.n_classes)
            return maps, {"crf": crf_log_probs(cosine)}, (correct, counted)

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
          f"linear probe (uses labels) pixel accuracy {report['linear_probe_pixel_accuracy_uses_labels']:.1f}")
    print(f"{label} metrics: {paths.metrics}; pictures: {paths.results}")
    print(final_line(report))


def show_existing(cfg, paths):
    """An up-to-date test step still ends with its result's numbers."""
    report = json.loads(paths.metrics.read_text())
    print_report(cfg, paths, report)
    return report


def _settings(cfg, recipe, precision):
    return {"dataset": cfg.dataset, "arch": cfg.arch, "dino_small_heads": cfg.dino_small_heads,
            "num_codebook": cfg.num_codebook, "head": cfg.head, "reduced_dim": cfg.reduced_dim,
            "projection_dim": cfg.projection_dim, "train_resolution": cfg.train_resolution,
            "test_resolution": cfg.test_resolution, "precision": precision, "num_pictures": cfg.num_pictures}


SPEC = StepSpec(
    outputs=lambda paths: [paths.metrics],
    upstream=lambda cfg, paths: {
        "modular": Upstream(paths.modular, "train_mediator.py"),
        "segment": Upstream(segment_file(cfg, paths), f"fine_tuning_{cfg.head}.py" if read_record(paths.cluster)
                            else f"train_front_door_{cfg.head}.py"),
        "cluster": Upstream(paths.cluster, f"fine_tuning_{cfg.head}.py")},
    data=("val",),
    settings=_settings,
    worker=evaluate,
    single_process=True,
    on_skip=show_existing,
)


def run(cfg):
    return run_step(cfg, SPEC)
