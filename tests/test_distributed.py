"""Several processes (gloo on CPU): the paper recipe trains as one process does, ranks agree, torchrun
works, errors reach the user as they would in one process, evaluation runs once."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT
from steps import make_tiny_setup, only_for, run_step, step_args
from torch.utils.data.distributed import DistributedSampler

from utils.engine.loop import check_processes_agree
from utils.runtime.distributed import BatchGroup, launch

HEAD_DIR = "CAUSE/cocostuff27/dino_vit_tiny_8/16"
# How far a tensor of a two-process run may lie from the one-process run's, relative to its norm: the
# two add the gradient up in another order, and Adam (g / (|g| + eps)) turns float32 rounding of
# near-zero gradient elements into whole steps of lr; measured: at most 2.3e-4 after 10 steps.
RELATIVE_TOLERANCE = 1e-3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(step, head=None):
    return {"mediator": "train_mediator.py", "front_door": f"train_front_door_{head}.py",
            "fine_tune": f"fine_tuning_{head}.py", "test": f"test_{head}.py"}[step]


def run_script(step, head, args, env=None, launcher=()):
    """A step script in its own process, as a user runs it; returns the finished process."""
    command = [sys.executable, *launcher, script(step, head), *only_for(step, list(args))]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 16 images: 80 crops, a quarter of them (20) per epoch in global batches of 4: five steps.
    return make_tiny_setup(tmp_path_factory.mktemp("processes"), n_train=16, n_val=2)


def comparable(name, value):
    """A tensor without the key-bias third of attention in_proj biases, whose gradient is analytically
    zero and numerically noise (tests/golden/README.md, trajectory.pt caveats)."""
    if name.endswith("in_proj_bias"):
        third = value.shape[0] // 3
        return torch.cat([value[:third], value[2 * third:]])
    return value


def assert_same_parameters(first, second):
    assert first.keys() == second.keys()
    for name in first:
        a, b = comparable(name, first[name]), comparable(name, second[name])
        assert (a - b).norm() <= RELATIVE_TOLERANCE * a.norm() + 1e-6, (name, ((a - b).norm() / a.norm()).item())


@pytest.fixture(scope="module")
def one_and_two_processes(setup, tmp_path_factory):
    """The paper recipe's mediator, front door and fine-tuning, run by one process and by two."""
    data_dir, ckpt = setup
    roots = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"processes{processes}")
        args = step_args(data_dir, ckpt, out, extra=("--epochs", "2", "--nproc", str(processes),
                                                     "--port", str(free_port())))
        for step, head in (("mediator", None), ("front_door", "tr"), ("fine_tune", "tr")):
            if processes == 1:
                run_step(step, head, args)  # in this process: the same code, without a new interpreter
            else:
                ok(run_script(step, head, args))
        roots[processes] = out
    return roots


def test_the_paper_recipe_trains_the_same_on_one_and_two_processes(one_and_two_processes):
    # Each run checks after every epoch that all its processes hold the same weights
    # (check_processes_agree), so the two-process run finishing means its ranks agree.
    for artifact in ("segment_tr.pth", "segment_tr_fine_tuned.pth", "cluster_tr.pth"):
        first, second = (torch.load(one_and_two_processes[n] / HEAD_DIR / artifact, weights_only=True) for n in (1, 2))
        assert_same_parameters(first, second)


def test_both_runs_read_the_official_rank_0_quarter(one_and_two_processes):
    for processes, root in one_and_two_processes.items():
        record = json.loads((root / HEAD_DIR / "segment_tr.json").read_text())
        recipe = record["recipe"]
        quarter = DistributedSampler(list(range(80)), num_replicas=4, rank=0, shuffle=True, seed=0)
        assert recipe["samples_per_epoch"] == len(quarter) == 20
        assert (recipe["global_batch"], recipe["batch_per_process"], recipe["processes"]) == (4, 4 // processes,
                                                                                                processes)
        assert recipe["lr"] == pytest.approx(4e-3) and recipe["optimizer_steps_per_epoch"] == 5


def with_mediator(source, out):
    """A copy of an earlier run's clusterbook (and its record) under `out`, instead of training another."""
    shutil.copytree(source / "CAUSE/cocostuff27/modularity", out / "CAUSE/cocostuff27/modularity")


def disagreeing(cfg, info):
    state = {"weight": torch.full((3,), float(info.rank))}
    check_processes_agree(state)


def test_processes_that_disagree_are_a_bug_with_a_traceback():
    cfg = SimpleNamespace(gpu="cpu", nproc=2, port=free_port())
    with pytest.raises(Exception, match="hold other weights than process 0"):
        launch(disagreeing, cfg, "test")


def reduce_sparse_gradients(cfg, info):
    """Rank 0 has a gradient for `a` only, rank 1 for `b` only; neither has one for `c`."""
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    (a if info.rank == 0 else b).grad = torch.full((2,), 1.0 + info.rank)
    BatchGroup(cfg.shared).reduce_gradients([a, b, c])
    gathered = [None, None]
    dist.all_gather_object(gathered, [None if p.grad is None else p.grad.tolist() for p in (a, b, c)])
    return gathered


