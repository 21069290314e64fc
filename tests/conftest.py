"""Shared test fixtures: the golden numbers of the official implementation and its stand-in weights."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
sys.path.insert(0, str(ROOT))


def load_golden(name):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: tests need ../shared/golden beside the checkout")
    return torch.load(path, weights_only=False)


def dead_pid():
    """The PID of a process that has exited, as one killed outright leaves behind."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def random_checkpoint():
    """The module `golden/random_checkpoint.py`: deterministic stand-in backbone weights."""
    spec = importlib.util.spec_from_file_location("random_checkpoint", GOLDEN / "random_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)
    yield
