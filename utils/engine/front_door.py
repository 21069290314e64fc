"""Step 2 — the front door: train the segmentation head with the concept-wise contrastive loss (docs/cause.md §4).

MLP and TR differ only in where grid sampling happens (`student_teacher_tokens`): the TR
head attends over the whole token grid, so it runs on all tokens and its outputs are
sampled afterwards; the MLP head is per-token, so it runs on the sampled tokens only.
"""
import torch

from modules.bank import ConceptBank
from modules.grid import grid_order, grid_sample_tokens
from modules.heads import build_segment
from modules.losses import contrastive_terms, probe_cross_entropy
from modules.quantize import quantize_index
from utils.engine.loop import Training, backbone_tokens, fit, make_backbone, progress, validation_loader
from utils.engine.optim import Precision, optimizer_step
from utils.engine.status import write_artifact_records
from utils.runtime.artifacts import load_modular
from utils.runtime.distributed import BatchGroup, all_reduce_sum, broadcast_parameters
from utils.runtime.io import save_torch
from utils.runtime.recipe import CAUSE_OPTIMISATION
from utils.runtime.steps import DATA, HEAD_MODEL, MLP_AT_224, MODEL, TRAINING, Step, Upstream, register


def student_teacher_tokens(segment, tokens, grid, random):
    """Sampled backbone tokens, student and teacher projections (same positions), and the probe's features."""
    dropout = random.dropout
    if segment.head_type == "tr":
        teacher = segment.head_ema(tokens, dropout)
        teacher_proj = segment.projection_head_ema(teacher)
        student_proj = segment.projection_head(segment.head(tokens, dropout))
        if grid:
            order = grid_order(random, tokens.shape[1])
            tokens, _ = grid_sample_tokens(tokens, order)
            student_proj, _ = grid_sample_tokens(student_proj, order)
            teacher_proj, _ = grid_sample_tokens(teacher_proj, order)
        return tokens, student_proj, teacher_proj, teacher
    probe_features = segment.head_ema(tokens, dropout)
    if grid:
        tokens, _ = grid_sample_tokens(tokens, grid_order(random, tokens.shape[1]))
    teacher_proj = segment.projection_head_ema(segment.head_ema(tokens, dropout))
    student_proj = segment.projection_head(segment.head(tokens, dropout))
    return tokens, student_proj, teacher_proj, probe_features


class FrontDoorTraining(Training):
    """One optimiser step of the front door: contrastive loss against the batch and the concept bank,
    plus the labelled linear probe on the teacher's features; then EMA and bank updates."""

    def __init__(self, backbone, segment, codebook, bank, optimizer, clip_norm, precision, group, n_classes, grid,
                 validation=None):
        super().__init__()
        self.backbone, self.segment, self.codebook, self.bank = backbone, segment, codebook, bank
        self.optimizer, self.clip_norm = optimizer, clip_norm
        self.precision, self.group = precision, group
        self.n_classes, self.grid = n_classes, grid
        self.trained = list(segment.student_parameters())  # the EMA teacher never receives gradients
        self.validation = validation
        self._bank_input = None

    def losses(self, batch, random):
        tokens = backbone_tokens(self.backbone, batch["img"], self.precision)
        with self.precision.autocast():
            sampled, student_proj, teacher_proj, probe_features = student_teacher_tokens(
                self.segment, tokens, self.grid, random)
            index = quantize_index(sampled, self.codebook)
            # The contrastive candidates are the teacher tokens of the whole global batch.
            candidates, candidate_index = self.group.gather(teacher_proj.detach()), self.group.gather(index)
            front, terms = contrastive_terms(student_proj, index, candidates, candidate_index, self.codebook,
                                             self.bank, random.share.offset)
            probe, correct, counted = probe_cross_entropy(self.segment.linear(probe_features), batch["label"],
                                                          self.n_classes)
        # This process's parts of the global batch's means: their denominators count the whole batch.
        totals = self.group.sum(torch.stack([terms, counted]).float())
        front, probe = front / totals[0].clamp_min(1), probe / totals[1].clamp_min(1)
        self._bank_input = (candidate_index, candidates)
        return {"loss": front + probe, "contrastive": front, "probe_cross_entropy": probe,
                "correct": correct, "counted": counted}

    def update(self, losses, random):
        total_norm = optimizer_step(losses["loss"], [self.optimizer], self.precision, self.group, self.trained,
                                    (self.trained, self.clip_norm))
        # The official EMA initialisation makes each teacher parameter share storage with its student, so
        # the first optimiser step moves the teacher too: after that step's EMA it equals the student.
        self.segment.update_ema(momentum=0.0 if self.steps_done == 0 else 0.99)
        # The bank stores the teacher projections of the whole global batch, the same on every process.
        index, values = self._bank_input
        self.bank.update(index.flatten(), values.flatten(0, 1).float(), random.permutation(index.numel()))
        self.steps_done += 1
        return {"grad_norm_before_clip": total_norm}

    def parts(self):
        return {"segment": self.segment, "optimizer": self.optimizer, "scaler": self.precision.scaler}

    def process_state(self):
        return self.bank.state_dict()

    def load_process_state(self, state):
        self.bank.load_state_dict(state)


