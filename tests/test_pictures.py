"""The figures of every evaluation: each class's IoU with and without the CRF, and the matched confusion
matrix, drawn from the evaluation's own numbers, readable (at least 600 px a side), and in TensorBoard."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loader import class_names
from modules.metrics import MatchedMetrics
from utils.engine.evaluate import evaluation_figures, figure_pairs, save_figures
from utils.runtime.pictures import confusion_figure, figure_rgb, per_class_iou_figure

NAMES = class_names("potsdam3")


def scored(preds, labels):
    metrics = MatchedMetrics(len(NAMES))
    metrics.update(torch.tensor(preds), torch.tensor(labels))
    return metrics.compute()


def bars(figure):
    """{legend label: [bar height, by class]} of a per-class IoU figure."""
    axes = figure.axes[0]
    return {container.get_label(): [patch.get_height() for patch in container.patches]
            for container in axes.containers}


def test_the_per_class_figure_has_one_bar_per_class_and_variant_with_its_iou():
    ious = {"after the CRF": [80.0, None, 12.5], "without the CRF": [70.0, 5.0, 0.0]}
    figure = per_class_iou_figure(NAMES, ious, "title")
    heights = bars(figure)
    assert list(heights) == list(ious)
    assert heights["without the CRF"] == [70.0, 5.0, 0.0]
    after = heights["after the CRF"]
    assert after[0] == 80.0 and math.isnan(after[1]) and after[2] == 12.5, "an undefined IoU draws no bar"
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == NAMES
    picture = figure_rgb(figure)
    assert picture.dtype == np.uint8 and min(picture.shape[:2]) >= 600
    with pytest.raises(ValueError, match="2 IoUs for 3 classes"):
        per_class_iou_figure(NAMES, {"short": [1.0, 2.0]}, "title")


def test_the_confusion_figure_normalises_each_true_class_and_names_both_axes():
    counts = np.array([[6, 2, 0], [0, 0, 0], [1, 1, 2]])
    figure = confusion_figure(NAMES, counts, "title")
    axes = figure.axes[0]
    shown = np.asarray(axes.images[0].get_array())
    np.testing.assert_allclose(shown, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    assert [label.get_text() for label in axes.get_xticklabels()] == NAMES
    assert [label.get_text() for label in axes.get_yticklabels()] == NAMES
    assert min(figure_rgb(figure).shape[:2]) >= 600


def test_the_figures_of_many_classes_stay_at_least_600_px():
    names = class_names("coco171")
    picture = figure_rgb(confusion_figure(names, np.eye(len(names)), "coco171"))
    assert min(picture.shape[:2]) >= 600


def test_variant_pairs_with_and_without_the_crf():
    variants = ["crf", "no_crf", "no_crf_no_flip", "linear_crf", "linear_no_crf", "primaps_protocol_crf",
                "primaps_protocol_no_crf", "theta_r_crf"]
    assert figure_pairs(variants) == {"": ("crf", "no_crf"), "linear_": ("linear_crf", "linear_no_crf"),
                                      "primaps_protocol_": ("primaps_protocol_crf", "primaps_protocol_no_crf")}


def test_an_evaluation_draws_its_own_numbers_beside_its_metrics_and_in_tensorboard(tmp_path):
    # Cluster 2 holds class 0's pixels, cluster 0 class 1's, cluster 1 class 2's, with some confusion.
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, -1]
    results = {"crf": scored([2, 2, 2, 0, 0, 0, 1, 1, 0, 1], labels),
               "no_crf": scored([2, 2, 0, 0, 0, 0, 1, 2, 0, 1], labels),
               "theta_r_crf": scored([0, 0, 0, 0, 1, 1, 2, 2, 2, 0], labels),
               "theta_r_no_crf": scored([0, 0, 0, 1, 1, 1, 2, 2, 2, 0], labels)}
    # The matched confusion, counted by hand from the matching: [true class, predicted class].
    matched = results["crf"]["assignment"][torch.tensor([2, 2, 2, 0, 0, 0, 1, 1, 0])]
    expected = np.zeros((3, 3))
    np.add.at(expected, (labels[:9], matched.numpy()), 1)
    assert np.array_equal(results["crf"]["confusion"].numpy(), expected)

    cfg = SimpleNamespace(dataset="potsdam3", step="test_primaps", head=None)
    figures = evaluation_figures(cfg, results)
    assert sorted(figures) == sorted(f"{prefix}{name}" for prefix in ("", "theta_r_")
                                     for name in ("per_class_iou", "confusion"))
    for prefix, (crf, no_crf) in {"": ("crf", "no_crf"), "theta_r_": ("theta_r_crf", "theta_r_no_crf")}.items():
        assert bars(figures[f"{prefix}per_class_iou"]) == {"after the CRF": results[crf]["per_class_iou"],
                                                           "without the CRF": results[no_crf]["per_class_iou"]}
    shown = np.asarray(figures["confusion"].axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, expected / expected.sum(axis=1, keepdims=True))

    save_figures(cfg, tmp_path, results)
    for name, figure in figures.items():  # the files are these figures, drawn
        picture = np.array(Image.open(tmp_path / f"{name}.png"))
        assert min(picture.shape[:2]) >= 600, name
        assert np.array_equal(picture, figure_rgb(figure)), name
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"test_primaps/{prefix}{name}" for prefix in ("", "theta_r_")
                                                     for name in ("per_class_iou", "confusion"))
    logged = events.Images("test_primaps/confusion")[0]
    on_disk = Image.open(tmp_path / "confusion.png")
    assert (logged.width, logged.height) == on_disk.size
