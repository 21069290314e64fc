"""Step 5 — PriMaPs-EM (PRIMAPS.md): class prototypes fitted to principal mask proposals by stochastic EM.

--mode cause (default): the features are head_ema of the trained CAUSE segment module (--head tr|mlp)
on the backbone CAUSE was trained with, and the prototypes start from CAUSE's cluster probe.
--mode backbone: the features are the plain backbone's, and the prototypes start from an
initialisation of their own, a step run first by the same script (`primaps_init`: PCA of the patch
features, then cosine k-means), with its own artifact, record and resume state.

In both modes the pseudo masks come from the plain backbone as the official PriMaPs code builds it:
DINO's ViT-S with DINO's own 6 heads, whatever --dino_small_heads the CAUSE steps use (PRIMAPS.md §1).
They are computed before training, once per data set, backbone and mask settings (primaps_masks.py).
Training reads the uncropped train images (COCO-Stuff-27: PriMaPs' curated list).
"""
from dataclasses import replace

import torch
from torch import nn

from loader import build_dataset
from loader.pseudo_masks import WithMasks
from models import load_backbone
from modules.crf import crf_pool
from modules.features import backbone_map, head_map, upsample
from modules.losses import probe_cross_entropy
from modules.metrics import MatchedMetrics
from modules.primaps import (NO_MASK, PriMaPsModel, Prototypes, class_probabilities, focal_loss, kmeans_loss,
                             mask_majority_labels, pca_directions)
from modules.randomness import mixed_seed
from modules.views import AugmentedViews
from utils.engine import evaluate
from utils.engine.loop import (Precision, StepSpec, Upstream, fit, optimizer_step, progress, recipe_settings,
                               row_counts, run_step, training_data, validation_loader, write_artifact_records)
from utils.engine.primaps_masks import masks_name, prepare_masks
from utils.runtime.artifacts import load_state_strict
from utils.runtime.config import PRIMAPS_INIT
from utils.runtime.distributed import BatchGroup, all_reduce_sum, broadcast_parameters
from utils.runtime.io import save_torch

# The official PriMaPs code loads DINO's hub models: ViT-S with 6 heads (only DINO ViT-S depends on it).
PRIMAPS_HEADS = 6
FOCAL_GAMMA = 2.0
MOMENTUM_EVERY = 10  # θ_M follows θ_R after the batches that 10, 20, ... batches preceded (momentum_update_due)
MOMENTUM_MAX_DECAY = 0.98
PCA_SEED = 93  # with the run's seed, seeds the initial PCA's random projection


class Features:
    """Φ(x) [B, C, h, w] float32 without gradient: head_ema of a CAUSE segment module on its backbone,
    or (segment None) the backbone's own patch tokens; the backbone runs under the run's autocast."""

    def __init__(self, backbone, segment, precision):
        self.backbone, self.segment, self.precision = backbone, segment, precision

    @torch.no_grad()
    def __call__(self, images):
        if self.segment is None:
            return backbone_map(self.backbone, images, self.precision.autocast)
        return head_map(self.backbone, self.segment, images, self.precision.autocast)


def feature_dim(cfg):
    return cfg.reduced_dim if cfg.mode == "cause" else cfg.dim


def load_features(ctx, precision):
    """The features of `ctx`'s mode, and (cause mode) CAUSE's cluster probe [K, 90]; None in backbone mode."""
    cfg = ctx.cfg
    if cfg.mode == "cause":
        backbone, segment, cluster = evaluate.load_trained_modules(ctx, ctx.upstream["segment"]["file"])
        return Features(backbone, segment, precision), cluster.cluster_probe.detach()
    backbone = load_backbone(cfg.ckpt, cfg.arch, PRIMAPS_HEADS).to(ctx.device)
    return Features(backbone, None, precision), None


def training_set(cfg):
    """PriMaPs' training images: the uncropped train split (COCO-Stuff-27: its curated list)."""
    return build_dataset(cfg.dataset, cfg.data_dir, "train", cfg.train_resolution, curated_7=True)


