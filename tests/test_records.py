"""Results that cannot silently mix: records of what made each artifact, reruns when an input changes,
partial upstream artifacts refused, released files recorded as such, a clone that tests itself."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from steps import make_tiny_setup, run_step, step_args

from models import build_backbone
from modules.heads import SegmentModule
from modules.probe import ClusterModule
from utils.engine.crop import write_cropped_dataset
from utils.runtime.io import save_torch

MEDIATOR_DIR = "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16"
HEAD_DIR = "CAUSE/cocostuff27/dino_vit_tiny_8/16"
RESULTS = "results/cocostuff27/TR/dino_vit_tiny_8/16"
CHAIN = (("mediator", None), ("front_door", "tr"), ("fine_tune", "tr"), ("test", "tr"))


def run_chain(args, capsys):
    """Every step once; {step: what it printed}."""
    printed = {}
    for step, head in CHAIN:
        capsys.readouterr()
        run_step(step, head, args)
        printed[step] = capsys.readouterr().out
    return printed


def skipped(printed):
    return {step for step, out in printed.items() if "up to date" in out}


@pytest.fixture
def trained(tmp_path, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path)
    args = step_args(data_dir, ckpt, tmp_path)
    run_chain(args, capsys)
    return tmp_path, data_dir, ckpt, args


def test_unchanged_inputs_skip_every_step_and_the_test_step_still_prints_its_numbers(trained, capsys):
    root, _, _, args = trained
    metrics = json.loads((root / RESULTS / "metrics.json").read_text())
    printed = run_chain(args, capsys)
    assert skipped(printed) == {"mediator", "front_door", "fine_tune", "test"}
    assert printed["test"].splitlines()[-1] == f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"


def test_a_new_backbone_file_reruns_every_step_saying_why(trained, capsys):
    root, _, ckpt, args = trained
    torch.manual_seed(1)
    save_torch(build_backbone("dino_vit_tiny_8").state_dict(), ckpt)
    printed = run_chain(args, capsys)
    assert not skipped(printed)
    assert "backbone.fingerprint" in printed["mediator"] and "running the step again" in printed["mediator"]


def test_new_crops_rerun_the_training_steps_but_not_the_test_step_inputs_it_does_not_read(trained, capsys):
    root, data_dir, _, args = trained
    # Other training crops: the same images cropped again after one of them changed.
    victim = sorted((data_dir / "cocostuff/images/train2017").glob("*.jpg"))[0]
    victim.write_bytes((data_dir / "cocostuff/images/val2017" / sorted(
        p.name for p in (data_dir / "cocostuff/images/val2017").iterdir())[0]).read_bytes())
    label = data_dir / "cocostuff/annotations/train2017" / victim.with_suffix(".png").name
    shutil.copy(sorted((data_dir / "cocostuff/annotations/val2017").iterdir())[0], label)
    write_cropped_dataset("cocostuff27", data_dir)
    printed = run_chain(args, capsys)
    assert "data.train.fingerprint" in printed["mediator"]
    # The test step reads the val set only, but its upstream artifacts changed.
    assert not skipped(printed) and "upstream.cluster.fingerprint" in printed["test"]


def test_rerunning_an_earlier_step_reruns_the_later_ones(trained, capsys):
    root, _, _, args = trained
    printed = {}
    for step, head in CHAIN[1:]:
        capsys.readouterr()
        run_step(step, head, [*args, "--restart"] if step == "front_door" else args)
        printed[step] = capsys.readouterr().out
    assert not skipped(printed)
    assert "upstream.segment.run" in printed["fine_tune"]


def test_if_changed_refuse_stops_naming_the_change(trained, capsys):
    root, _, _, args = trained
    run_step("mediator", None, [*args, "--seed", "3"])  # another clusterbook (rerun: the default)
    segment = (root / HEAD_DIR / "segment_tr.pth").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        run_step("front_door", "tr", [*args, "--if_changed", "refuse"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "upstream.modular.fingerprint" in message and "--if_changed refuse" in message
    assert (root / HEAD_DIR / "segment_tr.pth").read_bytes() == segment


def test_an_upstream_artifact_of_an_interrupted_run_is_refused_naming_the_step(trained, capsys):
    root, _, _, args = trained
    record_path = root / MEDIATOR_DIR / "modular.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "complete": False, "epochs_done": 0}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_step("front_door", "tr", args)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "interrupted run (0 of 1 epochs)" in message and "train_mediator.py" in message
    assert "--accept_partial" in message
    run_step("front_door", "tr", [*args, "--accept_partial"])
    accepted = json.loads((root / HEAD_DIR / "segment_tr.json").read_text())
    assert accepted["accepted_partial"] and "modular" in accepted["accepted_partial"][0]


def test_a_smoke_run_is_not_taken_for_a_full_one(tmp_path, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path)
    args = step_args(data_dir, ckpt, tmp_path)
    run_step("mediator", None, [*args, "--max_steps", "1"])
    capsys.readouterr()
    run_step("mediator", None, args)
    out = capsys.readouterr().out
    assert "settings.max_steps: 1 -> None" in out and "up to date" not in out


@pytest.mark.parametrize("leak", [False, True])
def test_fine_tuning_reruns_from_the_front_doors_segment_module(tmp_path, capsys, leak):
    data_dir, ckpt = make_tiny_setup(tmp_path)
    args = step_args(data_dir, ckpt, tmp_path, extra=["--label_leak"] if leak else [])
    for step, head in CHAIN[:3]:
        run_step(step, head, args)
    front_door_file = tmp_path / HEAD_DIR / "segment_tr.pth"
    front_door = front_door_file.read_bytes()
    tuned_files = ("cluster_tr.pth", "segment_tr_fine_tuned.pth")
    first = {name: (tmp_path / HEAD_DIR / name).read_bytes() for name in tuned_files}
    run_step("fine_tune", "tr", [*args, "--restart"])
    again = {name: (tmp_path / HEAD_DIR / name).read_bytes() for name in first}
    assert front_door_file.read_bytes() == front_door, "fine-tuning never changes the front door's file"
    for name in first:
        assert again[name] == first[name], name
    tuned = torch.load(tmp_path / HEAD_DIR / "segment_tr_fine_tuned.pth", weights_only=True)
    original = torch.load(tmp_path / HEAD_DIR / "segment_tr.pth", weights_only=True)
    head_ema_moved = any(not torch.equal(tuned[k], original[k]) for k in tuned if k.startswith("head_ema."))
    assert head_ema_moved == leak


def test_released_files_are_used_as_they_are_and_recorded_as_released(tmp_path, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=1, n_val=2)
    args = step_args(data_dir, ckpt, tmp_path)
    (tmp_path / MEDIATOR_DIR).mkdir(parents=True)
    (tmp_path / HEAD_DIR).mkdir(parents=True)
    np.save(tmp_path / MEDIATOR_DIR / "modular.npy", np.random.default_rng(0).standard_normal((16, 192), np.float32))
    torch.manual_seed(0)
    torch.save(SegmentModule("tr", 192, 90, 24, 27, 64).state_dict(), tmp_path / HEAD_DIR / "segment_tr.pth")
    torch.save(ClusterModule(16, 192, 90, 27).state_dict(), tmp_path / HEAD_DIR / "cluster_tr.pth")
    capsys.readouterr()
    run_step("test", "tr", args)
    out = capsys.readouterr().out
    assert "released files (no record of how they were made)" in out
    metrics = json.loads((tmp_path / RESULTS / "metrics.json").read_text())
    assert {name: entry["origin"] for name, entry in metrics["upstream"].items()} == {
        "modular": "released", "segment": "released", "cluster": "released"}
    assert metrics["upstream"]["segment"]["file"].endswith("segment_tr.pth")
    assert all(entry["fingerprint"].startswith("sha256:") for entry in metrics["upstream"].values())
    # The training steps keep released files as they are.
    capsys.readouterr()
    run_step("front_door", "tr", args)
    assert "without a record" in capsys.readouterr().out


def test_a_clean_clone_alone_passes_its_golden_tests(tmp_path):
    """A clone with nothing beside it: the tests read only the checkout (tests/golden, models/stand_in.py)."""
    clone = tmp_path / "alone" / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # The folder the golden files came from, named in pieces so that this file does not match itself.
    shared = "shared"
    pattern = rf"\.\./{shared}|{shared}/golden"
    outside = subprocess.run(["git", "grep", "-l", "-E", pattern, "--", "*.py", "*.sh", "*.ini", "*.toml", "run",
                              ".ci/run"], cwd=clone, capture_output=True, text=True)
    assert outside.stdout == "", f"files reading outside the checkout: {outside.stdout}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backbones.py",
                           "tests/test_losses.py", "tests/test_eval.py", "tests/test_heads.py",
                           "tests/test_primaps_numerics.py"],
                          cwd=clone, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (clone.parent / shared).exists()
