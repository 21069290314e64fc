"""The backbone file `--ckpt` names: a path, used as it is, or an arch name, whose release is found or fetched.

`--ckpt dino_vit_base_8` looks for `checkpoint/dino_vit_base_8.pth` (the official README's place, relative
to the working directory), then for `<cache_dir>/dino_vit_base_8.pth`, and otherwise downloads the
authors' release (models/releases.py) to the latter (utils/runtime/download.py: progress, resume, size
check, one download for all processes). The file keeps the layout its authors ship and is named
`<arch>.pth`, so its arch and the artifact folders follow from its name as for any checkpoint.

A release file is a torch file the safe loader reads (models/safe_load.py), or it is not used: a download
is checked before it is renamed into place, and its record says so. Any other file found is read each
time it is found: one this project downloaded before downloads were checked (its record says where it
came from) that cannot be read is moved aside and downloaded again; one placed by hand is named in the
error with the fix, and left as it is.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from models import ARCHS, CheckpointError
from models.releases import GATED_RELEASES, RELEASES
from models.safe_load import FileLoadError, safe_load
from utils.runtime.download import DownloadError, Downloaded, download, downloaded, set_aside

CHECKPOINT_DIR = Path("checkpoint")


def default_cache_dir():
    """$XDG_CACHE_HOME/cause, or ~/.cache/cause."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cause"


@dataclass(frozen=True)
class BackboneFile:
    path: Path
    release_url: str | None  # the authors' address of the file, when --ckpt named an arch
    download: Downloaded | None  # how this machine fetched it; None: found without a download record


def backbone_file(ckpt, cache_dir=None, fetch=True, progress=True):
    """The BackboneFile of a --ckpt value. An existing file, or a value that is no arch name, is a path
    (a missing path is reported by the step that reads it). An arch name with a release is found or
    downloaded (above; `fetch=False`: never downloaded, a missing file is a DownloadError saying where to
    get it). A DINOv3 arch's file, which its authors hand out only on request, is found where it was saved
(_saved_by_hand) or requested in one line. A stand-in arch's name, which has no release, is a
CheckpointError."""
    path = Path(ckpt)
    name = str(ckpt)
    if path.exists() or name not in ARCHS:
        return BackboneFile(path, None, downloaded(path))
    if name in GATED_RELEASES:
        return _saved_by_hand(GATED_RELEASES[name], Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if name not in RELEASES:
        raise CheckpointError(f"{name} is a stand-in arch without released weights: pass --ckpt the path of "
                              f"its file; the archs with a release are {', '.join(sorted(RELEASES))}")
    release = RELEASES[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / f"{name}.pth"
    for candidate in (CHECKPOINT_DIR / f"{name}.pth", cached):
        if candidate.is_file():
            record = downloaded(candidate)
            problem = None if record is not None and record.checked else torch_file_problem(candidate)
            if problem is None:
                return BackboneFile(candidate, release.url, record)
            if record is None:
                raise CheckpointError(f"{candidate} is not the {name} release file ({problem}), and this project "
                                      f"did not download it: replace it with {release.url} ({release.file_name}), "
                                      f"or delete it and --ckpt {name} downloads it to {cached}")
            aside = set_aside(candidate)
            print(f"[backbone] {candidate}, downloaded here, cannot be read ({problem}): moved to {aside}, "
                  f"downloading it again", flush=True)
            break
    instead = f"save it as {cached} (or as {CHECKPOINT_DIR / f'{name}.pth'})"
    if not fetch:
        raise DownloadError(f"the {name} release is not on this machine and downloads are off: fetch "
                            f"{release.url} ({release.file_name}) and {instead}")
    print(f"[backbone] {name}: downloading {release.file_name} to {cached}", flush=True)
    return BackboneFile(cached, release.url, download(release.url, cached, release.size, progress, instead=instead,
                                                      check=torch_file_problem))


def torch_file_problem(path):
    """None for a torch file the safe loader reads; otherwise why it is not one, in a few words."""
    try:
        safe_load(path)
    except FileLoadError as err:
        return str(err).removeprefix(f"{path} ")
    return None


def _saved_by_hand(release, cache_dir):
    """A gated release (DINOv3), which no one can download unasked: `<arch>.pth` or its official name in
    checkpoint/ or the cache, else a CheckpointError saying where to request it. A file found under its
    official name is linked as `<cache_dir>/<arch>.pth`, so that the artifact folders are named after the
    arch as for every `--ckpt <arch>`."""
    arch_file = f"{release.arch}.pth"
    linked = cache_dir / arch_file
    for candidate in (CHECKPOINT_DIR / arch_file, linked):
        if candidate.is_file():
            return BackboneFile(candidate, None, None)
    for candidate in (CHECKPOINT_DIR / release.file_name, cache_dir / release.file_name):
        if candidate.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            staged = cache_dir / f".{arch_file}.{os.getpid()}.link"  # one per process: torchrun's all look
            staged.unlink(missing_ok=True)
            staged.symlink_to(candidate.resolve())
            os.replace(staged, linked)
            return BackboneFile(linked, None, None)
    raise CheckpointError(release.request([CHECKPOINT_DIR / release.file_name, cache_dir / release.file_name]))
