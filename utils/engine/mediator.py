"""Step 1 — the mediator: learn the concept clusterbook by maximising modularity (docs/cause.md §3)."""
import numpy as np
import torch

from modules.grid import grid_order, grid_sample_tokens
from modules.losses import modularity_per_image
from utils.engine.loop import Training, backbone_tokens, fit, make_backbone
from utils.engine.optim import Precision, optimizer_step
from utils.engine.status import write_artifact_records
from utils.runtime.distributed import BatchGroup, broadcast_parameters
from utils.runtime.io import save_numpy
from utils.runtime.steps import DATA, MODEL, TRAINING, Step, register


class MediatorTraining(Training):
    """One optimiser step of the mediator: the modularity of the clusterbook on the batch's tokens."""

    def __init__(self, backbone, codebook, optimizer, scheduler, precision, group, grid):
        super().__init__()
        self.backbone, self.codebook = backbone, codebook
        self.optimizer, self.schedulers = optimizer, [scheduler]
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
        self.steps_done += 1

    def parts(self):
        # As the official code: the scheduler decays 0.2 per epoch (one epoch by default, so it never acts).
        return {"codebook": _TensorState(self.codebook), "optimizer": self.optimizer,
                "scheduler": self.schedulers[0], "scaler": self.precision.scaler}


class _TensorState:
    """A lone parameter as a resume state's part."""

    def __init__(self, tensor):
        self.tensor = tensor

    def state_dict(self):
        return self.tensor.detach().cpu()

    def load_state_dict(self, state):
        self.tensor.data.copy_(state)


def new_clusterbook(num_codebook, dim, device):
    """docs/cause.md §3: 2048 prototypes drawn from uniform(-1/2048, 1/2048)."""
    return torch.empty(num_codebook, dim, device=device).uniform_(-1 / num_codebook, 1 / num_codebook)


def work(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    backbone = make_backbone(cfg, ctx.device)
    codebook = torch.nn.Parameter(new_clusterbook(cfg.num_codebook, cfg.dim, ctx.device))
    broadcast_parameters(torch.nn.ParameterList([codebook]))
    optimizer = torch.optim.Adam([codebook], lr=ctx.recipe.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    training = MediatorTraining(backbone, codebook, optimizer, scheduler, Precision(cfg.precision, ctx.device),
                                BatchGroup(ctx.recipe.shared_batch), cfg.grid)

    def save(ctx, epochs_done):
        save_numpy(codebook.detach().float().cpu().numpy().astype(np.float32), ctx.paths.modular)
        write_artifact_records(ctx, [ctx.paths.modular], epochs_done)

    fit(ctx, training, cfg.train_resolution, save)
    if ctx.dist.is_main:
        print(f"[mediator] clusterbook saved to {ctx.paths.modular}")
    return str(ctx.paths.modular)


register(Step(
    name="mediator", engine=__name__, script="train_mediator.py", options=(*DATA, *MODEL, *TRAINING, "epochs", "grid"),
    outputs=lambda paths: [paths.modular], data=("train",), epochs=1, paper_gpus=4, pipeline="cause",
    description="the concept clusterbook (docs/cause.md §3)"))
