"""Step 3 — fine-tuning: fit the cluster probe on the head's features by modularity (docs/cause.md §5).

Leak-free by default: the official code reloads the segment module without freezing
`head_ema`, so the labelled probe's cross-entropy trains the very features the
unsupervised prediction uses. Here `head_ema` stays frozen and only the probes learn;
`--label_leak` restores the official behaviour for comparison with the paper.

Fine-tuning always starts from the front door's segment module and writes the one it ends with
to a file of its own, so a rerun (--restart, with or without --label_leak) starts from the same
weights as the first run.
"""
import torch

from modules.features import head_features, upsample
from modules.grid import grid_order, grid_sample_tokens
from modules.heads import build_segment
from modules.losses import modularity_per_image, probe_cross_entropy
from modules.metrics import MatchedMetrics
from modules.probe import ClusterModule
from utils.engine.loop import Training, backbone_tokens, fit, make_backbone, progress, validation_loader
from utils.engine.optim import Precision, optimizer_step
from utils.engine.status import write_artifact_records
from utils.runtime.artifacts import load_modular, load_state_strict
from utils.runtime.distributed import BatchGroup, all_reduce_sum, broadcast_parameters
from utils.runtime.io import save_torch
from utils.runtime.options import Option
from utils.runtime.recipe import CAUSE_OPTIMISATION
from utils.runtime.steps import DATA, HEAD_MODEL, MLP_AT_224, MODEL, TRAINING, Step, Upstream, register


def set_trainable(segment, label_leak):
    """Which segment parameters learn in step 3: only the linear probe, or (official) head_ema too."""
    for name, parameter in segment.named_parameters():
        parameter.requires_grad = name.startswith("linear.") or (label_leak and name.startswith("head_ema."))
    return [p for p in segment.parameters() if p.requires_grad]


class FineTuneTraining(Training):
    """One optimiser step of fine-tuning: the cluster probe's modularity on head_ema's features (with
    dropout, as the official code), plus the labelled linear probe's cross-entropy."""

    def __init__(self, backbone, segment, cluster, segment_trained, optimizers, schedulers, clip_norm, precision,
                 group, n_classes, grid, validation=None):
        super().__init__()
        self.backbone, self.segment, self.cluster = backbone, segment, cluster
        self.segment_trained = segment_trained
        self.trained = segment_trained + [cluster.cluster_probe]
        self.optimizers, self.schedulers = optimizers, schedulers
        self.clip = (segment_trained, clip_norm) if clip_norm else None
        self.precision, self.group = precision, group
        self.n_classes, self.grid = n_classes, grid
        self.validation = validation

    def losses(self, batch, random):
        tokens = backbone_tokens(self.backbone, batch["img"], self.precision)
        with self.precision.autocast():
            features = self.segment.head_ema(tokens, random.dropout)
            clustered = grid_sample_tokens(features, grid_order(random, features.shape[1]))[0] if self.grid \
                else features
            modularity = -modularity_per_image(self.cluster.cluster_probe, clustered).sum() / random.share.global_rows
            probe, correct, counted = probe_cross_entropy(self.segment.linear(features), batch["label"],
                                                          self.n_classes)
        # A batch whose labels are all ignored adds nothing to the probe term (the official mean is NaN there).
        probe = probe / self.group.sum(counted.float().clone()).clamp_min(1)
        return {"loss": modularity + probe, "modularity": -modularity, "probe_cross_entropy": probe,
                "correct": correct, "counted": counted}

    def update(self, losses, random):
        total_norm = optimizer_step(losses["loss"], self.optimizers, self.precision, self.group, self.trained,
                                    self.clip)
        self.steps_done += 1
        return {"grad_norm_before_clip": total_norm}

    def parts(self):
        return {"segment": self.segment, "cluster": self.cluster, "scaler": self.precision.scaler,
                **{f"optimizer{i}": o for i, o in enumerate(self.optimizers)},
                **{f"scheduler{i}": s for i, s in enumerate(self.schedulers)}}


