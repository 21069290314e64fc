"""Crafted files the safe loader (models/safe_load.py) refuses with its own error, one line, before they cost a
traceback or memory: pickles nesting containers thousands deep or holding themselves, storages declaring
far more elements than the file holds (both torch formats), and a web page saved under a torch file's name.
The files are made here: a small torch.save file whose object pickle is replaced by crafted opcodes."""
import io
import pickletools
import zipfile

import pytest
import torch

from models.safe_load import MAX_DEPTH, FileLoadError, safe_load

HUGE = 1 << 40  # elements: four TB of float32


def torch_file(path, obj, zip_format=True):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def with_object_pickle(path, pickled):
    """`path` (a zip-format torch file) with its object pickle replaced by `pickled`."""
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as crafted:
        for info, content in members:
            crafted.writestr(info, pickled if info.filename.endswith("/data.pkl") else content)
    return path


def declaring(pickled, elements):
    """`pickled` with the element count of its one storage's persistent id (BININT1 4) replaced."""
    ops = list(pickletools.genops(pickled))
    at = next(pos for op, arg, pos in ops if op.name == "BININT1" and arg == 4)
    return pickled[:at] + b"\x8a\x08" + elements.to_bytes(8, "little") + pickled[at + 2:]


def test_containers_nested_thousands_deep_are_refused(tmp_path):
    depth = 5000  # past Python's recursion limit
    path = with_object_pickle(torch_file(tmp_path / "deep.pt", {}),
                              b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    with pytest.raises(FileLoadError) as refused:
        safe_load(path)
    assert str(refused.value) == (f"{path} holds containers nested more than {MAX_DEPTH} deep (or one holding "
                                  f"itself), a layout this project does not read")


def test_a_list_holding_itself_is_refused(tmp_path):
    path = with_object_pickle(torch_file(tmp_path / "itself.pt", {}), b"\x80\x02]q\x00h\x00a.")  # l = []; l.append(l)
    with pytest.raises(FileLoadError, match="nested more than .* deep \\(or one holding itself\\)"):
        safe_load(path)


def test_nesting_as_deep_as_allowed_is_read(tmp_path):
    nested = []
    for _ in range(MAX_DEPTH):
        nested = [nested]
    assert safe_load(torch_file(tmp_path / "nested.pt", nested)) == nested


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_storage_declaring_more_elements_than_the_file_holds_is_refused_before_anything_is_allocated(
        tmp_path, zip_format):
    path = torch_file(tmp_path / "huge.pt", {"w": torch.zeros(4)}, zip_format)
    if zip_format:
        with zipfile.ZipFile(path) as source:
            pickled = source.read(next(n for n in source.namelist() if n.endswith("/data.pkl")))
        with_object_pickle(path, declaring(pickled, HUGE))
    else:
        content = path.read_bytes()
        stream = io.BytesIO(content)
        for _ in range(3):  # magic number, protocol version, system info: the object's pickle is next
            list(pickletools.genops(stream))
        start = stream.tell()
        end = start + max(pos for _, _, pos in pickletools.genops(io.BytesIO(content[start:]))) + 1
        path.write_bytes(content[:start] + declaring(content[start:end], HUGE) + content[end:])
    with pytest.raises(FileLoadError) as refused:
        safe_load(path)
    message = str(refused.value)
    assert "\n" not in message and message == (
        f"{path} is not a torch file this project reads (its storages declare {HUGE} elements, more than its "
        f"{path.stat().st_size} bytes can hold): damaged or crafted; nothing was allocated or run")


def test_views_of_one_storage_count_it_once(tmp_path):
    storage = torch.arange(100_000, dtype=torch.int64).to(torch.uint8)  # a byte an element, as the bound counts
    views = {"a": storage, "b": storage[10:], "c": storage[:-10]}
    path = torch_file(tmp_path / "views.pt", views)
    assert path.stat().st_size < 2 * storage.numel()  # the storage counted once per view would exceed it
    loaded = safe_load(path)
    assert all(torch.equal(loaded[name], view) for name, view in views.items())


def test_a_web_page_under_a_torch_files_name_says_what_torch_refused(tmp_path):
    path = tmp_path / "dino_vit_base_8.pth"
    path.write_bytes(b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    with pytest.raises(FileLoadError) as refused:
        safe_load(path)
    assert str(refused.value) == f"{path} cannot be read as a torch file without running code: Unsupported operand 60"
