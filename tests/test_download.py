"""Downloads (utils/runtime/download.py) and backbones named by arch (utils/runtime/backbone_files.py),
against a server on 127.0.0.1 that mirrors the release addresses (tests/file_server.py) and misbehaves
as servers do: no size, a web page answered with 200, a redirect to another host, a stall, a cut body.
Nothing here reaches outside the machine: every address goes through CAUSE_DOWNLOAD_MIRROR."""
import hashlib
import io
import json
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from file_server import FileServer

from models import ARCHS, CheckpointError, resolve_arch
from models.releases import GATED_RELEASES, RELEASES
from utils.runtime import download as download_module
from utils.runtime.backbone_files import backbone_file
from utils.runtime.download import MIRROR_VARIABLE, DownloadError, download, downloaded, downloaded_note

RELEASE = RELEASES["dino_vit_base_8"]
CONTENT = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
WEB_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Sign in to continue</body></html>\n"


def torch_file(value=3):
    """The bytes of a small torch file the safe loader reads (a release stands in for its authors')."""
    buffer = io.BytesIO()
    torch.save({"w": torch.full((4,), float(value))}, buffer)
    return buffer.getvalue()


def sha256(content):
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def visible_files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_complete_download_is_renamed_into_place_with_its_size_and_sha256(server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    target = tmp_path / "backbone.pth"
    got = download(RELEASE.url, target, progress=False)
    assert target.read_bytes() == CONTENT
    assert (got.path, got.url, got.size, got.sha256) == (target, server.base + path, len(CONTENT), sha256(CONTENT))
    assert server.requests_for(path) == [None]
    assert visible_files(tmp_path) == ["backbone.pth"] and not list(tmp_path.glob(".*partial*"))
    assert downloaded(target) == got  # what the download recorded, read back by a later process


def test_an_interrupted_download_is_refused_then_resumed_with_a_range_request(server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    server.drop_after[path] = 100_000
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "0.1 MB of 0.3 MB" in message and "resumes" in message
    assert not target.exists()  # a truncated file is never renamed into place
    assert (tmp_path / ".backbone.pth.partial").stat().st_size == 100_000
    got = download(RELEASE.url, target, progress=False)
    assert server.requests_for(path) == [None, "bytes=100000-"]
    assert target.read_bytes() == CONTENT and got.sha256 == sha256(CONTENT) and got.size == len(CONTENT)


def test_a_resume_starts_again_when_the_file_changed_on_the_server(server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    server.drop_after[path] = 100_000
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError):
        download(RELEASE.url, target, progress=False)
    changed = CONTENT[::-1]
    server.serve(RELEASE.url, changed)
    got = download(RELEASE.url, target, progress=False)
    assert server.requests_for(path) == [None, "bytes=100000-"]  # If-Range no longer matches: a whole file
    assert target.read_bytes() == changed and got.sha256 == sha256(changed)


def test_a_complete_partial_file_left_before_its_rename_is_finished_without_downloading_again(
        server, tmp_path, monkeypatch):
    path = server.serve(RELEASE.url, CONTENT)
    target = tmp_path / "backbone.pth"
    replace = os.replace

    def killed_before_rename(source, destination):
        if Path(destination) == target:
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(download_module.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        download(RELEASE.url, target, progress=False)
    monkeypatch.setattr(download_module.os, "replace", replace)
    got = download(RELEASE.url, target, progress=False)
    assert server.requests_for(path) == [None, f"bytes={len(CONTENT)}-"]  # answered 416: nothing after the end
    assert target.read_bytes() == CONTENT and got.sha256 == sha256(CONTENT)


def test_a_file_of_another_size_than_expected_is_refused(server, tmp_path):
    server.serve(RELEASE.url, CONTENT)
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError, match=f"offers {len(CONTENT)} bytes, the file has {len(CONTENT) + 1}"):
        download(RELEASE.url, target, size=len(CONTENT) + 1, progress=False)
    assert not target.exists() and not (tmp_path / ".backbone.pth.partial").exists()


def test_a_missing_file_names_its_address_its_name_and_where_to_put_it(server, tmp_path):
    target = tmp_path / "cache" / "dino_vit_base_8.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "HTTP 404" in message
    assert f"{server.base}/dl.fbaipublicfiles.com/dino/" in message and RELEASE.file_name in message
    assert f"save it as {target}" in message and not target.exists()


def test_no_network_is_one_line_naming_the_address_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connection is refused, as without a network
    monkeypatch.setenv(MIRROR_VARIABLE, f"http://127.0.0.1:{port}")
    target = tmp_path / "dino_vit_base_8.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False, timeout=5)
    message = str(refused.value)
    assert "\n" not in message and f"127.0.0.1:{port}/dl.fbaipublicfiles.com" in message
    assert RELEASE.file_name in message and str(target) in message and not target.exists()


def _ask_for_release(cache, out, results):
    sys.stdout = open(out, "w", buffering=1)  # where this process says that it waits
    found = backbone_file("dino_vit_small_16", cache, progress=False)
    results.put((found.path, found.download.sha256))


def test_two_processes_asking_for_the_same_release_download_it_once(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = server.serve(RELEASES["dino_vit_small_16"].url, torch_file())
    server.hold[path] = threading.Event()  # the first process's download waits until the second waits too
    cache = tmp_path / "cache"
    outputs = [tmp_path / f"out{i}.txt" for i in range(2)]
    # Forked processes (each its own lock holder, as the processes of a run) start without a second import.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_ask_for_release, args=(cache, out, results)) for out in outputs]
    for child in children:
        child.start()
    deadline = time.time() + 60
    while not any("waiting for another process" in out.read_text() for out in outputs if out.exists()):
        assert time.time() < deadline and all(child.is_alive() for child in children)
        time.sleep(0.02)
    server.hold[path].set()
    found = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert found == [(cache / "dino_vit_small_16.pth", sha256(torch_file()))] * 2
    assert server.requests_for(path) == [None]
    assert (cache / "dino_vit_small_16.pth").read_bytes() == torch_file()


def test_an_arch_name_downloads_its_release_into_the_cache_once(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    release = torch_file()
    path = server.serve(RELEASE.url, release)
    first = backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    assert first.path == tmp_path / "cache" / "dino_vit_base_8.pth" and first.path.read_bytes() == release
    assert resolve_arch(first.path) == "dino_vit_base_8"  # the arch and artifact folders follow from the name
    assert first.release_url == RELEASE.url and first.download.record() == {
        "url": server.base + path, "size": len(release), "sha256": sha256(release)}
    again = backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    assert again == first and server.requests_for(path) == [None]


def test_the_checkpoint_folder_is_looked_in_first_and_paths_are_used_as_they_are(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    placed = Path("checkpoint") / "dino_vit_base_8.pth"
    placed.parent.mkdir()
    placed.write_bytes(torch_file())  # placed by hand
    found = backbone_file("dino_vit_base_8", tmp_path / "cache")
    assert (found.path, found.release_url, found.download) == (placed, RELEASE.url, None)
    other = tmp_path / "elsewhere" / "mine.pth"
    assert backbone_file(other, tmp_path / "cache").path == other  # a missing path is the steps' to report
    assert server.requests == [] and not (tmp_path / "cache").exists()


def test_a_stand_in_arch_has_no_release_and_downloads_can_be_off(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="dino_vit_tiny_8 is a stand-in arch without released weights"):
        backbone_file("dino_vit_tiny_8", tmp_path / "cache")
    with pytest.raises(DownloadError) as off:
        backbone_file("mae_vit_base_16", tmp_path / "cache", fetch=False)
    release = RELEASES["mae_vit_base_16"]
    assert release.url in str(off.value) and release.file_name in str(off.value)
    assert str(tmp_path / "cache" / "mae_vit_base_16.pth") in str(off.value) and server.requests == []


def test_every_arch_of_the_manual_checkpoint_table_has_its_authors_release():
    page = (ROOT / "docs" / "backbones.md").read_text()
    section = page.split("\n## Checkpoints\n", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in section.split("\n\n") if block.startswith("| arch |"))
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    named = set()
    released = {**RELEASES, **GATED_RELEASES}  # DINOv3's files are requested, not downloaded
    for archs, files in rows:
        for arch in re.findall(r"`([a-z0-9_]+)`", archs):
            named.add(arch)
            assert released[arch].file_name in re.findall(r"`([^`]+)`", files), arch
            assert arch in GATED_RELEASES or RELEASES[arch].url.startswith("https://")
    # Every arch with released weights is in the table; the others are the stand-ins.
    assert named == set(released) and all(arch in ARCHS for arch in named)
    assert sorted(set(ARCHS) - named) == ["dino_vit_tiny_16", "dino_vit_tiny_8"]


def test_an_answer_without_a_size_is_refused_before_a_byte_is_written(server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    server.no_length.add(path)  # the body ends where the connection closes: a cut one looks the same
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "declared no size" in message and f"save it as {target}" in message
    assert list(tmp_path.iterdir()) == []
    got = download(RELEASE.url, target, size=len(CONTENT), progress=False)  # a size the project knows
    assert target.read_bytes() == CONTENT and got.size == len(CONTENT)


@pytest.mark.parametrize("told_by", ["content_type", "body"])
def test_a_web_page_answered_with_200_is_refused_and_the_next_run_fetches_the_file(server, tmp_path, told_by):
    path = server.serve(RELEASE.url, WEB_PAGE)
    if told_by == "content_type":
        server.content_type[path] = "text/html; charset=utf-8"
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "the server sent a web page" in message and "sign-in" in message
    assert f"{server.base}{path}" in message and f"save it as {target}" in message
    assert list(tmp_path.iterdir()) == []  # nothing of the page is kept
    server.serve(RELEASE.url, CONTENT)
    server.content_type.pop(path, None)
    assert download(RELEASE.url, target, progress=False).sha256 == sha256(CONTENT)


def test_the_record_names_the_host_a_redirect_led_to(server, tmp_path):
    other = FileServer("127.0.0.2")
    try:
        path = other.serve(RELEASE.url, CONTENT)
        server.redirect[path] = other.base + path
        target = tmp_path / "backbone.pth"
        got = download(RELEASE.url, target, progress=False)
    finally:
        other.close()
    assert got.url == f"http://127.0.0.2:{other.httpd.server_port}{path}" and target.read_bytes() == CONTENT
    assert downloaded(target).url == got.url and server.requests_for(path) == [None]
    assert json.loads(downloaded_note(target).read_text())["original_url"] == RELEASE.url


def test_the_bytes_received_before_a_stall_are_kept_and_resumed(server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    server.stall_after[path] = 100_000  # then nothing, with the connection open
    target = tmp_path / "backbone.pth"
    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False, timeout=0.5)
    message = str(refused.value)
    assert "\n" not in message and "timed out" in message and "0.1 MB received are kept" in message
    assert (tmp_path / ".backbone.pth.partial").read_bytes() == CONTENT[:100_000] and not target.exists()
    got = download(RELEASE.url, target, progress=False)
    assert server.requests_for(path) == [None, "bytes=100000-"]
    assert target.read_bytes() == CONTENT and got.sha256 == sha256(CONTENT)


def test_a_complete_body_failing_its_check_is_deleted_and_the_record_says_a_passing_one_was_checked(
        server, tmp_path):
    path = server.serve(RELEASE.url, CONTENT)
    target = tmp_path / "backbone.pth"

    def starts_with_zip_magic(partial):
        return None if partial.read_bytes()[:2] == b"PK" else "no zip signature"

    with pytest.raises(DownloadError) as refused:
        download(RELEASE.url, target, progress=False, check=starts_with_zip_magic)
    message = str(refused.value)
    assert "\n" not in message and "are not a valid dino_vitbase8_pretrain.pth (no zip signature)" in message
    assert list(tmp_path.iterdir()) == []
    server.serve(RELEASE.url, torch_file())
    got = download(RELEASE.url, target, progress=False, check=starts_with_zip_magic)
    assert got.checked and downloaded(target).checked and server.requests_for(path) == [None, None]


def test_a_web_page_answered_for_an_arch_name_is_refused_and_never_kept(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = server.serve(RELEASE.url, WEB_PAGE)
    with pytest.raises(DownloadError, match="the server sent a web page"):
        backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    server.serve(RELEASE.url, CONTENT)  # a body of the right size that is no torch file
    with pytest.raises(DownloadError, match=r"are not a valid dino_vitbase8_pretrain\.pth \(.*torch file"):
        backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    assert list(tmp_path.rglob("*.pth*")) == []
    server.serve(RELEASE.url, torch_file())
    found = backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    assert found.path.read_bytes() == torch_file() and found.download.checked
    assert server.requests_for(path) == [None, None, None]


def test_a_damaged_release_this_project_downloaded_is_moved_aside_and_fetched_again(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cached = tmp_path / "cache" / "dino_vit_base_8.pth"
    cached.parent.mkdir()
    cached.write_bytes(WEB_PAGE)  # what a download kept before downloads were checked, with its record
    downloaded_note(cached).write_text(json.dumps({"url": RELEASE.url, "size": len(WEB_PAGE),
                                                   "sha256": sha256(WEB_PAGE)}))
    path = server.serve(RELEASE.url, torch_file())
    found = backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    assert found.path == cached and cached.read_bytes() == torch_file() and found.download.checked
    assert (tmp_path / "cache" / ".dino_vit_base_8.pth.damaged").read_bytes() == WEB_PAGE
    assert server.requests_for(path) == [None]
    assert backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False) == found  # checked: not again
    assert server.requests_for(path) == [None]


def test_a_damaged_release_placed_by_hand_is_named_with_the_fix_and_left_alone(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    placed = Path("checkpoint") / "dino_vit_base_8.pth"
    placed.parent.mkdir()
    placed.write_bytes(WEB_PAGE)
    with pytest.raises(CheckpointError) as refused:
        backbone_file("dino_vit_base_8", tmp_path / "cache", progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{placed} is not the dino_vit_base_8 release file (")
    assert "did not download it: replace it with " + RELEASE.url in message
    assert f"delete it and --ckpt dino_vit_base_8 downloads it to {tmp_path / 'cache' / 'dino_vit_base_8.pth'}" \
        in message
    assert placed.read_bytes() == WEB_PAGE and server.requests == [] and not (tmp_path / "cache").exists()
