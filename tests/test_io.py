"""Artifacts are written whole or not at all (utils/runtime/io.py), and what a killed writer left is cleared."""
import errno
import os
import socket

import numpy as np
import pytest
import torch
from conftest import dead_pid
from steps import make_tiny_setup, run_step, step_args

import utils.runtime.io
from errors import UserError
from utils.runtime.io import DiskFullError, atomic_path, save_numpy, save_png, save_text, save_torch


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out" / "segment_tr.pth"
    save_torch({"step": 1}, path)
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("interrupted")
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left"


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "modular.npy"
    host = socket.gethostname()
    killed = tmp_path / f".{path.name}.tmp-{host}-{dead_pid()}"
    running = tmp_path / f".{path.name}.tmp-{host}-{os.getppid()}"  # a writer still at work
    elsewhere = tmp_path / f".{path.name}.tmp-another-host-{dead_pid()}"  # cannot be told from here
    other_file = tmp_path / f".cluster_tr.pth.tmp-{host}-{dead_pid()}"  # cleared when that file is written
    for leftover in (killed, running, elsewhere, other_file):
        leftover.write_bytes(b"partial")
    save_torch({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, running.name, elsewhere.name, other_file.name])


class _FillingDisk:
    """A file on a disk with `room` bytes left: a write past it fails as the kernel says ENOSPC."""

    def __init__(self, real, room):
        self.real, self.room = real, room

    def write(self, data):
        if len(data) > self.room:
            self.real.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


NOISE = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # a PNG that does not compress


@pytest.mark.parametrize("save,value", [(save_torch, {"weights": torch.arange(1000.0)}),
                                        (save_numpy, np.arange(1000.0)),
                                        (save_text, "x" * 4000),
                                        (save_png, NOISE)])
def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, save, value):
    path = tmp_path / "artifact"
    path.write_bytes(b"the previous artifact")
    monkeypatch.setattr(utils.runtime.io, "open", lambda *a, **k: _FillingDisk(open(*a, **k), 100), raising=False)
    with pytest.raises(DiskFullError) as failed:
        save(value, path)
    assert isinstance(failed.value, UserError)
    assert str(path) in str(failed.value) and "MiB free" in str(failed.value)
    assert path.read_bytes() == b"the previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left"


def test_a_step_that_fills_the_disk_stops_with_one_line(tmp_path, monkeypatch, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=1, n_val=1)
    real_open = open

    def fill_at_the_clusterbook(file, *args, **kwargs):
        opened = real_open(file, *args, **kwargs)
        return _FillingDisk(opened, 10) if "modular.npy" in str(file) else opened

    monkeypatch.setattr(utils.runtime.io, "open", fill_at_the_clusterbook, raising=False)
    with pytest.raises(SystemExit) as stopped:
        run_step("mediator", None, step_args(data_dir, ckpt, tmp_path / "out", extra=("--max_steps", "1")))
    assert stopped.value.code == 2
    printed = capsys.readouterr().err
    told = [line for line in printed.splitlines() if line.startswith("error")]
    assert len(told) == 1 and "Traceback" not in printed, printed
    assert "no space left to write" in told[0] and "modular.npy" in told[0] and "MiB free" in told[0]
    assert not list((tmp_path / "out").rglob("*modular.npy*")), "nothing half-written"
