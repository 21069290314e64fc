"""The whole-batch, one-process forms of the project's numerics, as the golden files record them.

The runtime computes these in parts (a process's rows of a global batch, the CRF on a worker pool);
the tests compare their sums and compositions with the official numbers, and load the golden files'
concept banks. No test lives here.
"""
from typing import NamedTuple

import torch

from modules.bank import ConceptBank
from modules.crf import dense_crf_batch
from modules.losses import contrastive_terms, modularity_per_image
from modules.primaps import CRF_ITERATIONS, check_mask_count, mask_log_probs, pseudo_from_marginals
from modules.quantize import quantize_index


def dense_crf(image, log_probs, max_iter=10):
    """image [3,H,W] ImageNet-normalised, log_probs [K,h,w] -> CRF marginals [K,H,W] (float32, CPU): one
    image's dense CRF, as a batch of one."""
    return dense_crf_batch(image[None], log_probs[None], max_iter)[0]


def bank_from_entries(entries, num_prototypes, capacity=100, dim=None):
    """A ConceptBank holding `entries` {prototype: [n, dim] values, oldest first} (the golden files'
    form); only the newest `capacity` of a longer list are kept. `dim` is needed only
    when `entries` is empty."""
    first = next(iter(entries.values()), None)
    if first is None and dim is None:
        raise ValueError("an empty entries dict does not tell the projection dim: pass dim")
    bank = ConceptBank(num_prototypes, first.shape[-1] if dim is None else dim, capacity,
                       device=None if first is None else first.device)
    for k, stored in entries.items():
        stored = stored[-capacity:]
        n = stored.shape[0]
        bank.values[k, :n] = stored
        bank.count[k] = n
        bank.head[k] = n % capacity
    return bank


def modularity_loss(codebook, feat, temp=0.1):
    """-mean over images of the modularity Q (the loss of docs/cause.md §3 and §5)."""
    return -modularity_per_image(codebook, feat, temp).mean()


def contrastive_loss(feat, proj, proj_ema, codebook, bank=None, temp=0.07, pos_thresh=0.3, neg_thresh=0.1,
                     index=None):
    """Concept-wise contrastive loss of docs/cause.md §4 for one batch: the mean of contrastive_terms.

    feat [B, P, D] sampled backbone tokens (only their prototypes matter), proj / proj_ema
    [B, P, Dp] student / teacher projections, codebook [K, D], bank a ConceptBank or None,
    index [B, P] a precomputed quantize_index(feat, codebook).
    """
    if index is None:
        index = quantize_index(feat, codebook)
    total, count = contrastive_terms(proj, index, proj_ema, index, codebook, bank, 0, temp, pos_thresh, neg_thresh)
    return total / count.clamp_min(1)


class PseudoMask(NamedTuple):
    log_probs: torch.Tensor  # [N+1, h, w], background first
    q: torch.Tensor  # [N+1, H, W] CRF marginals
    pseudo: torch.Tensor  # uint8 [H, W]: mask ids 1..N, NO_MASK where the background wins


def pseudo_mask_from_log_probs(image, log_probs):
    """Normalised image [3, H, W] and log-probabilities [N+1, h, w] -> (CRF marginals [N+1, H, W],
    pseudo mask uint8 [H, W]), computed on CPU in this process."""
    check_mask_count(log_probs.shape[0] - 1)
    q = dense_crf(image, log_probs, CRF_ITERATIONS)
    return q, torch.from_numpy(pseudo_from_marginals(q.numpy()))


def pseudo_mask(image, features, threshold=0.4, seed=None):
    """One image's pseudo mask (docs/primaps.md §1) in one process: both halves in a row."""
    log_probs = mask_log_probs(features, threshold, seed).cpu()
    q, pseudo = pseudo_mask_from_log_probs(image, log_probs)
    return PseudoMask(log_probs, q, pseudo)