@torch.no_grad()
def probe_accuracy(ctx, backbone, segment, loader, precision, epoch):
    """Pixel accuracy (%) of the labelled linear probe on val (a diagnostic, not part of the method)."""
    totals = torch.zeros(2, device=ctx.device)
    for _, _, batch in progress(ctx, loader, "[val] linear probe"):
        with precision.autocast():
            features = segment.head_ema(backbone(batch["img"]))
            _, correct, counted = probe_cross_entropy(segment.linear(features), batch["label"], ctx.cfg.n_classes)
        totals += torch.stack([correct, counted]).float()
    all_reduce_sum(totals)
    return {"probe_accuracy_uses_labels": 100 * (totals[0] / totals[1].clamp(min=1)).item()}


def work(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    backbone = make_backbone(cfg, ctx.device)
    codebook = load_modular(ctx.upstream["modular"]["file"], cfg.num_codebook, cfg.dim).to(ctx.device)
    segment = build_segment(cfg.head, cfg.dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes, cfg.num_queries,
                            codebook, ctx.device)
    broadcast_parameters(segment)  # the EMA heads, already copies of the students, come along
    optimisation = CAUSE_OPTIMISATION[cfg.dataset]
    optimizer = torch.optim.Adam(segment.student_parameters(), lr=ctx.recipe.lr,
                                 weight_decay=optimisation.weight_decay)
    precision = Precision(cfg.precision, ctx.device)
    bank = ConceptBank(cfg.num_codebook, cfg.projection_dim, device=ctx.device, compact=ctx.device.type == "cpu")
    validation = validation_loader(ctx, cfg.test_resolution)
    training = FrontDoorTraining(
        backbone, segment, codebook, bank, optimizer, optimisation.front_door_clip[cfg.head], precision,
        BatchGroup(ctx.recipe.shared_batch), cfg.n_classes, cfg.grid,
        validation=lambda epoch: probe_accuracy(ctx, backbone, segment, validation, precision, epoch))

    def save(ctx, epochs_done):
        save_torch(segment.state_dict(), ctx.paths.segment)
        write_artifact_records(ctx, [ctx.paths.segment], epochs_done)

    fit(ctx, training, cfg.train_resolution, save)
    return str(ctx.paths.segment)


register(Step(
    name="front_door", engine=__name__, script="train_front_door_{head}.py",
    options=(*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", "grid", "accept_partial"),
    outputs=lambda paths: [paths.segment], upstream=lambda cfg, paths: {"modular": Upstream(paths.modular, "mediator")},
    data=("train", "val"), head="script", epochs=2, neutral=("test_resolution",), trains_at=MLP_AT_224, paper_gpus=4,
    pipeline="cause", description="the segmentation head (docs/cause.md §4)"))
