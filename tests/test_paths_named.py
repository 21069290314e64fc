"""Every repository path that the documents and the code's comments name exists, and no comment or docstring
cites a document kept outside the repository.

A mention is a word of a document, or of a comment or docstring, that names a file or folder: a path that
starts with a folder of the repository (`utils/runtime/io.py`, `tests/golden`, `loader/transforms.RESIZES`),
a file of a kind the repository holds (`predict.py`, `docs/cause.md`), or a bare data file name
(`metrics.json`, which must then be a file here or one the code spells). Not repository paths, and so not
checked: addresses (`https://...`), absolute or home paths (`/data`, `~/.cache`), templates
(`checkpoint/<arch>.pth`, `{crop_dir}/img/...`, `DATA/...`), what runs write or users fill (the folders
.gitignore names: `CAUSE/`, `results/`, `demo/`, `checkpoint/`; a data file's path in no folder of the
repository), and the files of other repositories in OUTSIDE_NAMES.
"""
import ast
import functools
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders .gitignore names: what runs write (CAUSE/, results/, logs/, demo/), where users put backbone
# files (checkpoint/), and the tools' own (.venv/, caches).
IGNORED = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
           if line.strip().endswith("/")}


def repository():
    """(folders, files) of the repository, skipping the ignored folders (a .venv is not walked)."""
    folders, files = [], []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if name not in IGNORED and name != ".git"]
        folders += [Path(folder, name) for name in subfolders]
        files += [Path(folder, name) for name in names]
    return folders, files


FOLDERS, FILES = repository()
FOLDER_NAMES = {p.name for p in FOLDERS}  # every folder, at any depth (`golden` as well as `tests`)
FILE_NAMES = {p.name for p in FILES}
CODE = re.compile(r"\.(?:py|md|sh|toml|ini)$")  # the kinds of file the repository holds
DATA = re.compile(r"\.(?:pt|pth|ckpt|npy|json|yml|yaml|txt)$")  # what runs write, data sets and releases hold

# Files of other repositories that the documents name as theirs (the official code a port follows, the
# release files it reads), and the README's examples of a user's files; none is meant to exist here.
OUTSIDE_NAMES = {
    # the official CAUSE, STEGO and HP code and release files
    "train.py": "the official CAUSE, STEGO and PriMaPs training scripts", "test.py": "the official test script",
    "eval.py": "HP's evaluation script", "eval_segmentation.py": "STEGO's evaluation script",
    "train_segmentation.py": "STEGO's training script", "train_clean.py": "the script STEGO's README names",
    "modules.py": "STEGO's model code", "utils.py": "STEGO's helpers", "dataset/data.py": "STEGO's data sets",
    "train_config.yml": "STEGO's training config", "eval_config.yml": "STEGO's evaluation config",
    "src/download_models.py": "STEGO's download script", "src/download_datasets.py": "STEGO's download script",
    "cocostuff27_vit_base_5.ckpt": "a STEGO release file", "cityscapes_vit_base_1.ckpt": "a STEGO release file",
    "picie_and_probes.pth": "a STEGO release file",
    "run.py": "HP's entry point", "utils/common_utils.py": "HP's checkpoint helpers",
    # the official PriMaPs code and the Lightning version it pins
    "parser.py": "PriMaPs' option parser", "primaps_modules/parser.py": "PriMaPs' option parser",
    "primaps_modules/transforms.py": "PriMaPs' transforms", "experiments.sh": "PriMaPs' experiment commands",
    "pytorch_lightning/loops/epoch/training_epoch_loop.py": "Lightning 1.5's training loop",
    "core/lightning.py": "Lightning 1.5's LightningModule",
    # the official backbone code and release files
    "hubconf.py": "DINO's torch.hub entry", "vision_transformer.py": "DINO's ViT",
    "dinov2/hub/backbones.py": "DINOv2's hub functions", "dinov3/hub/backbones.py": "DINOv3's hub functions",
    "checkpoint_teacher.pth": "MSN's and iBOT's release file name",
    # the shared golden set's README cites its own notes: tests/golden/README.md's first lines map them
    # (spelt in pieces, as tests/test_records.py's clone test looks for the name of the folder)
    "../" + "shared/PRIMAPS" + ".md": "the shared notes behind docs/primaps.md",
    # the README's examples of a user's own files
    "more.txt": "a list of images given to predict.py", "my_steps.py": "a user's own step module",
    "my_result.txt": "what that step writes",
}

# Citations of documents outside the repository (the notes docs/ was written from).
OUTSIDE_DOCUMENT = re.compile(r"\b(?:SPEC|PRIMAPS|SOTA)[.]md\b|\.\./shared\b|\b(?:SPEC|PRIMAPS|SOTA) §")


def code_files():
    python = [p for p in FILES if p.suffix == ".py"]
    return sorted(python) + [ROOT / "run", ROOT / ".ci" / "run", ROOT / "tests" / "run_tests.sh"]


def documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "golden" / "README.md",
            ROOT / "tests" / "fixtures" / "README.md"]


