"""Runs that survive: resume after a kill, resume with other settings, damaged artifacts, bad input,
non-finite loss, determinism, mixed precision on CPU."""
import json
import shutil
import socket

import numpy as np
import pytest
import torch
from datagen import write_cityscapes
from PIL import Image
from steps import make_tiny_setup, run_step, step_args

import utils.engine.front_door
from utils.engine.crop import write_cropped_dataset
from utils.engine.resume import ResumeState, describe

HEAD_DIR = "CAUSE/cocostuff27/dino_vit_tiny_8/16"


class Killed(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("resume"))


def segment_state(out):
    return torch.load(out / HEAD_DIR / "segment_tr.pth", weights_only=True)


def train_front_door(setup, out, extra=()):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, out, extra=("--epochs", "2", *extra))
    run_step("mediator", None, args)
    run_step("front_door", "tr", args)
    return args


def kill_after_first_epoch(monkeypatch, step="front_door", epoch_killed=0):
    """Kill the step right after it saved the resume state of epoch `epoch_killed`, before that epoch's artifacts."""
    original_save = ResumeState.save

    def save_then_die(self, epoch, training):
        original_save(self, epoch, training)
        if self.ctx.cfg.step == step and epoch == epoch_killed:
            raise Killed

    monkeypatch.setattr(ResumeState, "save", save_then_die)


@pytest.mark.parametrize("epoch_killed", [0, 1])
def test_a_killed_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch, epoch_killed):
    train_front_door(setup, tmp_path / "whole")
    whole = segment_state(tmp_path / "whole")

    kill_after_first_epoch(monkeypatch, epoch_killed=epoch_killed)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path / "killed")
    monkeypatch.undo()
    resume_file = tmp_path / "killed" / HEAD_DIR / "resume/front_door_tr.json"
    assert json.loads(resume_file.read_text())["epoch"] == epoch_killed, "the killed epoch is committed"
    assert sorted(p.name for p in resume_file.parent.iterdir()) == sorted(
        [resume_file.name, f"front_door_tr.epoch{epoch_killed}.pt", f"front_door_tr.epoch{epoch_killed}.bank0.pt"])
    if epoch_killed == 1:  # the first epoch's artifact is on disk, and its record says it is partial
        record = json.loads((tmp_path / "killed" / HEAD_DIR / "segment_tr.json").read_text())
        assert (record["complete"], record["epochs_done"]) == (False, 1)

    train_front_door(setup, tmp_path / "killed")
    resumed = segment_state(tmp_path / "killed")
    assert not resume_file.exists(), "the resume state goes once the step is complete"
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


@pytest.mark.parametrize("changed,named", [
    (("--lr", "2e-3"), "lr: 0.004 -> 0.008"),
    (("--batch_size", "2"), "global_batch: 4 -> 2"),
    (("--precision", "bf16"), "precision: fp32 -> bf16"),
    (("--recipe", "scaled"), "recipe: paper -> scaled"),
])
def test_resuming_with_other_settings_is_refused_naming_them(setup, tmp_path, monkeypatch, capsys, changed, named):
    kill_after_first_epoch(monkeypatch)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path)
    monkeypatch.undo()
    resume_file = tmp_path / HEAD_DIR / "resume/front_door_tr.json"
    before = resume_file.read_bytes()
    with pytest.raises(SystemExit) as stopped:
        train_front_door(setup, tmp_path, extra=changed)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert named in message and "--restart" in message, message
    assert resume_file.read_bytes() == before, "the unfinished run is kept for a resume with its settings"


def test_the_paper_recipe_resumes_on_another_process_count(setup, tmp_path, monkeypatch):
    """Documented: the paper recipe trains the same on any process count, so a run may continue on another."""
    kill_after_first_epoch(monkeypatch)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path)
    monkeypatch.undo()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train_front_door(setup, tmp_path, extra=("--nproc", "2", "--port", str(port)))
    record = json.loads((tmp_path / HEAD_DIR / "segment_tr.json").read_text())
    assert record["complete"] and record["recipe"]["processes"] == 2


