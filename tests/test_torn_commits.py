"""Nothing torn: a run killed right before any of its commits (utils/runtime/io.commit) resumes to the bytes an
uninterrupted run gives; artifacts of one step written by two runs are refused; a resume commit holding
garbage starts the step over in one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from steps import make_tiny_setup, only_for, run_step, step_args

import utils.runtime.io
from utils.runtime.io import KILL_AT_COMMIT

HEAD_DIR = "CAUSE/cocostuff27/dino_vit_tiny_8/16"
SHORT = ("--epochs", "2", "--max_steps", "1")


class Killed(BaseException):
    """Stands for the process being killed at a commit (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def mediated(tmp_path_factory):
    """Tiny data, a backbone, the mediator's clusterbook, and an uninterrupted front door's segment module."""
    root = tmp_path_factory.mktemp("torn")
    data_dir, ckpt = make_tiny_setup(root, n_train=2, n_val=2)
    base = root / "base"
    run_step("mediator", None, step_args(data_dir, ckpt, base, extra=SHORT))
    whole = root / "whole"
    shutil.copytree(base, whole)
    run_step("front_door", "tr", step_args(data_dir, ckpt, whole, extra=SHORT))
    return data_dir, ckpt, base, whole


def _fresh(mediated, out):
    _, _, base, _ = mediated
    shutil.copytree(base, out)
    return out


def _segment(out):
    return torch.load(out / HEAD_DIR / "segment_tr.pth", weights_only=True)


def _assert_as_uninterrupted(out, whole):
    resumed, expected = _segment(out), _segment(whole)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    record = json.loads((out / HEAD_DIR / "segment_tr.json").read_text())
    assert record["complete"] and record["epochs_done"] == 2
    assert not list((out / HEAD_DIR / "resume").glob("*")), "no resume file is left once the step is complete"


def _kill_at(monkeypatch, n, seen):
    """Raise Killed right before the process's n-th commit; `seen` collects the names committed."""
    real = utils.runtime.io.commit

    def commit(written, path):
        seen.append(os.path.basename(path))
        if len(seen) == n:
            raise Killed
        real(written, path)

    monkeypatch.setattr(utils.runtime.io, "commit", commit)


def test_a_run_killed_before_any_commit_resumes_to_the_uninterrupted_bytes(mediated, tmp_path, monkeypatch):
    data_dir, ckpt, _, whole = mediated
    n, names = 1, []
    while True:
        out = _fresh(mediated, tmp_path / f"killed{n}")
        args = step_args(data_dir, ckpt, out, extra=SHORT)
        seen = []
        _kill_at(monkeypatch, n, seen)
        try:
            run_step("front_door", "tr", args)
        except Killed:
            names.append(seen[-1])
        else:
            break  # a run with fewer commits than n: every commit has been killed at
        finally:
            monkeypatch.undo()
        run_step("front_door", "tr", args)
        _assert_as_uninterrupted(out, whole)
        shutil.rmtree(out)
        n += 1
    # The commits of both epochs were killed at: each process's concept bank, the state, the resume commit.
    assert names.count("front_door_tr.json") == 2 and names.count("front_door_tr.epoch1.bank0.pt") == 1, names


def _run_in_a_process(args, env=None):
    code = "import sys; from utils.cli.steps import main; main('front_door', 'tr', sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *only_for("front_door", args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_a_process_killed_between_the_bank_and_the_state_resumes_to_the_uninterrupted_bytes(mediated, tmp_path):
    """A real SIGKILL (CAUSE_KILL_AT_COMMIT): nothing of the process runs after it, not even a finally block."""
    data_dir, ckpt, _, whole = mediated
    out = _fresh(mediated, tmp_path / "killed")
    args = step_args(data_dir, ckpt, out, extra=SHORT)
    seen = []
    # The second epoch's state is the commit right after its concept bank: find its number.
    real = utils.runtime.io.commit
    utils.runtime.io.commit = lambda written, path: (seen.append(os.path.basename(path)), real(written, path))
    try:
        run_step("front_door", "tr", step_args(data_dir, ckpt, _fresh(mediated, tmp_path / "counted"), extra=SHORT))
    finally:
        utils.runtime.io.commit = real
    state = seen.index("front_door_tr.epoch1.pt") + 1
    killed = _run_in_a_process(args, {KILL_AT_COMMIT: str(state)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resume = out / HEAD_DIR / "resume"
    assert (resume / "front_door_tr.epoch1.bank0.pt").is_file(), "killed after the second epoch's bank"
    assert json.loads((resume / "front_door_tr.json").read_text())["epoch"] == 0, "the first epoch is the one committed"
    done = _run_in_a_process(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch 1" in done.stdout
    _assert_as_uninterrupted(out, whole)


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"epoch": "one", "identity": {}}', '{"epoch": 0}'])
def test_a_resume_commit_holding_garbage_starts_over_in_one_line(mediated, tmp_path, monkeypatch, capsys, garbage):
    data_dir, ckpt, _, whole = mediated
    out = _fresh(mediated, tmp_path / "out")
    args = step_args(data_dir, ckpt, out, extra=SHORT)
    seen = []
    _kill_at(monkeypatch, 4, seen)  # after the first epoch's commit
    with pytest.raises(Killed):
        run_step("front_door", "tr", args)
    monkeypatch.undo()
    commit = out / HEAD_DIR / "resume/front_door_tr.json"
    assert json.loads(commit.read_text())["epoch"] == 0
    commit.write_text(garbage)
    capsys.readouterr()
    run_step("front_door", "tr", args)
    printed = capsys.readouterr()
    said = [line for line in printed.out.splitlines() if "cannot be used" in line]
    assert len(said) == 1 and "starting over" in said[0] and str(commit) in said[0], printed.out
    assert "resuming" not in printed.out and "Traceback" not in printed.err
    _assert_as_uninterrupted(out, whole)


def test_fine_tuning_artifacts_of_two_runs_are_refused_and_made_again(mediated, tmp_path, monkeypatch, capsys):
    """fine_tune writes two files (the fine-tuned segment module, the cluster probe) and their records: a run
    killed between them leaves the test step nothing it would score."""
    data_dir, ckpt, _, whole = mediated
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    args = step_args(data_dir, ckpt, out, extra=("--epochs", "1", "--max_steps", "1"))
    run_step("fine_tune", "tr", args)
    # Another run of it (another seed: other weights) killed right after its first artifact.
    original = utils.runtime.io.commit

    def after_the_segment(written, path):
        if os.path.basename(path) == "segment_tr_fine_tuned.pth":
            utils.runtime.io.os.replace(written, path)
            raise Killed
        original(written, path)

    monkeypatch.setattr(utils.runtime.io, "commit", after_the_segment)
    with pytest.raises(Killed):
        run_step("fine_tune", "tr", [*args, "--seed", "5", "--restart"])
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_step("test", "tr", [*args, "--seed", "5"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "segment_tr_fine_tuned.pth is not the file its record" in message and "fine_tuning_tr.py" in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    # The step itself sees it too, and makes them again.
    run_step("fine_tune", "tr", [*args, "--seed", "5"])
    printed = capsys.readouterr().out
    assert "not what its run wrote" in printed or "resuming" in printed, printed
    run_step("test", "tr", [*args, "--seed", "5"])
