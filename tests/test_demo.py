"""The demo's code path learns: after Hungarian matching its mIoU is far above a random assignment's."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from steps import run_step

from loader import build_dataset
from modules.metrics import MatchedMetrics
from utils.tools.demo import prepare
from utils.runtime.pictures import colorize


def chance_levels(data_dir, resolution, n_classes, seed=0):
    """(mIoU of uniformly random cluster ids matched the same way, pixel share of the commonest class)."""
    generator = torch.Generator().manual_seed(seed)
    metrics = MatchedMetrics(n_classes)
    counts = torch.zeros(n_classes)
    for item in build_dataset("cocostuff27", data_dir, "val", resolution):
        label = item["label"]
        metrics.update(torch.randint(0, n_classes, label.shape, generator=generator), label)
        counts += torch.bincount(label[label >= 0], minlength=n_classes)
    return metrics.compute()["mIoU"], 100 * (counts.max() / counts.sum()).item()


def matched_picture_accuracy(results, val):
    """Pixel accuracy (%) of the saved matched pictures against the labels, every val image having one.

    COCO-Stuff pictures use the Pascal palette, whose colours differ for every class index, so
    a pixel is right exactly when its colour is its label's colour."""
    correct = counted = 0
    for i in range(len(val)):
        label = val[i]["label"].numpy()
        with Image.open(results / "matched" / f"{i}.png") as picture:
            matched = np.array(picture)
        valid = label >= 0
        correct += (matched == colorize(label, "pascal")).all(-1)[valid].sum()
        counted += valid.sum()
    return 100 * correct / counted


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """demo_run(head) -> (root, data_dir, args): the demo's CAUSE steps for `head`, run once for the tests
    that read them."""
    runs = {}

    def run(head):
        if head not in runs:
            root = tmp_path_factory.mktemp(f"demo_{head}")
            data_dir, ckpt, options = prepare(root, n_train=12, n_val=6, image_size=128, seed=0)
            args = ["--data_dir", str(data_dir), "--ckpt", str(ckpt), *options]
            run_step("crop", None, args)
            run_step("mediator", None, args)
            run_step("front_door", head, args)
            run_step("fine_tune", head, [*args, "--epochs", "3"])
            run_step("test", head, [*args, "--num_pictures", "-1"])
            runs[head] = (root, data_dir, args)
        return runs[head]

    return run


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_demo_pipeline_beats_a_random_assignment_by_far(demo_run, head):
    tmp_path, data_dir, _ = demo_run(head)
    results = tmp_path / "results/cocostuff27" / head.upper() / "dino_vit_tiny_8/64"
    metrics = json.loads((results / "metrics.json").read_text())
    assert matched_picture_accuracy(results, build_dataset("cocostuff27", data_dir, "val", 96)) == pytest.approx(
        metrics["crf"]["pAcc"], abs=1e-3), "the matched pictures show the predictions that were scored"
    chance_miou, majority = chance_levels(data_dir, 96, 27)
    print(f"demo: CRF mIoU {metrics['crf']['mIoU']:.1f} pAcc {metrics['crf']['pAcc']:.1f}; random assignment "
          f"mIoU {chance_miou:.1f}; commonest class {majority:.1f}% of pixels")
    for variant in ("crf", "no_crf", "no_crf_no_flip"):
        assert metrics[variant]["mIoU"] > max(10 * chance_miou, 15)
        assert metrics[variant]["pAcc"] > majority + 20, "better than labelling everything as the commonest class"


@pytest.mark.parametrize("mode", ["cause", "backbone"])
def test_demo_primaps_beats_a_random_assignment_by_far(demo_run, mode):
    root, data_dir, args = demo_run("tr")
    args = [*args, "--mode", mode, "--head", "tr", "--epochs", "20"]
    run_step("primaps", None, args)
    run_step("test_primaps", None, args)
    results = "PRIMAPS_TR/dino_vit_tiny_8/64" if mode == "cause" else "PRIMAPS_BACKBONE/dino_vit_tiny_8"
    metrics = json.loads((root / "results/cocostuff27" / results / "metrics.json").read_text())
    chance_miou, majority = chance_levels(data_dir, 96, 27)
    print(f"demo, PriMaPs-EM {mode} mode: θ_M CRF mIoU {metrics['crf']['mIoU']:.1f} pAcc {metrics['crf']['pAcc']:.1f}; "
          f"initial prototypes CRF mIoU {metrics['init_crf']['mIoU']:.1f}; random assignment mIoU {chance_miou:.1f}")
    for variant in ("crf", "no_crf", "theta_r_crf", "theta_r_no_crf"):
        assert metrics[variant]["mIoU"] > max(10 * chance_miou, 15), variant
        assert metrics[variant]["pAcc"] > majority + 20, variant
