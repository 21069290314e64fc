"""prepare_data.py (utils/engine/prepare_data.py): each data set's published archives, built small in their
real member layouts (datagen.write_archives), turned into the layout the steps read, checked and cropped;
missing, damaged and interrupted archives; downloads from a server on 127.0.0.1 (tests/file_server.py),
web pages and damaged bodies among them. (tests/test_archives_members.py: what no archive may hold.)"""
import json
import os
import runpy
import shutil
import sys

import datagen
import pytest
from conftest import ROOT
from file_server import FileServer

from loader import DATASETS, build_dataset, build_source_dataset, existing_crop_dir, split_files
from loader.archives import LAYOUTS
from utils.engine import prepare_data as engine
from utils.engine.prepare_data import PrepareError, prepare
from utils.runtime.download import MIRROR_VARIABLE, DownloadError, downloaded_note

# The authors' own archives of each root (STEGO's all-in-one cocostuff.zip is tested on its own).
ORIGINALS = {"cocostuff": ["train2017.zip", "val2017.zip", "stuffthingmaps_trainval2017.zip",
                           "COCOStuff164kCurated.tar.gz"],
             "cityscapes": ["leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"],
             "pascalvoc": ["VOCtrainval_11-May-2012.tar"], "potsdam": ["potsdam.zip"]}
CROPS_PER_IMAGE = {"five": 5, "double": 20, "super": 50}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return datagen.write_archives(tmp_path_factory.mktemp("published"))


