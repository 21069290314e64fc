"""A user's own images: which files the command line names, and reading any of them as RGB.

`list_inputs` turns command-line arguments (image files, folders, `.txt` lists) into an
ordered list of `InputImage`s, each with a unique output name. `read_image` decodes one file
into an 8-bit RGB PIL image as a viewer would show it (as the steps read a data set's images:
loader/image_files.py); `check_processable` refuses sizes that
cannot be segmented meaningfully. Both raise a `RejectedImage` naming the file and the reason,
so a caller can report the image and go on with the others; a missing input or a bad list is a
user error (errors.UserError) that stops the run before any image is read.
"""
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import ImageOps

from errors import UserError
from loader.image_files import UndecodableImage, decode, to_rgb

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
LIST_EXTENSION = ".txt"
# Past this long/short side ratio the working image (short side at the model's resolution) and
# the number of windows grow too large: 64 keeps a 320-pixel working image near 80 MB / 127 windows.
MAX_ASPECT = 64


class MissingInput(UserError):
    """A path given on the command line, or in a list file, does not exist: the run stops."""


class InputListError(UserError):
    """A `.txt` list of inputs cannot be used as one: the run stops."""


class RejectedImage(ValueError):
    """One image is skipped: `path` and `reason` say which and why."""

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class UnreadableImage(RejectedImage):
    """The file is missing, corrupt, truncated, not an image, or in a format PIL cannot decode."""


class UnprocessableImage(RejectedImage):
    """The image decodes, but its size is outside what segmentation can use (`check_processable`)."""


@dataclass(frozen=True)
class InputImage:
    source: Path
    name: str  # unique output name: a relative POSIX path without extension, e.g. "street/0001"


def list_inputs(arguments, skip_folder=None):
    """The images that command-line `arguments` name, in the order given, each with a unique name.

    An argument is
    - an image file: named by its stem; any extension is accepted, the content decides later;
    - a folder: walked recursively, keeping files with an image extension (case-insensitive) and
      skipping hidden files and folders (".git", macOS "._x.jpg" resource forks) and not following
      links to folders, sorted by relative path; named by that relative path without extension;
    - a `.txt` file: a list of images and folders, one path per line, relative to the list's
      folder; blank lines and lines starting with "#" are skipped. Lists do not nest.
    Names that repeat (the same stem in two places, x.jpg next to x.png) get "_2", "_3", ... in
    input order, so outputs never overwrite each other. An empty result is the caller's to report.
    Folder walks do not enter `skip_folder` (the outputs' folder, which may lie inside an input
    folder: a rerun must not take the last run's outputs for inputs).
    """
    skip = None if skip_folder is None else Path(skip_folder).resolve()
    candidates = []
    for argument in arguments:
        path = Path(argument)
        _require_exists(path, "given on the command line")
        if path.is_file() and path.suffix.lower() == LIST_EXTENSION:
            candidates.extend(_listed(path, skip))
        else:
            candidates.extend(_expanded(path, skip))
    return _with_unique_names(candidates)


def _require_exists(path, where):
    if not path.exists():
        raise MissingInput(f"input {path} does not exist ({where})")


def _expanded(path, skip=None):
    """(source, candidate name) pairs of one image file or one folder (not entering `skip`)."""
    if not path.is_dir():
        return [(path, path.stem)]
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [sub for sub in subfolders  # pruned: not walked
                         if not sub.startswith(".") and Path(folder, sub).resolve() != skip]
        for file in files:
            if not file.startswith(".") and Path(file).suffix.lower() in IMAGE_EXTENSIONS:
                relative = PurePosixPath(Path(folder, file).relative_to(path))
                found.append((relative.as_posix(), Path(folder, file), relative.with_suffix("").as_posix()))
    return [(source, name) for _, source, name in sorted(found)]


def _listed(list_file, skip=None):
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: Notepad's byte-order mark
    except UnicodeDecodeError as err:
        raise InputListError(f"input list {list_file} is not UTF-8 text: {err}") from err
    entries = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = list_file.parent / line  # an absolute line replaces the folder
        _require_exists(path, f"listed in {list_file}, line {number}")
        if path.is_file() and path.suffix.lower() == LIST_EXTENSION:
            raise InputListError(f"{list_file}, line {number}: {line} is another list; lists do not nest")
        entries.extend(_expanded(path, skip))
    return entries


def _with_unique_names(candidates):
    # Compared case-insensitively: "A" and "a" are one file on macOS and Windows file systems.
    reserved = {name.casefold() for _, name in candidates}
    taken = set()
    images = []
    for source, name in candidates:
        unique = name
        if name.casefold() in taken:
            suffix = 2
            while f"{name}_{suffix}".casefold() in taken | reserved:
                suffix += 1
            unique = f"{name}_{suffix}"
        taken.add(unique.casefold())
        images.append(InputImage(source, unique))
    return images


def read_image(path):
    """The 8-bit RGB PIL image of a file's content, as an image viewer shows it, read as the steps read a
    data set's images (loader/image_files.py: decoded in full, so a truncated, corrupt or too large file
    fails now, as `UnreadableImage`; 16-bit grayscale scaled; transparency onto white), and:

    - the EXIF orientation is applied: a portrait photo comes back upright, sides swapped;
    - multi-frame files (TIFF pages, animated WebP/PNG): the first frame.
    """
    try:
        with decode(path) as picture:
            upright = ImageOps.exif_transpose(picture)
    except (FileNotFoundError, UndecodableImage) as err:
        reason = str(err) if isinstance(err, UndecodableImage) else f"{type(err).__name__}: {err}"
        raise UnreadableImage(path, f"cannot read image ({reason})") from err
    try:
        return to_rgb(upright)
    except ValueError as err:  # a colour mode PIL cannot convert, e.g. LAB
        raise UnreadableImage(path, f"cannot convert colour mode {upright.mode} to RGB: {err}") from err


def check_processable(size, min_side, path=None):
    """Refuse, as `UnprocessableImage`, an image of `size` = (width, height) that cannot be segmented.

    Policy: any size is *processable* (dense features are computed on a working copy whose shorter
    side is scaled to the model's resolution, in bounded-memory windows: modules/tiling.py), so only
    two cases are refused:
    - a shorter side below `min_side` (the caller passes one patch, in pixels): such an image holds
      less than one token's worth of pixels across, and scaling it up invents every detail;
    - a long/short side ratio above MAX_ASPECT: the working copy, and the time, grow with the ratio.
    Small images at or above one patch (a 20×20 icon) are scaled up and processed.
    """
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < min_side:
        raise UnprocessableImage(path, f"{width}×{height} pixels: the shorter side is below one patch "
                                       f"({min_side} pixels), too small to segment")
    if long > MAX_ASPECT * short:
        raise UnprocessableImage(path, f"{width}×{height} pixels: aspect ratio {long / short:.0f}:1 is beyond "
                                       f"the {MAX_ASPECT}:1 that can be processed")
