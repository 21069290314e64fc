"""Resume states: what an unfinished training step saves after every epoch, and how it continues.

The state (model, EMA, optimisers, schedulers, loss scaler; each process's concept bank in a file of
its own) is written atomically after every finished epoch and removed when the step completes. Its
presence marks the step unfinished; a small JSON beside it holds the identity (settings and inputs)
it was made with, which the runner checks before resuming (utils/engine/status.py).

Nothing random is saved: every draw of a step comes from a generator seeded by (seed, epoch,
batch), and the data order depends only on (seed, epoch). The files hold tensors and plain values
only, and are read as any file is (models/safe_load.py): nothing they name runs.
"""
import json

from models.safe_load import safe_load
from utils.runtime.distributed import barrier, torchrun_rank
from utils.runtime.io import save_text, save_torch


def describe(files):
    """{path, epoch, identity} of the saved state of a run (its RunFiles), or None."""
    path = files.resume_state
    if not path.is_file():
        return None
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None  # written before its identity: cannot be trusted, start over
    return {"path": path, **info}


def discard(files):
    """Remove a run's saved state (rank 0 of a torchrun launch only: every rank decides alike)."""
    if torchrun_rank() != 0:
        return
    path = files.resume_state
    for stale in [path, path.with_suffix(".json"), *path.parent.glob(path.stem + ".bank*.pt")]:
        if stale.is_file():
            stale.unlink()


class ResumeState:
    """The saved state of one run of a training step (its StepContext's RunFiles)."""

    def __init__(self, ctx, shared_process_state):
        self.ctx = ctx
        self.path = ctx.files.resume_state
        # The paper recipe's processes hold the same bank: rank 0's file serves all of them.
        self.shared = shared_process_state
        self.first_epoch = 0

    def _bank_path(self):
        return self.ctx.files.resume_bank(0 if self.shared else self.ctx.dist.rank)

    def load(self, training):
        """Restore `training` from the saved state, if any; sets first_epoch."""
        if not self.path.is_file():
            return
        state = safe_load(self.path)
        training.load_state_dict(state["training"])
        bank = self._bank_path()
        if bank.is_file():
            training.load_process_state(safe_load(bank))
        self.first_epoch = state["epoch"] + 1
        if self.ctx.dist.is_main:
            print(f"[{self.ctx.label}] resuming after epoch {self.first_epoch} from {self.path}")

    def nothing_left(self):
        """True when the saved state is of the last epoch: killed after it, before the artifacts."""
        return self.first_epoch == self.ctx.cfg.epochs

    def save(self, epoch, training):
        process_state = training.process_state()
        if process_state is not None and (self.ctx.dist.is_main or not self.shared):
            save_torch({k: v.cpu() for k, v in process_state.items()}, self._bank_path())
        if self.ctx.dist.is_main:
            save_torch({"epoch": epoch, "training": training.state_dict()}, self.path)
            save_text(json.dumps({"epoch": epoch, "identity": self.ctx.identity}, indent=2),
                      self.path.with_suffix(".json"))
        barrier()

    def finish(self):
        barrier()
        if self.ctx.dist.is_main:
            discard(self.ctx.files)
