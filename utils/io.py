"""Artifact I/O that never leaves a half-written file behind.

Every artifact is written to a temporary file in the destination folder and renamed
into place, so a crash mid-write leaves either the old file or none, never a
truncated one that a later step would mistake for finished work.
"""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_numpy(array, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_text(text, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
