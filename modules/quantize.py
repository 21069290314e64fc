"""Nearest-prototype quantisation by cosine similarity (the official `vqt` / `quantize_index`)."""
import torch.nn.functional as F


def cosine_similarity_to(z, codebook):
    """[..., D] x [K, D] -> [..., K] cosine similarities."""
    return F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T


def quantize_index(z, codebook):
    """[B, P, D] -> [B, P] int64 index of the prototype with the highest cosine."""
    return cosine_similarity_to(z, codebook).argmax(-1)


def quantize(z, codebook):
    """[B, P, D] -> the nearest prototype of every token, [B, P, D]."""
    return codebook[quantize_index(z, codebook)]
