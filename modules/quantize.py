"""Nearest-prototype quantisation by cosine similarity (the official `vqt` / `quantize_index`)."""
import torch
import torch.nn.functional as F


def cosine_similarity_to(z, codebook):
    """[..., D] x [K, D] -> [..., K] cosine similarities."""
    return F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T


def quantize_index(z, codebook):
    """[B, P, D] -> [B, P] int64 index of the prototype with the highest cosine.

    In float32 even under autocast: neighbouring prototypes' cosines can differ by 1e-5, and a
    half-precision arg-max would choose other prototypes than a float32 run does."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return cosine_similarity_to(z.float(), codebook.float()).argmax(-1)


def quantize(z, codebook):
    """[B, P, D] -> the nearest prototype of every token, [B, P, D]."""
    return codebook[quantize_index(z, codebook)].to(z.dtype)
