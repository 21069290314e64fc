"""Before step 0 — a data set's layout made from the archives its authors publish, checked, then cropped.

    python prepare_data.py --dataset cocostuff27 --data_dir DATA [ARCHIVE ...] [--download]

The archives are those of loader/archives.py, given as paths or found by their names in
`--download_dir` (default DATA/downloads) or DATA itself; `--download` fetches the public ones that are
missing (utils/runtime/download.py). Their members are extracted, one file at a time and each renamed
into place, into a staging folder of the data set's own, `DATA/.prepare-ROOT/ROOT`, which outlives an
interrupted run: the next run skips the members already there. Only when the staged layout passes the
steps' own checks (loader.split_files of train and val) is it renamed to `DATA/ROOT`. Where `DATA/ROOT`
already exists (another data set of the same root, files placed by hand), the new files are added to it,
never replacing one, with the files that index a split (the image lists, Cityscapes' image folders)
last, so no step reads a layout that is still being completed. Then every val file (and every train
file of a data set without crops) is decoded, and the crop step writes the training crops.

What an archive may hold (refused before its members are written, PrepareError naming the archive):
- sizes its compressed bytes can make: a zip member may declare at most MAX_RATIO times its compressed
  size (plus 1 MiB), a tar's members together at most MAX_RATIO times the archive's size (plus 1 MiB);
  real images, label maps and lists compress far less, a crafted "zip bomb" far more;
- sizes the disk can hold: a member larger than the free space left is refused before it is written;
- one member per name, and per place in the layout: with two, which one is meant cannot be told;
- links (symbolic or hard) are never extracted: they are skipped and named, and a layout that lacks
  their files says so rather than that the files are missing.
A downloaded archive is checked whole before it is renamed into place (its index, every member's CRC
and the rules above); one downloaded here that later proves damaged is moved aside and, with
`--download`, fetched again; one placed by hand is named with the fix.
"""
import argparse
import gzip
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from errors import UserError
from loader import DATASETS, DatasetLayoutError, dataset_info, split_files, verify_readable
from loader.archives import LAYOUTS
from utils.engine.crop import write_cropped_dataset
from utils.runtime.download import DownloadError, download, downloaded, downloaded_note, set_aside
from utils.runtime.locks import exclusive

_SKIPPED_NAMES = ("__MACOSX",)  # resource forks a Mac zip carries beside each file
MAX_RATIO = 100  # bytes a member may declare per compressed byte (see the module's docstring)
_RATIO_SLACK = 1 << 20  # small members may compress better: a MiB is never refused
_LINKS_NAMED = 3  # links a message names before it counts the rest
_LINK_TARGET = 256  # bytes of a zip link's target a message names
_DAMAGE = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)  # a cut or damaged archive


class PrepareError(UserError):
    """A data set's archives are missing, damaged, or do not make the layout the steps read."""