def momentum_update_due(batches_before):
    """Whether θ_M follows θ_R after a batch's optimiser step, given the training batches run before that
    batch (across epochs): the official gate `global_step > 0 and global_step % 10 == 0`, whose
    Lightning 1.5 global_step counts the batches before the current one, so θ_M moves after the 11th,
    21st, ... batch (docs/primaps.md §2)."""
    return batches_before > 0 and batches_before % MOMENTUM_EVERY == 0


def all_pixels(random, labels):
    """The pixels of the whole global batch at the labels' size: the denominator of both PriMaPs
    cross-entropies, which count an ignored pixel as 0 (docs/primaps.md §2). Each process divides its
    part of the sum by it, so the parts add up to the global batch's loss."""
    return random.share.global_rows * labels.shape[-2] * labels.shape[-1]


def probe_loss(linear, features, labels, random, n_classes):
    """The labelled linear probe (a diagnostic) on detached features: (the cross-entropy of its logits
    upsampled to the labels, summed over the labelled pixels and divided by all_pixels, correct, counted)."""
    probe, correct, counted = probe_cross_entropy(linear(features), labels, n_classes)
    return probe / all_pixels(random, labels), correct, counted


class PriMaPsTraining:
    """One optimiser step of PriMaPs-EM (docs/primaps.md §2): the E-step labels each cached mask with
    θ_M's majority class on the (flipped) image, the M-step fits θ_R on the student view with the focal
    loss; the labelled linear probe on the image's features is a diagnostic. θ_M follows θ_R when
    `momentum_update_due`. `views` makes a step's views from its batch and draws (modules/views.py;
    default AugmentedViews: the random flip and student view)."""

    def __init__(self, features, model, lr, precision, group, n_classes, validation=None, keep_best=False,
                 views=None):
        self.features, self.model = features, model
        self.precision, self.group, self.n_classes = precision, group, n_classes
        self.views = AugmentedViews() if views is None else views
        self.trained = [*model.online.parameters(), *model.linear.parameters()]
        # One Adam where the official code has three (linear probe, cluster probe, θ_R; the cluster one
        # holds nothing that learns here): Adam is per parameter, so the numbers are the same.
        self.optimizer = torch.optim.Adam(self.trained, lr=lr)
        self.validation = validation
        self.keep_best = keep_best
        self.steps_done = 0  # training batches run, across epochs: θ_M's schedule counts them
        self.best = None  # with keep_best: {"mIoU", "epoch", "model"} of the best θ_M on val so far

    def e_step(self, teacher, masks, size):
        """θ_M's logits of the image features upsampled to `size`, and the E-step's labels: each mask's
        majority class of their argmax, NO_MASK outside every mask."""
        with torch.no_grad():
            logits = upsample(self.model.momentum(teacher), size)
            return logits, mask_majority_labels(logits.argmax(dim=1), masks.long())

    def losses(self, batch, random):
        views = self.views(batch, random)
        teacher = self.features(views.image)
        student = self.features(views.student)
        size = views.image.shape[-2:]
        _, targets = self.e_step(teacher, views.mask, size)
        logits = upsample(self.model.online(student), size)
        # π and the denominator are the whole global batch's: each process adds its part of one loss.
        pixels = all_pixels(random, targets)
        mean_probability = self.group.sum(class_probabilities(logits).sum(dim=1)) / pixels
        focal = focal_loss(logits, targets, FOCAL_GAMMA, mean_probability=mean_probability, pixels=pixels)
        probe, correct, counted = probe_loss(self.model.linear, teacher, views.label, random, self.n_classes)
        return {"loss": focal + probe, "focal": focal, "probe_cross_entropy": probe,
                "pseudo_labelled_fraction": (targets != NO_MASK).sum().float() / pixels,
                "correct": correct, "counted": counted}

    def update(self, losses, random):
        optimizer_step(losses["loss"], [self.optimizer], self.precision, self.group, self.trained)
        if momentum_update_due(self.steps_done):
            self.model.momentum.update(self.model.online)
        self.steps_done += 1

    def end_epoch(self):
        pass

    def validate(self, epoch):
        scores = self.validation() if self.validation is not None else {}
        score = scores.get("theta_m_mIoU_uses_labels")
        if self.keep_best and (self.best is None or score > self.best["mIoU"]):
            self.best = {"mIoU": score, "epoch": epoch + 1,
                         "model": {k: v.clone() for k, v in self.model.state_dict().items()}}
        return scores

    def kept_model(self):
        """The weights to save: the last ones, or the best on val with --keep_best_on_val."""
        return self.best["model"] if self.best is not None else self.model.state_dict()

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "steps_done": self.steps_done, "best": self.best}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.steps_done = state["steps_done"]
        self.best = state["best"]

    def process_state(self):
        return None


