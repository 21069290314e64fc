"""Unsupervised segmentation metrics (docs/cause.md §6): Hungarian-matched mIoU and pixel accuracy."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class MatchedMetrics:
    """Accumulates H[pred, true] over a whole split, then matches clusters to classes once (matched=False:
    the predictions are classes already, as a labelled probe's; each keeps its own id)."""

    def __init__(self, n_classes, device=None, matched=True):
        self.n_classes = n_classes
        self.matched = matched
        self.histogram = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)

    def update(self, preds, labels):
        n = self.n_classes
        preds, labels = preds.reshape(-1), labels.reshape(-1).to(preds.device)
        valid = (labels >= 0) & (labels < n) & (preds >= 0) & (preds < n)
        counts = torch.bincount(preds[valid] * n + labels[valid], minlength=n * n).reshape(n, n)
        self.histogram = self.histogram.to(preds.device) + counts

    def _assignment(self):
        """Matched class of each predicted cluster, maximising the matched pixels."""
        if not self.matched:
            return torch.arange(self.n_classes)
        clusters, classes = linear_sum_assignment(self.histogram.cpu().numpy(), maximize=True)
        assignment = np.empty(self.n_classes, dtype=np.int64)
        assignment[clusters] = classes
        return torch.from_numpy(assignment)

    def compute(self):
        assignment = self._assignment()
        hist = self.histogram.cpu().double()
        # Row i of `matched` counts the pixels predicted as class i after matching.
        matched = torch.zeros_like(hist)
        matched[assignment] = hist
        tp = matched.diagonal()
        predicted, actual = matched.sum(dim=1), matched.sum(dim=0)
        iou = tp / (predicted + actual - tp)
        precision = tp / predicted
        defined = ~iou.isnan()
        return {
            "mIoU": iou[defined].mean().item() * 100,
            "Acc": (tp.sum() / hist.sum()).item() * 100,
            "mAP": precision[~precision.isnan()].mean().item() * 100,
            "per_class_iou": [value.item() * 100 if ok else None for value, ok in zip(iou, defined, strict=True)],
            "assignment": assignment,
            # [true class, matched prediction] pixel counts: the confusion matrix after the matching.
            "confusion": matched.T.to(torch.int64),
        }
