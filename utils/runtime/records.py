"""Records of what made each artifact, the fingerprints they hold, and whether a step is up to date.

Beside every artifact a JSON record with the same stem (`segment_tr.json` beside `segment_tr.pth`;
a folder artifact, the crops, holds its record inside, written before the folder is renamed into
place) says how it was made: the step's settings and recipe, the fingerprints of everything it read (the
backbone file, the earlier steps' artifacts, the data lists), whether the run that wrote it finished
all its epochs, the project's version. A step is "already done" when its artifact's record is
complete and was made from exactly the current inputs and settings; otherwise it says what changed
and runs again (or, with --if_changed refuse, stops). Released CAUSE files have no record: they are
used as they are and recorded as "released" by whatever reads them.

Fingerprints are SHA-256 hashes of file contents, cached by path, size, modification and change
times (a checkpoint is hashed once; a file modified in the last seconds is hashed again each time, as
a write within one tick of the clock would not change its times); a list of data files is
fingerprinted by each file's name (relative to the data folder), size and modification time, read
from every file at every start (a stat per file: a second for COCO's 118k images).
"""
import datetime
import hashlib
import json
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

from errors import UserError
from utils.runtime.io import save_text

_CHUNK = 1 << 22
FOLDER_RECORD = "record.json"
# A file modified this recently when it was hashed may be written again within the same clock tick: its
# hash is not cached.
RECENT_NS = 2_000_000_000


class StaleInputError(UserError):
    """An input changed since an artifact was made and --if_changed refuse was given, or an earlier
    step's artifact comes from an interrupted run."""


def weights_fingerprint(module):
    """sha256 of a module's weights (names, dtypes, shapes and values, in state-dict order): the same for
    the same weights, whichever file held them (a release, or a STEGO file with the same ViT inside)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


class FingerprintCache:
    """Content hashes of files, kept in a JSON file so each file is hashed once while it is unchanged
    (path None: kept in memory only)."""

    def __init__(self, path):
        self.path = None if path is None else Path(path)
        self.updated = {}
        try:
            self.entries = json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):  # no cache yet, or one damaged by hand: start a new one
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def file(self, path):
        """sha256 of a file's content. The cached hash serves while the file's size, modification time
        and change time (which no tool sets back) are those it had when hashed, and the file had not been
        modified for RECENT_NS before it was hashed."""
        path = Path(path).resolve()
        stat = path.stat()
        state = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = self.entries.get(str(path))
        if isinstance(entry, dict) and entry.get("state") == state and isinstance(entry.get("fingerprint"), str):
            return entry["fingerprint"]
        hashed_at = time.time_ns()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        fingerprint = f"sha256:{digest.hexdigest()}"
        if hashed_at - max(stat.st_mtime_ns, stat.st_ctime_ns) > RECENT_NS:
            self.entries[str(path)] = self.updated[str(path)] = {"state": state, "fingerprint": fingerprint}
        return fingerprint

    def artifact(self, path):
        """The fingerprint of an artifact: a file's content, or a folder's files (names, sizes and
        modification times, its record left out)."""
        path = Path(path)
        if not path.is_dir():
            return self.file(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != FOLDER_RECORD)
        return file_list_fingerprint(files, path)["fingerprint"]

    def save(self):
        """Write the hashes taken here into the cache (whole or not at all), with what other runs wrote
        meanwhile."""
        if not self.updated or self.path is None:
            return
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        save_text(json.dumps({**(on_disk if isinstance(on_disk, dict) else {}), **self.updated}), self.path)
        self.updated = {}


def file_list_fingerprint(files, root):
    """sha256 of the files' names relative to `root`, in order, with their sizes and modification times: a
    file added, removed, renamed, resized or rewritten changes it. A stat per file, never cached."""
    lines = []
    for f in map(Path, files):
        stat = f.stat()
        lines.append(f"{os.path.relpath(f, root)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return {"fingerprint": _digest(lines), "files": len(lines)}


def _digest(lines):
    digest = hashlib.sha256()
    for line in lines:
        digest.update(f"{line}\n".encode())
    return f"sha256:{digest.hexdigest()}"


@lru_cache(maxsize=None)
def project_version():
    """The git commit of this code (with "+changes" when the tree differs from it), or "unknown"."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + ("+changes" if dirty else "")


def record_path(artifact):
    """Where the record of `artifact` lives: beside it with the same stem, or inside a folder artifact."""
    artifact = Path(artifact)
    return artifact / FOLDER_RECORD if artifact.is_dir() else artifact.with_suffix(".json")


def read_record(artifact):
    """The record of `artifact` (record_path), or None when it has none."""
    path = record_path(artifact)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(artifact, record):
    save_text(json.dumps(record, indent=2, default=str), record_path(artifact))


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def upstream_entry(artifact, produced_by, fingerprints, record=None):
    """What a step records of an earlier step's artifact it reads: its fingerprint and its origin
    ("trained" with the earlier record, whether complete, or "released": a file without a record)."""
    record = read_record(artifact) if record is None else record
    entry = {"file": str(artifact), "fingerprint": fingerprints.artifact(artifact), "produced_by": produced_by}
    if record is None:
        entry.update(origin="released", complete=True)
        return entry
    written = recorded_fingerprint(record, artifact)
    if written is not None and written != entry["fingerprint"]:
        raise StaleInputError(
            f"{artifact} is not the file its record {record_path(artifact).name} describes (replaced, damaged, or "
            f"its run was stopped between writing it and its record): run {produced_by} again (or, for a released "
            f"file put in its place, delete {record_path(artifact)})")
    entry.update(origin="trained", complete=bool(record.get("complete")), record=record)
    return entry


def recorded_fingerprint(record, artifact):
    """The fingerprint `record` gives `artifact` (found by its name: the output folder may have been given
    otherwise), or None when it names none."""
    recorded = record.get("artifacts")
    if not isinstance(recorded, dict):
        return None
    return next((value for key, value in recorded.items() if Path(key).name == Path(artifact).name), None)


def identity_of(entry):
    """The part of an upstream entry a later step's result depends on: its content, and the run that made
    it (a rerun of an earlier step reruns the later ones, even where its output came out the same)."""
    run = entry["record"].get("run_id") if entry["origin"] == "trained" else None
    return {"fingerprint": entry["fingerprint"], "origin": entry["origin"], "complete": entry["complete"], "run": run}


def check_complete(upstream, accept_partial):
    """Stop when an earlier artifact comes from an interrupted run, naming the step to finish;
    with accept_partial, return the warnings to record instead."""
    warnings = []
    for name, entry in upstream.items():
        if entry["complete"]:
            continue
        record = entry["record"]
        done = f"{record.get('epochs_done', '?')} of {record.get('epochs', '?')} epochs"
        message = (f"{entry['file']} was written by an interrupted run ({done}); finish it by running "
                   f"{entry['produced_by']} again with the same options (it resumes), or pass --accept_partial "
                   f"to use it anyway")
        if not accept_partial:
            raise StaleInputError(message)
        warnings.append(f"{name}: accepted from an interrupted run ({done})")
        print(f"warning: {name} comes from an interrupted run ({done}); --accept_partial uses it, and the "
              f"new record says so")
    return warnings


def differences(old, new, prefix=""):
    """Human-readable differences between two identities (nested dicts)."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(none)"), new.get(key, "(none)")
        if isinstance(before, dict) and isinstance(after, dict):
            found += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            found.append(f"{prefix}{key}: {_short(before)} -> {_short(after)}")
    return found


def _short(value):
    text = str(value)
    return text[:7 + 12] + "…" if text.startswith("sha256:") else text