class DamagedArchiveError(PrepareError):
    """An archive that cannot be read to its end (`reason`: what broke)."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


class RefusedArchiveError(PrepareError):
    """An archive whose members cannot be written safely (see the module's docstring)."""


def _megabytes(count):
    return f"{count / 1e6:.1f} MB"


def _one_line(err):
    """An exception's message on one line (tarfile tells why each compression failed on a line each)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _bound(compressed):
    """The most bytes that `compressed` bytes of an archive may declare."""
    return MAX_RATIO * compressed + _RATIO_SLACK


def prepare(name, data_dir, archives=(), fetch=False, download_dir=None, remove_archives=False, num_workers=0,
            progress=True):
    """Make data set `name`'s layout under `data_dir` from `archives` (paths) and those found or, with
    `fetch`, downloaded (see the module's docstring); check it, decode val, crop. Returns its root folder.
    `remove_archives` deletes each archive once its members are staged."""
    info = dataset_info(name)
    layout = LAYOUTS[info.layout.root]
    data_dir = Path(data_dir)
    download_dir = Path(download_dir) if download_dir is not None else data_dir / "downloads"
    root = data_dir / layout.root
    data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(data_dir / f".prepare-{layout.root}.lock", f"prepare_data.py writing {root}",
                   waiting=f"[prepare] waiting for another prepare_data.py writing {root}"):
        if layout_problem(name, data_dir) is None:
            print(f"[prepare] {root} already holds the {name} layout")
        else:
            _assemble(name, layout, data_dir, download_dir, [Path(a) for a in archives], fetch, remove_archives,
                      progress)
        try:
            split_files(name, data_dir, "train", "curated")
        except DatasetLayoutError as err:  # its first line names the missing file
            print(f"[prepare] note, for PriMaPs-EM only (it trains on its own list): {str(err).splitlines()[0]}")
        verify_readable(name, data_dir, "val", num_workers=num_workers, progress=progress)
        if info.crops is None:
            verify_readable(name, data_dir, "train", num_workers=num_workers, progress=progress)
        else:  # up to date crops are kept; the crop step says so
            write_cropped_dataset(name, data_dir, num_workers=num_workers)
    print(f"[prepare] {name} is ready under {data_dir}")
    return root


def layout_problem(name, data_dir):
    """Why the steps would refuse data set `name` under `data_dir` (before cropping), or None."""
    try:
        split_files(name, data_dir, "train", "images")
        split_files(name, data_dir, "val")
    except DatasetLayoutError as err:
        return str(err)
    return None


def _assemble(name, layout, data_dir, download_dir, given, fetch, remove_archives, progress):
    """Stage the archives' members, fetch what is missing when asked, and move the layout into place."""
    staging = data_dir / f".prepare-{layout.root}"
    staged_root = staging / layout.root
    root = data_dir / layout.root
    staged_root.mkdir(parents=True, exist_ok=True)
    for leftover in staging.glob(".member-*"):  # a member being written when a run was killed
        leftover.unlink()

    links = []  # "archive: member (link to ...)" of the links the layout would have taken

    def take(archive):
        try:
            links.extend(f"{archive.name}: {link}" for link in _extract(archive, layout, staging,
                                                                         (staged_root, root), progress))
        except DamagedArchiveError as err:
            if downloaded(archive) is None:  # placed by hand: the user's to replace
                raise
            aside = set_aside(archive)
            again = "downloading it again" if fetch else "run again with --download to fetch it again"
            print(f"[prepare] {archive.name}, downloaded here, is damaged ({err.reason}): moved to {aside}; {again}",
                  flush=True)
            return
        if remove_archives:
            archive.unlink()
            downloaded_note(archive).unlink(missing_ok=True)

    for archive in _archives_at_hand(layout, given, [download_dir, data_dir]):
        take(archive)
    missing = _missing_parts(layout, (staged_root, root))
    if missing and fetch:
        for part in missing:
            archive = _download_part(layout, part, download_dir, progress)
            if archive is not None:
                take(archive)
        missing = _missing_parts(layout, (staged_root, root))
    if missing:
        raise PrepareError(_links_note(links) + _missing_message(name, layout, missing, download_dir, fetch))
    if root.exists():
        _merge(staged_root, root, layout.index)
        shutil.rmtree(staging)
        problem, kept = layout_problem(name, data_dir), f"the files extracted were added to {root}"
    else:
        problem, kept = layout_problem(name, staging), f"the files extracted so far are kept in {staging}"
        if problem is None:
            staged_root.rename(root)
            shutil.rmtree(staging)
    if problem is not None:
        raise PrepareError(f"{_links_note(links)}the archives read do not make the {name} layout (its archives: "
                           f"{', '.join(layout.archives)}); {kept} for the next run.\n{problem}")
    print(f"[prepare] {root} is in place")


def _named_links(links):
    shown = ", ".join(links[:_LINKS_NAMED])
    return shown + (f" and {len(links) - _LINKS_NAMED} more" if len(links) > _LINKS_NAMED else "")


def _links_note(links):
    """What a layout lacking files says first when the archives held links in their place."""
    if not links:
        return ""
    return (f"{len(links)} member(s) the layout takes are links, which are never extracted ({_named_links(links)}): "
            f"use archives holding the files themselves, or put the files in place by hand.\n")


def _archives_at_hand(layout, given, folders):
    """The given archives (which must exist), then those of the layout found by name in `folders`."""
    for path in given:
        if not path.is_file():
            raise PrepareError(f"archive {path} does not exist")
    found = list(given)
    for folder in folders:
        for archive_name in layout.archives:
            path = folder / archive_name
            if path.is_file() and not any(path.resolve() == f.resolve() for f in found):
                found.append(path)
    return found


def _missing_parts(layout, bases):
    """The parts of `layout` that none of `bases` (the staged root, the final root) holds."""
    def present(folder):
        return any((base / folder).is_dir() and any((base / folder).iterdir()) for base in bases)
    return [part for part in layout.parts if not all(present(folder) for folder in part.folders)]


def _source(archive):
    return archive.urls[0] if archive.urls else archive.page


def _missing_message(name, layout, missing, download_dir, fetched):
    lines = []
    for part in missing:
        first, *others = (layout.archives[a] for a in part.archives)
        where = _source(first) if first.downloadable else f"behind a login, {first.page}"
        also = "".join(f"; or {other.name} ({other.content}): {_source(other)}" for other in others)
        lines.append(f"  {part.content}: {first.name} ({first.size}), {where}{also}")
    public = any(layout.archives[part.archives[0]].downloadable for part in missing)
    hint = ", or run again with --download to fetch the public ones" if public and not fetched else ""
    return (f"{name}: {len(missing)} archive(s) missing; put them in {download_dir} or pass their paths"
            f"{hint}:\n" + "\n".join(lines))


def _download_part(layout, part, download_dir, progress):
    """Download the first public archive of `part` into `download_dir`; None when none is public."""
    archive = next((layout.archives[a] for a in part.archives if layout.archives[a].downloadable), None)
    if archive is None:
        return None
    target = download_dir / archive.name
    failures = []
    for url in archive.urls:
        try:
            return download(url, target, progress=progress, instead=f"put it in {download_dir} (or pass its path)",
                            check=_archive_problem).path
        except DownloadError as err:
            failures.append(str(err))
    raise DownloadError(" / ".join(failures))


def _placed(layout, member):
    """Where archive `member` goes under the root (a relative path), or None: not read by the steps."""
    parts = PurePosixPath(member.replace("\\", "/")).parts
    if any(part in _SKIPPED_NAMES for part in parts) or not parts or parts[-1].startswith("._"):
        return None
    for rule in layout.rules:
        match = rule.pattern.search("/".join(parts))
        if match:
            relative = PurePosixPath(rule.target.format(**match.groupdict()))
            if relative.is_absolute() or any(p in ("", ".", "..") for p in relative.parts):
                return None
            return relative
    return None


def _members(archive):
    """(name, size, open(), link) of every file and link of a zip or tar archive, in archive order: `link`
    says what a link member links to (it has no open(), None), and is None for a file. RefusedArchiveError
    for a name met twice and sizes beyond the bound of MAX_RATIO (a zip's before any member is read)."""
    seen = set()

    def once(name):
        if name in seen:
            raise RefusedArchiveError(f"archive {archive} holds two members named {name}: which one is meant "
                                      f"cannot be told; use an archive from its authors' page")
        seen.add(name)

    suffixes = "".join(archive.suffixes[-2:]).lower()
    if archive.suffix.lower() == ".zip" or (not suffixes.startswith(".tar") and zipfile.is_zipfile(archive)):
        with zipfile.ZipFile(archive) as zipped:
            infos = [info for info in zipped.infolist() if not info.is_dir()]
            for info in infos:
                once(info.filename)
                if info.file_size > _bound(info.compress_size):
                    raise RefusedArchiveError(
                        f"archive {archive}: member {info.filename} declares {_megabytes(info.file_size)} from "
                        f"{_megabytes(info.compress_size)} compressed, more than {MAX_RATIO} times as much: a "
                        f"crafted archive (a zip bomb); nothing of it was written")
            for info in infos:
                if stat.S_ISLNK(info.external_attr >> 16):  # a link's target is its content
                    with zipped.open(info) as link:
                        target = link.read(_LINK_TARGET).decode(errors="replace")
                    yield info.filename, info.file_size, None, f"symbolic link to {target}"
                else:
                    yield info.filename, info.file_size, lambda info=info: zipped.open(info), None
        return
    with tarfile.open(archive, "r:*") as tarred:
        declared, limit = 0, _bound(archive.stat().st_size)
        for info in tarred:
            if info.issym() or info.islnk():
                yield info.name, 0, None, f"{'symbolic' if info.issym() else 'hard'} link to {info.linkname}"
            elif info.isfile():
                once(info.name)
                declared += info.size
                if declared > limit:
                    raise RefusedArchiveError(
                        f"archive {archive}: its members up to {info.name} declare {_megabytes(declared)}, more "
                        f"than {MAX_RATIO} times its own {_megabytes(archive.stat().st_size)}: a crafted archive "
                        f"(a tar bomb); refused before that member was written")
                yield info.name, info.size, lambda info=info: tarred.extractfile(info), None
        # tarfile ends its iteration quietly where a cut archive stops between two members: a complete
        # one has its end-of-archive marker, a zero block, there.
        tarred.fileobj.seek(tarred.offset)
        if tarred.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("it ends before its end-of-archive marker")


def _archive_problem(path):
    """None for an archive whose index, every member's CRC (a zip's; a tar.gz's stream) and the rules of
    the module's docstring check; otherwise why not, in a few words (a download's check)."""
    try:
        for _, _, open_member, _ in _members(path):
            if open_member is not None:
                with open_member() as member:
                    while member.read(1 << 20):
                        pass
    except _DAMAGE as err:
        return f"damaged or incomplete: {_one_line(err)}"
    except RefusedArchiveError as err:
        return str(err)
    return None


def _extract(archive, layout, staging, bases, progress):
    """Write `archive`'s members that the layout places under bases[0] (the staged root), skipping those
    already of the right size in any of `bases`; each member goes to a file of its own and is renamed.
    Returns the links the layout would have placed, "member (link to ...)", skipped."""
    staged_root = bases[0]
    scratch = staging / f".member-{os.getpid()}"
    made = set()
    placed = {}  # relative path -> the member going there
    links = []
    written = kept = 0
    try:
        bar = tqdm(_members(archive), desc=f"[prepare] {archive.name}", unit=" files", disable=not progress)
        for member, size, open_member, link in bar:
            relative = _placed(layout, member)
            if relative is None:
                continue
            if link is not None:
                links.append(f"{member} ({link})")
                continue
            if relative in placed:
                raise RefusedArchiveError(f"archive {archive} holds {placed[relative]} and {member}, which both "
                                          f"go to {relative}: which one is meant cannot be told; use an archive "
                                          f"from its authors' page")
            placed[relative] = member
            if any(_has_size(base / relative, size) for base in bases):
                kept += 1
                continue
            free = shutil.disk_usage(staged_root).free
            if size > free:
                raise PrepareError(f"cannot extract {member} of {archive}: it needs {_megabytes(size)} and "
                                   f"{staged_root} has {_megabytes(free)} free; free some space and run again (the "
                                   f"{written + kept} files taken from it so far are kept)")
            destination = staged_root / relative
            if destination.parent not in made:
                destination.parent.mkdir(parents=True, exist_ok=True)
                made.add(destination.parent)
            with open_member() as source, open(scratch, "wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
            os.replace(scratch, destination)
            written += 1
    except _DAMAGE as err:
        raise DamagedArchiveError(f"archive {archive} is damaged or incomplete ({_one_line(err)}): fetch it again; "
                                  f"the {written + kept} files taken from it so far are kept", _one_line(err)) from None
    except OSError as err:
        raise PrepareError(f"cannot extract {archive} into {staged_root}: {err}") from None
    finally:
        scratch.unlink(missing_ok=True)
    if links:
        print(f"[prepare] {archive.name}: {len(links)} link member(s) skipped, links are never extracted: "
              f"{_named_links(links)}")
    if written + kept == 0 and not links:
        raise PrepareError(f"archive {archive} holds none of the files of the {layout.root} layout; its "
                           f"archives are: {', '.join(layout.archives)}")
    print(f"[prepare] {archive.name}: {written} files extracted, {kept} already there")
    return links


def _has_size(path, size):
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _merge(source, target, index):
    """Move the staged tree `source` into the existing `target`, adding only what `target` lacks (a
    folder it lacks goes whole); the `index` paths (relative to the root) go last."""
    def move(src, dst, skip):
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            relative = Path(entry.path).relative_to(source).as_posix()
            if relative in skip:
                continue
            destination = dst / entry.name
            if not destination.exists():
                os.replace(entry.path, destination)
            elif entry.is_dir() and destination.is_dir():
                move(Path(entry.path), destination, skip)
    move(source, target, set(index))
    for relative in index:
        staged = source / relative
        if staged.exists():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            if not (target / relative).exists():
                os.replace(staged, target / relative)
            elif staged.is_dir():
                move(staged, target / relative, set())


def _describe_archives():
    lines = ["archives (put them in --download_dir or pass their paths; --download fetches the public ones):"]
    for layout in LAYOUTS.values():
        names = ", ".join(name for name, info in DATASETS.items() if info.layout.root == layout.root)
        lines.append(f"  {names}:")
        for part in layout.parts:
            choices = " or ".join(f"{a} ({layout.archives[a].size})" for a in part.archives)
            lines.append(f"    {part.content}: {choices}")
    return "\n".join(lines)


def parse_options(argv=None):
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_describe_archives(),
        description="Make a data set's layout under --data_dir from its published archives, check it, then "
                    "write its training crops.")
    parser.add_argument("archives", nargs="*", type=Path, help="archive files (zip or tar); others are found by "
                                                               "name in --download_dir and --data_dir")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("CAUSE_DATA_DIR", "data")))
    parser.add_argument("--download", action="store_true",
                        help="download the public archives that are missing (Cityscapes needs a login: never)")
    parser.add_argument("--download_dir", type=Path, default=None,
                        help="where downloaded archives go and are looked for (default: DATA_DIR/downloads)")
    parser.add_argument("--remove_archives", action="store_true",
                        help="delete each archive once its files are extracted (they are not needed again)")
    parser.add_argument("--num_workers", type=int, default=0, help="processes decoding and cropping images")
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_options(argv)
    return prepare(options.dataset, options.data_dir, options.archives, fetch=options.download,
                   download_dir=options.download_dir, remove_archives=options.remove_archives,
                   num_workers=options.num_workers)
