"""Reading `torch.save` and Lightning files from the internet without running anything they name
(docs/sota.md §4).

`safe_load(path)` is `torch.load(path, map_location="cpu", weights_only=True)` with an allow-list of
the foreign globals that released files of this project's sources hold. torch's weights-only
unpickler never imports a name from a file: every global it meets must be one torch allows (tensors,
storages, dtypes, OrderedDict, ...) or one registered through `torch.serialization.safe_globals`.
Here each allowed foreign name is registered as an inert stand-in (a class or function defined in
this module whose `__module__` and `__qualname__` are the foreign name; torch keys its list by those),
so neither omegaconf nor Lightning need be installed, and a stand-in only keeps the state the pickle
hands it. After loading, `plain` turns the stand-ins into plain data, so callers see only dicts, lists,
strings, numbers, tensors and None. Any other global stops the load: `RefusedGlobalError` names the
file and the global, and nothing the file names has run (torch refuses a global when it reads it).

What the allow-list (`FOREIGN_GLOBALS`) holds, and what each name becomes:
- OmegaConf 2.0-2.3 containers, `omegaconf.dictconfig.DictConfig` and `omegaconf.listconfig.ListConfig`
  (STEGO's pickled hydra cfg): their pickled state keeps the entries under `_content`, a dict (or
  list) of child containers and value nodes, or None for a None container, or a string for an
  interpolation or "???"; they become dicts and lists.
- OmegaConf value nodes, `omegaconf.nodes.{AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode,
  BytesNode, InterpolationResultNode}`: their state keeps the value under `_val`; they become it.
  Interpolations (`"${dim}"`) and missing values (`"???"`) stay the strings OmegaConf stores.
- What an OmegaConf metadata record references: the records `omegaconf.base.{ContainerMetadata,
  Metadata}` (dropped with the containers they describe), the type objects they record (`typing.Any`,
  `builtins.{dict, list, int, str, float, bool}`: their names) and `collections.defaultdict`, the
  type of their resolver cache (an empty dict).
- Lightning 1.x callback classes, which key `callbacks` in files written by Lightning 1.2-1.4
  (`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, `...early_stopping.EarlyStopping`,
  `...timer.Timer`, `...finetuning.BaseFinetuning`, `...finetuning.BackboneFinetuning`: the callbacks
  whose state Lightning saves): their qualified names.
- `argparse.Namespace` (PriMaPs' stored training options, MAE's pickled arguments): a dict of its
  attributes.
A file that needs anything else (a numpy scalar, a pathlib path, another class) is refused.

Crafted files are refused before they cost memory or a traceback: storages declaring more elements
than the file has bytes (every storage's bytes are in the file, one byte at least per element; found by
following the pickle's opcodes, before torch allocates anything), and containers nested more than
`MAX_DEPTH` deep, or holding themselves (released files nest a handful).
"""
import os
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Mapping

import torch

from errors import UserError


class FileLoadError(UserError):
    """A file that cannot be read: not a complete torch file, or one holding what may not be loaded."""


class RefusedGlobalError(FileLoadError):
    """A file whose pickle names a global outside the allow-list."""


class ForeignObject:
    """An inert stand-in for an instance of a foreign class: it keeps the state the pickle gives it.

    torch's unpickler makes it with `cls.__new__(cls)` and hands it its state (BUILD) through
    `__setstate__`; a pickle that calls the class instead (REDUCE) gets an object without state, which
    `plain` refuses. `__getstate__` gives the state back, so tests/stand_ins.py writes the foreign
    layout with it.
    """

    foreign_name = ""
    kind = ""
    state = None

    def __init__(self, *args):
        pass  # the arguments of a pickled call are not kept: no foreign object is built by a call

    def __setstate__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state

    @classmethod
    def with_state(cls, state):
        obj = cls.__new__(cls)
        obj.state = state
        return obj


class ForeignLayoutError(ValueError):
    """A foreign object whose pickled state is not the layout this module reads (reported with the file)."""


_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode",
                    "InterpolationResultNode")
_TYPE_NAMES = ("typing.Any", "builtins.dict", "builtins.list", "builtins.int", "builtins.str", "builtins.float",
               "builtins.bool")
_LIGHTNING_CALLBACKS = ("model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping", "timer.Timer",
                        "finetuning.BaseFinetuning", "finetuning.BackboneFinetuning")