def test_restart_starts_the_step_over(setup, tmp_path, monkeypatch):
    kill_after_first_epoch(monkeypatch)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path)
    monkeypatch.undo()

    def no_resuming(self, training):
        raise AssertionError("--restart must not resume")

    monkeypatch.setattr(ResumeState, "load", no_resuming)
    data_dir, ckpt = setup
    with pytest.raises(AssertionError, match="must not resume"):
        run_step("front_door", "tr", step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2")))
    monkeypatch.undo()
    original_load = ResumeState.load

    def fresh(self, training):
        assert describe(self.files) is None, "--restart discards the saved state before training"
        original_load(self, training)

    monkeypatch.setattr(ResumeState, "load", fresh)
    run_step("front_door", "tr", step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2", "--restart")))
    assert not list(tmp_path.rglob("resume/*.pt"))


def test_damaged_artifacts_are_made_again(setup, tmp_path, capsys):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "1"))
    run_step("mediator", None, args)
    modular = tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.npy"
    good = modular.read_bytes()
    modular.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    run_step("mediator", None, args)
    assert "is not what its run wrote" in capsys.readouterr().out
    assert modular.read_bytes() == good, "remade, and the same as before (seeded)"


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("case", ["no_data_dir", "empty_data_dir", "missing_list", "absent_images", "unknown_arch",
                                  "missing_checkpoint", "missing_mediator", "absent_gpus", "busy_port",
                                  "missing_crops", "corrupt_image", "label_out_of_range", "unknown_dataset",
                                  "zero_processes", "zero_epochs", "zero_steps", "batch_not_divisible",
                                  "resolution_not_a_patch_multiple"])
