"""Step 4 — evaluation: nearest-centroid prediction, dense CRF, Hungarian-matched mIoU (SPEC §6)."""
import json
import multiprocessing
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from modules.crf import dense_crf_batch
from modules.grid import tokens_to_map
from modules.metrics import MatchedMetrics
from modules.probe import ClusterModule, crf_log_probs
from utils.artifacts import load_modular, load_state_strict, require
from utils.engine import (Precision, backbone_tokens, batches, check_data, labelled_cross_entropy, make_backbone,
                          run_step, seed_everything, val_loader)
from utils.front_door import build_segment
from utils.io import save_text
from utils.visualize import colorize, prediction_pictures, save_pictures


def run(cfg):
    # Evaluation is one process (as the official test scripts): the CRF runs on CPU workers anyway.
    first_gpu = cfg.gpu.split(",")[0] if cfg.gpu else cfg.gpu
    return run_step(replace(cfg, gpu=first_gpu, nproc=1), evaluate, is_complete=is_complete, preflight=preflight)


def preflight(cfg, paths):
    check_data(cfg, ["val"])
    require(paths.modular, "train_mediator.py")
    require(paths.segment, f"train_front_door_{cfg.head}.py")
    require(paths.cluster, f"fine_tuning_{cfg.head}.py")


def is_complete(cfg, paths):
    try:
        return "crf" in json.loads(paths.metrics.read_text())
    except (OSError, ValueError):
        return False


def load_trained_modules(ctx):
    """Backbone, segment module and cluster probe of a finished run (or released files), loaded strictly."""
    cfg = ctx.cfg
    backbone = make_backbone(ctx)
    codebook = load_modular(ctx.paths.modular, cfg.num_codebook, cfg.dim)
    segment = build_segment(cfg, codebook, ctx.device)
    load_state_strict(segment, ctx.paths.segment, "segment module", f"train_front_door_{cfg.head}.py")
    cluster = ClusterModule(cfg.num_codebook, cfg.dim, cfg.reduced_dim, cfg.n_classes).to(ctx.device)
    load_state_strict(cluster, ctx.paths.cluster, "cluster probe", f"fine_tuning_{cfg.head}.py")
    return backbone, segment, cluster


def dense_features(backbone, segment, images, size, precision, flip):
    """head_ema features on the patch grid, upsampled bilinearly to `size`: [B,R,H,W].

    With `flip`, the mean of the image's and its mirrored image's features (SPEC §6).
    The backbone runs under autocast, the head in float32, as the official test scripts.
    """
    with precision.autocast():
        tokens = backbone_tokens(backbone, images)
    features = tokens_to_map(segment.head_ema(tokens.float()))
    if flip:
        with precision.autocast():
            flipped = backbone_tokens(backbone, images.flip(-1))
        features = (features + tokens_to_map(segment.head_ema(flipped.float())).flip(-1)) / 2
    return F.interpolate(features, size, mode="bilinear", align_corners=False)


def summary(result):
    """The part of MatchedMetrics.compute()'s result that metrics.json reports."""
    return {"mIoU": result["mIoU"], "pAcc": result["Acc"], "per_class_iou": result["per_class_iou"]}


@torch.no_grad()
def evaluate(ctx):
    cfg = ctx.cfg
    seed_everything(cfg.seed, 0)
    backbone, segment, cluster = load_trained_modules(ctx)
    segment.eval()
    precision = Precision(cfg.precision, ctx.device)
    loader = val_loader(ctx, cfg.test_resolution, distributed=False)
    raw_metrics = MatchedMetrics(cfg.n_classes, ctx.device)
    crf_metrics = MatchedMetrics(cfg.n_classes, ctx.device)
    probe = torch.zeros(2, device=ctx.device)
    palette = ctx.dataset_info.palette
    wanted_pictures = len(loader.dataset) if cfg.num_pictures < 0 else cfg.num_pictures
    # The matched pictures need the final Hungarian matching, so only their CRF maps are kept,
    # as bytes; every other picture is written as soon as it is predicted.
    kept_crf = []
    # The CRF is CPU work: a pool of workers runs it for the images of a batch in parallel.
    with (multiprocessing.Pool(cfg.crf_workers) if cfg.crf_workers > 1 else nullcontext()) as pool:
        for _, bar, batch in batches(ctx, loader, 0, f"[test {cfg.head.upper()}] {cfg.dataset}"):
            images, labels = batch["img"], batch["label"]
            features = dense_features(backbone, segment, images, labels.shape[-2:], precision, flip=True)
            cosine = cluster.cosine_logits(features)
            raw = cosine.argmax(dim=1)
            crf = dense_crf_batch(images, crf_log_probs(cosine), pool=pool).argmax(1)
            raw_metrics.update(raw, labels)
            crf_metrics.update(crf, labels)
            with precision.autocast():
                tokens = backbone_tokens(backbone, images)
            _, correct, counted = labelled_cross_entropy(segment.linear(segment.head_ema(tokens.float())), labels,
                                                         cfg.n_classes)
            probe += torch.stack([correct, counted]).float()
            for i in range(min(len(images), wanted_pictures - len(kept_crf))):
                index = int(batch["ind"][i])
                pictures = prediction_pictures(images[i], labels[i], raw[i], crf[i], palette)
                save_pictures(ctx.paths.results, index, pictures)
                kept_crf.append((index, crf[i].to(torch.uint8).cpu()))  # at most 171 clusters (coco171)
            bar.set_postfix(crf_mIoU=f"{crf_metrics.compute()['mIoU']:.1f}")

    crf_result = crf_metrics.compute()  # the final Hungarian matching, once
    results = {
        "dataset": cfg.dataset, "head": cfg.head, "backbone": cfg.arch, "checkpoint": str(cfg.ckpt),
        "crf": summary(crf_result),
        "no_crf": summary(raw_metrics.compute()),
        "linear_probe_pixel_accuracy_uses_labels": 100 * (probe[0] / probe[1].clamp(min=1)).item(),
    }
    for index, crf in kept_crf:
        save_pictures(ctx.paths.results, index, {"matched": colorize(crf_result["assignment"][crf.long()], palette)})
    save_text(json.dumps(results, indent=2), ctx.paths.metrics)
    print(f"[test {cfg.head.upper()}] {cfg.dataset}: without CRF mIoU {results['no_crf']['mIoU']:.1f} "
          f"pAcc {results['no_crf']['pAcc']:.1f}; linear probe (uses labels) pixel accuracy "
          f"{results['linear_probe_pixel_accuracy_uses_labels']:.1f}")
    print(f"[test {cfg.head.upper()}] metrics: {ctx.paths.metrics}; "
          f"pictures of {len(kept_crf)} images: {ctx.paths.results}")
    print(f"mIoU: {results['crf']['mIoU']:.1f} pAcc: {results['crf']['pAcc']:.1f}")
    return results
