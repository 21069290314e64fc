"""STEGO's and HP's released models as the official code computes them (docs/sota.md §1, §2): the code
head on the frozen DINO ViT, the cluster and linear probes, and each method's evaluation path.

`SotaModel` (built from a released file by `models.released.load_sota_model`) holds
- `backbone`: the frozen DINO ViT (DINO's definition: ViT-S with 6 heads), whose features are the last
  block's tokens after the final LayerNorm, CLS dropped, as a `[B, D, h, w]` map;
- `head`: `CodeHead`, STEGO's projection `code = cluster1(f) + cluster2(f)` (`net(x)[1]`), with HP's
  EMA copy of both branches (`ema_model1`, `ema_model2`, `net(x)[2]`) for HP files (loaded with the
  rest; no step computes it);
- `cluster_probe`: `ClusterLookup`, the unsupervised prediction, log_softmax(α · cos(code, centres));
- `linear_probe`: a 1×1 convolution trained with labels (a diagnostic).

Interfaces for the steps:
- `model.code(images)`: the online code `[B, d, h, w]` (STEGO's and HP's `net(x)[1]`), the features
  PriMaPs-EM runs on (`features_for_primaps` is the same call, named for that use);
- `model.eval_patch_code(images)` and `model.log_probs_of(code, size)`: the method's own evaluation
  (`PROTOCOLS[family]`): STEGO averages the code with the mirrored image's, HP does not; the code is
  upsampled bilinearly to `size` and gives the linear probe's and the cluster probe's (α = 2)
  log-probabilities, which the evaluation gives the dense CRF of `modules.crf` (the same parameters as
  STEGO's and HP's `crf.py`).
The image transform of the protocol (shorter side resized to 320 by nearest neighbour, the image
too, centre crop, ImageNet normalisation) is the data loader's; `EvalProtocol` records it.

Dropout follows the project's convention (modules/heads.py): the official `Dropout2d(0.1)`, drawn
anew for each branch, applies exactly when a `dropout(x, p)` function is passed (`channel_dropout`
is the official one); without it the code is the official eval-mode code. The official PriMaPs
wrapper of STEGO leaves the module in train mode, so its features are `code(images, channel_dropout)`.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modules.features import flip_averaged, upsample
from modules.grid import tokens_to_map

DROPOUT = 0.1  # STEGO's and HP's Dropout2d before each branch of the code head


def channel_dropout(x, p):
    """The official `nn.Dropout2d(p)` in train mode: whole channels zeroed, the rest scaled by 1/(1-p)."""
    return F.dropout2d(x, p, training=True)


@dataclass(frozen=True)
class EvalProtocol:
    """How a method evaluates its released model (docs/sota.md §1, §2)."""

    flip: bool  # average the code with the mirrored image's mirrored code, on the patch grid
    cluster_alpha: float = 2.0  # log_softmax(alpha · cos) of the cluster probe (CAUSE uses 3)
    resolution: int = 320  # shorter side resized to this, then centre-cropped square
    image_resize: str = "nearest"  # the image is resized by nearest neighbour, as its label
    half_precision: bool = False  # the official forward pass runs under fp16 autocast on a GPU


PROTOCOLS = {
    "stego": EvalProtocol(flip=True),
    # HP's eval.py: the online code, no flip; its fp16 autocast is inactive on CPU, where the golden
    # numbers were taken.
    "hp": EvalProtocol(flip=False, half_precision=True),
}


def _drop(dropout, x):
    return x if dropout is None else dropout(x, DROPOUT)


class CodeHead(nn.Module):
    """STEGO's projection of backbone features `f` [B, D, h, w] to the code [B, d, h, w]:
    cluster1(f) + cluster2(f), a 1×1 convolution plus (projection 'nonlinear') conv-ReLU-conv.
    With `ema` (HP files) it also holds HP's EMA copies of both branches. The names are the official
    modules' (`cluster1.0`, `cluster2.0`, `cluster2.2`, `ema_model1.0`, `ema_model2.{0,2}`)."""

    def __init__(self, width, code_dim, nonlinear=True, ema=False):
        super().__init__()
        self.cluster1 = self._linear(width, code_dim)
        self.cluster2 = self._nonlinear(width, code_dim) if nonlinear else None
        if ema:
            self.ema_model1 = self._linear(width, code_dim)
            self.ema_model2 = self._nonlinear(width, code_dim)
        else:
            self.ema_model1 = self.ema_model2 = None

    @staticmethod
    def _linear(width, code_dim):
        return nn.Sequential(nn.Conv2d(width, code_dim, 1))

    @staticmethod
    def _nonlinear(width, code_dim):
        return nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, code_dim, 1))

    @staticmethod
    def _project(linear, nonlinear, feat, dropout):
        code = linear(_drop(dropout, feat))
        if nonlinear is not None:
            code = code + nonlinear(_drop(dropout, feat))
        return code

    def forward(self, feat, dropout=None):
        """The online code (`net(x)[1]`)."""
        return self._project(self.cluster1, self.cluster2, feat, dropout)


