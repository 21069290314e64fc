"""Artifacts are written whole or not at all (utils/runtime/io.py), and what a killed writer left is cleared."""
import os
import socket

import pytest
import torch
from conftest import dead_pid

from utils.runtime.io import atomic_path, save_torch


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
