"""Nothing stale: any file of a step's inputs added, removed, renamed, resized or rewritten in place changes its
fingerprint; a step run alone refuses an earlier artifact made from another backbone or other data; a record
describes what was actually read."""
import hashlib
import json
import os
import shutil

import pytest
import torch
from steps import make_tiny_setup, run_step, step_args

import utils.runtime.records
from models import build_backbone
from utils.runtime.io import save_torch
from utils.runtime.records import FingerprintCache, file_list_fingerprint

HEAD_DIR = "CAUSE/cocostuff27/dino_vit_tiny_8/16"
MEDIATOR = "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.json"
RESULTS = "results/cocostuff27/TR/dino_vit_tiny_8/16/metrics.json"
SHORT = ("--epochs", "1", "--max_steps", "1")
CHAIN = (("mediator", None), ("front_door", "tr"), ("fine_tune", "tr"), ("test", "tr"))


def _same_folder_times(folder, change):
    """Apply `change` to a file of `folder` and put the folder's times back: what `cp` onto an existing
    name does (the folder is not written)."""
    before = os.stat(folder)
    change()
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_file_list_changes_with_any_file_added_removed_renamed_resized_or_rewritten(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    for name, content in (("a.png", b"1111"), ("b.png", b"2222"), ("c.png", b"3333")):
        (folder / name).write_bytes(content)

    def fingerprint():
        return file_list_fingerprint(sorted(folder.iterdir()), tmp_path)["fingerprint"]

    os.utime(folder / "a.png", ns=(1, 1_000_000_000))
    seen = [fingerprint()]
    changes = [lambda: (folder / "b.png").write_bytes(b"2223"),  # rewritten in place, same size
               lambda: os.utime(folder / "a.png", ns=(1, 2_000_000_000)),  # touched
               lambda: (folder / "c.png").write_bytes(b"33333"),  # resized
               lambda: (folder / "c.png").rename(folder / "d.png"),  # renamed
               lambda: (folder / "e.png").write_bytes(b"5"),  # added
               lambda: (folder / "e.png").unlink()]  # removed
    for change in changes:
        _same_folder_times(folder, change)
        seen.append(fingerprint())
    changed = [before != after for before, after in zip(seen[:-1], seen[1:], strict=True)]
    assert all(changed), f"every change gives a new fingerprint: {changed}"


def test_a_cached_hash_serves_only_an_untouched_file(tmp_path, monkeypatch):
    path = tmp_path / "backbone.pth"
    path.write_bytes(b"first content")
    cache_file = tmp_path / ".fingerprints.json"
    monkeypatch.setattr(utils.runtime.records, "RECENT_NS", 0)
    cache = FingerprintCache(cache_file)
    first = cache.file(path)
    cache.save()
    again = FingerprintCache(cache_file)
    assert again.file(path) == first and not again.updated, "an untouched file is not hashed again"
    # The same size, the modification time forged back: the change time (which no tool sets) tells.
    stat = path.stat()
    path.write_bytes(b"other content")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again.file(path) == "sha256:" + hashlib.sha256(b"other content").hexdigest()


def test_a_file_modified_just_before_it_was_hashed_is_hashed_again(tmp_path):
    """Rewritten within one tick of the clock, a file keeps its times: its hash is not trusted until it
    has been quiet for a while (RECENT_NS)."""
    path = tmp_path / "modular.npy"
    path.write_bytes(b"content")
    cache = FingerprintCache(tmp_path / ".fingerprints.json")
    cache.file(path)
    assert not cache.updated and str(path.resolve()) not in cache.entries


@pytest.fixture(scope="module")
def chain_done(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    data_dir, ckpt = make_tiny_setup(root, n_train=2, n_val=2)
    out = root / "out"
    for step, head in CHAIN:
        run_step(step, head, step_args(data_dir, ckpt, out, extra=SHORT))
    return root


@pytest.fixture
def copied(chain_done, tmp_path):
    """A copy of the tiny data, backbone and finished chain (file times kept)."""
    for name in ("data", "checkpoint", "out"):
        shutil.copytree(chain_done / name, tmp_path / name)
    data_dir, ckpt, out = tmp_path / "data", tmp_path / "checkpoint/dino_vit_tiny_8.pth", tmp_path / "out"
    return data_dir, ckpt, out, step_args(data_dir, ckpt, out, extra=SHORT)


def _refused(step, head, args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_step(step, head, args)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    return message


def test_a_val_label_overwritten_in_place_is_seen(copied, capsys):
    data_dir, _, out, args = copied
    labels = data_dir / "cocostuff/annotations/val2017"
    first, second = sorted(labels.iterdir())[:2]
    before = json.loads((out / RESULTS).read_text())["identity"]["data"]["val"]
    _same_folder_times(labels, lambda: shutil.copyfile(second, first))
    # Run alone, the test step would score heads whose record read the earlier labels.
    message = _refused("test", "tr", args, capsys)
    assert "the val files" in message and "fine_tuning_tr.py" in message, message
    printed = {}
    for step, head in CHAIN:  # what `bash run` does: each step reruns where its inputs changed
        capsys.readouterr()
        run_step(step, head, args)
        printed[step] = capsys.readouterr().out
    assert "up to date" in printed["mediator"], "the mediator reads no val file"
    assert all("data.val.fingerprint" in printed[step] for step in ("front_door", "fine_tune", "test")), printed
    after = json.loads((out / RESULTS).read_text())["identity"]["data"]["val"]
    assert after["fingerprint"] != before["fingerprint"]


def test_a_new_backbone_file_stops_a_later_step_run_alone_naming_the_step_to_rerun(copied, capsys):
    _, ckpt, out, args = copied
    torch.manual_seed(3)
    torch.save(build_backbone("dino_vit_tiny_8").state_dict(), ckpt)
    metrics = (out / RESULTS).read_bytes()
    message = _refused("test", "tr", args, capsys)
    assert "backbone" in message and "train_mediator.py" in message and "bash run" in message, message
    assert (out / RESULTS).read_bytes() == metrics


def test_a_restart_after_a_same_size_change_records_what_it_read(copied, capsys):
    data_dir, ckpt, out, args = copied
    # Other weights of the same shapes (the same size), the modification time forged back.
    stat = ckpt.stat()
    torch.manual_seed(4)
    save_torch(build_backbone("dino_vit_tiny_8").state_dict(), ckpt)  # as the fixture wrote it
    assert ckpt.stat().st_size == stat.st_size
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # A training crop rewritten in place with the same bytes: only its modification time says so.
    crop = sorted((data_dir / "cocostuff/cropped").rglob("*.jpg"))[0]
    _same_folder_times(crop.parent, lambda: crop.write_bytes(crop.read_bytes()))
    old = json.loads((out / MEDIATOR).read_text())["identity"]
    run_step("mediator", None, [*args, "--restart"])
    new = json.loads((out / MEDIATOR).read_text())["identity"]
    assert new["backbone"]["fingerprint"] == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert new["backbone"]["fingerprint"] != old["backbone"]["fingerprint"]
    assert new["data"]["train"]["fingerprint"] != old["data"]["train"]["fingerprint"]
    capsys.readouterr()
    run_step("mediator", None, args)
    assert "up to date" in capsys.readouterr().out, "the record describes the files as they are now"