def test_bad_input_stops_before_any_work_with_a_clear_message(setup, tmp_path, capsys, case):
    data_dir, ckpt = setup
    step, head, expected = "mediator", None, None
    if case == "no_data_dir":
        data_dir, expected = tmp_path / "nowhere", "does not exist"
    elif case == "empty_data_dir":
        (tmp_path / "empty").mkdir()
        data_dir, expected = tmp_path / "empty", "is empty"
    elif case == "label_out_of_range":
        # COCO fine ids always map into range (unmapped ids become class 0, as officially);
        # a Cityscapes labelId above 33 does not.
        data_dir, step, head = tmp_path / "cityscapes_data", "front_door", "tr"
        write_cityscapes(data_dir)
        write_cropped_dataset("cityscapes", data_dir)
        victim = sorted((data_dir / "cityscapes/gtFine/val").rglob("*_labelIds.png"))[-1]
        label = np.array(Image.open(victim))
        label[0, 0] = 40
        Image.fromarray(label).save(victim)
        expected = f"label file {victim} holds value(s) [40]"
    elif case in ("missing_list", "absent_images", "missing_crops", "corrupt_image"):
        copy = tmp_path / "data"
        shutil.copytree(data_dir, copy)
        data_dir, step, head = copy, "front_door", "tr"
        if case == "missing_list":
            (copy / "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
            expected = "Coco164kFull_Stuff_Coarse_7.txt"
        elif case == "absent_images":
            victim = sorted((copy / "cocostuff/images/val2017").glob("*.jpg"))[0]
            victim.unlink()
            expected = victim.name
        elif case == "missing_crops":
            shutil.rmtree(copy / "cocostuff/cropped")
            expected = "python crop_dataset.py --dataset cocostuff27"
        else:
            victim = sorted((copy / "cocostuff/images/val2017").glob("*.jpg"))[-1]
            victim.write_bytes(victim.read_bytes()[:200])
            expected = f"cannot read image file {victim}"
    extra = ["--dataset", "cityscapes"] if case == "label_out_of_range" else []
    refusals = {"zero_processes": (["--nproc", "0"], "--nproc must be at least 1"),
                "zero_epochs": (["--epochs", "0"], "--epochs must be at least 1"),
                "zero_steps": (["--max_steps", "0"], "--max_steps must be at least 1"),
                "batch_not_divisible": (["--nproc", "3"], "3 processes cannot share it equally"),
                "resolution_not_a_patch_multiple": (["--train_resolution", "60"], "not a multiple of"),
                "unknown_dataset": (["--dataset", "cocostuff28"], "invalid choice: 'cocostuff28'")}
    if case in refusals:
        extra, expected = refusals[case]
    elif case == "unknown_arch":
        ckpt, expected = tmp_path / "my_backbone.pth", "--arch"
    elif case == "missing_checkpoint":
        ckpt, expected = tmp_path / "dino_vit_base_8.pth", "does not exist"
    elif case == "missing_mediator":
        step, head, expected = "front_door", "tr", "run train_mediator.py first"
    elif case == "absent_gpus":
        extra, expected = ["--gpu", "3"], "--gpu 3 names GPU(s) [3]"
    elif case == "busy_port":
        held = _busy_port()
        extra, expected = ["--nproc", "2", "--port", str(held.getsockname()[1])], "already in use"
    out = tmp_path / "out"
    if case in ("corrupt_image", "label_out_of_range"):  # the val files are decoded once the inputs are found
        dataset = "cityscapes" if case == "label_out_of_range" else "cocostuff27"
        released = out / f"CAUSE/{dataset}/modularity/dino_vit_tiny_8/16/modular.npy"
        released.parent.mkdir(parents=True)
        np.save(released, np.zeros((16, 192), np.float32))
    before = sorted(out.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        run_step(step, head, step_args(data_dir, ckpt, out, extra=extra))
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert len([line for line in message.splitlines() if line.startswith("error")]) <= 1
    assert "Traceback" not in message
    assert sorted(out.rglob("*")) == before, "nothing may be written"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(setup, tmp_path, monkeypatch, capsys):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2"))
    run_step("mediator", None, args)
    calls = []
    real_terms = utils.engine.front_door.contrastive_terms

    def diverging(*a, **k):
        calls.append(1)
        total, count = real_terms(*a, **k)
        return (total * float("nan") if len(calls) > 2 else total), count  # 2 batches = the first epoch

    monkeypatch.setattr(utils.engine.front_door, "contrastive_terms", diverging)
    with pytest.raises(SystemExit):
        run_step("front_door", "tr", args)
    message = capsys.readouterr().err
    assert "loss is nan at epoch 2, batch 0" in message, message
    after_first_epoch = segment_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in after_first_epoch.values())
    assert json.loads((tmp_path / HEAD_DIR / "resume/front_door_tr.json").read_text())["epoch"] == 0


def test_seeded_cpu_runs_are_identical(setup, tmp_path):
    for name in ("a", "b"):
        train_front_door(setup, tmp_path / name, extra=("--seed", "7"))
    modular = [np.load(tmp_path / n / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.npy") for n in "ab"]
    assert np.array_equal(*modular)
    first, second = segment_state(tmp_path / "a"), segment_state(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_step_runs_under_mixed_precision_on_cpu(setup, tmp_path, precision, capsys):
    """The autocast and loss-scaling paths a GPU runs, executed on the CPU (CPU autocast, the same GradScaler)."""
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--precision", precision))
    for step, head in (("mediator", None), ("front_door", "tr"), ("fine_tune", "tr"), ("test", "tr")):
        run_step(step, head, args)
    for artifact in ("segment_tr.pth", "cluster_tr.pth"):
        state = torch.load(tmp_path / HEAD_DIR / artifact, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values()), artifact
    record = json.loads((tmp_path / HEAD_DIR / "segment_tr.json").read_text())
    assert record["identity"]["settings"]["precision"] == precision
    metrics = json.loads((tmp_path / "results/cocostuff27/TR/dino_vit_tiny_8/16/metrics.json").read_text())
    assert metrics["identity"]["settings"]["precision"] == precision and 0 <= metrics["crf"]["mIoU"] <= 100