@torch.no_grad()
def validation_scores(ctx, features, model, loader):
    """θ_M's val mIoU (no CRF, no flip) and the linear probe's pixel accuracy: labelled diagnostics,
    and with --keep_best_on_val the score that picks the kept epoch."""
    cfg = ctx.cfg
    metrics = MatchedMetrics(cfg.n_classes, ctx.device)
    probe = torch.zeros(2, device=ctx.device)
    for _, _, batch in progress(ctx, loader, "[val] θ_M mIoU"):
        labels = batch["label"]
        found = features(batch["img"])
        metrics.update(upsample(model.momentum(found), labels.shape[-2:]).argmax(dim=1), labels)
        _, correct, counted = probe_cross_entropy(model.linear(found), labels, cfg.n_classes)
        probe += torch.stack([correct, counted]).float()
    all_reduce_sum(metrics.histogram)
    all_reduce_sum(probe)
    return {"theta_m_mIoU_uses_labels": metrics.compute()["mIoU"],
            "probe_accuracy_uses_labels": 100 * (probe[0] / probe[1].clamp(min=1)).item()}


def train(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    # Made before anything else draws from the generator: the linear probe's initialisation must not
    # depend on whether the masks were computed (their loader draws a seed) or found cached.
    model = PriMaPsModel(feature_dim(cfg), cfg.n_classes, MOMENTUM_MAX_DECAY)
    precision = Precision(cfg.precision, ctx.device)
    dataset = training_set(cfg)
    mask_files = ctx.paths.primaps_mask_files(masks_name(cfg), dataset.source.image_files)
    with crf_pool(cfg.crf_workers) as pool:  # before a model reaches a GPU (modules/crf.py)
        mask_backbone = load_backbone(cfg.ckpt, cfg.arch, PRIMAPS_HEADS).to(ctx.device)
        prepare_masks(ctx, mask_backbone, dataset, mask_files, pool, PRIMAPS_HEADS)
    if cfg.mode == "backbone":
        features, start = Features(mask_backbone, None, precision), load_initial(ctx)
    else:
        del mask_backbone
        features, start = load_features(ctx, precision)
    model.to(ctx.device)
    broadcast_parameters(model)  # the linear probe's random initialisation
    model.start_from(start)
    if cfg.keep_best_on_val and ctx.dist.is_main:
        print("[primaps] --keep_best_on_val: the kept epoch is the one whose θ_M scores best on the val labels, "
              "as the official code selects it: a choice made with labels")
    validation = validation_loader(ctx, cfg.test_resolution)
    training = PriMaPsTraining(
        features, model, ctx.recipe.lr, precision, BatchGroup(ctx.recipe.shared_batch), cfg.n_classes,
        validation=lambda: validation_scores(ctx, features, model, validation), keep_best=cfg.keep_best_on_val)

    def save(ctx, epochs_done):
        save_torch(training.kept_model(), ctx.paths.primaps)
        kept = (f"the epoch with the best θ_M val mIoU (selected with the val labels): epoch {training.best['epoch']}"
                if training.best is not None else "the last epoch")
        write_artifact_records(ctx, [ctx.paths.primaps], epochs_done,
                               {"kept": kept, "pseudo_masks": str(mask_files[0].parent)})

    fit(ctx, training, cfg.train_resolution, save, dataset=WithMasks(dataset, mask_files))
    if ctx.dist.is_main:
        print(f"[primaps] prototypes saved to {ctx.paths.primaps}")
    return str(ctx.paths.primaps)


def load_initial(ctx):
    """Backbone mode: the prototypes of the initialisation step, [K, C]."""
    cfg = ctx.cfg
    probe = Prototypes(cfg.dim, cfg.n_classes)
    load_state_strict(probe, ctx.paths.primaps_init, "PriMaPs initialisation", "train_primaps.py --mode backbone")
    return probe.weight_v.detach().reshape(cfg.n_classes, cfg.dim).to(ctx.device)


class KMeansTraining:
    """One optimiser step of the backbone mode's initialisation: hard cosine k-means of the patch
    features (docs/primaps.md §2 (b)); the probe's prototypes are its weight_v (g plays no part, as the
    official probe holds it at 1). The labelled linear probe `linear` learns beside it as in the EM
    stage, a diagnostic: the official loss is their sum, and neither gradient reaches the other."""

    def __init__(self, features, probe, linear, lr, precision, group, n_classes):
        self.features, self.probe, self.linear = features, probe, linear
        self.precision, self.group, self.n_classes = precision, group, n_classes
        self.trained = [probe.weight_v, *linear.parameters()]
        self.optimizer = torch.optim.Adam(self.trained, lr=lr)  # one Adam for the official two: see PriMaPsTraining

    def losses(self, batch, random):
        found = self.features(batch["img"])
        pixels = random.share.global_rows * found.shape[-2] * found.shape[-1]
        kmeans = kmeans_loss(self.probe.cosine(found), pixels)
        probe, correct, counted = probe_loss(self.linear, found, batch["label"], random, self.n_classes)
        # float64, as the official sum of the float32 probe loss and the float64 k-means loss.
        return {"loss": kmeans + probe, "mean_nearest_cosine": -kmeans, "probe_cross_entropy": probe,
                "correct": correct, "counted": counted}

    def update(self, losses, random):
        optimizer_step(losses["loss"], [self.optimizer], self.precision, self.group, self.trained)

    def end_epoch(self):
        pass

    def validate(self, epoch):
        return {}

    def state_dict(self):
        return {"probe": self.probe.state_dict(), "linear": self.linear.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.precision.scaler.state_dict()}

    def load_state_dict(self, state):
        self.probe.load_state_dict(state["probe"])
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])

    def process_state(self):
        return None


