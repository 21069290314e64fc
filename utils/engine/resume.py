"""Resume states: what an unfinished training step saves after every epoch, and how it continues.

The state (model, EMA, optimisers, schedulers, loss scaler; each process's concept bank in a file of
its own) is saved after every finished epoch and removed when the step completes. Its presence marks
the step unfinished; it holds the identity (settings and inputs) it was made with, which the runner
checks before resuming (utils/engine/status.py).

A state is several files committed as one: the epoch's files get names of their own
(`front_door_tr.epoch3.pt`, `front_door_tr.epoch3.bank0.pt`), each written atomically, and only then
the commit, `front_door_tr.json` (atomic too), names the epoch, its identity and its files; after it
the files of other epochs go. A run killed at any instant leaves the last committed epoch whole,
whatever it had written of the next one: a resume never mixes two epochs. A commit that cannot be
read (damaged by hand, an older layout) is said in one line and the step starts over.

Nothing random is saved: every draw of a step comes from a generator seeded by (seed, epoch,
batch), and the data order depends only on (seed, epoch). The files hold tensors and plain values
only, and are read as any file is (models/safe_load.py): nothing they name runs.
"""
import json

from models.safe_load import safe_load
from utils.runtime.distributed import barrier, torchrun_rank
from utils.runtime.io import save_text, save_torch


class UnreadableState(ValueError):
    """A resume commit that cannot be trusted: its reason is the message."""


def commit_path(files):
    """The file that commits a run's saved state (its RunFiles)."""
    return files.resume_state.with_suffix(".json")


def epoch_file(files, epoch, rank=None):
    """The state of `epoch` (rank None), or process `rank`'s concept bank of that epoch."""
    state = files.resume_state
    return state.with_name(f"{state.stem}.epoch{epoch}" + ("" if rank is None else f".bank{rank}") + ".pt")


def _saved_files(files):
    """Every file of a run's saved states, committed or not (the commit itself left out)."""
    state = files.resume_state
    # An earlier layout's state and banks (`<run>.pt`, `<run>.bank<rank>.pt`) are removed alike.
    return [state, *state.parent.glob(f"{state.stem}.bank*.pt"), *state.parent.glob(f"{state.stem}.epoch*.pt")]


def describe(files):
    """{path, epoch, identity} of the committed state of a run (its RunFiles), or None when there is
    none; UnreadableState when its commit cannot be trusted."""
    path = commit_path(files)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if files.resume_state.is_file():
            raise UnreadableState(f"{files.resume_state} has no commit ({path.name}): it was left by an older "
                                  f"version, or its run was killed while writing it") from None
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableState(f"{path} cannot be read ({err})") from None
    try:
        info = json.loads(text)
    except ValueError:
        raise UnreadableState(f"{path} is not JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("epoch"), int) or info["epoch"] < 0 \
            or not isinstance(info.get("identity"), dict) or not isinstance(info["identity"].get("settings"), dict):
        raise UnreadableState(f"{path} does not hold an epoch and the identity of its run")
    state = epoch_file(files, info["epoch"])
    if not state.is_file():
        raise UnreadableState(f"{path} commits epoch {info['epoch'] + 1}, but its state {state.name} is missing")
    return {"path": state, "epoch": info["epoch"], "identity": info["identity"]}


def discard(files):
    """Remove a run's saved state (rank 0 of a torchrun launch only: every rank decides alike). The commit
    goes first: a run killed meanwhile leaves files no commit names, which the next save removes."""
    if torchrun_rank() != 0:
        return
    for stale in [commit_path(files), *_saved_files(files)]:
        stale.unlink(missing_ok=True)


class ResumeState:
    """The saved state of one run of a training step (its StepContext's RunFiles)."""

    def __init__(self, ctx, shared_process_state):
        self.ctx = ctx
        self.files = ctx.files
        # The paper recipe's processes hold the same bank: rank 0's file serves all of them.
        self.shared = shared_process_state
        self.first_epoch = 0

    def _bank_rank(self):
        return 0 if self.shared else self.ctx.dist.rank

    def load(self, training):
        """Restore `training` from the committed state, if any; sets first_epoch. The runner has removed
        an unreadable commit before the processes start (status.decide_to_run)."""
        saved = describe(self.files)
        if saved is None:
            return
        epoch = saved["epoch"]
        training.load_state_dict(safe_load(saved["path"])["training"])
        bank = epoch_file(self.files, epoch, self._bank_rank())
        if bank.is_file():
            training.load_process_state(safe_load(bank))
        self.first_epoch = epoch + 1
        if self.ctx.dist.is_main:
            print(f"[{self.ctx.label}] resuming after epoch {self.first_epoch} from {saved['path']}")

    def nothing_left(self):
        """True when the saved state is of the last epoch: killed after it, before the artifacts."""
        return self.first_epoch == self.ctx.cfg.epochs

    def save(self, epoch, training):
        """Commit the state after `epoch` (see the module's doc): the epoch's files, then the commit, then
        the other epochs' files go."""
        process_state = training.process_state()
        if process_state is not None and (self.ctx.dist.is_main or not self.shared):
            save_torch({k: v.cpu() for k, v in process_state.items()}, epoch_file(self.files, epoch, self._bank_rank()))
        if self.ctx.dist.is_main:
            save_torch({"epoch": epoch, "training": training.state_dict()}, epoch_file(self.files, epoch))
        barrier()  # every process's bank is written before the commit names it
        if self.ctx.dist.is_main:
            save_text(json.dumps({"epoch": epoch, "identity": self.ctx.identity}, indent=2), commit_path(self.files))
            kept = {epoch_file(self.files, epoch), *self.files.resume_state.parent.glob(
                f"{self.files.resume_state.stem}.epoch{epoch}.bank*.pt")}
            for other in _saved_files(self.files):
                if other not in kept:
                    other.unlink(missing_ok=True)
        barrier()

    def finish(self):
        barrier()
        if self.ctx.dist.is_main:
            discard(self.ctx.files)
