"""PriMaPs-EM's initial prototypes in backbone mode (docs/primaps.md §2): a PCA of the patch features,
then cosine k-means; a step of its own (`primaps_init`) that train_primaps.py runs first in backbone
mode, with its artifact, record and resume state."""
import torch
from torch import nn

from modules.primaps import Prototypes, kmeans_loss, pca_directions
from modules.randomness import mixed_seed
from utils.engine.loop import Training, fit, progress, row_counts, training_data
from utils.engine.optim import Precision, optimizer_step
from utils.engine import resume
from utils.engine.primaps import PRIMAPS_TRAINING, choices, probe_loss
from utils.engine.status import write_artifact_records
from utils.engine.trained import Features, mask_backbone
from utils.runtime.distributed import BatchGroup, broadcast_parameters
from utils.runtime.io import save_torch
from utils.runtime.options import POSITIVE, Option
from utils.runtime.steps import DATA, MODEL, PRIMAPS_RESIZE, TRAINING, Step, register

PCA_SEED = 93  # with the run's seed, seeds the initial PCA's random projection


class KMeansTraining(Training):
    """One optimiser step of the backbone mode's initialisation: hard cosine k-means of the patch
    features (docs/primaps.md §2 (b)); the probe's prototypes are its weight_v (g plays no part, as the
    official probe holds it at 1). The labelled linear probe `linear` learns beside it as in the EM
    stage, a diagnostic: the official loss is their sum, and neither gradient reaches the other."""

    def __init__(self, features, probe, linear, lr, precision, group, n_classes):
        super().__init__()
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
        self.steps_done += 1

    def parts(self):
        return {"probe": self.probe, "linear": self.linear, "optimizer": self.optimizer,
                "scaler": self.precision.scaler}


@torch.no_grad()
def pca_start(ctx, features, dataset):
    """The first K of 2K principal directions of all patch features of the first --pca_batches global
    batches of the first epoch's order, [K, C], on rank 0 (others: None). Each process computes its
    rows of a batch; rank 0 gathers them in batch order, so under the paper recipe the result does not
    depend on the process count (docs/primaps.md §2 (a)); under the scaled one rank 0 reads its own
    batches. It holds every feature at once (docs/primaps_usage.md, "Memory of the initial PCA")."""
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
    for index, _, batch in progress(ctx, loader, f"[{ctx.label}] features for the PCA", batches):
        group.set_rows(row_counts(recipe, sampler.share(index)))
        found = group.gather(features(batch["img"])).permute(0, 2, 3, 1).reshape(-1, cfg.dim)
        if ctx.dist.is_main:
            samples[filled:filled + len(found)] = found.cpu()
            filled += len(found)
    if not ctx.dist.is_main:
        return None
    print(f"[{ctx.label}] PCA of {rows} patch features of width {cfg.dim}")
    samples = samples.to(ctx.device)
    directions = pca_directions(samples, cfg.n_classes, seed=mixed_seed(cfg.seed, PCA_SEED))
    # A direction's sign is rounding noise (modules/primaps.pca_directions: another thread count or
    # machine flips some), yet the k-means starts from it: point each one to its largest component.
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    return directions * largest.sign()


def work(ctx):
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    precision = Precision(cfg.precision, ctx.device)
    features = Features(mask_backbone(cfg, ctx.device), None, precision)
    probe = Prototypes(cfg.dim, cfg.n_classes).to(ctx.device)
    # The labelled diagnostic, made before the PCA's loader draws from the generator. It is not saved with
    # the prototypes: the EM stage starts a probe of its own, as the official one does.
    linear = nn.Conv2d(cfg.dim, cfg.n_classes, 1).to(ctx.device)
    if resume.describe(ctx.files) is None:  # a resumed run has its prototypes in the resume state
        directions = pca_start(ctx, features, None)
        if directions is not None:
            probe.set_directions(directions)
        broadcast_parameters(probe)
        broadcast_parameters(linear)
    training = KMeansTraining(features, probe, linear, ctx.recipe.lr, precision, BatchGroup(ctx.recipe.shared_batch),
                              cfg.n_classes)

    def save(ctx, epochs_done):
        save_torch(probe.state_dict(), ctx.paths.primaps_init)
        write_artifact_records(ctx, [ctx.paths.primaps_init], epochs_done, choices(ctx, "backbone"))

    fit(ctx, training, cfg.train_resolution, save)
    return str(ctx.paths.primaps_init)


INIT_EPOCHS = 2
EPOCHS = Option("init_epochs", "PriMaPs", dict(
    type=int, default=None, help=f"backbone mode: epochs of the cosine k-means initialisation; default {INIT_EPOCHS}"),
    refused=POSITIVE)
PCA_BATCHES = Option("pca_batches", "PriMaPs", dict(
    type=int, default=93, help="backbone mode: global batches whose patch features the initial PCA reads"),
    refused=POSITIVE)


def _epochs(values, head):
    """Its epochs come from --init_epochs: in train_primaps.py, which runs it first, --epochs are the EM stage's."""
    return values["init_epochs"] if values["init_epochs"] is not None else INIT_EPOCHS


register(Step(
    name="primaps_init", engine=__name__, script=None, options=(*DATA, *MODEL, *TRAINING, EPOCHS, PCA_BATCHES),
    outputs=lambda paths: [paths.primaps_init], data=("train",), train_set="curated", resize=PRIMAPS_RESIZE,
    drop_last=True, epochs=_epochs, overrides=PRIMAPS_TRAINING,
    description="PriMaPs-EM's initial prototypes in backbone mode: PCA, then cosine k-means (docs/primaps.md §2)"))
