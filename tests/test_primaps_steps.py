"""The PriMaPs-EM steps (train_primaps.py, test_primaps.py) on tiny synthetic data: both modes, the
COCO-Stuff and Potsdam-3 layouts, the pseudo-mask cache, kill and resume, determinism, bad input."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import ROOT
from datagen import write_potsdam
from steps import make_tiny_setup, only_for, run_step, step_args

import utils.engine.primaps as primaps_engine
import utils.engine.primaps_masks as masks_engine
from modules.primaps import NO_MASK, class_probabilities, focal_loss
from modules.views import FLIP, VIEW_DRAWS, flip_rows, student_view
from utils.engine.resume import ResumeState
from utils.cli.steps import main

# The masks' folder: the arch, the first hex digits of the backbone weights' fingerprint, the settings.
MASKS = "primaps_masks/dino_vit_tiny_8_{weights}_64px_threshold0.4_seed0"
BACKBONE_DIR = "CAUSE/{dataset}/primaps/dino_vit_tiny_8"


class Killed(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("primaps")
    data_dir, ckpt = make_tiny_setup(root, n_train=4, n_val=3, image_size=96)
    write_potsdam(data_dir, n_train=4, n_val=2)
    return data_dir, ckpt


def masks_of(root, dataset="cocostuff27"):
    """The one masks folder of the tiny backbone under `root` (its name holds the weights' fingerprint)."""
    found = list((root / "CAUSE" / dataset).glob(MASKS.format(weights="*")))
    assert len(found) == 1, found
    return found[0]


def primaps_args(setup, out, *extra):
    data_dir, ckpt = setup
    return step_args(data_dir, ckpt, out, extra=("--epochs", "2", "--init_epochs", "1", "--pca_batches", "2", *extra))


def state(path):
    return torch.load(path, weights_only=True)


def assert_same_state(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def mask_bytes(folder):
    return {png.name: png.read_bytes() for png in sorted(folder.glob("*.png"))}


def test_the_student_view_and_the_shared_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    draws = torch.rand(3, VIEW_DRAWS, generator=gen)
    draws[:, FLIP] = torch.tensor([0.2, 0.7, 0.4])
    flipped = flip_rows(images, draws[:, FLIP] < 0.5)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    masks = torch.arange(3 * 32 * 32).reshape(3, 32, 32)
    assert torch.equal(flip_rows(masks, draws[:, FLIP] < 0.5)[2], masks[2].flip(-1)), "masks flip with their images"
    # Row 0: the grayscale branch, applied; row 1: the jitter branch, not applied (blur alone); row 2: jittered.
    draws[:, 2:4] = torch.tensor([[0.9, 0.05], [0.1, 0.9], [0.1, 0.1]])
    views = student_view(images, draws)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    rgb = views * std + mean
    assert torch.allclose(rgb[0][0], rgb[0][1], atol=1e-5) and torch.allclose(rgb[0][1], rgb[0][2], atol=1e-5)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5, "jittered in [0, 1], then normalised"
    blurred = student_view(images[1:2], draws[1:2])
    assert torch.equal(blurred, views[1:2]) and not torch.allclose(views[1], images[1])
    assert not torch.allclose(views[2], student_view(images[2:], torch.cat([draws[2:, :4], draws[1:2, 4:]], 1))[0]), \
        "the jitter factors come from the draws"


def test_the_focal_loss_of_a_split_batch_adds_up_to_the_whole_batch_loss():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 6, 7, generator=gen)
    target = torch.randint(0, 5, (4, 6, 7), generator=gen)
    target[:, :2] = NO_MASK
    pixels = target.numel()
    mean_probability = class_probabilities(logits).sum(dim=1) / pixels
    parts = [focal_loss(logits[rows], target[rows], mean_probability=mean_probability, pixels=pixels)
             for rows in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(sum(parts), focal_loss(logits, target))


def test_backbone_mode_on_potsdam_caches_reuses_and_repairs_its_masks(setup, tmp_path, capsys):
    args = primaps_args(setup, tmp_path, "--dataset", "potsdam3", "--mode", "backbone")
    run_step("primaps", None, args)
    artifacts = tmp_path / BACKBONE_DIR.format(dataset="potsdam3")
    for name in ("init", "primaps"):
        record = json.loads((artifacts / f"{name}.json").read_text())
        assert record["complete"], name
    masks = masks_of(tmp_path, "potsdam3")
    info = json.loads((masks / "masks.json").read_text())
    assert info["complete"] and info["images"] == 4 and info["identity"]["attention_heads_of_dino_vit_small"] == 6
    assert sorted(masks_png.stem for masks_png in masks.glob("*.png")) == [f"tile_{i}" for i in range(4)]
    first_masks, first_model = mask_bytes(masks), state(artifacts / "primaps.pth")
    run_step("primaps", None, args)
    assert capsys.readouterr().out.count("is up to date") == 2, "the initialisation and the prototypes"

    run_step("test_primaps", None, args)
    results = tmp_path / "results/potsdam3/PRIMAPS_BACKBONE/dino_vit_tiny_8"
    metrics = json.loads((results / "metrics.json").read_text())
    for variant in ("crf", "no_crf", "theta_r_crf", "theta_r_no_crf", "init_crf", "init_no_crf"):
        assert 0 <= metrics[variant]["mIoU"] <= 100 and len(metrics[variant]["per_class_iou"]) == 3, variant
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"
    assert len(list(results.glob("*/*.png"))) == 2 * 5, "image, label, raw, crf and matched pictures of 2 images"
    assert sorted(path.name for path in results.glob("*.png")) == sorted(
        f"{prefix}{figure}.png" for prefix in ("", "theta_r_", "init_") for figure in ("confusion", "per_class_iou")), \
        "the figures of θ_M, θ_R and the initial prototypes"
    assert metrics["upstream"]["primaps"]["fingerprint"].startswith("sha256:")

    # A mask cut short is found and computed again, the others are reused; the same seed gives the same
    # masks and the same prototypes.
    damaged = masks / "tile_2.png"
    damaged.write_bytes(damaged.read_bytes()[:40])
    run_step("primaps", None, [*args, "--restart"])
    assert "1 computed, 3 reused" in capsys.readouterr().out
    assert mask_bytes(masks) == first_masks
    assert_same_state(state(artifacts / "primaps.pth"), first_model)


@pytest.fixture(scope="module")
def whole_run(setup, tmp_path_factory):
    """An uninterrupted backbone-mode run on the COCO-Stuff layout (the reference of the next tests)."""
    out = tmp_path_factory.mktemp("whole")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as conftest sets it for the tests that compare with this run
    try:
        run_step("primaps", None, primaps_args(setup, out, "--mode", "backbone"))
    finally:
        torch.set_num_threads(threads)
    return out


def test_a_run_killed_in_its_masks_and_then_in_training_resumes_to_the_uninterrupted_result(
        setup, whole_run, tmp_path, monkeypatch, capsys):
    args = primaps_args(setup, tmp_path, "--mode", "backbone")
    written = []
    real_save_png = masks_engine.save_png

    def save_then_die(mask, path):
        if len(written) == 2:
            raise Killed
        real_save_png(mask, path)
        written.append(path)

    monkeypatch.setattr(masks_engine, "save_png", save_then_die)
    with pytest.raises(Killed):
        run_step("primaps", None, args)
    monkeypatch.undo()
    masks = masks_of(tmp_path)
    assert len(list(masks.glob("*.png"))) == 2
    assert not json.loads((masks / "masks.json").read_text())["complete"]

    real_resume_save = ResumeState.save

    def save_epoch_then_die(self, epoch, training):
        real_resume_save(self, epoch, training)
        if self.ctx.cfg.step == "primaps":
            raise Killed

    monkeypatch.setattr(ResumeState, "save", save_epoch_then_die)
    with pytest.raises(Killed):
        run_step("primaps", None, args)
    monkeypatch.undo()
    assert "2 computed, 2 reused" in capsys.readouterr().out
    resume = tmp_path / BACKBONE_DIR.format(dataset="cocostuff27") / "resume" / "primaps.json"
    assert resume.is_file()

    run_step("primaps", None, args)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert not resume.exists()
    reference = whole_run / BACKBONE_DIR.format(dataset="cocostuff27")
    for name in ("init.pth", "primaps.pth"):
        assert_same_state(state(tmp_path / BACKBONE_DIR.format(dataset="cocostuff27") / name), state(reference / name))
    assert mask_bytes(masks) == mask_bytes(masks_of(whole_run))


def test_keep_best_on_val_keeps_the_best_epoch_and_says_it_used_labels(whole_run, setup, tmp_path):
    shutil.copytree(whole_run / "CAUSE", tmp_path / "CAUSE")  # its initialisation and masks: reused
    run_step("primaps", None, primaps_args(setup, tmp_path, "--mode", "backbone", "--epochs", "1"))
    artifacts = tmp_path / BACKBONE_DIR.format(dataset="cocostuff27")
    after_one_epoch = state(artifacts / "primaps.pth")
    run_step("primaps", None, primaps_args(setup, tmp_path, "--mode", "backbone", "--keep_best_on_val"))
    # θ_M first moves after the 11th batch: both epochs score the same, and the first of equals is kept.
    assert_same_state(state(artifacts / "primaps.pth"), after_one_epoch)
    record = json.loads((artifacts / "primaps.json").read_text())
    assert record["kept"].endswith("(selected with the val labels): epoch 1") and record["epochs_done"] == 2
    assert record["identity"]["settings"]["keep_best_on_val"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_does(setup, whole_run, tmp_path):
    # The PCA is computed on rank 0 from the gathered global batches and broadcast; π and the focal
    # loss's denominator are the global batch's: the paper recipe trains the same on 1 and 2 processes.
    args = primaps_args(setup, tmp_path, "--mode", "backbone", "--nproc", "2", "--port", str(free_port()))
    command = [sys.executable, "train_primaps.py", *only_for("primaps", args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("init.pth", "primaps.pth"):
        one, two = (state(root / BACKBONE_DIR.format(dataset="cocostuff27") / name) for root in (whole_run, tmp_path))
        for key in one:
            # Gradients summed in another order: float32 rounding, which Adam's steps can enlarge a little.
            assert (one[key].float() - two[key].float()).norm() <= 1e-3 * one[key].float().norm() + 1e-5, (name, key)


def test_nan_proposals_and_a_non_finite_loss(setup, tmp_path, monkeypatch, capsys):
    args = primaps_args(setup, tmp_path, "--mode", "backbone")
    proposals = []
    real_log_probs = masks_engine.mask_log_probs

    def nan_for_the_first_image(*a, **k):  # as features without any direction make them
        proposals.append(1)
        log_probs = real_log_probs(*a, **k)
        return log_probs * float("nan") if len(proposals) == 1 else log_probs

    monkeypatch.setattr(masks_engine, "mask_log_probs", nan_for_the_first_image)
    calls = []
    real_focal = primaps_engine.focal_loss

    def diverging(*a, **k):
        calls.append(1)
        loss = real_focal(*a, **k)
        return loss * float("nan") if len(calls) > 1 else loss  # one batch per epoch: NaN in the second

    monkeypatch.setattr(primaps_engine, "focal_loss", diverging)
    with pytest.raises(SystemExit) as stopped:
        run_step("primaps", None, args)
    assert stopped.value.code == 2
    assert "loss is nan at epoch 2, batch 0" in capsys.readouterr().err
    artifacts = tmp_path / BACKBONE_DIR.format(dataset="cocostuff27")
    assert (artifacts / "resume" / "primaps.json").is_file()
    record = json.loads((artifacts / "primaps.json").read_text())
    assert record["epochs_done"] == 1 and not record["complete"]
    assert all(torch.isfinite(value).all() for value in state(artifacts / "primaps.pth").values())
    # The image whose proposals went NaN has no mask at all, and masks.json says so.
    masks = masks_of(tmp_path)
    info = json.loads((masks / "masks.json").read_text())
    assert info["proposals_nan_in_the_last_run"] == info["images_without_masks"] == ["000000000001"]
    assert (np.array(Image.open(masks / "000000000001.png")) == NO_MASK).all()


@pytest.mark.parametrize("case", ["cause_without_cause_artifacts", "test_before_training", "threshold",
                                  "missing_primaps_train_list"])
def test_bad_input_stops_before_any_work_with_a_clear_message(setup, tmp_path, capsys, case):
    data_dir, ckpt = setup
    step, extra = "primaps", ["--mode", "backbone"]
    if case == "cause_without_cause_artifacts":
        extra, expected = ["--mode", "cause"], "modular.npy does not exist: run train_mediator.py first"
    elif case == "test_before_training":
        step, expected = "test_primaps", "primaps.pth does not exist: run train_primaps.py --mode backbone first"
    elif case == "threshold":
        extra, expected = ["--threshold", "1.5"], "--threshold must lie in (0, 1]"
    else:
        copy = tmp_path / "data"
        shutil.copytree(data_dir, copy)
        (copy / "cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
        data_dir, expected = copy, "train2017/Coco164kFull_Stuff_Coarse_7.txt is missing"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_step(step, None, primaps_args((data_dir, ckpt), out, *extra))
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "nothing may be written"


def test_help_lists_the_primaps_options(capsys):
    train_options = ("--mode", "--head", "--threshold", "--epochs", "--batch_size", "--lr", "--train_resolution",
                     "--init_epochs", "--pca_batches", "--keep_best_on_val", "--seed", "--restart")
    done = subprocess.run([sys.executable, "train_primaps.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(option in done.stdout for option in train_options), done.stdout
    with pytest.raises(SystemExit) as stopped:
        main("test_primaps", argv=["--help"])  # what test_primaps.py runs
    assert stopped.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--mode", "--head", "--test_resolution", "--crf_workers")), shown


def test_bash_run_runs_a_backbone_mode_row_alone_and_prints_it_beside_its_initialisation(setup, whole_run):
    done = subprocess.run(["bash", "run", "--primaps", *primaps_args(setup, whole_run, "--mode", "backbone")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert [line.split()[1] for line in commands] == ["train_primaps.py", "test_primaps.py"], "no CAUSE step"
    assert done.stdout.count("is up to date") == 2, "the initialisation and the prototypes of whole_run"
    report = json.loads((whole_run / "results/cocostuff27/PRIMAPS_BACKBONE/dino_vit_tiny_8/metrics.json").read_text())
    first, last = done.stdout.strip().splitlines()[-2:]
    assert first.startswith("its initialisation (PCA + k-means)") and f"mIoU {report['init_crf']['mIoU']:.1f}" in first
    assert last.startswith("PriMaPs-EM on the backbone") and f"mIoU {report['crf']['mIoU']:.1f}" in last
    assert report["choices"]["precision"] == "fp32" and report["choices"]["resize"]["val"] == "tensor_bilinear"
    for artifact in ("init", "primaps"):  # what every PriMaPs artifact says of how it was made
        made = json.loads((whole_run / BACKBONE_DIR.format(dataset="cocostuff27") / f"{artifact}.json").read_text())
        assert made["choices"]["resize"]["train"] == "bilinear" and made["choices"]["drop_last"], artifact
        assert made["choices"]["precision"] == made["identity"]["settings"]["precision"] == "fp32", artifact
