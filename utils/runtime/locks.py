"""One run at a time on one step's artifacts (and one download of a file).

A step holds an exclusive lock (fcntl.flock) on a lock file in its output folder while it runs. A
second process that wants the same artifacts finds the lock taken and stops at once, naming the
process that holds it (the lock file says who: PID, host, start time, command). The kernel releases a
flock when its process ends, however it ends, so a killed run never blocks the next one. A run that
ends removes its lock file, and the folders it made for it if nothing else came to live there, so
a run refused before it wrote anything leaves nothing behind.
"""
import datetime
import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from errors import UserError


class BusyError(UserError):
    """Another live process is running the same step on the same artifacts."""


def _missing_folders(folder):
    """The folders of `folder`'s path that do not exist yet, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _take(lock_file, what, waiting):
    """An open handle of `lock_file` holding its lock. When another process holds it: BusyError, or
    with `waiting` (a message, printed) wait for it."""
    while True:
        handle = open(lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not said who it is yet"
            if waiting is None:
                handle.close()
                raise BusyError(f"{what} is being run by another process right now ({holder}); wait for it to "
                                f"finish or stop it (lock: {lock_file})") from None
            print(f"{waiting} ({holder})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(lock_file).st_ino:
                return handle
        except FileNotFoundError:
            pass
        # The holder removed the file as we opened it: the lock that counts is that of the file now there.
        handle.close()


@contextmanager
def exclusive(lock_file, what, waiting=None):
    """Hold the lock of `lock_file` for the body; BusyError at once when another process holds it, or,
    with `waiting` (what to print then), wait for it to finish (a download others use when it is done).
    `what` names the work in the message ("front door TR (CAUSE/.../segment_tr.pth)")."""
    lock_file = Path(lock_file)
    made = _missing_folders(lock_file.parent)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = _take(lock_file, what, waiting)
    except BusyError:
        _remove_empty(made)
        raise
    try:
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"PID {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)}")
        handle.flush()
        yield
    finally:
        lock_file.unlink()  # before the lock goes: a process that opened this file now sees it is gone
        handle.close()
        _remove_empty(made)


def _remove_empty(folders):
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # something else lives there now
            return
