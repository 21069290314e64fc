"""What prepare_data.py (utils/engine/prepare_data.py) refuses to write from an archive, on archives crafted
here the way bad ones come: a zip member or tar members declaring far more than their compressed bytes
make (a "bomb"), a member bigger than the free disk space, two members of one name or one place, and
members that are links. Each is refused before it is written, with one line naming the archive."""
import io
import os
import stat
import tarfile
import zipfile
from collections import namedtuple

import pytest

from errors import UserError
from utils.engine import prepare_data as engine
from utils.engine.prepare_data import MAX_RATIO, PrepareError, RefusedArchiveError, prepare

BOMB = bytes(32 << 20)  # 32 MiB of zeros: some 32 kB compressed, a ratio near a thousand
VOC = "VOCdevkit/VOC2012"


def written_files(data_dir):
    """The files prepare left under data_dir (its lock is no file it wrote from an archive)."""
    return sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))


def tar_archive(path, members, mode="w"):
    """A tar archive of `members`: {name: bytes, or ("symlink"|"hardlink", target)}, in order."""
    with tarfile.open(path, mode) as tarred:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = content[1]
                tarred.addfile(info)
            else:
                info.size = len(content)
                tarred.addfile(info, io.BytesIO(content))
    return path


def test_a_zip_member_declaring_far_more_than_its_compressed_size_is_refused_before_anything_is_written(
        tmp_path):
    archive = tmp_path / "potsdam.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("potsdam/gt/tile_0.mat", b"a real tile comes first")
        zipped.writestr("potsdam/imgs/tile_0.mat", BOMB)
    assert archive.stat().st_size < len(BOMB) // MAX_RATIO  # far beyond the bound
    with pytest.raises(RefusedArchiveError) as refused:
        prepare("potsdam3", tmp_path / "data", [archive], progress=False)
    message = str(refused.value)
    assert "\n" not in message and f"archive {archive}: member potsdam/imgs/tile_0.mat declares 33.6 MB" in message
    assert "zip bomb" in message and written_files(tmp_path / "data") == []


def test_tar_members_declaring_far_more_than_the_archive_are_refused_before_that_member_is_written(tmp_path):
    archive = tar_archive(tmp_path / "voc.tar.gz", {f"{VOC}/ImageSets/Segmentation/train.txt": b"a\n",
                                                     f"{VOC}/JPEGImages/a.jpg": BOMB}, mode="w:gz")
    with pytest.raises(RefusedArchiveError) as refused:
        prepare("pascalvoc", tmp_path / "data", [archive], progress=False)
    message = str(refused.value)
    assert "\n" not in message and f"its members up to {VOC}/JPEGImages/a.jpg declare 33.6 MB" in message
    assert written_files(tmp_path / "data") == [f".prepare-pascalvoc/pascalvoc/{VOC}/ImageSets/Segmentation/train.txt"]


