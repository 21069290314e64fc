"""Step 2 — the front door: train the segmentation head with the concept-wise contrastive loss (SPEC §4).

MLP and TR differ only in where grid sampling happens (`student_teacher_tokens`): the TR
head attends over the whole token grid, so it runs on all tokens and its outputs are
sampled afterwards; the MLP head is per-token, so it runs on the sampled tokens only.
"""
import torch

from modules.bank import ConceptBank
from modules.grid import grid_sample_tokens
from modules.heads import SegmentModule
from modules.losses import contrastive_loss
from modules.quantize import quantize_index
from utils.artifacts import load_modular, require
from utils.distributed import all_reduce_sum, broadcast_parameters
from utils.engine import (Logger, Precision, ResumeState, backbone_tokens, batches, check_data, check_finite,
                          labelled_cross_entropy, loads, make_backbone, optimizer_step, run_step, seed_everything,
                          train_loader, val_loader)
from utils.io import save_torch


def run(cfg):
    return run_step(cfg, train, is_complete=is_complete, preflight=preflight)


def preflight(cfg, paths):
    check_data(cfg, ["train", "val"])
    require(paths.modular, "train_mediator.py")


def is_complete(cfg, paths):
    return not paths.resume_state("front_door").is_file() and paths.segment.is_file() and loads(paths.segment)


def build_segment(cfg, codebook, device):
    segment = SegmentModule(cfg.head, cfg.dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes,
                            cfg.num_queries if cfg.head == "tr" else None).to(device)
    segment.set_codebook(codebook.to(device))
    return segment


def student_teacher_tokens(segment, tokens, grid):
    """Sampled backbone tokens, student and teacher projections (same positions), and the probe's features."""
    if segment.head_type == "tr":
        teacher = segment.head_ema(tokens, dropout=True)
        teacher_proj = segment.projection_head_ema(teacher)
        student_proj = segment.projection_head(segment.head(tokens, dropout=True))
        if grid:
            tokens, order = grid_sample_tokens(tokens)
            student_proj, _ = grid_sample_tokens(student_proj, order)
            teacher_proj, _ = grid_sample_tokens(teacher_proj, order)
        return tokens, student_proj, teacher_proj, teacher
    probe_features = segment.head_ema(tokens, dropout=True)
    if grid:
        tokens, _ = grid_sample_tokens(tokens)
    teacher_proj = segment.projection_head_ema(segment.head_ema(tokens, dropout=True))
    student_proj = segment.projection_head(segment.head(tokens, dropout=True))
    return tokens, student_proj, teacher_proj, probe_features


def train(ctx):
    cfg = ctx.cfg
    seed_everything(cfg.seed, ctx.dist.rank)
    backbone = make_backbone(ctx)
    codebook = load_modular(ctx.paths.modular, cfg.num_codebook, cfg.dim).to(ctx.device)
    segment = build_segment(cfg, codebook, ctx.device)
    broadcast_parameters(segment)  # the EMA heads, already copies of the students, come along
    trained = list(segment.student_parameters())  # the EMA teacher never receives gradients
    info = ctx.dataset_info
    optimizer = torch.optim.Adam(trained, lr=cfg.lr * ctx.dist.world_size, weight_decay=info.weight_decay)
    clip = (trained, info.front_door_clip[cfg.head])
    precision = Precision(cfg.precision, ctx.device)
    bank = ConceptBank(cfg.num_codebook, cfg.projection_dim, device=ctx.device)
    loader = train_loader(ctx, cfg.train_resolution)
    validation = val_loader(ctx, cfg.test_resolution)
    logger = Logger(ctx)
    resume = ResumeState(ctx)

    state = resume.load()
    if state is not None:
        segment.load_state_dict(state["segment"])
        optimizer.load_state_dict(state["optimizer"])
        precision.scaler.load_state_dict(state["scaler"])
        bank.load_state_dict(state["bank"][ctx.dist.rank])

    for epoch in range(resume.first_epoch, cfg.epochs):
        segment.train()
        desc = f"[front door {cfg.head.upper()}] epoch {epoch + 1}/{cfg.epochs}"
        for index, bar, batch in batches(ctx, loader, epoch, desc):
            with precision.autocast():
                tokens = backbone_tokens(backbone, batch["img"])
                sampled, student_proj, teacher_proj, probe_features = student_teacher_tokens(segment, tokens, cfg.grid)
                prototype = quantize_index(sampled, codebook)
                loss_front = contrastive_loss(sampled, student_proj, teacher_proj, codebook, bank, index=prototype)
                loss_probe, correct, counted = labelled_cross_entropy(segment.linear(probe_features), batch["label"],
                                                                      cfg.n_classes)
                loss = loss_front + loss_probe
            value = check_finite(loss, ctx, epoch, index)
            optimizer_step(loss, [optimizer], precision, trained, clip)
            segment.update_ema()
            bank.update(prototype.flatten(), teacher_proj.detach().flatten(0, 1).float())
            accuracy = (correct / counted.clamp(min=1)).item()
            bar.set_postfix(loss=f"{value:.3f}", contrastive=f"{loss_front.item():.3f}",
                            probe_acc=f"{100 * accuracy:.1f}%")
            logger.scalars({"front_door/loss": value, "front_door/contrastive": loss_front.item(),
                            "front_door/probe_cross_entropy": loss_probe.item(), "front_door/probe_accuracy": accuracy})
        accuracy = probe_accuracy(ctx, backbone, segment, validation, precision, epoch)
        logger.scalars({"front_door/val_probe_accuracy": accuracy}, step=epoch)
        if ctx.dist.is_main:
            print(f"[front door {cfg.head.upper()}] epoch {epoch + 1}: linear probe accuracy on val "
                  f"(uses labels; diagnostic only) {100 * accuracy:.1f}%")
        resume.save(epoch, segment=segment.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=precision.scaler.state_dict(), bank=_gather_banks(ctx, bank))
        save_segment(ctx, segment)
    if resume.nothing_left():
        save_segment(ctx, segment)
    resume.finish()
    logger.close()
    return str(ctx.paths.segment)


def save_segment(ctx, segment):
    if ctx.dist.is_main:
        save_torch(segment.state_dict(), ctx.paths.segment)


def _gather_banks(ctx, bank):
    """Each process keeps its own concept bank (as the official code); the resume state keeps them all."""
    state = {k: v.cpu() for k, v in bank.state_dict().items()}
    if ctx.dist.world_size == 1:
        return [state]
    gathered = [None] * ctx.dist.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


@torch.no_grad()
def probe_accuracy(ctx, backbone, segment, loader, precision, epoch):
    """Pixel accuracy of the labelled linear probe on val (a diagnostic, not part of the method)."""
    segment.eval()
    totals = torch.zeros(2, device=ctx.device)
    for _, _, batch in batches(ctx, loader, epoch, "[val] linear probe"):
        with precision.autocast():
            features = segment.head_ema(backbone_tokens(backbone, batch["img"]))
            _, correct, counted = labelled_cross_entropy(segment.linear(features), batch["label"], ctx.cfg.n_classes)
        totals += torch.stack([correct, counted]).float()
    all_reduce_sum(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()
