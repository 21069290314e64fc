"""PriMaPs-EM numerics (docs/primaps.md §1, §2): principal mask proposals and their pseudo masks,
the median filter they use, the E-step that labels each mask by its majority class, the focal
loss of the M-step, the cosine k-means loss and PCA directions of the initialisation stage, and
the prototype module θ_R with its momentum copy θ_M.

Mask generation is split in two so that the CRF, which dominates the cost, can run on a process
pool: `mask_log_probs` (features -> log-probabilities at patch resolution) and the CRF half,
`pseudo_mask_job` (numpy and pydensecrf only: the CRF's marginals -> the pseudo mask).
"""
import copy
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.crf import crf_inference_job

# The official PriMaPs code loads DINO's hub models: ViT-S with DINO's own 6 attention heads (only DINO
# ViT-S depends on it). Its pseudo masks, and backbone mode's features, come from that definition.
MASK_BACKBONE_HEADS = 6
# Pixel value of "no mask" in pseudo masks and of "no label" in E-step targets. Pseudo masks are
# cached as 8-bit PNGs, so mask ids must stay below it.
NO_MASK = 255
# Proposal gain before clamping to [0, 1]: a median-filtered similarity of 0.1 already counts fully.
PROPOSAL_GAIN = 10.0
# Proposals stop once this fraction of the patches is assigned; power iterations of each round's PCA.
STOP_FRACTION = 0.95
PCA_ITERATIONS = 100
CRF_ITERATIONS = 10  # the evaluation CRF's (docs/cause.md §6)