def tree(folder, leave_out=()):
    """{relative path: content} of the files under folder, without the folders named in leave_out."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.relative_to(folder).parts[0] not in leave_out}


def assert_prepared(name, data_dir, expected):
    """The layout holds exactly the files the steps read, byte for byte, and the steps read it."""
    info = DATASETS[name]
    assert tree(data_dir / info.layout.root, leave_out=("cropped",)) == tree(expected / info.layout.root)
    assert not (data_dir / f".prepare-{info.layout.root}").exists()
    for split in ("train", "val"):
        split_files(name, data_dir, split)
    item = build_dataset(name, data_dir, "train", 16)[0]
    assert item["img"].shape == (3, 16, 16) and item["label"].shape == (16, 16)
    build_dataset(name, data_dir, "val", 16)[0]
    if info.crops is not None:
        crops = existing_crop_dir(info, data_dir)
        assert crops == data_dir / info.crops.folder
        count = len(build_source_dataset(name, data_dir, "train")) * CROPS_PER_IMAGE[info.crops.kind]
        assert len(list((crops / "img" / "train").iterdir())) == count


@pytest.mark.parametrize("name", list(DATASETS))
def test_each_data_set_is_prepared_end_to_end_from_its_authors_archives(published, tmp_path, name, capsys):
    archives, expected = published
    data_dir = tmp_path / "data"
    root = prepare(name, data_dir, [archives[a] for a in ORIGINALS[DATASETS[name].layout.root]], progress=False)
    assert root == data_dir / DATASETS[name].layout.root
    assert_prepared(name, data_dir, expected)
    capsys.readouterr()
    prepare(name, data_dir, progress=False)  # a second run finds the layout in place and extracts nothing
    assert "already holds" in capsys.readouterr().out


def test_stegos_cocostuff_zip_found_in_the_download_folder_is_a_whole_source_and_can_be_removed(
        published, tmp_path):
    archives, expected = published
    data_dir = tmp_path / "data"
    (data_dir / "downloads").mkdir(parents=True)
    shutil.copy(archives["cocostuff.zip"], data_dir / "downloads")
    prepare("cocostuff27", data_dir, remove_archives=True, progress=False)
    assert_prepared("cocostuff27", data_dir, expected)
    assert list((data_dir / "downloads").iterdir()) == []


def test_missing_archives_are_named_with_their_addresses_and_the_staged_files_wait_for_them(
        published, tmp_path, capsys):
    archives, expected = published
    data_dir = tmp_path / "data"
    with pytest.raises(PrepareError) as missing:
        prepare("cocostuff27", data_dir, [archives["train2017.zip"]], progress=False)
    message = str(missing.value)
    assert f"3 archive(s) missing; put them in {data_dir / 'downloads'}" in message and "--download" in message
    coco = LAYOUTS["cocostuff"].archives
    for absent in ("val2017.zip", "stuffthingmaps_trainval2017.zip", "COCOStuff164kCurated.tar.gz"):
        assert f"{absent} ({coco[absent].size}), {coco[absent].urls[0]}" in message
    assert "train2017.zip" not in message.replace("val2017.zip", "")
    assert not (data_dir / "cocostuff").exists()  # no layout until it is complete
    assert (data_dir / ".prepare-cocostuff" / "cocostuff" / "images" / "train2017" / "000000000001.jpg").is_file()
    capsys.readouterr()
    prepare("cocostuff27", data_dir, [archives[a] for a in ORIGINALS["cocostuff"]], progress=False)
    assert "train2017.zip: 0 files extracted, 3 already there" in capsys.readouterr().out
    assert_prepared("cocostuff27", data_dir, expected)


def test_lists_that_do_not_make_the_layout_are_refused_before_it_is_put_in_place(published, tmp_path):
    archives, expected = published
    data_dir = tmp_path / "data"
    curated = "COCO/CocoStuff164k/curated"
    only_7 = datagen.pack_archive(tmp_path / "COCOStuff164kCurated.tar.gz", {  # no full train list
        f"{curated}/val2017/Coco164kFull_Stuff_Coarse_7.txt":
            expected / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt",
        f"{curated}/train2017/Coco164kFew_Stuff_6.txt": b"000000000001\n"})
    with pytest.raises(PrepareError) as refused:
        prepare("cocostuff27", data_dir, [archives[a] for a in ORIGINALS["cocostuff"][:3]] + [only_7], progress=False)
    message = str(refused.value)
    assert "curated/train2017/Coco164kFull_Stuff_Coarse.txt is missing" in message
    assert f"kept in {data_dir / '.prepare-cocostuff'}" in message and not (data_dir / "cocostuff").exists()
    prepare("cocostuff27", data_dir, [archives["cocostuff.zip"]], progress=False)  # STEGO's lists complete it
    (data_dir / "cocostuff" / "curated" / "train2017" / "Coco164kFew_Stuff_6.txt").unlink()
    assert_prepared("cocostuff27", data_dir, expected)


def test_cityscapes_is_never_downloaded_and_says_where_to_get_it(tmp_path, monkeypatch):
    served = FileServer()
    monkeypatch.setenv(MIRROR_VARIABLE, served.base)
    try:
        with pytest.raises(PrepareError) as missing:
            prepare("cityscapes", tmp_path / "data", fetch=True, progress=False)
    finally:
        served.close()
    message = str(missing.value)
    assert "leftImg8bit_trainvaltest.zip (11 GB), behind a login, https://www.cityscapes-dataset.com/" in message
    assert "gtFine_trainvaltest.zip" in message and "--download" not in message and served.requests == []


def test_an_interrupted_extraction_leaves_no_layout_and_the_next_run_finishes_it(
        published, tmp_path, monkeypatch, capsys):
    archives, expected = published
    data_dir = tmp_path / "data"
    copy = shutil.copyfileobj
    calls = []

    def killed_on_the_third_file(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        copy(*args)

    monkeypatch.setattr(engine.shutil, "copyfileobj", killed_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        prepare("pascalvoc", data_dir, [archives["VOCtrainval_11-May-2012.tar"]], progress=False)
    monkeypatch.setattr(engine.shutil, "copyfileobj", copy)
    staging = data_dir / ".prepare-pascalvoc"
    assert not (data_dir / "pascalvoc").exists() and not list(staging.glob(".member-*"))
    assert sum(1 for p in staging.rglob("*") if p.is_file()) == 2
    capsys.readouterr()
    prepare("pascalvoc", data_dir, [archives["VOCtrainval_11-May-2012.tar"]], progress=False)
    total = len(tree(expected / "pascalvoc"))
    assert f"VOCtrainval_11-May-2012.tar: {total - 2} files extracted, 2 already there" in capsys.readouterr().out
    assert_prepared("pascalvoc", data_dir, expected)


@pytest.mark.parametrize("archive", ["VOCtrainval_11-May-2012.tar", "potsdam.zip"])
def test_a_damaged_archive_is_refused_with_the_fix_and_nothing_is_put_in_place(published, tmp_path, archive):
    archives, _ = published
    damaged = tmp_path / archive
    content = archives[archive].read_bytes()
    damaged.write_bytes(content[:len(content) * 2 // 3])
    name = "pascalvoc" if archive.endswith(".tar") else "potsdam3"
    with pytest.raises(PrepareError, match=f"archive {damaged} is damaged or incomplete .*: fetch it again"):
        prepare(name, tmp_path / "data", [damaged], progress=False)
    assert not (tmp_path / "data" / DATASETS[name].layout.root).exists()


def test_files_are_added_to_an_existing_root_without_replacing_any_and_the_lists_go_last(
        published, tmp_path, monkeypatch):
    archives, expected = published
    data_dir = tmp_path / "data"
    coco = data_dir / "cocostuff"
    shutil.copytree(expected / "cocostuff" / "images" / "train2017", coco / "images" / "train2017")
    mine = coco / "images" / "train2017" / "000000000001.jpg"
    mine.write_bytes(mine.read_bytes())  # the user's own copy, kept as it is
    (coco / "notes.txt").write_text("mine")
    moved = []
    replace = os.replace

    def recording(source, destination):  # the layout's files; the crop step's own writes come after
        if str(destination).startswith(str(coco)) and not str(destination).startswith(str(coco / "cropped")):
            moved.append(os.path.relpath(destination, coco))
        replace(source, destination)

    monkeypatch.setattr(engine.os, "replace", recording)
    prepare("cocostuff27", data_dir, [archives[a] for a in ORIGINALS["cocostuff"][1:]], progress=False)
    assert (coco / "notes.txt").read_text() == "mine"
    assert moved[-1] == "curated" and not any(path.startswith("curated") for path in moved[:-1])
    assert "images/train2017" not in moved and len(moved) > 1
    (coco / "notes.txt").unlink()
    assert_prepared("cocostuff27", data_dir, expected)


def test_download_fetches_the_missing_public_archive_from_its_next_address(published, tmp_path, monkeypatch):
    archives, expected = published
    served = FileServer()
    monkeypatch.setenv(MIRROR_VARIABLE, served.base)
    first, second = LAYOUTS["pascalvoc"].archives["VOCtrainval_11-May-2012.tar"].urls
    path = served.serve(second, archives["VOCtrainval_11-May-2012.tar"].read_bytes())  # the first answers 404
    try:
        prepare("pascalvoc", tmp_path / "data", fetch=True, progress=False)
    finally:
        served.close()
    assert [asked for asked, _ in served.requests] == [f"/{first.split('://')[1]}", path]
    assert (tmp_path / "data" / "downloads" / "VOCtrainval_11-May-2012.tar").is_file()
    assert_prepared("pascalvoc", tmp_path / "data", expected)


def test_the_script_ends_a_missing_archive_with_one_error_and_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "--dataset", "potsdam3", "--data_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(ROOT / "prepare_data.py"), run_name="__main__")
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error [prepare_data]: potsdam3: 1 archive(s) missing") and "Traceback" not in error
    assert "potsdam.zip (size not published), https://marhamilresearch4.blob.core.windows.net/" in error


@pytest.mark.parametrize("recorded", [True, False])
def test_a_damaged_archive_downloaded_here_is_fetched_again_and_one_placed_by_hand_is_left_alone(
        published, tmp_path, monkeypatch, recorded):
    archives, expected = published
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    kept = downloads / "VOCtrainval_11-May-2012.tar"
    page = b"<!DOCTYPE html><html><body>Quota exceeded</body></html>"
    kept.write_bytes(page)  # what a download kept before downloads were checked
    if recorded:
        downloaded_note(kept).write_text(json.dumps({"url": "http://host.robots.ox.ac.uk/", "size": len(page),
                                                     "sha256": "sha256:0"}))
    served = FileServer()
    monkeypatch.setenv(MIRROR_VARIABLE, served.base)
    url = LAYOUTS["pascalvoc"].archives["VOCtrainval_11-May-2012.tar"].urls[0]
    path = served.serve(url, archives["VOCtrainval_11-May-2012.tar"].read_bytes())
    try:
        if recorded:
            prepare("pascalvoc", tmp_path / "data", fetch=True, progress=False)
        else:
            with pytest.raises(PrepareError, match=f"archive {kept} is damaged or incomplete .*: fetch it again"):
                prepare("pascalvoc", tmp_path / "data", fetch=True, progress=False)
    finally:
        served.close()
    if recorded:
        assert (downloads / ".VOCtrainval_11-May-2012.tar.damaged").read_bytes() == page
        assert kept.read_bytes() == archives["VOCtrainval_11-May-2012.tar"].read_bytes()
        assert served.requests_for(path) == [None]
        assert_prepared("pascalvoc", tmp_path / "data", expected)
    else:
        assert kept.read_bytes() == page and served.requests == []


def test_a_web_page_or_a_damaged_body_is_never_kept_as_an_archive(published, tmp_path, monkeypatch):
    archives, _ = published
    first, second = LAYOUTS["pascalvoc"].archives["VOCtrainval_11-May-2012.tar"].urls
    served = FileServer()
    monkeypatch.setenv(MIRROR_VARIABLE, served.base)
    served.serve(first, b"<html><body>Please sign in</body></html>")
    content = bytearray(archives["VOCtrainval_11-May-2012.tar"].read_bytes())
    content[1024:1536] = bytes(512)  # a member's data block zeroed: complete by size, damaged inside
    content[148:156] = b"0000000\0"  # and the first header's checksum wrong
    served.serve(second, bytes(content))
    try:
        with pytest.raises(DownloadError) as refused:
            prepare("pascalvoc", tmp_path / "data", fetch=True, progress=False)
    finally:
        served.close()
    message = str(refused.value)
    assert "\n" not in message and "the server sent a web page (an HTML page)" in message
    assert "are not a valid VOCtrainval_11-May-2012.tar (damaged or incomplete" in message
    assert list((tmp_path / "data").rglob("*.tar*")) == []
