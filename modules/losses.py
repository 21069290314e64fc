"""The two training objectives: the modularity loss (docs/cause.md §3) and the concept-wise
contrastive loss with the concept bank (docs/cause.md §4)."""
import torch
import torch.nn.functional as F


# Bytes the no-grad [B, rows, P, K] product tensor of the modularity arg-max may take.
_CHUNK_BYTES = 64 * 2**20


def _pairwise_argmax(assign):
    """argmax_k assign[b,i,k] * assign[b,j,k] -> [B, P, P] int64, a block of rows i at a time."""
    b, p, k = assign.shape
    # max(1, ...): a process's share of a short last batch may hold no image (b = 0).
    row_chunk = max(1, _CHUNK_BYTES // max(1, b * p * k * assign.element_size()))
    blocks = [(assign[:, start:start + row_chunk, None, :] * assign[:, None, :, :]).argmax(-1)
              for start in range(0, p, row_chunk)]
    return torch.cat(blocks, dim=1)


def modularity_per_image(codebook, feat, temp=0.1):
    """[B] modularity Q of each image's soft assignment of tokens to prototypes (docs/cause.md §3).

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
            best = _pairwise_argmax(assign)
        at_i = assign.gather(2, best)
        at_j = assign.gather(2, best.transpose(1, 2)).transpose(1, 2)
        delta = torch.tanh(at_i * at_j / temp)
        # Q = tr(W δ) = Σ_ij W_ij δ_ji
        return (weight * delta.transpose(1, 2)).sum((1, 2))


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


def _image_terms(rows, n_pos, batch, tokens):
    """Each image's mean over the positive pairs of its anchors -> ([B] terms, [B] has-positives)."""
    total = rows.view(batch, tokens).sum(1)
    count = n_pos.view(batch, tokens).sum(1)
    return total / count.clamp_min(1), count > 0


def contrastive_terms(proj, index, candidates, candidate_index, codebook, bank=None, anchor_offset=0, temp=0.07,
                      pos_thresh=0.3, neg_thresh=0.1):
    """The terms of the concept-wise contrastive loss (docs/cause.md §4) of some anchor images: (sum, count).

    proj [b, P, Dp] student projections of the anchor images and index [b, P] their tokens'
    prototypes; candidates [B, P, Dp] the teacher projections of the whole batch (the anchor
    images among them, starting at image `anchor_offset`) and candidate_index [B, P]; codebook
    [K, D]; bank a ConceptBank or None. Each anchor image gives one term against the batch and,
    when the bank holds anything, one against the bank. Returns the sum of the terms that have a
    positive pair and their number, so that processes sharing a batch can add both up.
    """
    # float32 even under autocast: logits are cosines / 0.07 and the masks compare cosines
    # with 0.3 / 0.1, where half-precision rounding would shift logits and flip pairs.
    with torch.autocast(device_type=proj.device.type, enabled=False):
        batch, tokens, _ = proj.shape
        prototypes = F.normalize(codebook.detach().float(), dim=-1)
        index = index.reshape(-1)
        candidate_index = candidate_index.reshape(-1)
        # Explicit sizes: a process's share of a short last batch can hold no image.
        anchor = F.normalize(proj.float().reshape(batch * tokens, proj.shape[-1]), dim=-1)
        teacher = F.normalize(candidates.detach().float().reshape(candidate_index.numel(), candidates.shape[-1]),
                              dim=-1)

        # Cosine of each anchor's prototype to every prototype: the candidates' similarity
        # c is then a column gather of [b·P, K] masks instead of another matmul.
        prototype_cos = prototypes[index] @ prototypes.T
        is_pos = prototype_cos > pos_thresh
        is_neg = prototype_cos < neg_thresh

        pos = is_pos[:, candidate_index]
        # An anchor is not its own positive (same image, same position).
        own = torch.arange(batch * tokens, device=pos.device)
        pos[own, own + anchor_offset * tokens] = False
        terms, has_pos = _image_terms(*_nce_rows(anchor, teacher, pos, is_neg[:, candidate_index], temp), batch,
                                      tokens)

        bank_index, bank_values, valid = bank.candidates() if bank is not None else (None, (), None)
        if len(bank_values):  # a compact bank hands out no rows while empty
            stored = F.normalize(bank_values.float(), dim=-1)
            pos = is_pos[:, bank_index] & valid
            neg = is_neg[:, bank_index] & valid
            bank_terms, bank_has_pos = _image_terms(*_nce_rows(anchor, stored, pos, neg, temp, valid), batch, tokens)
            terms = torch.cat([terms, bank_terms])
            has_pos = torch.cat([has_pos, bank_has_pos])

        # A term without a single positive pair is NaN (an empty mean) in the official code;
        # it is left out here, counted by mask so that nothing syncs with the host. Whenever
        # the official value is finite the two agree; an empty bank adds no terms.
        return torch.where(has_pos, terms, 0.0).sum(), has_pos.sum()


def probe_cross_entropy(logits, labels, n_classes):
    """The labelled linear probe's loss summed over valid pixels: (sum, correct, counted).

    logits [B,n,h,w] are upsampled bilinearly to the labels [B,H,W]; pixels labelled outside
    0..n-1 are ignored. Divide the sum by the valid pixels of the whole batch for the mean.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False)
        valid = (labels >= 0) & (labels < n_classes)
        flat_logits = logits.permute(0, 2, 3, 1)[valid]
        loss = F.cross_entropy(flat_logits, labels[valid], reduction="sum")
        correct = (flat_logits.argmax(1) == labels[valid]).sum()
    return loss, correct, valid.sum()