@pytest.mark.parametrize("shared", [True, False])
def test_gradients_missing_on_one_rank_are_reduced_without_hanging(shared):
    cfg = SimpleNamespace(gpu="cpu", nproc=2, port=free_port(), shared=shared)
    ranks = launch(reduce_sparse_gradients, cfg, "test")
    assert ranks[0] == ranks[1], "every rank holds the same gradients"
    scale = 1 if shared else 0.5  # summed over one shared batch, averaged over independent ones
    assert ranks[0] == [[1.0 * scale] * 2, [2.0 * scale] * 2, None], "no gradient anywhere stays none"


def test_a_torchrun_launch_trains_as_the_spawned_processes_do(setup, one_and_two_processes, tmp_path):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2"))
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    for step, head in (("mediator", None), ("front_door", "tr")):
        done = ok(run_script(step, head, args, launcher=launcher))
    assert_same_parameters(torch.load(one_and_two_processes[1] / HEAD_DIR / "segment_tr.pth", weights_only=True),
                           torch.load(tmp_path / HEAD_DIR / "segment_tr.pth", weights_only=True))
    assert done.stdout.count("epoch 2: probe_accuracy_uses_labels") == 1, "only rank 0 reports"


def test_the_test_step_evaluates_once_under_torchrun(setup, one_and_two_processes):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, one_and_two_processes[1])
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    done = ok(run_script("test", "tr", args, launcher=launcher))
    assert done.stdout.count("mIoU: ") == 1 and done.stdout.count("[test TR] metrics:") == 1, done.stdout


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_a_user_error_in_one_of_several_processes_is_one_line(setup, one_and_two_processes, tmp_path, launcher):
    data_dir, ckpt = setup
    port = str(free_port())
    if launcher == "spawn":
        args, prefix = step_args(data_dir, ckpt, tmp_path, extra=("--nproc", "2", "--port", port)), ()
    else:  # the project's torchrun, which ends a user error as a single process does
        args = step_args(data_dir, ckpt, tmp_path)
        prefix = ("-m", "utils.cli.torchrun", "--nproc_per_node", "2", "--master_port", port)
    with_mediator(one_and_two_processes[2], tmp_path)
    # A damaged crop is read only in training (the val set is decoded up front): a user error inside
    # a spawned process, rank 1 (the third item of the first global batch of 4).
    order = DistributedSampler(list(range(80)), num_replicas=4, rank=0, shuffle=True, seed=0)
    victim = data_dir / f"cocostuff/cropped/cocostuff_five_crop_0.5/img/train/{list(order)[2]}.jpg"
    intact, times = victim.read_bytes(), victim.stat()
    # Damaged behind the project's back: same size, modification time set back (what the data fingerprint
    # cannot see, docs/runs.md), so the mediator's record still matches and the damage is met in training.
    # The other tests of this module share the data: its bytes and times are restored after.
    try:
        victim.write_bytes(intact[:100] + bytes(len(intact) - 100))
        os.utime(victim, ns=(times.st_atime_ns, times.st_mtime_ns))
        done = run_script("front_door", "tr", args, launcher=prefix)
    finally:
        victim.write_bytes(intact)
        os.utime(victim, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert done.returncode == 2, done.stderr[-3000:]
    # One line (under torchrun it may follow the other process's progress bar on the terminal's line).
    assert done.stderr.count("error [") == 1
    assert f"error [front door TR]: cannot read image file {victim}" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_bug_in_a_spawned_process_keeps_its_traceback(setup, one_and_two_processes, tmp_path):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--nproc", "2", "--port", str(free_port())))
    with_mediator(one_and_two_processes[2], tmp_path)
    # Every process of the run imports this before the project: the front door's step breaks as a bug would.
    injected = tmp_path / "inject"
    injected.mkdir()
    (injected / "sitecustomize.py").write_text(
        "import utils.engine.front_door as front_door\n"
        "def broken(self, *arguments):\n"
        "    raise ValueError('injected bug')\n"
        "front_door.FrontDoorTraining.losses = broken\n")
    done = run_script("front_door", "tr", args, env={"PYTHONPATH": f"{injected}{os.pathsep}{ROOT}"})
    assert done.returncode not in (0, 2)
    assert "Traceback" in done.stderr and "ValueError: injected bug" in done.stderr


def test_a_two_process_run_killed_after_an_epoch_resumes_to_the_uninterrupted_result(
        setup, one_and_two_processes, tmp_path):
    data_dir, ckpt = setup
    args = step_args(data_dir, ckpt, tmp_path, extra=("--epochs", "2", "--nproc", "2", "--port", str(free_port())))
    with_mediator(one_and_two_processes[2], tmp_path)
    command = [sys.executable, script("front_door", "tr"), *only_for("front_door", args)]
    resume_identity = tmp_path / HEAD_DIR / "resume" / "front_door_tr.json"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not resume_identity.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both training processes, as a crash would
    process.wait()
    assert resume_identity.exists(), "the run must have finished its first epoch"
    assert process.returncode == -signal.SIGKILL, "killed during the second epoch"
    ok(run_script("front_door", "tr", args))
    whole = torch.load(one_and_two_processes[2] / HEAD_DIR / "segment_tr.pth", weights_only=True)
    resumed = torch.load(tmp_path / HEAD_DIR / "segment_tr.pth", weights_only=True)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
