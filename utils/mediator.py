"""Step 1 — the mediator: learn the concept clusterbook by maximising modularity (SPEC §3)."""
import numpy as np
import torch

from modules.grid import grid_sample_tokens
from modules.losses import modularity_loss
from utils.artifacts import ArtifactError, load_modular
from utils.distributed import broadcast_parameters
from utils.engine import (Logger, Precision, ResumeState, backbone_tokens, batches, check_data, check_finite,
                          make_backbone, optimizer_step, run_step, seed_everything, train_loader)
from utils.io import save_numpy


def run(cfg):
    return run_step(cfg, train, is_complete=is_complete, preflight=lambda c, p: check_data(c, ["train"]))


def is_complete(cfg, paths):
    if paths.resume_state("mediator").is_file():
        return False
    try:
        load_modular(paths.modular, cfg.num_codebook, cfg.dim)
        return True
    except (FileNotFoundError, ArtifactError):
        return False


def save_clusterbook(ctx, codebook):
    if ctx.dist.is_main:
        save_numpy(codebook.detach().float().cpu().numpy().astype(np.float32), ctx.paths.modular)


def new_clusterbook(num_codebook, dim, device):
    """SPEC §3: 2048 prototypes drawn from uniform(-1/2048, 1/2048)."""
    return torch.empty(num_codebook, dim, device=device).uniform_(-1 / num_codebook, 1 / num_codebook)


def train(ctx):
    cfg = ctx.cfg
    seed_everything(cfg.seed, ctx.dist.rank)
    backbone = make_backbone(ctx)
    codebook = torch.nn.Parameter(new_clusterbook(cfg.num_codebook, cfg.dim, ctx.device))
    broadcast_parameters(torch.nn.ParameterList([codebook]))
    optimizer = torch.optim.Adam([codebook], lr=cfg.lr * ctx.dist.world_size)
    # As the official code: decay 0.2 per epoch (one epoch by default, so it never acts).
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    precision = Precision(cfg.precision, ctx.device)
    loader = train_loader(ctx, cfg.train_resolution)
    logger = Logger(ctx)
    resume = ResumeState(ctx)

    state = resume.load()
    if state is not None:
        codebook.data.copy_(state["codebook"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])

    for epoch in range(resume.first_epoch, cfg.epochs):
        for index, bar, batch in batches(ctx, loader, epoch, f"[mediator] epoch {epoch + 1}/{cfg.epochs}"):
            with precision.autocast():
                tokens = backbone_tokens(backbone, batch["img"])
            if cfg.grid:
                tokens, _ = grid_sample_tokens(tokens)
            loss = modularity_loss(codebook, tokens)
            value = check_finite(loss, ctx, epoch, index)
            optimizer_step(loss, [optimizer], precision, [codebook])
            bar.set_postfix(modularity=f"{-value:.4f}")
            logger.scalars({"mediator/modularity": -value})
        scheduler.step()
        resume.save(epoch, codebook=codebook.detach().cpu(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=precision.scaler.state_dict())
        save_clusterbook(ctx, codebook)
    if resume.nothing_left():
        save_clusterbook(ctx, codebook)
    resume.finish()
    logger.close()
    if ctx.dist.is_main:
        print(f"[mediator] clusterbook saved to {ctx.paths.modular}")
    return str(ctx.paths.modular)
