"""Runs that survive: resume after a kill, truncated artifacts, bad input, non-finite loss, determinism."""
import shutil
import socket

import numpy as np
import pytest
import torch
from datagen import write_cityscapes
from PIL import Image
from steps import make_tiny_setup, run_step, step_args

import utils.front_door
from loader import write_cropped_dataset
from utils import front_door, mediator
from utils.runtime.config import parse_config
from utils.engine import ResumeState, artifact_paths


class Killed(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("resume"))


def segment_state(out):
    return torch.load(out / "CAUSE/cocostuff27/dino_vit_tiny_8/16/segment_tr.pth", weights_only=True)


def train_front_door(setup, out, extra=()):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, out, extra=("--epochs", "2", *extra))
    run_step("mediator", None, args)
    run_step("front_door", "tr", args)
    return args


def test_a_run_killed_after_its_first_epoch_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch):
    train_front_door(setup, tmp_path / "whole")
    whole = segment_state(tmp_path / "whole")

    original_save = ResumeState.save

    def save_then_die(self, epoch, **states):
        original_save(self, epoch, **states)
        if self.ctx.cfg.step == "front_door" and epoch == 0:
            raise Killed

    monkeypatch.setattr(ResumeState, "save", save_then_die)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path / "killed")
    monkeypatch.undo()
    resume_file = tmp_path / "killed/CAUSE/cocostuff27/dino_vit_tiny_8/16/resume/front_door_tr.pt"
    assert resume_file.is_file()

    train_front_door(setup, tmp_path / "killed")
    resumed = segment_state(tmp_path / "killed")
    assert not resume_file.exists(), "the resume state goes once the step is complete"
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def test_restart_ignores_the_resume_state(setup, tmp_path, monkeypatch):
    original_save = ResumeState.save

    def save_then_die(self, epoch, **states):
        original_save(self, epoch, **states)
        if self.ctx.cfg.step == "front_door":
            raise Killed

    monkeypatch.setattr(ResumeState, "save", save_then_die)
    with pytest.raises(Killed):
        train_front_door(setup, tmp_path)
    monkeypatch.undo()

    def no_resuming(self, state):
        raise AssertionError("--restart must not resume")

    monkeypatch.setattr(ResumeState, "restore_rng", no_resuming)
    train_front_door(setup, tmp_path, extra=("--restart",))
    assert not list(tmp_path.rglob("resume/*.pt"))


def test_truncated_artifacts_are_not_taken_as_finished(setup, tmp_path):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "1"))
    run_step("mediator", None, args)
    cfg = parse_config("mediator", None, args)
    paths = artifact_paths(cfg)
    assert mediator.is_complete(cfg, paths)
    good = paths.modular.read_bytes()
    paths.modular.write_bytes(good[: len(good) // 2])
    assert not mediator.is_complete(cfg, paths)
    run_step("mediator", None, args)
    assert paths.modular.read_bytes() != good[: len(good) // 2]
    assert np.load(paths.modular).shape == (16, 192)

    front_cfg = parse_config("front_door", "tr", args)
    front_paths = artifact_paths(front_cfg)
    front_paths.segment.parent.mkdir(parents=True, exist_ok=True)
    front_paths.segment.write_bytes(b"PK\x03\x04 truncated")
    assert not front_door.is_complete(front_cfg, front_paths)


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("case", ["no_data_dir", "empty_data_dir", "missing_list", "absent_images", "unknown_arch",
                                  "missing_checkpoint", "missing_mediator", "absent_gpus", "busy_port",
                                  "missing_crops", "corrupt_image", "label_out_of_range",
                                  "unknown_dataset"])
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
        write_cropped_dataset("cityscapes", data_dir, progress=False)
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
    if case == "unknown_dataset":
        extra, expected = ["--dataset", "cocostuff28"], "invalid choice: 'cocostuff28'"
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
    with pytest.raises(SystemExit) as stopped:
        run_step(step, head, step_args(data_dir, ckpt, out, extra=extra))
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert expected in message, message
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "nothing may be written"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(setup, tmp_path, monkeypatch, capsys):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2"))
    run_step("mediator", None, args)
    calls = []
    real_loss = utils.front_door.contrastive_loss

    def diverging(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) > 5 else loss  # 5 batches = the first epoch

    monkeypatch.setattr(utils.front_door, "contrastive_loss", diverging)
    with pytest.raises(SystemExit):
        run_step("front_door", "tr", args)
    message = capsys.readouterr().err
    assert "loss is nan at epoch 2, batch 0" in message, message
    after_first_epoch = segment_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in after_first_epoch.values())
    assert (tmp_path / "CAUSE/cocostuff27/dino_vit_tiny_8/16/resume/front_door_tr.pt").is_file()


def test_seeded_cpu_runs_are_identical(setup, tmp_path):
    for name in ("a", "b"):
        train_front_door(setup, tmp_path / name, extra=("--seed", "7"))
    modular = [np.load(tmp_path / n / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.npy") for n in "ab"]
    assert np.array_equal(*modular)
    first, second = segment_state(tmp_path / "a"), segment_state(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)