@torch.no_grad()
def pca_start(ctx, features, dataset):
    """The first K of 2K principal directions of all patch features of the first --pca_batches global
    batches of the first epoch's order, [K, C], on rank 0 (others: None). Each process computes its
    rows of a batch; rank 0 gathers them in batch order, so under the paper recipe the result does not
    depend on the process count (PRIMAPS.md §2 (a)); under the scaled one rank 0 reads its own batches.
    It holds every feature at once (README: memory)."""
    cfg, recipe = ctx.cfg, ctx.recipe
    loader, sampler = training_data(ctx, cfg.train_resolution, dataset)
    sampler.set_epoch(0)
    group = BatchGroup(recipe.shared_batch)
    batches = min(cfg.pca_batches, len(sampler))
    patches = (cfg.train_resolution // cfg.patch) ** 2
    rows = sum(sampler.share(index).global_rows for index in range(batches)) * patches
    # Filled in place: a list of batches joined at the end would hold every feature twice.
    samples = torch.empty(rows, cfg.dim) if ctx.dist.is_main else None
    filled = 0
    for index, _, batch in progress(ctx, loader, "[primaps init] features for the PCA", batches):
        group.set_rows(row_counts(recipe, sampler.share(index)))
        found = group.gather(features(batch["img"])).permute(0, 2, 3, 1).reshape(-1, cfg.dim)
        if ctx.dist.is_main:
            samples[filled:filled + len(found)] = found.cpu()
            filled += len(found)
    if not ctx.dist.is_main:
        return None
    print(f"[primaps init] PCA of {rows} patch features of width {cfg.dim}")
    samples = samples.to(ctx.device)
    directions = pca_directions(samples, cfg.n_classes, seed=mixed_seed(cfg.seed, PCA_SEED))
    # A direction's sign is rounding noise (modules/primaps.pca_directions: another thread count or
    # machine flips some), yet the k-means starts from it: point each one to its largest component.
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    return directions * largest.sign()


def initialise(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    precision = Precision(cfg.precision, ctx.device)
    features = Features(load_backbone(cfg.ckpt, cfg.arch, PRIMAPS_HEADS).to(ctx.device), None, precision)
    probe = Prototypes(cfg.dim, cfg.n_classes).to(ctx.device)
    # The labelled diagnostic, made before the PCA's loader draws from the generator. It is not saved with
    # the prototypes: the EM stage starts a probe of its own, as the official one does.
    linear = nn.Conv2d(cfg.dim, cfg.n_classes, 1).to(ctx.device)
    dataset = training_set(cfg)
    if not ctx.paths.resume_state(cfg.step).is_file():  # a resumed run has its prototypes in the resume state
        directions = pca_start(ctx, features, dataset)
        if directions is not None:
            probe.set_directions(directions)
        broadcast_parameters(probe)
        broadcast_parameters(linear)
    training = KMeansTraining(features, probe, linear, ctx.recipe.lr, precision, BatchGroup(ctx.recipe.shared_batch),
                              cfg.n_classes)

    def save(ctx, epochs_done):
        save_torch(probe.state_dict(), ctx.paths.primaps_init)
        write_artifact_records(ctx, [ctx.paths.primaps_init], epochs_done)

    fit(ctx, training, cfg.train_resolution, save, dataset=dataset)
    return str(ctx.paths.primaps_init)


def _settings(cfg, recipe, precision):
    """The options the prototypes depend on (the masks' settings included)."""
    settings = {"dataset": cfg.dataset, "arch": cfg.arch, "mode": cfg.mode, "epochs": cfg.epochs,
                "max_steps": cfg.max_steps, "train_resolution": cfg.train_resolution,
                "test_resolution": cfg.test_resolution, "seed": cfg.seed, "precision": precision,
                "threshold": cfg.threshold, "keep_best_on_val": cfg.keep_best_on_val, **recipe_settings(recipe)}
    if cfg.mode == "cause":
        settings.update(head=cfg.head, dino_small_heads=cfg.dino_small_heads, num_codebook=cfg.num_codebook,
                        reduced_dim=cfg.reduced_dim, projection_dim=cfg.projection_dim)
    return settings


def _init_settings(cfg, recipe, precision):
    return {"dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
            "train_resolution": cfg.train_resolution, "seed": cfg.seed, "precision": precision,
            "pca_batches": cfg.pca_batches, **recipe_settings(recipe)}


def upstream(cfg, paths):
    """Cause mode: the CAUSE artifacts (as the CAUSE test step reads them); backbone mode: the initialisation."""
    if cfg.mode == "cause":
        return evaluate.SPEC.upstream(cfg, paths)
    return {"init": Upstream(paths.primaps_init, "train_primaps.py --mode backbone")}


SPEC = StepSpec(
    outputs=lambda paths: [paths.primaps],
    upstream=upstream,
    data=("train", "val"),
    settings=_settings,
    worker=train,
    curated_7=True,
)

INIT_SPEC = StepSpec(
    outputs=lambda paths: [paths.primaps_init],
    upstream=lambda cfg, paths: {},
    data=("train",),
    settings=_init_settings,
    worker=initialise,
    curated_7=True,
)


def run(cfg):
    if cfg.mode == "backbone":
        run_step(replace(cfg, step=PRIMAPS_INIT, epochs=cfg.init_epochs), INIT_SPEC)
    return run_step(cfg, SPEC)