@torch.no_grad()
def cluster_miou(ctx, backbone, segment, cluster, loader, precision):
    """Unsupervised mIoU on val (nearest centroid, Hungarian-matched, no CRF)."""
    metrics = MatchedMetrics(ctx.cfg.n_classes, ctx.device)
    for _, _, batch in progress(ctx, loader, "[val] cluster mIoU"):
        features, _ = head_features(backbone, segment, batch["img"], autocast=precision.autocast)
        metrics.update(cluster.predict(upsample(features, batch["label"].shape[-2:])), batch["label"])
    all_reduce_sum(metrics.histogram)
    return {"cluster_mIoU_no_crf": metrics.compute()["mIoU"]}


def work(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    if cfg.label_leak and ctx.dist.is_main:
        print("[fine-tune] --label_leak: head_ema learns from the labelled probe's loss, as in the official code. "
              "Predictions then use ground-truth labels: only for comparing with the paper's numbers.")
    backbone = make_backbone(cfg, ctx.device)
    codebook = load_modular(ctx.upstream["modular"]["file"], cfg.num_codebook, cfg.dim)
    segment = build_segment(cfg.head, cfg.dim, cfg.reduced_dim, cfg.projection_dim, cfg.n_classes, cfg.num_queries,
                            codebook, ctx.device)
    load_state_strict(segment, ctx.upstream["segment"]["file"], "segment module",
                      ctx.upstream["segment"]["produced_by"])
    cluster = ClusterModule(cfg.num_codebook, cfg.dim, cfg.reduced_dim, cfg.n_classes).to(ctx.device)
    cluster.codebook.copy_(codebook)
    broadcast_parameters(cluster)
    segment_trained = set_trainable(segment, cfg.label_leak)
    optimisation = CAUSE_OPTIMISATION[cfg.dataset]
    segment_optimizer = torch.optim.Adam(segment_trained, lr=ctx.recipe.lr, weight_decay=optimisation.weight_decay)
    cluster_optimizer = torch.optim.Adam([cluster.cluster_probe], lr=ctx.recipe.lr)
    optimizers = [segment_optimizer, cluster_optimizer]  # the official order: the segment's steps first
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
    precision = Precision(cfg.precision, ctx.device)
    validation = validation_loader(ctx, cfg.test_resolution)
    training = FineTuneTraining(
        backbone, segment, cluster, segment_trained, optimizers, schedulers,
        optimisation.fine_tune_clip[cfg.head] if optimisation.fine_tune_clip else None, precision,
        BatchGroup(ctx.recipe.shared_batch), cfg.n_classes, cfg.grid,
        validation=lambda epoch: cluster_miou(ctx, backbone, segment, cluster, validation, precision))

    def save(ctx, epochs_done):
        save_torch(segment.state_dict(), ctx.paths.fine_tuned_segment)
        save_torch(cluster.state_dict(), ctx.paths.cluster)
        write_artifact_records(ctx, [ctx.paths.cluster, ctx.paths.fine_tuned_segment], epochs_done)

    fit(ctx, training, cfg.train_resolution, save)
    return str(ctx.paths.cluster)


LABEL_LEAK = Option("label_leak", "training", dict(
    action="store_true",
    help="let the labelled probe's loss train head_ema as the official code does (uses ground-truth labels; only "
         "for comparing with the paper)"))

register(Step(
    name="fine_tune", engine=__name__, script="fine_tuning_{head}.py",
    options=(*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", "grid", LABEL_LEAK, "accept_partial"),
    outputs=lambda paths: [paths.cluster, paths.fine_tuned_segment],
    upstream=lambda cfg, paths: {"modular": Upstream(paths.modular, "mediator"),
                                 "segment": Upstream(paths.segment, "front_door")},
    data=("train", "val"), head="script", epochs={"tr": 5, "mlp": 1}, neutral=("test_resolution",),
    trains_at=MLP_AT_224, paper_gpus=4, pipeline="cause", description="the cluster probe (docs/cause.md §5)"))
