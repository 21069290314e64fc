"""Artifact I/O that never leaves a half-written file behind.

Every artifact is written to a temporary file in the destination folder and renamed
into place, so a crash mid-write leaves either the old file or none, never a
truncated one that a later step would mistake for finished work.
"""
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def owned_sibling(path, kind):
    """Hidden sibling of `path` that belongs to this process: .NAME.KIND-HOST-PID."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_siblings(path, kind):
    """Delete the `kind` siblings of `path` (files or folders) whose process on this host has died.

    A process killed outright (SIGKILL, out of memory) cannot clean up after itself; the next one
    to write `path` does. Siblings of other hosts (a folder shared over the network) are left
    alone: whether their process still runs cannot be told from here.
    """
    path = Path(path)
    removed = []
    for sibling in path.parent.glob(f".{path.name}.{kind}-{socket.gethostname()}-*"):
        pid = sibling.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
            removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_siblings(path, "tmp")
    tmp = owned_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def save_png(array, path):
    """A uint8 [H,W] or [H,W,3] array as a PNG file."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_jpeg(array, path, quality=90):
    """A uint8 [H,W,3] array as a JPEG file (for pictures of photos: a tenth of a PNG's size), with
    full-resolution colour (no chroma subsampling), so that the edges of coloured labels stay sharp."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="JPEG", quality=quality, subsampling=0)