@contextmanager
def seeded_rng(device, seed):
    """Run the body with the random generator of `device` seeded with `seed`, restoring the
    caller's state afterwards. None leaves the caller's generator in use (and advances it).

    torch.pca_lowrank draws its random projection from the global generator of the input's
    device, so seeding that generator reproduces `torch.manual_seed(seed)` set right before the
    call (as the golden cases record) without touching any other device's generator: unlike
    torch.manual_seed, this does not queue a seed for CUDA in a process that has not started it.
    The same seed draws different numbers on CPU and on CUDA.
    """
    if seed is None:
        yield
        return
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def median_filter_3x3(x):
    """[B, N, h, w] -> the same shape: the median of each 3×3 neighbourhood, reflect-padded."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)
    return windows.reshape(*x.shape, 9).median(dim=-1).values


def principal_mask_proposals(features, threshold=0.4):
    """Patch features [C, h, w] -> soft mask proposals [N, h, w] in [0, 1], in the order found.

    Each round takes the first principal direction of the still unassigned features, moves it to
    the unassigned patch most similar to it (its nearest real feature), and proposes the
    unassigned patches whose cosine to that patch reaches `threshold` times the best one.
    Draws random numbers (torch.pca_lowrank): see `seeded_rng`.

    As in the official code, a round in which no unassigned patch has a positive cosine to the
    anchor (which then lies outside the unassigned set: e.g. zero features) divides 0 by 0: its
    proposal is NaN everywhere, assigns nothing, and makes every log-probability NaN downstream.
    """
    height, width = features.shape[-2:]
    unit = F.normalize(features, dim=0)
    unassigned = torch.ones(height, width, dtype=torch.bool, device=features.device)
    recent_unassigned = []
    proposals = []
    while (~unassigned).float().mean() < STOP_FRACTION:
        _, _, directions = torch.pca_lowrank(features[:, unassigned].T, q=3, niter=PCA_ITERATIONS)
        similarity = torch.einsum("c,chw->hw", directions[:, 0], unit)
        similarity[~unassigned] = 0
        # The first maximum in row-major order, as the official boolean indexing picks it.
        anchor = unit.flatten(1)[:, similarity.flatten().argmax()]
        similarity = torch.einsum("c,chw->hw", anchor, unit)
        similarity[~unassigned] = 0
        similarity[similarity < threshold * similarity.max()] = 0
        similarity = similarity / similarity.max()
        proposals.append(similarity)
        unassigned[similarity > 0] = False
        # Degenerate features can stop assigning anything: give up once the unassigned set has
        # not changed over the last three rounds (checked from the fourth round on, as officially).
        recent_unassigned.append(unassigned.clone())
        if len(recent_unassigned) > 3:
            recent_unassigned.pop(0)
            if all(torch.equal(recent_unassigned[0], later) for later in recent_unassigned[1:]):
                break
    return torch.stack(proposals)


def check_mask_count(count):
    if count >= NO_MASK:
        raise ValueError(f"{count} mask proposals: pseudo masks hold ids 1..{NO_MASK - 1} in 8 bits "
                         f"({NO_MASK} means no mask); lower the number of proposals (raise the threshold)")


def proposal_log_probs(proposals):
    """Proposals [N, h, w] -> log-probabilities [N+1, h, w] over (background, proposal 1..N).

    The background is what the proposals leave of their mean non-zero strength."""
    strength = (median_filter_3x3(proposals[None])[0] * PROPOSAL_GAIN).clamp(0, 1)
    background = (strength[strength != 0].mean() - strength.sum(dim=0)).clamp(0, 1)
    return torch.log_softmax(torch.cat([background[None], strength]), dim=0)


def mask_log_probs(features, threshold=0.4, seed=None):
    """Patch features [C, h, w] of one image -> log-probabilities [N+1, h, w], background first:
    the CRF input of its pseudo mask. `seed`: see `seeded_rng`. Refuses N ≥ 255."""
    with seeded_rng(features.device, seed):
        proposals = principal_mask_proposals(features, threshold)
    check_mask_count(len(proposals))
    return proposal_log_probs(proposals)


def pseudo_from_marginals(q):
    """CRF marginals [N+1, H, W] (numpy) -> the pseudo mask, uint8 [H, W]: the winning mask id,
    NO_MASK where the background wins."""
    winner = q.argmax(axis=0)
    return np.where(winner == 0, NO_MASK, winner).astype(np.uint8)


def pseudo_mask_job(crf_input):
    """The CRF half of one pseudo mask for a worker pool: modules.crf.crf_inputs(image, log_probs),
    computed by the caller, -> the pseudo mask (uint8 numpy [H, W]). numpy and pydensecrf only."""
    return pseudo_from_marginals(crf_inference_job(crf_input, CRF_ITERATIONS))


def mask_majority_labels(class_map, masks, ignore_id=NO_MASK):
    """E-step: class_map [B, H, W] (predicted classes), masks [B, H, W] (mask ids, `ignore_id` =
    none) -> labels [B, H, W]: every pixel of a mask gets the class most frequent inside it, the
    smallest class among equally frequent ones (as torch.mode breaks ties); `ignore_id` elsewhere.
    """
    batch = class_map.shape[0]
    inside = masks != ignore_id
    if not inside.any():
        return torch.full_like(masks, ignore_id)
    image_index = torch.arange(batch, device=masks.device)[:, None, None].expand_as(masks)[inside]
    mask_id, cls = masks[inside], class_map[inside]
    n_ids, n_classes = int(mask_id.max()) + 1, int(cls.max()) + 1
    slot = image_index * n_ids + mask_id
    counts = torch.bincount(slot * n_classes + cls, minlength=batch * n_ids * n_classes)
    # argmax returns the first maximum: the smallest of the most frequent classes.
    majority = counts.view(batch * n_ids, n_classes).argmax(dim=1)
    labels = torch.full_like(masks, ignore_id)
    labels[inside] = majority[slot]
    return labels


def class_probabilities(logits):
    """[B, K, H, W] logits -> [K, B·H·W] predicted probabilities, detached (what π_k averages)."""
    return logits.detach().softmax(dim=1).transpose(0, 1).flatten(1)


def focal_weights(mean_probability, gamma=2.0):
    """The focal loss's class weights (1 − π_k)^γ from the batch's mean predicted probabilities π [K]."""
    return (1 - mean_probability) ** gamma


def focal_loss(logits, target, gamma=2.0, ignore_id=NO_MASK, mean_probability=None, pixels=None):
    """M-step loss: logits [B, K, H, W], target [B, H, W] -> scalar. Classes weighted by
    (1 − π_k)^γ with π_k the batch's mean predicted probability (no gradient), summed over
    labelled pixels and divided by all B·H·W pixels.

    A batch split over processes passes the whole batch's π (`mean_probability` [K]) and pixel
    count (`pixels`): each process's value is then its part of the batch's loss, and the parts add
    up to it."""
    if mean_probability is None:
        mean_probability = class_probabilities(logits).mean(dim=1)
    weight = focal_weights(mean_probability, gamma)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_id, reduction="none")
    return per_pixel.mean() if pixels is None else per_pixel.sum() / pixels


def _normalised_kernel(weight_v, weight_g):
    """g · v / ‖v‖ per output class of a [K, C, 1, 1] kernel. torch._weight_norm is the op both of
    torch's weight_norm wrappers (and so the official modules) call; writing the formula out
    differs from it in the last bit."""
    return torch._weight_norm(weight_v, weight_g, 0)


def cosine_inner_products(features, weight_v):
    """features [B, C, h, w], prototypes weight_v [K, C, 1, 1] -> cosines [B, K, h, w]."""
    unit_g = torch.ones(weight_v.shape[0], 1, 1, 1, dtype=weight_v.dtype, device=weight_v.device)
    return F.conv2d(F.normalize(features, dim=1), _normalised_kernel(weight_v, unit_g))


def kmeans_loss(inner_products, pixels=None):
    """Hard cosine k-means: −mean over pixels of the cosine to the nearest prototype (the first
    one among equals), accumulated in float64 as the official one-hot product is. `pixels`: the
    whole batch's pixel count when the batch is split over processes (see focal_loss)."""
    nearest = inner_products.gather(1, inner_products.argmax(dim=1, keepdim=True)).double()
    return -(nearest.mean() if pixels is None else nearest.sum() / pixels)