def test_a_member_bigger_than_the_free_space_is_refused_before_it_is_written(tmp_path, monkeypatch):
    archive = tar_archive(tmp_path / "voc.tar", {f"{VOC}/ImageSets/Segmentation/train.txt": b"a\n",
                                                 f"{VOC}/JPEGImages/a.jpg": bytes(1000)})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda path: usage(10_000, 9_500, 500))  # a nearly full disk
    with pytest.raises(PrepareError) as refused:
        prepare("pascalvoc", tmp_path / "data", [archive], progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"cannot extract {VOC}/JPEGImages/a.jpg of {archive}: it "
                                                      f"needs 0.0 MB and ")
    assert "free some space and run again (the 1 files taken from it so far are kept)" in message
    assert written_files(tmp_path / "data") == [f".prepare-pascalvoc/pascalvoc/{VOC}/ImageSets/Segmentation/train.txt"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_two_members_of_one_name_are_refused(tmp_path, kind):
    name = "potsdam/imgs/tile_0.mat"
    if kind == "zip":
        archive = tmp_path / "potsdam.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr(name, b"first")
            with pytest.warns(UserWarning, match="Duplicate name"):
                zipped.writestr(name, b"second, which would have won")
    else:
        archive = tar_archive(tmp_path / "potsdam.tar", {name: b"first"})
        with tarfile.open(archive, "a") as tarred:  # appended, as `tar -r` does
            info = tarfile.TarInfo(name)
            info.size = 28
            tarred.addfile(info, io.BytesIO(b"second, which would have won"))
    with pytest.raises(RefusedArchiveError) as refused:
        prepare("potsdam3", tmp_path / "data", [archive], progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"archive {archive} holds two members named {name}")
    assert not (tmp_path / "data" / "potsdam").exists()
    if kind == "zip":  # a zip's index is read whole first: nothing was written
        assert written_files(tmp_path / "data") == []
    else:
        assert (tmp_path / "data" / ".prepare-potsdam" / "potsdam" / "imgs" / "tile_0.mat").read_bytes() == b"first"


def test_two_members_going_to_one_place_of_the_layout_are_refused(tmp_path):
    archive = tar_archive(tmp_path / "potsdam.tar", {"potsdam/imgs/tile_0.mat": b"one copy",
                                                     "other/imgs/tile_0.mat": b"another copy"})
    with pytest.raises(RefusedArchiveError, match=f"archive {archive} holds potsdam/imgs/tile_0.mat and "
                                                  f"other/imgs/tile_0.mat, which both go to imgs/tile_0.mat"):
        prepare("potsdam3", tmp_path / "data", [archive], progress=False)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_link_members_are_skipped_and_named_as_links(tmp_path, link, capsys):
    archive = tar_archive(tmp_path / "voc.tar", {
        f"{VOC}/ImageSets/Segmentation/train.txt": b"a\n", f"{VOC}/ImageSets/Segmentation/val.txt": b"a\n",
        f"{VOC}/SegmentationClass/a.png": b"label", "elsewhere/a.jpg": b"outside the layout",
        f"{VOC}/JPEGImages/a.jpg": (link, "../../../elsewhere/a.jpg")})
    with pytest.raises(PrepareError) as refused:
        prepare("pascalvoc", tmp_path / "data", [archive], progress=False)
    kind = "symbolic" if link == "symlink" else "hard"
    named = f"voc.tar: {VOC}/JPEGImages/a.jpg ({kind} link to ../../../elsewhere/a.jpg)"
    assert str(refused.value).startswith(f"1 member(s) the layout takes are links, which are never extracted "
                                         f"({named}): use archives holding the files themselves")
    assert f"voc.tar: 1 link member(s) skipped, links are never extracted: {VOC}/JPEGImages/a.jpg" \
        in capsys.readouterr().out
    staged = tmp_path / "data" / ".prepare-pascalvoc" / "pascalvoc"
    assert not (staged / VOC / "JPEGImages").exists() and not (tmp_path / "data" / "pascalvoc").exists()
    assert not any(os.path.islink(p) for p in staged.rglob("*"))


def test_refusals_are_user_errors():
    assert issubclass(RefusedArchiveError, PrepareError) and issubclass(PrepareError, UserError)


def test_a_zip_member_that_is_a_symbolic_link_is_skipped_and_named(tmp_path, capsys):
    archive = tmp_path / "potsdam.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("potsdam/gt/tile_0.mat", b"label")
        link = zipfile.ZipInfo("potsdam/imgs/tile_0.mat")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # as `zip --symlinks` stores one
        zipped.writestr(link, "/etc/passwd")
    with pytest.raises(PrepareError) as refused:
        prepare("potsdam3", tmp_path / "data", [archive], progress=False)
    assert str(refused.value).startswith("1 member(s) the layout takes are links, which are never extracted "
                                         "(potsdam.zip: potsdam/imgs/tile_0.mat (symbolic link to /etc/passwd))")
    assert "1 link member(s) skipped" in capsys.readouterr().out
    assert not (tmp_path / "data" / ".prepare-potsdam" / "potsdam" / "imgs").exists()
