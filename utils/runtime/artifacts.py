"""Loading CAUSE artifacts strictly, with errors that say what is wrong and how to fix it.

The official loaders use `strict=False` and only print mismatches, so a wrong file
silently leaves random weights (and ~5% mIoU). Here a released or trained file either
loads completely into the module it belongs to, or the step stops before any work with
a message naming the mismatch.
"""
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from models.safe_load import FileLoadError, safe_load


class ArtifactError(UserError):
    """An artifact of an earlier step is missing, unreadable, or does not fit this run."""


def require(path, produced_by):
    """Stop early when an earlier step's artifact is missing, naming the step to run."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path} does not exist: run {produced_by} first "
                            f"(or place the released CAUSE file there)")


def load_modular(path, num_codebook, dim):
    """The mediator's clusterbook: float32 [num_codebook, dim] (docs/cause.md §3)."""
    require(path, "train_mediator.py")
    try:
        codebook = np.load(path)
    except (ValueError, OSError, EOFError) as err:  # what np.load raises for a damaged file
        raise ArtifactError(f"{path} is not a readable .npy file ({err}); "
                            f"delete it and rerun train_mediator.py") from err
    if codebook.shape != (num_codebook, dim):
        raise ArtifactError(
            f"{path} holds a clusterbook of shape {tuple(codebook.shape)}, expected ({num_codebook}, {dim}): "
            f"it was made with another backbone width or --num_codebook")
    return torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32))


def load_state_strict(module, path, kind, produced_by):
    """Load a saved state dict into `module`, refusing any missing, unexpected or reshaped entry."""
    require(path, produced_by)
    try:
        state = safe_load(path)
    except FileLoadError as err:
        raise ArtifactError(f"{err}; delete it and rerun {produced_by}") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} should hold a state dict of a {kind}, found {type(state).__name__}")
    expected = module.state_dict()
    problems = _diagnose(state, expected, kind)
    if problems:
        raise ArtifactError(f"{path} does not fit the {kind} this run builds:\n  - " + "\n  - ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _diagnose(state, expected, kind):
    """Explain a mismatch in terms a user can fix (wrong head, backbone, resolution, dataset)."""
    problems = []
    has_tr, wants_tr = "head.query_pos" in state, "head.query_pos" in expected
    if kind == "segment module" and has_tr != wants_tr:
        found, built = ("TR", "MLP") if has_tr else ("MLP", "TR")
        return [f"the file holds a {found} head but this is a {built} run: use the {found.lower()} scripts "
                f"(e.g. test_{found.lower()}.py) or the segment_{built.lower()}.pth file"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} entries: {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} entries: {unexpected[:5]}")
    for name in sorted(set(state) & set(expected)):
        got, want = tuple(state[name].shape), tuple(expected[name].shape)
        if got != want:
            problems.append(f"{name}: file {got}, expected {want}" + _hint(name, got, want))
    return problems


def _hint(name, got, want):
    if name.endswith("query_pos") and got[0] != want[0]:
        return (f" — the TR head was trained for {got[0]} tokens, this run uses {want[0]}: pass the "
                f"--train_resolution it was trained with (tokens = (resolution / patch)^2)")
    if name in ("linear.f.weight", "linear.f.bias", "cluster_probe") and got[0] != want[0]:
        return f" — the file has {got[0]} classes, this dataset {want[0]}: wrong --dataset?"
    if name == "codebook" and got[0] != want[0]:
        return " — made with another --num_codebook"
    return " — made with another backbone width (wrong --ckpt?) or --reduced_dim/--projection_dim"
