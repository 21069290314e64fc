"""Step-3 cluster probe (docs/cause.md §5, §6): class centroids in the head's R-dim feature space.

Saved with the clusterbook as `cluster_{mlp,tr}.pth`; the names `codebook` and
`cluster_probe` are those of the released files.
"""
import torch
import torch.nn.functional as F
from torch import nn


def crf_log_probs(cosine, alpha=3):
    """The CRF's unary input from ClusterModule.cosine_logits: log_softmax(alpha * cosine) over classes.

    A function of the cosines rather than of the features, so that evaluation, which also takes
    their argmax, computes them once."""
    return torch.log_softmax(alpha * cosine, dim=1)


class ClusterModule(nn.Module):
    def __init__(self, num_codebook, dim, reduced_dim, n_classes):
        super().__init__()
        # The step-1 clusterbook travels in this file but never learns here: a buffer, not a parameter.
        self.register_buffer("codebook", torch.empty(num_codebook, dim).uniform_(-1 / num_codebook, 1 / num_codebook))
        self.cluster_probe = nn.Parameter(torch.empty(n_classes, reduced_dim).uniform_(-1 / n_classes, 1 / n_classes))

    def cosine_logits(self, feat_map):
        """[B,R,H,W] -> [B,n,H,W]: cosine between each pixel's feature and each centroid."""
        features = F.normalize(feat_map, dim=1)
        centroids = F.normalize(self.cluster_probe, dim=1)
        return torch.einsum("brhw,nr->bnhw", features, centroids)

    def predict(self, feat_map):
        """Nearest centroid by cosine: [B,H,W] int64."""
        return self.cosine_logits(feat_map).argmax(dim=1)
