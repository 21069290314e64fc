"""Artifact I/O that never leaves a half-written file behind.

Every artifact is written to a temporary file in the destination folder and renamed
into place, so a crash mid-write leaves either the old file or none, never a
truncated one that a later step would mistake for finished work. A disk that fills
mid-write stops the run with one line (DiskFullError) and leaves the old file as it was.

Each rename is a commit point. CAUSE_KILL_AT_COMMIT=N kills the process (SIGKILL, as
an out-of-memory kill or a pulled plug would) right before its N-th commit: a way to
check that a run killed at any commit resumes to the same result (tests/test_torn_*.py).
"""
import errno
import os
import shutil
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import UserError

KILL_AT_COMMIT = "CAUSE_KILL_AT_COMMIT"
_commits = 0


class DiskFullError(UserError):
    """A write failed for want of space (or quota) on its disk."""


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
        commit(tmp, path)
    except Exception as err:
        full = _full_disk(err)
        if full is None:
            raise
        free = shutil.disk_usage(path.parent).free
        quota = ", and the user's disk quota is reached" if full.errno == errno.EDQUOT else ""
        raise DiskFullError(f"no space left to write {path} ({free / 2**20:.1f} MiB free on its disk{quota}): "
                            f"free some space and run again; {path} is as it was before") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _full_disk(err):
    """The OSError saying the disk (or quota) is full behind `err`, or None. torch's writer reports it as a
    RuntimeError of its own, raised while it handles the OSError."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def commit(written, path):
    """Rename the finished file (or folder) `written` onto `path`: a commit point (see the module's doc)."""
    global _commits
    if Path(written).is_file():  # on the disk before the rename, so that a power cut leaves no empty file
        with open(written, "rb+") as f:
            os.fsync(f.fileno())
    _commits += 1
    if os.environ.get(KILL_AT_COMMIT) == str(_commits):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(written, path)


def save_torch(obj, path):
    # Through a Python file: torch's own writer reports a full disk without its errno.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_numpy(array, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_text(text, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_png(array, path):
    """A uint8 [H,W] or [H,W,3] array as a PNG file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def save_jpeg(array, path, quality=90):
    """A uint8 [H,W,3] array as a JPEG file (for pictures of photos: a tenth of a PNG's size), with
    full-resolution colour (no chroma subsampling), so that the edges of coloured labels stay sharp."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(array).save(f, format="JPEG", quality=quality, subsampling=0)
