"""Two first-time `bash run demo` at once: both find the demo's data written whole (one waits for the other)."""
import subprocess
import sys

from conftest import ROOT

# Each process imports everything, says it is ready, and starts writing when the test says go: both
# find the demo missing at the same moment.
PREPARE = """
import sys, time
from pathlib import Path
from utils.tools.demo import prepare
root, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.01)
data_dir, ckpt, _ = prepare(root, n_train=8, n_val=8, image_size=96)
print(data_dir, ckpt)
"""


def test_two_first_demos_at_once_both_finish(tmp_path):
    root, go = tmp_path / "demo", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    runs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(root), str(flag), str(go)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    while not all(flag.exists() for flag in ready):
        assert all(run.poll() is None for run in runs), [run.communicate() for run in runs]
    go.touch()
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0 and "Traceback" not in err, err
        # The last line: what prepare gave (before it, the one that waited says so).
        assert out.splitlines()[-1].split() == [str(root / "data"), str(root / "checkpoint/dino_vit_tiny_8.pth")]
    assert len(list((root / "data/cocostuff/images").rglob("*.jpg"))) == 16
    assert not list(root.rglob(".*")), "no staging folder or lock is left behind"
