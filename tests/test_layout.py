"""How the code is laid out: layers that point one way, modules that hold one job, loading that runs no
code, comments that cite the project's own documents, and data facts apart from training settings."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from loader import DatasetInfo

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FILES = sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", ".venv", "demo"))


def imported_modules(path):
    """Every module `path` imports, at its top or inside a function (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_of(path):
    parts = path.relative_to(ROOT).parts
    return ".".join(parts[:2]) if parts[0] == "utils" and len(parts) > 2 else parts[0]


# Which packages each layer may not import: the method's parts import nothing of utils, the
# infrastructure none of the engines, tools or entry points, the engines none of the entry points.
FORBIDDEN = {"loader": ("utils",), "modules": ("utils",), "models": ("utils",),
             "utils.runtime": ("utils.engine", "utils.tools", "utils.cli"),
             "utils.engine": ("utils.cli",), "utils.tools": ("utils.cli",)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    wrong = {}
    for path in RUNTIME_FILES:
        if package_of(path) != package:
            continue
        bad = [name for name in imported_modules(path) if name.startswith(FORBIDDEN[package])]
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{package} must not import {FORBIDDEN[package]}: {wrong}"


def test_the_step_scripts_are_thin_launchers():
    for script in ("train_mediator.py", "train_front_door_mlp.py", "train_front_door_tr.py", "fine_tuning_mlp.py",
                   "fine_tuning_tr.py", "test_mlp.py", "test_tr.py", "crop_dataset.py", "train_primaps.py",
                   "test_primaps.py"):
        assert len((ROOT / script).read_text().splitlines()) <= 6, script


def test_no_module_holds_more_than_one_job():
    """About 450 lines at most: a longer module has grown a second job."""
    long = {str(p.relative_to(ROOT)): n for p in RUNTIME_FILES if (n := len(p.read_text().splitlines())) > 460}
    assert not long


def test_no_file_is_unpickled_with_code_execution_allowed():
    offenders = [str(p.relative_to(ROOT)) for p in RUNTIME_FILES if "weights_only=False" in p.read_text()]
    assert not offenders


OUTSIDE = re.compile(r"SPEC[ ]§|PRIMAPS[.]md|SOTA[.]md|\.\./shared|\bissue \d+|\(#\d+\)")
CITATION = re.compile(r"docs/(\w+)\.md §(\d+[a-z]?)")


def test_comments_cite_only_the_projects_own_documents_and_each_cited_section_exists():
    sources = RUNTIME_FILES + sorted((ROOT / "tests").glob("*.py"))
    checkers = ("test_layout.py", "test_paths_named.py")  # they spell what they look for
    outside = {str(p.relative_to(ROOT)) for p in sources if p.name not in checkers and OUTSIDE.search(p.read_text())}
    assert not outside, "cite docs/<file>.md §N, not files outside the repository or tracker numbers"
    sections = {}
    for doc in (ROOT / "docs").glob("*.md"):
        sections[doc.stem] = set(re.findall(r"^## (\d+[a-z]?)\. ", doc.read_text(), flags=re.MULTILINE))
    cited = {(doc, section) for p in sources for doc, section in CITATION.findall(p.read_text())}
    missing = sorted(f"docs/{doc}.md §{section}" for doc, section in cited if section not in sections.get(doc, ()))
    assert cited and not missing


def test_a_data_set_row_holds_data_facts_only():
    assert {field.name for field in dataclasses.fields(DatasetInfo)} == {
        "name", "n_classes", "layout", "palette", "crops", "square_resize"}
