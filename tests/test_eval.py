"""Evaluation pieces against the official implementation's numbers (golden/eval.pt)."""
import multiprocessing

import numpy as np
import pytest
import torch
from conftest import load_golden
from PIL import Image
from whole_batch import dense_crf

from modules.crf import crf_image, dense_crf_batch
from modules.metrics import MatchedMetrics
from utils.runtime.pictures import colorize, palette, prediction_pictures, save_pictures


@pytest.fixture(scope="module")
def golden():
    return load_golden("eval.pt")


def test_metrics_match_official(golden):
    for case in golden["metrics"]:
        metrics = MatchedMetrics(case["n_classes"])
        for preds, labels in zip(case["preds"], case["labels"], strict=True):
            metrics.update(preds, labels)
        result = metrics.compute()
        for key in ("mIoU", "Acc", "mAP"):
            assert result[key] == pytest.approx(case[key], rel=1e-5), key
        assert torch.equal(result["assignment"], case["assignment"])
        defined = [v for v in result["per_class_iou"] if v is not None]
        assert result["mIoU"] == pytest.approx(sum(defined) / len(defined))


def test_metrics_perfect_up_to_permutation():
    labels = torch.tensor([[0, 0, 1, 2], [2, 1, -1, 0]])
    relabel = torch.tensor([2, 0, 1])  # cluster c stands for class relabel.argsort()[c]
    preds = relabel[labels.clamp(min=0)]  # the ignored pixel gets a real cluster: it must not count
    metrics = MatchedMetrics(3)
    metrics.update(preds, labels)
    result = metrics.compute()
    assert result["mIoU"] == result["Acc"] == result["mAP"] == 100
    assert result["per_class_iou"] == [100, 100, 100]
    assert torch.equal(result["assignment"], relabel.argsort())
    assert torch.equal(result["assignment"][preds][labels >= 0], labels[labels >= 0])


def test_metrics_hand_computed():
    # H[pred, true]: cluster 0 holds 3 pixels of class 1 and 1 of class 0; cluster 1 holds 2 of class 0.
    # The last pixel's prediction is out of range: it must not count.
    preds = torch.tensor([0, 0, 0, 0, 1, 1, 7])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0])
    metrics = MatchedMetrics(2)
    metrics.update(preds, labels)
    assert metrics.histogram.tolist() == [[1, 3], [2, 0]]
    result = metrics.compute()
    assert result["assignment"].tolist() == [1, 0]
    assert result["Acc"] == pytest.approx(500 / 6)
    assert result["per_class_iou"] == pytest.approx([200 / 3, 75])
    assert result["mAP"] == pytest.approx((100 + 75) / 2)


def test_metrics_undefined_class_is_none():
    metrics = MatchedMetrics(3)
    metrics.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    result = metrics.compute()
    assert result["per_class_iou"][2] is None and result["mIoU"] == 100


def test_crf_matches_official(golden):
    for case in golden["crf"]:
        q = dense_crf(case["image"], case["log_probs"], case["max_iter"])
        torch.testing.assert_close(q, case["q"], rtol=0, atol=1e-4)


def test_crf_batch_matches_single(golden):
    case = golden["crf"][0]
    images = torch.stack([case["image"], case["image"].flip(-1)])
    log_probs = torch.stack([case["log_probs"], case["log_probs"].flip(-1)])
    batch = dense_crf_batch(images, log_probs, max_iter=2)
    assert batch.shape == (2, *case["q"].shape)
    for image, lp, q in zip(images, log_probs, batch, strict=True):
        torch.testing.assert_close(q, dense_crf(image, lp, max_iter=2))


class _TimedPool:
    """A pool whose map fails instead of hanging, so a deadlocked worker fails the test."""

    def __init__(self, pool):
        self.pool = pool

    def map(self, function, iterable):
        return self.pool.map_async(function, iterable).get(timeout=60)


def test_crf_batch_in_forked_pool_after_parent_torch_work():
    # Parent-side torch work starts OpenMP threads; forked workers must not depend on them.
    torch.randn(256, 256) @ torch.randn(256, 256)
    images, log_probs = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 4, 4).log_softmax(0)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pooled = dense_crf_batch(images, log_probs, max_iter=2, pool=_TimedPool(pool))
    torch.testing.assert_close(pooled, dense_crf_batch(images, log_probs, max_iter=2))


def test_palettes():
    pascal, cityscapes = palette("pascal"), palette("cityscapes")
    assert pascal.shape == (512, 3) and pascal.dtype == np.uint8
    assert pascal[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert cityscapes.shape == (28, 3) and cityscapes.dtype == np.uint8
    assert cityscapes[0].tolist() == [128, 64, 128] and cityscapes[-1].tolist() == [0, 0, 0]
    for name in ("pascal", "cityscapes"):
        picture = colorize(torch.tensor([[-1, 1], [2, 3]]), name)
        assert picture.shape == (2, 2, 3) and picture.dtype == np.uint8
        assert picture[0, 0].tolist() == [0, 0, 0]
        assert picture[1, 1].tolist() == palette(name)[3].tolist()


def test_save_prediction_pictures(tmp_path):
    image = torch.randn(3, 6, 10)
    label = torch.randint(-1, 27, (6, 10))
    raw, crf = (torch.randint(0, 27, (6, 10)) for _ in range(2))
    save_pictures(tmp_path, 7, prediction_pictures(image, label, raw, crf, palette_name="cityscapes"))
    for folder in ("imgs", "labels", "raw", "crf"):
        with Image.open(tmp_path / folder / "7.png") as picture:
            assert picture.size == (10, 6) and picture.mode == "RGB"
    with Image.open(tmp_path / "labels" / "7.png") as picture:
        assert np.array_equal(np.array(picture), colorize(label, "cityscapes"))


def test_crf_image_wraps_out_of_range_like_the_official():
    # to_pil_image truncates ×255 values toward zero and wraps them modulo 256.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    values = torch.tensor([-1.5, 256.5, 100.3])
    image = ((values[None, :] / 255 - mean[:, None]) / std[:, None])[:, None, :]  # [3,1,3], same per channel
    bgr = crf_image(image)
    assert bgr.shape == (1, 3, 3)
    assert bgr[0, :, 0].tolist() == [255, 0, 100]


def test_a_labelled_probe_is_scored_on_its_own_classes():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    swapped = torch.tensor([[1, 1, 0, 0, 2, 2]])
    matched, unmatched = MatchedMetrics(3), MatchedMetrics(3, matched=False)
    for metrics in (matched, unmatched):
        metrics.update(swapped, labels)
    assert matched.compute()["mIoU"] == pytest.approx(100)
    result = unmatched.compute()
    assert result["mIoU"] == pytest.approx(100 / 3) and result["Acc"] == pytest.approx(100 / 3)
    assert result["assignment"].tolist() == [0, 1, 2]
