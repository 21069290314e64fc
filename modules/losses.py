"""The two training objectives: the modularity loss (SPEC §3) and the concept-wise
contrastive loss with the concept bank (SPEC §4)."""
import torch
import torch.nn.functional as F

from modules.quantize import quantize_index

# Bytes the no-grad [B, rows, P, K] product tensor of the modularity arg-max may take.
_CHUNK_BYTES = 64 * 2**20


def _pairwise_argmax(assign, row_chunk):
    """argmax_k assign[b,i,k] * assign[b,j,k] -> [B, P, P] int64, a block of rows i at a time."""
    b, p, k = assign.shape
    if row_chunk is None:
        row_chunk = max(1, _CHUNK_BYTES // (b * p * k * assign.element_size()))
    blocks = [(assign[:, start:start + row_chunk, None, :] * assign[:, None, :, :]).argmax(-1)
              for start in range(0, p, row_chunk)]
    return torch.cat(blocks, dim=1)


def modularity_loss(codebook, feat, temp=0.1, row_chunk=None):
    """-mean over images of the modularity Q of the soft assignment of tokens to prototypes.

    feat [B, P, D] (detached here: only the codebook learns), codebook [K, D].
    δ_ij = max_k tanh(S_ik S_jk / temp) equals tanh(S_ik* S_jk* / temp) at the arg-max k*,
    because tanh is increasing: k* is found without gradient a block of rows at a time,
    and gathering S at k* gives the value and the gradient of torch's max without ever
    holding the [B, P, P, K] tensor under autograd.
    """
    # float32 even under autocast: e sums P² affinities and W = A - d dᵀ/e is a difference
    # of nearly equal terms, which half precision would drown in rounding.
    with torch.autocast(device_type=feat.device.type, enabled=False):
        x = F.normalize(feat.detach().float(), dim=-1)
        affinity = (x @ x.transpose(1, 2)).clamp_min(0)
        affinity.diagonal(dim1=1, dim2=2).zero_()
        degree = affinity.sum(2, keepdim=True)
        edges = degree.sum(1, keepdim=True)
        weight = (affinity - degree @ degree.transpose(1, 2) / edges) / edges

        assign = (x @ F.normalize(codebook.float(), dim=-1).T).clamp_min(0)
        with torch.no_grad():
            best = _pairwise_argmax(assign, row_chunk)
        at_i = assign.gather(2, best)
        at_j = assign.gather(2, best.transpose(1, 2)).transpose(1, 2)
        delta = torch.tanh(at_i * at_j / temp)
        # Q = tr(W δ) = Σ_ij W_ij δ_ji
        q = (weight * delta.transpose(1, 2)).sum((1, 2))
        return -q.mean()


def _nce_rows(anchor, candidate, pos, neg, temp, valid=None):
    """Per anchor row: Σ_pos (-s) + n_pos · log Σ_{pos ∪ neg} exp(s), and n_pos.

    s = cos / temp minus its row max (no gradient through the max); `valid` masks out
    candidate columns that hold nothing (empty bank slots), also from the max.
    """
    logits = anchor @ candidate.T / temp
    with torch.no_grad():
        if valid is None:
            row_max = logits.amax(1, keepdim=True)
        else:
            row_max = logits.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
            # With no valid column at all the max is -inf; any finite shift keeps exp finite.
            row_max = torch.where(valid.any(), row_max, 0.0)
    shifted = logits - row_max
    n_pos = pos.sum(1)
    denominator = torch.where(pos | neg, shifted.exp(), 0.0).sum(1)
    # Rows without positives have an empty denominator: the clamp keeps their log (and its
    # gradient) finite, and n_pos = 0 removes them.
    log_denominator = denominator.clamp_min(torch.finfo(denominator.dtype).tiny).log()
    rows = n_pos * log_denominator - torch.where(pos, shifted, 0.0).sum(1)
    return rows, n_pos


def _image_terms(rows, n_pos, batch):
    """Mean over the positive pairs of each image's anchors -> ([B] terms, [B] has-positives)."""
    total = rows.view(batch, -1).sum(1)
    count = n_pos.view(batch, -1).sum(1)
    return total / count.clamp_min(1), count > 0


def contrastive_loss(feat, proj, proj_ema, codebook, bank=None, temp=0.07, pos_thresh=0.3,
                     neg_thresh=0.1, index=None):
    """Concept-wise contrastive loss of SPEC §4, all images at once.

    feat [B, P, D] sampled backbone tokens (only their prototypes matter), proj / proj_ema
    [B, P, Dp] student / teacher projections, codebook [K, D], bank a ConceptBank or None,
    index [B, P] a precomputed quantize_index(feat, codebook).
    Anchors are all B·P student tokens; candidates all B·P teacher tokens, then the bank.
    """
    # float32 even under autocast: logits are cosines / 0.07 and the masks compare cosines
    # with 0.3 / 0.1, where half-precision rounding would shift logits and flip pairs.
    with torch.autocast(device_type=proj.device.type, enabled=False):
        batch, tokens, _ = proj.shape
        prototypes = F.normalize(codebook.detach().float(), dim=-1)
        if index is None:
            index = quantize_index(feat.detach().float(), codebook.detach().float())
        index = index.reshape(-1)
        anchor = F.normalize(proj.float().reshape(batch * tokens, -1), dim=-1)
        teacher = F.normalize(proj_ema.float().reshape(batch * tokens, -1), dim=-1)

        # Cosine of each anchor's prototype to every prototype: the candidates' similarity
        # c is then a column gather of [B·P, K] masks instead of another matmul.
        prototype_cos = prototypes[index] @ prototypes.T
        is_pos = prototype_cos > pos_thresh
        is_neg = prototype_cos < neg_thresh

        pos = is_pos[:, index]
        pos.fill_diagonal_(False)  # an anchor is not its own positive (same image, same position)
        terms, has_pos = _image_terms(*_nce_rows(anchor, teacher, pos, is_neg[:, index], temp), batch)

        if bank is not None:
            bank_index, bank_values, valid = bank.candidates()
            stored = F.normalize(bank_values.float(), dim=-1)
            pos = is_pos[:, bank_index] & valid
            neg = is_neg[:, bank_index] & valid
            bank_terms, bank_has_pos = _image_terms(*_nce_rows(anchor, stored, pos, neg, temp, valid), batch)
            terms = torch.cat([terms, bank_terms])
            has_pos = torch.cat([has_pos, bank_has_pos])

        # A term without a single positive pair is NaN (an empty mean) in the official code;
        # it is left out of the mean here, counted by mask so that nothing syncs with the host.
        # Whenever the official value is finite the two agree; an empty bank adds no terms.
        return torch.where(has_pos, terms, 0.0).sum() / has_pos.sum().clamp_min(1)
