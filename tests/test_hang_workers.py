"""A worker process that dies (SIGKILL, as the out-of-memory killer sends it) ends its step within a bounded
time with one line naming what died, exit status 2, the step's lock released, and a rerun finishes:
a dense-CRF worker of the test step, a data-loader worker, a spawned training process (--nproc 2).

Each fault is injected into the step scripts' processes through a sitecustomize module, which every
Python process of the run (the spawned ones too) imports first; each run is a subprocess with a
timeout, so that a hang fails the test instead of stalling the suite.
"""
import os
import re
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import ROOT
from steps import make_tiny_setup, only_for, step_args
from test_distributed import free_port

from loader.synthetic import make_synthetic_cocostuff
from models import stand_in_release
from modules.crf import CrfWorkerDied, crf_inference_job, crf_inputs, crf_pool, dense_crf_batch
from stand_ins import save_foreign, stand_in_stego
from utils.runtime.io import save_torch

ARCH, K, DIM = "dino_vit_tiny_8", 27, 16
# Far more than each run needs (seconds): reached only when a run hangs.
HANG = 300

# Imported first by every process of the run: `module.function` kills its own process with SIGKILL
# where `when` holds (an expression over the call's `arguments`).
KILLER = """
import multiprocessing
import os
import signal

import torch

import {module} as target

_original = target.{function}


def _dying(*arguments, **keywords):
    if {when}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(*arguments, **keywords)


target.{function} = _dying
"""


def run_killed(tmp_path, script, args, module, function, when):
    """`script` run as a user runs it, with `module.function` killing its process where `when` holds."""
    injected = tmp_path / "inject"
    injected.mkdir()
    (injected / "sitecustomize.py").write_text(KILLER.format(module=module, function=function, when=when))
    return run(script, args, {"PYTHONPATH": f"{injected}{os.pathsep}{ROOT}"})


def run(script, args, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG,
                          env={**os.environ, **(env or {})})


def assert_one_line(done, pattern):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("error [") == 1, done.stderr[-3000:]
    assert re.search(pattern, done.stderr), done.stderr[-3000:]


def assert_no_lock(root):
    assert not list(root.rglob("*.lock")), "the step's lock is released"


def ok(done):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny COCO-Stuff data with its crops, the ViT-Tiny stand-in release and a STEGO file holding it."""
    root = tmp_path_factory.mktemp("hang")
    data_dir, ckpt = make_tiny_setup(root, n_train=4, n_val=2, image_size=96)
    save_torch(stand_in_release(ARCH), ckpt)
    stego = root / "stego.ckpt"
    save_foreign(stand_in_stego(ARCH, K, DIM), stego)
    return data_dir, ckpt, stego


def test_a_killed_crf_worker_ends_the_test_step_in_one_line_and_a_rerun_finishes(setup, tmp_path):
    data_dir, ckpt, stego = setup
    args = only_for("test_sota", step_args(data_dir, ckpt, tmp_path, extra=("--sota_ckpt", str(stego),
                                                                             "--crf_workers", "2")))
    # The CRF workers are the step's forked children; each dies at its first image.
    done = run_killed(tmp_path, "test_sota.py", args, "modules.crf", "_crf_inference",
                      "multiprocessing.parent_process() is not None")
    assert_one_line(done, r"error \[test sota\]: a dense-CRF worker process \(one of --crf_workers 2\) died")
    assert_no_lock(tmp_path)
    assert not list(tmp_path.rglob("metrics.json")), "no figures from an unfinished evaluation"
    ok(run("test_sota.py", args))
    assert list(tmp_path.rglob("metrics.json")), "the rerun wrote its figures"


def test_a_killed_data_loader_worker_ends_the_crop_step_in_one_line_and_a_rerun_finishes(tmp_path):
    data_dir = tmp_path / "data"
    make_synthetic_cocostuff(data_dir, n_train=3, n_val=1, image_size=48, seed=0)
    args = ["--dataset", "cocostuff27", "--data_dir", str(data_dir), "--num_workers", "1"]
    done = run_killed(tmp_path, "crop_dataset.py", args, "loader.crops", "crop_pair",
                      "torch.utils.data.get_worker_info() is not None")
    assert_one_line(done, r"error \[crop\]: a data-loader worker process died \(DataLoader worker \(pid")
    assert_no_lock(tmp_path)
    ok(run("crop_dataset.py", args))
    assert (data_dir / "cocostuff/cropped/cocostuff_five_crop_0.5/img/train/14.jpg").is_file(), "3 images, 15 crops"


def test_a_killed_training_process_ends_the_run_in_one_line_and_a_rerun_finishes(setup, tmp_path):
    data_dir, ckpt, _ = setup
    args = only_for("mediator", step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "1", "--nproc", "2",
                                                                            "--port", str(free_port()))))
    done = run_killed(tmp_path, "train_mediator.py", args, "loader.datasets", "SegmentationDataset.__getitem__",
                      "torch.distributed.is_initialized() and torch.distributed.get_rank() == 1")
    assert_one_line(done, r"error \[mediator\]: training process 1 of 2 \(PID \d+\) was killed by signal SIGKILL")
    assert_no_lock(tmp_path)
    ok(run("train_mediator.py", args))
    assert list(tmp_path.rglob("modular.npy")), "the rerun wrote its clusterbook"


def test_the_crf_pool_gives_the_bits_one_process_gives():
    images, log_probs = torch.randn(3, 3, 12, 12), torch.randn(3, 5, 4, 4).log_softmax(1)
    alone = dense_crf_batch(images, log_probs, max_iter=2)
    inputs = [crf_inputs(image, lp) for image, lp in zip(images, log_probs, strict=True)]
    job = partial(crf_inference_job, max_iter=2)
    with crf_pool(2) as pool:
        assert torch.equal(dense_crf_batch(images, log_probs, max_iter=2, pool=pool), alone)  # the test steps
        masks = pool.map_async(job, inputs)  # PriMaPs' pseudo masks
        one = pool.apply_async(job, (inputs[1],))  # predict.py
        assert torch.equal(torch.from_numpy(one.get()), alone[1])
        assert all(torch.equal(torch.from_numpy(q), a) for q, a in zip(masks.get(), alone, strict=True))
        assert masks.ready()


def _killed_at(index, victim):
    if index == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return index


@pytest.mark.parametrize("use", ["map_async", "apply_async"])
def test_a_crf_worker_killed_under_each_way_the_pool_is_used_is_noticed(use):
    with crf_pool(2) as pool:
        pending = (pool.map_async(partial(_killed_at, victim=2), range(4)) if use == "map_async" else
                   pool.apply_async(_killed_at, (0, 0)))
        with pytest.raises(CrfWorkerDied, match="--crf_workers 2"):
            pending.get()
