"""Step 5 — PriMaPs-EM (docs/primaps.md): class prototypes fitted to principal mask proposals by stochastic EM.

--mode cause (default): the features are head_ema of the trained CAUSE segment module (--head tr|mlp)
on the backbone CAUSE was trained with, and the prototypes start from CAUSE's cluster probe.
--mode backbone: the features are the plain backbone's, and the prototypes start from an
initialisation of their own, a step train_primaps.py runs first (`primaps_init`, primaps_init.py:
PCA of the patch features, then cosine k-means), with its own artifact, record and resume state.

In both modes the pseudo masks come from the plain backbone as the official PriMaPs code builds it:
DINO's ViT-S with DINO's own 6 heads, whatever --dino_small_heads the CAUSE steps use (docs/primaps.md
§1). They are computed before training, once per data set, backbone and mask settings
(primaps_masks.py). Training reads the uncropped train images (COCO-Stuff-27: PriMaPs' curated list).
"""
import torch

from loader.pseudo_masks import WithMasks
from models import ARCHS
from modules.crf import crf_pool
from modules.features import upsample
from modules.losses import probe_cross_entropy
from modules.metrics import MatchedMetrics
from modules.primaps import (MASK_BACKBONE_HEADS, NO_MASK, PriMaPsModel, Prototypes, class_probabilities, focal_loss,
                             mask_majority_labels)
from modules.randomness import mixed_seed
from modules.views import AugmentedViews
from utils.engine.evaluate import test_upstream
from utils.engine.loop import Training, fit, progress, training_set, validation_loader
from utils.engine.optim import Precision, optimizer_step
from utils.engine.primaps_masks import masks_name, prepare_masks
from utils.engine.status import write_artifact_records
from utils.engine.trained import Features, feature_dim, mask_backbone, on_sota_model, primaps_features, sota_model
from utils.runtime.artifacts import load_state_strict
from utils.runtime.distributed import BatchGroup, all_reduce_sum, broadcast_parameters
from utils.runtime.io import save_torch
from utils.runtime.options import SOTA_MODES, Option, fraction
from utils.runtime.records import weights_fingerprint
from utils.runtime.steps import (CAUSE_FEATURES, DATA, HEAD_MODEL, MODEL, PRIMAPS_RESIZE, SOTA, TRAINING, Step,
                                 Upstream, register)

FOCAL_GAMMA = 2.0
MOMENTUM_EVERY = 10  # θ_M follows θ_R after the batches that 10, 20, ... batches preceded (momentum_update_due)


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


class PriMaPsTraining(Training):
    """One optimiser step of PriMaPs-EM (docs/primaps.md §2): the E-step labels each cached mask with
    θ_M's majority class on the (flipped) image, the M-step fits θ_R on the student view with the focal
    loss; the labelled linear probe on the image's features is a diagnostic. θ_M follows θ_R when
    `momentum_update_due` (steps_done counts the training batches run, across epochs). `views` makes a
    step's views from its batch and draws (modules/views.py's AugmentedViews: the random flip and student
    view)."""

    def __init__(self, features, model, lr, precision, group, n_classes, validation=None, keep_best=False):
        super().__init__()
        self.features, self.model = features, model
        self.precision, self.group, self.n_classes = precision, group, n_classes
        self.views = AugmentedViews()
        self.trained = [*model.online.parameters(), *model.linear.parameters()]
        # One Adam where the official code has three (linear probe, cluster probe, θ_R; the cluster one
        # holds nothing that learns here): Adam is per parameter, so the numbers are the same.
        self.optimizer = torch.optim.Adam(self.trained, lr=lr)
        self.validation = validation
        self.keep_best = keep_best
        self.best = None  # with keep_best: {"mIoU", "epoch", "model"} of the best θ_M on val so far

    def e_step(self, teacher, masks, size):
        """θ_M's logits of the image features upsampled to `size`, and the E-step's labels: each mask's
        majority class of their argmax, NO_MASK outside every mask."""
        with torch.no_grad():
            logits = upsample(self.model.momentum(teacher), size)
            return logits, mask_majority_labels(logits.argmax(dim=1), masks.long())

    def losses(self, batch, random):
        views = self.views(batch, random)
        teacher = self.features(views.image, random)
        student = self.features(views.student, random)
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

    def validate(self, epoch):
        scores = self.validation(epoch) if self.validation is not None else {}
        score = scores.get("theta_m_mIoU_uses_labels")
        if self.keep_best and (self.best is None or score > self.best["mIoU"]):
            self.best = {"mIoU": score, "epoch": epoch + 1,
                         "model": {k: v.clone() for k, v in self.model.state_dict().items()}}
        return scores

    def kept_model(self):
        """The weights to save: the last ones, or the best on val with --keep_best_on_val."""
        return self.best["model"] if self.best is not None else self.model.state_dict()

    def parts(self):
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.precision.scaler}

    def state_dict(self):
        return {**super().state_dict(), "best": self.best}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.best = state["best"]