class ClusterLookup(nn.Module):
    """STEGO's and HP's cluster probe: one centre per cluster in code space, `clusters` [n, d]."""

    def __init__(self, n_clusters, code_dim):
        super().__init__()
        self.clusters = nn.Parameter(torch.zeros(n_clusters, code_dim))

    def cosine(self, code):
        """[B, d, H, W] -> [B, n, H, W]: the cosine of every pixel's code to every centre."""
        return torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))

    def log_probs(self, code, alpha):
        return torch.log_softmax(alpha * self.cosine(code), dim=1)


class SotaLogProbs(NamedTuple):
    linear: torch.Tensor  # [B, K, H, W] log_softmax of the linear probe
    cluster: torch.Tensor  # [B, n, H, W] log_softmax(alpha · cos) of the cluster probe


class SotaModel(nn.Module):
    """A released STEGO or HP model: frozen backbone, code head, cluster and linear probes (module
    docstring). Everything is frozen; call under torch.no_grad()."""

    def __init__(self, family, backbone, head, n_clusters, n_classes):
        super().__init__()
        if family not in PROTOCOLS:
            raise ValueError(f"unknown SotA family {family!r}; expected one of {tuple(PROTOCOLS)}")
        self.family = family
        self.protocol = PROTOCOLS[family]
        code_dim = head.cluster1[0].out_channels
        self.backbone = backbone
        self.head = head
        self.cluster_probe = ClusterLookup(n_clusters, code_dim)
        self.linear_probe = nn.Conv2d(code_dim, n_classes, 1)
        self.requires_grad_(False)
        self.train(False)

    @property
    def code_dim(self):
        return self.linear_probe.in_channels

    def features(self, images):
        """The backbone's features [B, D, h, w]: last block, final LayerNorm, CLS dropped."""
        p = self.backbone.patch_size
        return tokens_to_map(self.backbone(images).float(), images.shape[-2] // p, images.shape[-1] // p)

    def code(self, images, dropout=None):
        """The online code [B, d, h, w] (`net(x)[1]`); `dropout`: see the module docstring."""
        return self.head(self.features(images), dropout)

    def features_for_primaps(self, images, dropout=None):
        """Φ of +SotA+PriMaPs (docs/sota.md §3): STEGO's `net(x)[-1]` and HP's `net(x)[1]`, the online code."""
        return self.code(images, dropout)

    def eval_patch_code(self, images):
        """The code the method evaluates, on the patch grid: STEGO's averaged with the mirrored image's
        mirrored code, HP's the online code of the image alone."""
        plain, averaged = flip_averaged(self.code, images, self.protocol.flip)
        return averaged if self.protocol.flip else plain

    def log_probs_of(self, patch_code, size):
        """The probes' log-probabilities of an evaluated code on the patch grid, upsampled bilinearly to `size`."""
        code = upsample(patch_code, size)
        return SotaLogProbs(torch.log_softmax(self.linear_probe(code), dim=1),
                            self.cluster_probe.log_probs(code, self.protocol.cluster_alpha))