def comments(path):
    """The comments and docstrings of a Python file, or the comments of a shell script."""
    text = path.read_text()
    if path.suffix != ".py":
        return [line.split("#", 1)[1] for line in text.splitlines()[1:] if "#" in line]
    found = [token.string for token in tokenize.generate_tokens(io.StringIO(text).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(ast.get_docstring(node, clean=False) or "")
    return found


def words(text):
    """Candidate path words: split at spaces, quotes, brackets and commas; a trailing line number
    (`run.py:282-286`) and sentence punctuation dropped."""
    for word in re.split(r"[\s`'\"()\[\],;]+", text):
        word = re.sub(r":\d[\d-]*$", "", word.strip("*")).rstrip(".:!?")
        if word:
            yield word


def is_template(word):
    """A pattern, not a name: placeholders (`<arch>`, `{dataset}`, `$HOME`, `...`, `DATA/`, `NAME.png`)
    or a wildcard outside the repository's folders (`dino_deit*_pretrain.pth`)."""
    placeholder = any(re.fullmatch(r"[A-Z][A-Z0-9_]+", part.lstrip(".").split(".")[0]) for part in word.split("/"))
    wildcard = "*" in word and word.split("/", 1)[0] not in FOLDER_NAMES
    return placeholder or wildcard or re.search(r"[<>{}$|…]|\.\.\.", word) is not None


def mentioned_path(word):
    """The word as a repository path, or None when it names none: a path in one of the repository's
    folders, a file of a kind the repository holds, or a bare data file name. A data file's path outside
    the repository's folders is a place on the user's disk (a data set's layout, a run's output, a release
    folder), not checked."""
    if "://" in word or word.startswith(("/", "~", "-", "www.", "github.com")) or is_template(word):
        return None
    first = word.removeprefix("./").split("/", 1)[0]
    if "/" in word and first in IGNORED:
        return None
    if "/" in word and first in FOLDER_NAMES or CODE.search(word) or "/" not in word and DATA.search(word):
        return word
    return None


def exists(word, folder):
    """`word` names a file or folder of the repository, from its root or from the mentioning file's folder;
    a module's path with a name (`loader/transforms.RESIZES`) names a module that spells that name; a bare
    file name may live anywhere here."""
    for base in (ROOT, folder):
        if "*" in word and any(base.glob(word)) or "*" not in word and (base / word).exists():
            return True
        module, dot, names = word.rpartition("/")[2].partition(".")
        source = base / word.rpartition("/")[0] / f"{module}.py"
        if dot and "/" in word and source.is_file() and all(
                re.search(rf"\b{re.escape(name)}\b", source.read_text()) for name in names.split(".")):
            return True
    return "/" not in word and word in FILE_NAMES


@functools.cache
def spelled_by_code():
    """File names the code spells (what runs write or read: `metrics.json`, `option.json`, ...): its string
    constants, and the names its f-strings make when their fixed text names the file (`segment_{head}.pth`).
    This file's own examples do not count."""
    names, templates = set(), []
    for path in code_files():
        if path.suffix != ".py" or path == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value.rpartition("/")[2])
            elif isinstance(node, ast.JoinedStr):
                fixed = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if DATA.search(fixed) and len(re.sub(r"\W", "", fixed)) > 6:
                    pattern = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else "\0" for v in node.values)
                    templates.append(re.compile(pattern.rpartition("/")[2].replace("\0", r"\w+")))
    return names, templates


def written_by_runs(name):
    """A file name the code spells, or the record beside such an artifact (`segment_tr.json` beside
    `segment_tr.pth`: utils/runtime/records.py)."""
    names, templates = spelled_by_code()
    stem, _, extension = name.rpartition(".")
    artifacts = [f"{stem}.{kind}" for kind in ("pth", "pt", "npy")] if extension == "json" else []
    return any(candidate in names or any(t.fullmatch(candidate) for t in templates) for candidate in [name, *artifacts])


def missing_paths(path, texts, links=False):
    missing = set()
    for text in texts:
        if links:  # a markdown link's target is relative to the document's folder
            for target in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists():
                    missing.add(target)
            text = re.sub(r"\]\([^)]*\)", "]", text)
        for word in words(text):
            mentioned = mentioned_path(word)
            if mentioned is None or mentioned in OUTSIDE_NAMES or exists(mentioned, path.parent):
                continue
            if "/" not in mentioned and written_by_runs(mentioned):
                continue
            missing.add(mentioned)
    return sorted(missing)


@pytest.mark.parametrize("path", code_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_comment_names_exists(path):
    assert not missing_paths(path, comments(path))


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_document_names_exists(path):
    assert not missing_paths(path, [path.read_text()], links=True)


def test_no_comment_cites_a_document_outside_the_repository():
    citing = {str(path.relative_to(ROOT)): match.group(0) for path in code_files() for text in comments(path)
              if (match := OUTSIDE_DOCUMENT.search(text))}
    assert not citing, "cite docs/cause.md, docs/primaps.md or docs/sota.md §N instead"


def test_the_check_finds_what_it_is_meant_to():
    """The pattern's own cases: real paths and stale ones are caught, everything else is left alone."""
    here = ROOT / "utils" / "engine" / "primaps.py"
    found = missing_paths(here, ["utils/io.py utils/runtime/io.py primaps_masks.py (crops.json: its record) "
                                 "loader/transforms.RESIZES loader/transforms.NO_SUCH_NAME tests/golden "
                                 "tests/fixtures/omegaconf_*.ckpt metrics.json segment_tr.pth"])
    assert found == ["crops.json", "loader/transforms.NO_SUCH_NAME", "utils/io.py"]
    assert not missing_paths(here, ["https://x.org/a/b.py /data ~/.cache/cause checkpoint/<arch>.pth "
                                    "CAUSE/{dataset}/x.pth results/cocostuff27/metrics.json demo/data "
                                    "ViT-S/8 mean/std DATA/downloads dinov2/hub/backbones.py"])
    # Spelt in pieces, as the project's own checks look for these names in every Python file.
    cited = ["SPEC" + " §3", "the notes (PRIMAPS" + ".md)", "SOTA §4", "../" + "shared/gold" + "en"]
    assert all(OUTSIDE_DOCUMENT.search(text) for text in cited)
    assert not OUTSIDE_DOCUMENT.search("docs/primaps.md §2, PRIMAPS_TR/, SPECS[arch]")