@torch.no_grad()
def validation_scores(ctx, features, model, loader, epoch):
    """θ_M's val mIoU (no CRF, no flip) and the linear probe's pixel accuracy after `epoch`: labelled
    diagnostics, and with --keep_best_on_val the score that picks the kept epoch."""
    cfg = ctx.cfg
    # STEGO's official dropout draws from torch's generator here: seeded by the epoch, a resumed run
    # scores (and with --keep_best_on_val keeps) what the uninterrupted one did.
    torch.manual_seed(mixed_seed(cfg.seed, epoch))
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


def work(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    # Made before anything else draws from the generator: the linear probe's initialisation must not
    # depend on whether the masks were computed (their loader draws a seed) or found cached.
    model = PriMaPsModel(feature_dim(cfg), cfg.n_classes)
    precision = Precision(cfg.precision, ctx.device)
    dataset = training_set(ctx, cfg.train_resolution)
    with crf_pool(cfg.crf_workers) as pool:  # before a model reaches a GPU (modules/crf.py)
        # The masks' backbone: the plain DINO ViT as PriMaPs builds it, or the one inside the STEGO or HP file.
        sota = sota_model(cfg, ctx.device) if cfg.mode in SOTA_MODES else None
        backbone = sota.backbone if sota is not None else mask_backbone(cfg, ctx.device)
        weights = weights_fingerprint(backbone)
        mask_files = ctx.paths.primaps_mask_files(masks_name(cfg, weights), dataset.source.image_files)
        prepare_masks(ctx, backbone, dataset, mask_files, pool, MASK_BACKBONE_HEADS, weights)
    if cfg.mode == "backbone":
        features, start = Features(backbone, None, precision), initial_prototypes(ctx)
    elif sota is not None:  # no PCA or k-means stage: θ_R starts from the SotA model's cluster centres
        features, start = on_sota_model(cfg, sota, precision)
    else:
        del backbone  # cause mode's features come from CAUSE's own definition of the backbone
        features, start = primaps_features(cfg, ctx.upstream, ctx.device, precision)
    model.to(ctx.device)
    broadcast_parameters(model)  # the linear probe's random initialisation
    model.start_from(start)
    if cfg.keep_best_on_val and ctx.dist.is_main:
        print("[primaps] --keep_best_on_val: the kept epoch is the one whose θ_M scores best on the val labels, "
              "as the official code selects it: a choice made with labels")
    validation = validation_loader(ctx, cfg.test_resolution)
    training = PriMaPsTraining(
        features, model, ctx.recipe.lr, precision, BatchGroup(ctx.recipe.shared_batch), cfg.n_classes,
        validation=lambda epoch: validation_scores(ctx, features, model, validation, epoch),
        keep_best=cfg.keep_best_on_val)

    def save(ctx, epochs_done):
        save_torch(training.kept_model(), ctx.paths.primaps)
        kept = (f"the epoch with the best θ_M val mIoU (selected with the val labels): epoch {training.best['epoch']}"
                if training.best is not None else "the last epoch")
        write_artifact_records(ctx, [ctx.paths.primaps], epochs_done,
                               {"kept": kept, "pseudo_masks": str(mask_files[0].parent), **choices(ctx, cfg.mode)})

    fit(ctx, training, cfg.train_resolution, save, dataset=WithMasks(dataset, mask_files))
    if ctx.dist.is_main:
        print(f"[primaps] prototypes saved to {ctx.paths.primaps}")
    return str(ctx.paths.primaps)


def choices(ctx, mode):
    """The choices a PriMaPs-EM result of `mode` depends on, said in words in its record (their values are in
    its identity): what the features are, and how they were computed."""
    cfg = ctx.cfg
    features = {"cause": lambda: f"head_ema of CAUSE's {(cfg.head or '').upper()} segment module",
                "backbone": lambda: f"the plain {cfg.arch} backbone's patch tokens",
                "stego": lambda: f"the STEGO code of {cfg.sota_ckpt}" + (
                    ", its Dropout2d(0.1) active as in the official wrapper" if cfg.sota_dropout == "official"
                    else ", STEGO in eval mode"),
                "hp": lambda: f"the online code of HP's {cfg.sota_ckpt}, in eval mode"}[mode]()
    return {"choices": {"mode": mode, "features": features, "precision": cfg.precision,
                        "resize": ctx.step.resize, "drop_last": ctx.step.drop_last,
                        "masks_backbone": masks_backbone_choice(cfg.arch)}}


def masks_backbone_choice(arch):
    """How the masks' backbone is built, in words: the head count PriMaPs gives DINO's ViT-S, the arch's own
    heads for every other arch (models/vit.build_backbone)."""
    spec = ARCHS[arch]
    if spec.family == "dino" and spec.dim == 384:
        return f"{arch}, DINO's {MASK_BACKBONE_HEADS}-head definition"
    return f"{arch}, its own {spec.heads} heads"


def initial_prototypes(ctx):
    """Backbone mode: the prototypes of the initialisation step, [K, C]."""
    cfg, init = ctx.cfg, ctx.upstream["init"]
    probe = load_state_strict(Prototypes(cfg.dim, cfg.n_classes), init["file"], "PriMaPs initialisation",
                              init["produced_by"])
    return probe.weight_v.detach().reshape(cfg.n_classes, cfg.dim).to(ctx.device)


THRESHOLD = Option("threshold", "PriMaPs", dict(
    type=float, default=0.4, help="mask proposal threshold ψ: a proposal keeps the patches whose cosine to its "
                                  "anchor reaches ψ times the best one"), refused=fraction)
KEEP_BEST_ON_VAL = Option("keep_best_on_val", "PriMaPs", dict(
    action="store_true",
    help="keep the epoch whose θ_M scores the best val mIoU, as the official code does, instead of the last one: "
         "this selects the model with the val labels"))
# PriMaPs-EM's own defaults (its initialisation's and its evaluation's too).
PRIMAPS_BATCH = dict(default=32, help="the global batch (paper recipe) or the batch per process (scaled); also the "
                                      "images per forward pass of the masks")
PRIMAPS_LR = dict(default=5e-3, help="Adam's learning rate of the prototypes, the linear probe and the k-means "
                                     "initialisation (the scaled recipe multiplies it by the number of processes)")
PRIMAPS_PRECISION = dict(default="fp32", help="autocast precision; default fp32, as the official PriMaPs-EM runs "
                                               "(its Trainer is given none); fp16 (with loss scaling) or bf16 "
                                               "on request; auto: fp16 on GPU, fp32 on CPU")
PRIMAPS_RECIPE = dict(help="paper: PriMaPs' optimisation on any process count (global batch 32 split over the "
                           "processes, lr 5e-3, every image each epoch); scaled: batch 32 per process, lr 5e-3 × "
                           "processes")
PRIMAPS_TRAINING = {"batch_size": PRIMAPS_BATCH, "lr": PRIMAPS_LR, "recipe": PRIMAPS_RECIPE,
                    "precision": PRIMAPS_PRECISION}


def primaps_unused(values):
    """Cause mode: the SotA options; backbone mode: CAUSE's too; a STEGO or HP model (or a released PriMaPs
    checkpoint, whose backbone is inside) also makes the backbone options idle: its own ViT is used."""
    mode = values["mode"]
    if mode == "cause":
        return SOTA
    own_backbone = mode in SOTA_MODES or values.get("primaps_ckpt") is not None
    idle_sota = SOTA if mode == "backbone" else ("sota_dropout",) if mode == "hp" else ()
    return (*CAUSE_FEATURES, *idle_sota, *(("ckpt", "cache_dir", "arch") if own_backbone else ()))


def _upstream(cfg, paths):
    """Cause mode: the CAUSE modules whose features it fits (as the CAUSE test step reads them);
    backbone mode: its initial prototypes; stego, hp: nothing but the released file (its identity's "sota")."""
    if cfg.mode == "cause":
        return test_upstream(cfg, paths)
    if cfg.mode == "backbone":
        return {"init": Upstream(paths.primaps_init, "primaps_init")}
    return {}


def _initialised_here(values):
    """Backbone mode starts from prototypes of its own: train_primaps.py runs their step (primaps_init) first."""
    return values["mode"] == "backbone"


register(Step(
    name="primaps", engine=__name__, script="train_primaps.py",
    options=(*DATA, *MODEL, *HEAD_MODEL, *TRAINING, "epochs", "mode", "head", THRESHOLD, KEEP_BEST_ON_VAL, *SOTA,
             "crf_workers", "accept_partial"),
    outputs=lambda paths: [paths.primaps], upstream=_upstream, data=("train", "val"), train_set="curated",
    head="option", resize=PRIMAPS_RESIZE, drop_last=True, epochs=50, runs_first={"primaps_init": _initialised_here},
    unused=primaps_unused, overrides=PRIMAPS_TRAINING, pipeline="primaps",
    description="PriMaPs-EM's prototypes (docs/primaps.md §1-§2)"))
