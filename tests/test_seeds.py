"""`bash run --seeds`: the chain once per seed, each seed's files apart, then mean ± std over the seeds,
and the report of them all."""
import csv
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from steps import make_tiny_setup

from utils.cli.pipeline import PipelineError, seeded, split_seeds

# The smallest chain: one optimizer step per training step, 64 px, three val images.
TINY = ["--train_resolution", "64", "--test_resolution", "64", "--batch_size", "4", "--num_codebook", "16",
        "--projection_dim", "24", "--num_workers", "0", "--crf_workers", "1", "--num_pictures", "1",
        "--epochs", "1", "--max_steps", "1"]


def test_seeds_are_read_and_each_gets_its_own_folders_and_seed():
    assert split_seeds(["--epochs", "1", "--seeds", "2,0"]) == ([2, 0], ["--epochs", "1"])
    assert split_seeds(["--seeds=3"]) == ([3], [])
    assert split_seeds(["--epochs", "1"]) == (None, ["--epochs", "1"])
    for tokens, message in ((["--seeds", "0,x"], "whole numbers"), (["--seeds", "1,1"], "a seed twice"),
                            (["--seeds"], "needs a value")):
        with pytest.raises(PipelineError, match=message):
            split_seeds(tokens)
    tokens = ["--output_root", "out", "--data_dir", "data.seed", "--results_root=res"]
    assert seeded(tokens, None) is tokens, "a run without --seeds is routed as it always was"
    assert seeded(tokens, 2) == ["--data_dir", "data.seed", "--output_root=out/seed_2", "--results_root=res/seed_2",
                                 "--logs_root=logs/seed_2", "--seed=2"]
    for refused in (["--seed", "4"], ["--front_door.seed", "4"], ["--test.results_root", "r"]):
        with pytest.raises(PipelineError, match="--seeds sets each chain's --seed"):
            seeded(refused, 0)


def test_two_seeds_train_apart_and_end_with_mean_and_std(tmp_path):
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=4, n_val=3)
    args = ["bash", str(ROOT / "run"), "--head", "tr", "--data_dir", str(data_dir), "--ckpt", str(ckpt), *TINY,
            "--output_root", str(tmp_path / "CAUSE"), "--results_root", str(tmp_path / "results"),
            "--logs_root", str(tmp_path / "logs"), "--seeds", "0,1"]
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reports = []
    for seed in (0, 1):
        model = tmp_path / f"CAUSE/seed_{seed}/cocostuff27/dino_vit_tiny_8/16/cluster_tr.json"
        assert json.loads(model.read_text())["identity"]["settings"]["seed"] == seed
        assert list((tmp_path / f"logs/seed_{seed}").rglob("events.out.tfevents.*")), "each seed's own logs"
        folder = tmp_path / f"results/seed_{seed}/cocostuff27/TR/dino_vit_tiny_8/16"
        reports.append(json.loads((folder / "metrics.json").read_text()))
        for picture in ("per_class_iou.png", "confusion.png"):
            assert min(np.array(Image.open(folder / picture)).shape[:2]) >= 600
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert reports[0]["crf"] != reports[1]["crf"], "the seeds trained differently"

    lines = done.stdout.splitlines()
    summary = lines[lines.index("over seeds 0, 1 (n = 2), mean ± std:"):]
    for variant in reports[0]["variants"]:
        shown = [f"{figure} {statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
                 for figure in ("mIoU", "pAcc") for values in [[report[variant][figure] for report in reports]]]
        assert f"  {variant:<24} {shown[0]}  {shown[1]}  (n = 2)" in summary, variant
    assert lines[-1] == f"report: {tmp_path / 'results' / 'report.md'}"

    row, = list(csv.DictReader((tmp_path / "results/report.csv").read_text().splitlines()))
    assert row["seeds"] == "0, 1" and row["n"] == "2"
    for variant in ("crf", "no_crf"):
        for figure in ("mIoU", "pAcc"):
            values = [report[variant][figure] for report in reports]
            assert float(row[f"{variant}_{figure}_mean"]) == statistics.fmean(values)
            assert float(row[f"{variant}_{figure}_std"]) == statistics.stdev(values)
