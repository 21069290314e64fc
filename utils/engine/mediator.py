"""Step 1 — the mediator: learn the concept clusterbook by maximising modularity (SPEC §3)."""
import numpy as np
import torch

from modules.grid import grid_order, grid_sample_tokens
from modules.losses import modularity_per_image
from utils.engine.loop import (Precision, StepSpec, backbone_tokens, fit, make_backbone, optimizer_step, run_step,
                               training_settings, write_artifact_records)
from utils.runtime.distributed import BatchGroup, broadcast_parameters
from utils.runtime.io import save_numpy


class MediatorTraining:
    """One optimiser step of the mediator: the modularity of the clusterbook on the batch's tokens."""

    def __init__(self, backbone, codebook, optimizer, scheduler, precision, group, grid):
        self.backbone, self.codebook = backbone, codebook
        self.optimizer, self.scheduler = optimizer, scheduler
        self.precision, self.group, self.grid = precision, group, grid

    def losses(self, batch, random):
        tokens = backbone_tokens(self.backbone, batch["img"], self.precision)
        if self.grid:
            tokens, _ = grid_sample_tokens(tokens, grid_order(random, tokens.shape[1]))
        # This process's part of −(mean over the global batch's images): processes add their parts.
        loss = -modularity_per_image(self.codebook, tokens).sum() / random.share.global_rows
        return {"loss": loss, "modularity": -loss}

    def update(self, losses, random):
        optimizer_step(losses["loss"], [self.optimizer], self.precision, self.group, [self.codebook])

    def end_epoch(self):
        # As the official code: decay 0.2 per epoch (one epoch by default, so it never acts).
        self.scheduler.step()

    def validate(self, epoch):
        return {}

    def state_dict(self):
        return {"codebook": self.codebook.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict()}

    def load_state_dict(self, state):
        self.codebook.data.copy_(state["codebook"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])

    def process_state(self):
        return None


def new_clusterbook(num_codebook, dim, device):
    """SPEC §3: 2048 prototypes drawn from uniform(-1/2048, 1/2048)."""
    return torch.empty(num_codebook, dim, device=device).uniform_(-1 / num_codebook, 1 / num_codebook)


def train(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    backbone = make_backbone(ctx)
    codebook = torch.nn.Parameter(new_clusterbook(cfg.num_codebook, cfg.dim, ctx.device))
    broadcast_parameters(torch.nn.ParameterList([codebook]))
    optimizer = torch.optim.Adam([codebook], lr=ctx.recipe.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    precision = Precision(cfg.precision, ctx.device)
    training = MediatorTraining(backbone, codebook, optimizer, scheduler, precision,
                                BatchGroup(ctx.recipe.shared_batch), cfg.grid)

    def save(ctx, epochs_done):
        save_numpy(codebook.detach().float().cpu().numpy().astype(np.float32), ctx.paths.modular)
        write_artifact_records(ctx, [ctx.paths.modular], epochs_done)

    fit(ctx, training, cfg.train_resolution, save)
    if ctx.dist.is_main:
        print(f"[mediator] clusterbook saved to {ctx.paths.modular}")
    return str(ctx.paths.modular)


SPEC = StepSpec(
    outputs=lambda paths: [paths.modular],
    upstream=lambda cfg, paths: {},
    data=("train",),
    settings=lambda cfg, recipe, precision: training_settings(cfg, recipe, precision),
    worker=train,
)


def run(cfg):
    return run_step(cfg, SPEC)