# The allow-list: foreign global -> what it becomes (see the module docstring).
FOREIGN_GLOBALS = {
    "omegaconf.dictconfig.DictConfig": "dict_config",
    "omegaconf.listconfig.ListConfig": "list_config",
    **{f"omegaconf.nodes.{node}": "value_node" for node in _OMEGACONF_NODES},
    "omegaconf.base.ContainerMetadata": "metadata",
    "omegaconf.base.Metadata": "metadata",
    **{name: "name" for name in _TYPE_NAMES},
    **{f"pytorch_lightning.callbacks.{name}": "name" for name in _LIGHTNING_CALLBACKS},
    "collections.defaultdict": "resolver_cache",
    "argparse.Namespace": "namespace",
}


def foreign_class(name, kind="name"):
    """A stand-in class registered (or written, by tests/stand_ins.py) under the foreign `name`."""
    module, _, qualname = name.rpartition(".")
    return type(qualname, (ForeignObject,), {"__module__": module, "__qualname__": qualname,
                                             "foreign_name": name, "kind": kind})


def _stand_in(name, kind):
    if kind != "resolver_cache":
        return foreign_class(name, kind)

    def empty_resolver_cache(*args):
        """Stands in for `collections.defaultdict(dict)`, OmegaConf's resolver cache: an empty dict
        (a pickled defaultdict is a call of the class, then its items, if any, set one by one)."""
        return {}

    module, _, qualname = name.rpartition(".")
    empty_resolver_cache.__module__, empty_resolver_cache.__name__ = module, qualname
    empty_resolver_cache.__qualname__ = qualname
    return empty_resolver_cache


STAND_INS = {name: _stand_in(name, kind) for name, kind in FOREIGN_GLOBALS.items()}


def _content(obj, key):
    if not isinstance(obj.state, Mapping) or key not in obj.state:
        raise ForeignLayoutError(f"a pickled {obj.foreign_name} without its {key!r} entry")
    return obj.state[key]


def _plain_foreign(obj, depth):
    kind, inner = obj.kind, depth + 1
    if kind == "dict_config":
        content = _content(obj, "_content")
        return ({plain(k, inner): plain(v, inner) for k, v in content.items()} if isinstance(content, Mapping)
                else content)
    if kind == "list_config":
        content = _content(obj, "_content")
        return [plain(v, inner) for v in content] if isinstance(content, list) else content
    if kind == "value_node":
        return plain(_content(obj, "_val"), inner)
    if kind == "namespace":
        return {k: plain(v, inner) for k, v in (obj.state or {}).items()}
    raise ForeignLayoutError(f"a pickled instance of {obj.foreign_name}, which files hold only as a name")


MAX_DEPTH = 100  # containers within containers a file may nest


def plain(obj, depth=0):
    """`obj` with every stand-in turned into plain data (see the module docstring); classes become their
    qualified names, so that Lightning's callback classes key `callbacks` by a string. ForeignLayoutError
    for containers nested more than MAX_DEPTH deep (`depth`: how deep `obj` is)."""
    if depth > MAX_DEPTH:
        raise ForeignLayoutError(f"containers nested more than {MAX_DEPTH} deep (or one holding itself)")
    if isinstance(obj, ForeignObject):
        return _plain_foreign(obj, depth)
    if isinstance(obj, type):
        return getattr(obj, "foreign_name", "") or f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, Mapping):
        return {plain(k, depth + 1): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, depth + 1) for v in obj]
    if type(obj) is tuple:
        return tuple(plain(v, depth + 1) for v in obj)
    return obj


def _pickles(path):
    """The (opcode, arg) of each pickle of the file's object, a list per pickle, decoded with pickletools
    (which builds nothing); a damaged pickle ends with what was read before the damage."""
    def opcodes(stream, into):
        for opcode, arg, _ in pickletools.genops(stream):
            into.append((opcode, arg))

    found = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                found.append([])
                opcodes(archive.read(name), found[-1])
        else:
            with open(path, "rb") as stream:
                # torch's legacy format: magic number, protocol version, system info, then the object.
                for _ in range(4):
                    found.append([])
                    opcodes(stream, found[-1])
    except (ValueError, StopIteration, zipfile.BadZipFile, EOFError):
        pass  # a damaged pickle: what was read before the damage is all there is
    return found


