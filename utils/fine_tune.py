"""Step 3 — fine-tuning: fit the cluster probe on the head's features by modularity (SPEC §5).

Leak-free by default: the official code reloads the segment module without freezing
`head_ema`, so the labelled probe's cross-entropy trains the very features the
unsupervised prediction uses. Here `head_ema` stays frozen and only the probes learn;
`--label_leak` restores the official behaviour for comparison with the paper.
"""
import torch

from modules.grid import grid_sample_tokens
from modules.losses import modularity_loss
from modules.metrics import MatchedMetrics
from modules.probe import ClusterModule
from utils.artifacts import load_modular, load_state_strict, require
from utils.distributed import all_reduce_sum, broadcast_parameters
from utils.engine import (Logger, Precision, ResumeState, backbone_tokens, batches, check_data, check_finite,
                          labelled_cross_entropy, loads, make_backbone, optimizer_step, run_step, seed_everything,
                          train_loader, val_loader)
from utils.evaluate import dense_features
from utils.front_door import build_segment
from utils.io import save_torch


def run(cfg):
    return run_step(cfg, train, is_complete=is_complete, preflight=preflight)


def preflight(cfg, paths):
    check_data(cfg, ["train", "val"])
    require(paths.modular, "train_mediator.py")
    require(paths.segment, f"train_front_door_{cfg.head}.py")


def is_complete(cfg, paths):
    return not paths.resume_state("fine_tune").is_file() and paths.cluster.is_file() and loads(paths.cluster)


def set_trainable(segment, label_leak):
    """Which segment parameters learn in step 3: only the linear probe, or (official) head_ema too."""
    for name, parameter in segment.named_parameters():
        parameter.requires_grad = name.startswith("linear.") or (label_leak and name.startswith("head_ema."))
    return [p for p in segment.parameters() if p.requires_grad]


def fine_tune_losses(segment, cluster, tokens, labels, n_classes, grid):
    """(modularity loss of the cluster probe, probe cross-entropy, probe correct, probe counted)."""
    features = segment.head_ema(tokens, dropout=True)
    clustered = grid_sample_tokens(features)[0] if grid else features
    loss_modularity = modularity_loss(cluster.cluster_probe, clustered)
    loss_probe, correct, counted = labelled_cross_entropy(segment.linear(features), labels, n_classes)
    return loss_modularity, loss_probe, correct, counted


def train(ctx):
    cfg = ctx.cfg
    seed_everything(cfg.seed, ctx.dist.rank)
    if cfg.label_leak and ctx.dist.is_main:
        print("[fine-tune] --label_leak: head_ema learns from the labelled probe's loss, as in the official code. "
              "Predictions then use ground-truth labels: only for comparing with the paper's numbers.")
    backbone = make_backbone(ctx)
    codebook = load_modular(ctx.paths.modular, cfg.num_codebook, cfg.dim)
    segment = build_segment(cfg, codebook, ctx.device)
    load_state_strict(segment, ctx.paths.segment, "segment module", f"train_front_door_{cfg.head}.py")
    cluster = ClusterModule(cfg.num_codebook, cfg.dim, cfg.reduced_dim, cfg.n_classes).to(ctx.device)
    cluster.codebook.copy_(codebook)
    broadcast_parameters(cluster)
    segment_trained = set_trainable(segment, cfg.label_leak)
    info = ctx.dataset_info
    lr = cfg.lr * ctx.dist.world_size
    segment_optimizer = torch.optim.Adam(segment_trained, lr=lr, weight_decay=info.weight_decay)
    cluster_optimizer = torch.optim.Adam([cluster.cluster_probe], lr=lr)
    optimizers = [segment_optimizer, cluster_optimizer]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
    clip_norm = info.fine_tune_clip[cfg.head] if info.fine_tune_clip else None
    clip = (segment_trained, clip_norm) if clip_norm else None
    precision = Precision(cfg.precision, ctx.device)
    loader = train_loader(ctx, cfg.train_resolution)
    validation = val_loader(ctx, cfg.test_resolution)
    logger = Logger(ctx)
    resume = ResumeState(ctx)

    state = resume.load()
    if state is not None:
        segment.load_state_dict(state["segment"])
        cluster.load_state_dict(state["cluster"])
        for holder, saved in zip(optimizers + schedulers, state["optimizers"] + state["schedulers"], strict=True):
            holder.load_state_dict(saved)
        precision.scaler.load_state_dict(state["scaler"])

    trained = segment_trained + [cluster.cluster_probe]
    for epoch in range(resume.first_epoch, cfg.epochs):
        segment.train()
        desc = f"[fine-tune {cfg.head.upper()}] epoch {epoch + 1}/{cfg.epochs}"
        for index, bar, batch in batches(ctx, loader, epoch, desc):
            with precision.autocast():
                tokens = backbone_tokens(backbone, batch["img"])
                loss_modularity, loss_probe, correct, counted = fine_tune_losses(
                    segment, cluster, tokens, batch["label"], cfg.n_classes, cfg.grid)
                loss = loss_modularity + loss_probe
            value = check_finite(loss, ctx, epoch, index)
            optimizer_step(loss, optimizers, precision, trained, clip)
            accuracy = (correct / counted.clamp(min=1)).item()
            bar.set_postfix(loss=f"{value:.3f}", modularity=f"{-loss_modularity.item():.4f}",
                            probe_acc=f"{100 * accuracy:.1f}%")
            logger.scalars({"fine_tune/loss": value, "fine_tune/modularity": -loss_modularity.item(),
                            "fine_tune/probe_cross_entropy": loss_probe.item(), "fine_tune/probe_accuracy": accuracy})
        miou = cluster_miou(ctx, backbone, segment, cluster, validation, precision, epoch)
        logger.scalars({"fine_tune/val_cluster_mIoU_no_crf": miou}, step=epoch)
        if ctx.dist.is_main:
            print(f"[fine-tune {cfg.head.upper()}] epoch {epoch + 1}: cluster mIoU on val without CRF {miou:.1f}")
        for scheduler in schedulers:
            scheduler.step()
        resume.save(epoch, segment=segment.state_dict(), cluster=cluster.state_dict(),
                    optimizers=[o.state_dict() for o in optimizers], schedulers=[s.state_dict() for s in schedulers],
                    scaler=precision.scaler.state_dict())
        save_segment_and_cluster(ctx, segment, cluster)
    if resume.nothing_left():
        save_segment_and_cluster(ctx, segment, cluster)
    resume.finish()
    logger.close()
    return str(ctx.paths.cluster)


def save_segment_and_cluster(ctx, segment, cluster):
    if ctx.dist.is_main:
        save_torch(segment.state_dict(), ctx.paths.segment)
        save_torch(cluster.state_dict(), ctx.paths.cluster)


@torch.no_grad()
def cluster_miou(ctx, backbone, segment, cluster, loader, precision, epoch):
    """Unsupervised mIoU on val (nearest centroid, Hungarian-matched, no CRF)."""
    segment.eval()
    metrics = MatchedMetrics(ctx.cfg.n_classes, ctx.device)
    for _, _, batch in batches(ctx, loader, epoch, "[val] cluster mIoU"):
        features = dense_features(backbone, segment, batch["img"], batch["label"].shape[-2:], precision, flip=False)
        metrics.update(cluster.predict(features), batch["label"])
    all_reduce_sum(metrics.histogram)
    return metrics.compute()["mIoU"]
