"""The whole chain (`bash run`) on a tiny generated data set with a small stand-in backbone, on CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from loader.synthetic import make_synthetic_cocostuff
from models import build_backbone
from modules.heads import SegmentModule
from modules.probe import ClusterModule
from utils.runtime.io import save_torch

# 64-px crops on a patch-8 backbone: an 8×8 token grid, 2×2 after grid sampling.
SMALL = ["--train_resolution", "64", "--test_resolution", "64", "--batch_size", "4", "--num_codebook", "16",
         "--projection_dim", "24", "--num_workers", "0", "--crf_workers", "1", "--num_pictures", "2",
         "--epochs", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data_dir = root / "data"
    make_synthetic_cocostuff(data_dir, n_train=4, n_val=3, image_size=128, seed=1)
    ckpt = root / "checkpoint" / "dino_vit_tiny_8.pth"
    torch.manual_seed(0)
    save_torch(build_backbone("dino_vit_tiny_8").state_dict(), ckpt)
    return root, data_dir, ckpt


def run_chain(root, data_dir, ckpt, head, *extra):
    args = ["bash", str(ROOT / "run"), "--head", head, "--data_dir", str(data_dir), "--ckpt", str(ckpt), *SMALL,
            "--output_root", str(root / "CAUSE"), "--results_root", str(root / "results"),
            "--logs_root", str(root / "logs"), *extra]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_run_chains_every_step_then_skips_finished_ones(tiny_run, head):
    root, data_dir, ckpt = tiny_run
    output = run_chain(root, data_dir, ckpt, head)

    crops = data_dir / "cocostuff" / "cropped" / "cocostuff_five_crop_0.5"
    assert len(list((crops / "img" / "train").glob("*.jpg"))) == 4 * 5
    artifacts = root / "CAUSE" / "cocostuff27"
    modular = artifacts / "modularity" / "dino_vit_tiny_8" / "16" / "modular.npy"
    segment_file = artifacts / "dino_vit_tiny_8" / "16" / f"segment_{head}.pth"
    cluster_file = artifacts / "dino_vit_tiny_8" / "16" / f"cluster_{head}.pth"
    assert np.load(modular).shape == (16, 192)
    # The artifacts load strictly into the modules of the released layout.
    segment = SegmentModule(head, 192, 90, 24, 27, 64 if head == "tr" else None)
    segment.load_state_dict(torch.load(segment_file, weights_only=True), strict=True)
    ClusterModule(16, 192, 90, 27).load_state_dict(torch.load(cluster_file, weights_only=True), strict=True)
    assert not list(artifacts.rglob("resume/*.pt")), "a finished step must leave no resume state"

    results = root / "results" / "cocostuff27" / head.upper() / "dino_vit_tiny_8" / "16"
    metrics = json.loads((results / "metrics.json").read_text())
    for variant in ("crf", "no_crf"):
        assert 0 <= metrics[variant]["mIoU"] <= 100 and 0 <= metrics[variant]["pAcc"] <= 100
        assert len(metrics[variant]["per_class_iou"]) == 27
    assert 0 <= metrics["linear_probe_pixel_accuracy_uses_labels"] <= 100
    last_line = [line for line in output.splitlines() if line.startswith("mIoU:")][-1]
    assert last_line == f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"
    pictures = list(results.rglob("*.png"))
    assert len(pictures) == 2 * 5, "image, label, raw, crf and matched pictures of 2 images"
    assert list((root / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs are written"

    stamps = {p: p.stat().st_mtime_ns for p in (modular, segment_file, cluster_file, results / "metrics.json")}
    again = run_chain(root, data_dir, ckpt, head)
    assert again.count("skipping") == 5, again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_run_with_primaps_adds_its_steps_in_cause_mode_and_prints_both_results(tiny_run):
    root, data_dir, ckpt = tiny_run
    output = run_chain(root, data_dir, ckpt, "tr", "--primaps", "--primaps.epochs", "2")
    assert "+ train_primaps.py --head tr" in output and "+ test_primaps.py --head tr" in output
    masks = root / "CAUSE/cocostuff27/primaps_masks/dino_vit_tiny_8_64px_threshold0.4_seed0"
    assert len(list(masks.glob("*.png"))) == 4, "one pseudo mask per train image"
    model = root / "CAUSE/cocostuff27/dino_vit_tiny_8/16/primaps_tr.pth"
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["complete"] and record["identity"]["settings"]["mode"] == "cause"
    assert set(record["upstream"]) == {"modular", "segment", "cluster"}, "cause mode reads the CAUSE artifacts"
    cause = json.loads((root / "results/cocostuff27/TR/dino_vit_tiny_8/16/metrics.json").read_text())
    primaps = json.loads((root / "results/cocostuff27/PRIMAPS_TR/dino_vit_tiny_8/16/metrics.json").read_text())
    both = [line for line in output.splitlines() if line.startswith("CAUSE TR ")]
    assert len(both) == 2 and f"mIoU {cause['crf']['mIoU']:.1f}" in both[0], both
    assert both[1].startswith("CAUSE TR + PriMaPs-EM ") and f"mIoU {primaps['crf']['mIoU']:.1f}" in both[1]