def pca_directions(features, n_classes, seed=None):
    """features [N, C] -> [K, C]: the first K of 2K principal directions (torch.pca_lowrank,
    centred, 200 iterations), the backbone-mode initial prototypes. `seed`: see `seeded_rng`.

    The sign of every direction but the first depends on float rounding (LAPACK decides it from
    noise-sized entries): the same seed can flip some of them under another thread count, BLAS or
    device."""
    with seeded_rng(features.device, seed):
        _, _, directions = torch.pca_lowrank(features, q=2 * n_classes, niter=200)
    return directions[:, :n_classes].T


class Prototypes(nn.Module):
    """θ_R: a bias-free 1×1 convolution with weight-normalised kernel, weight = g · v / ‖v‖ per class,
    applied to un-normalised features (logits are dot products).

    Explicit weight_g [K,1,1,1] and weight_v [K,C,1,1] parameters rather than torch's weight_norm
    wrappers: the same numbers and the official state-dict names, without the deprecated
    nn.utils.weight_norm hook or the parametrization machinery in copies and checkpoints.
    """

    def __init__(self, in_channels, n_classes):
        super().__init__()
        # Conv2d's default initialisation, then weight_norm's split of it into g and v.
        weight = torch.empty(n_classes, in_channels, 1, 1)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True))
        self.weight_v = nn.Parameter(weight)

    @torch.no_grad()
    def set_directions(self, directions):
        """v ← directions [K, C] (PCA, k-means prototypes or CAUSE's cluster_probe), g ← 1."""
        self.weight_v.copy_(directions.reshape(self.weight_v.shape))
        self.weight_g.fill_(1)

    def weight(self):
        return _normalised_kernel(self.weight_v, self.weight_g)

    def forward(self, features):
        """[B, C, h, w] -> logits [B, K, h, w]."""
        return F.conv2d(features, self.weight())

    def cosine(self, features):
        """The k-means probe's view of the same parameters: g ignored (the official probe holds it
        at 1) and the features normalised too."""
        return cosine_inner_products(features, self.weight_v)


class MomentumPrototypes(nn.Module):
    """θ_M: a momentum copy of θ_R, made when training starts; `update` is called by the caller
    (after every 10th optimiser step). Call s = 1, 2 copies θ_R; call s ≥ 3 moves θ_M toward θ_R
    by 1 − d with d = min(1 − 1/s, max_decay), on g and v separately. The official EMA also
    copies on the second call (it is not yet "initialised" then), so a decay of 1/2 never applies.
    The call count is a buffer: state_dict/load_state_dict save and restore it with the weights.
    """

    def __init__(self, online, max_decay=0.98):
        super().__init__()
        self.prototypes = copy.deepcopy(online).requires_grad_(False)
        self.max_decay = max_decay
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, online):
        self.calls += 1
        calls = int(self.calls)
        for mine, theirs in zip(self.prototypes.parameters(), online.parameters(), strict=True):
            if calls <= 2:
                mine.copy_(theirs)
            else:
                mine.lerp_(theirs, 1.0 - min(1.0 - 1.0 / calls, self.max_decay))

    def forward(self, features):
        return self.prototypes(features)


class PriMaPsModel(nn.Module):
    """What PriMaPs-EM trains and evaluates, in one state dict: θ_R (`online`), θ_M (`momentum`), the
    prototypes they started from (`initial` [K, C]: k-means or CAUSE's cluster probe, kept so that
    the initialisation can be evaluated beside them) and the labelled linear probe (a diagnostic)."""

    def __init__(self, in_channels, n_classes, max_decay=0.98):
        super().__init__()
        self.online = Prototypes(in_channels, n_classes)
        self.momentum = MomentumPrototypes(self.online, max_decay)
        self.linear = nn.Conv2d(in_channels, n_classes, 1)
        self.register_buffer("initial", torch.zeros(n_classes, in_channels))

    @torch.no_grad()
    def start_from(self, directions):
        """θ_R and θ_M ← directions [K, C] (g = 1), as the official EMA copy is made when training starts."""
        self.online.set_directions(directions)
        self.momentum.prototypes.set_directions(directions)
        self.initial.copy_(directions)

    def initial_cosine(self, features):
        """The initial prototypes' cosines [B, K, h, w], as the official k-means probe predicts."""
        return cosine_inner_products(features, self.initial[:, :, None, None])