def _pickled_globals(path):
    """The globals the file's object pickle names, in order, as torch reads them (protocol-2 names
    mapped to Python 3's)."""
    found = []
    for opcodes in _pickles(path):
        for opcode, arg in opcodes:
            if opcode.name in ("GLOBAL", "INST"):
                module, name = arg.split(" ", 1)
                module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
                found.append(f"{module}.{name}")
    return found


class _Mark:
    """A MARK on the followed stack."""


def _declared_elements(opcodes):
    """{storage key: element count} that one pickle's persistent ids `("storage", type, key, location,
    count, ...)` declare. The stack is followed only as far as these ids need: strings, numbers, marks,
    tuples and the memo are kept, every other value is None; a pickle too damaged to follow ends it."""
    stack, memo, declared = [], {}, {}

    def from_mark():
        at = max(i for i, item in enumerate(stack) if item is _Mark)
        items = stack[at + 1:]
        del stack[at:]
        return items

    try:
        for opcode, arg in opcodes:
            name = opcode.name
            if name == "MARK":
                stack.append(_Mark)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif name == "TUPLE":
                stack.append(tuple(from_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "BINPERSID":
                pid = stack.pop()
                if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
                    declared[str(pid[2])] = pid[4]
                stack.append(None)
            elif opcode.arg is not None and not opcode.stack_before and len(opcode.stack_after) == 1:
                stack.append(arg)  # a string, a number, a global's name
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    from_mark()
                    del stack[len(stack) - before.index(pickletools.markobject):]
                elif before:
                    del stack[-len(before):]
                stack.extend([None] * len(opcode.stack_after))
    except (IndexError, ValueError):
        pass  # a damaged pickle: torch refuses it
    return declared


# Globals torch's weights-only unpickler allows by itself: the ones a refusal cannot have been about.
_TORCH_OWN = ("collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray",
              "builtins.set", "builtins.complex")


def _refused_global(path):
    for name in _pickled_globals(path):
        if name not in FOREIGN_GLOBALS and name not in _TORCH_OWN and not name.startswith("torch."):
            return name
    return None


def _torch_reason(err):
    """The line of torch's weights-only message that says what it refused."""
    text = str(err)
    marker = "WeightsUnpickler error: "
    reason = text[text.index(marker) + len(marker):] if marker in text else text
    return next((line.strip() for line in reason.splitlines() if line.strip()), type(err).__name__)


def _oversized(path):
    """Why the file's storages cannot be what they declare (more elements than the file has bytes), or None."""
    elements = sum(sum(_declared_elements(opcodes).values()) for opcodes in _pickles(path))
    size = os.path.getsize(path)
    if elements > size:
        return f"its storages declare {elements} elements, more than its {size} bytes can hold"
    return None


def safe_load(path):
    """The object a `torch.save` / Lightning file holds, on CPU, with foreign objects as plain data.

    FileLoadError for a file torch cannot read (truncated, damaged, not a torch file, crafted: see the
    module docstring); RefusedGlobalError, naming the file and the global, for a file that names a
    global outside FOREIGN_GLOBALS (e.g. `os.system`, `builtins.eval`)."""
    oversized = _oversized(path)
    if oversized is not None:
        raise FileLoadError(f"{path} is not a torch file this project reads ({oversized}): damaged or crafted; "
                            f"nothing was allocated or run")
    try:
        with torch.serialization.safe_globals(list(STAND_INS.values())):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_global(path)
        if refused is not None:
            raise RefusedGlobalError(
                f"{path} names the global {refused}, which is not on the allow-list of foreign objects a "
                f"file may hold (nothing was run): only tensors, plain containers, OmegaConf configs, "
                f"Lightning callback states and argparse.Namespace are read") from None
        raise FileLoadError(f"{path} cannot be read as a torch file without running code: "
                            f"{_torch_reason(err)}") from None
    except (EOFError, RuntimeError) as err:  # torch.load's RuntimeErrors are about the file it reads
        raise FileLoadError(f"{path} is not a complete torch file (truncated or damaged?): "
                            f"{_torch_reason(err)}") from None
    try:
        return plain(obj)
    except ForeignLayoutError as err:
        raise FileLoadError(f"{path} holds {err}, a layout this project does not read") from None
