"""Shared test fixtures: the golden numbers of the official implementations (tests/golden)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from file_server import FileServer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))


def load_golden(name):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing from the checkout")
    return torch.load(path, weights_only=False)


def dead_pid():
    """The PID of a process that has exited, as one killed outright leaves behind."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)
    yield


def bank_entries(bank):
    """{prototype: [n, dim] values, oldest first} of a ConceptBank's non-empty prototypes (the golden files' form)."""
    entries = {}
    for k in torch.nonzero(bank.count).flatten().tolist():
        n = int(bank.count[k])
        slots = (int(bank.head[k]) - n + torch.arange(n)) % bank.capacity
        entries[k] = bank.values[k, slots.to(bank.count.device)]
    return entries


@pytest.fixture
def server(monkeypatch):
    """A file server on 127.0.0.1 that every download reaches through the mirror variable: no test leaves
    the machine."""
    from utils.runtime.download import MIRROR_VARIABLE  # after the repository is on the path (above)
    served = FileServer()
    monkeypatch.setenv(MIRROR_VARIABLE, served.base)
    yield served
    served.close()
