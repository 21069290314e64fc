"""The one place that names every file a run reads or writes.

The layout of the CAUSE artifacts is the official one (SPEC §3-§5), so released CAUSE files
dropped into `CAUSE/` load unchanged:

    CAUSE/{dataset}/modularity/{baseline}/{K}/modular.npy            mediator
    CAUSE/{dataset}/{baseline}/{K}/segment_{head}.pth                front door
    CAUSE/{dataset}/{baseline}/{K}/segment_{head}_fine_tuned.pth     fine-tune (the segment it ended with)
    CAUSE/{dataset}/{baseline}/{K}/cluster_{head}.pth                fine-tune
    results/{dataset}/{MLP|TR}/{baseline}/{K}/                       test (metrics.json, pictures)

`baseline` is the backbone checkpoint's file stem. Beside every artifact a record with the same
stem (`segment_tr.json`, ...) says what made it (utils/runtime/records.py); the test step's
record is inside its metrics.json. Resume states of unfinished steps live in `resume/` beside
the artifacts; a step's TensorBoard logs under `logs/`.
"""
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArtifactPaths:
    dataset: str
    baseline: str
    num_codebook: int
    head: str | None = None  # "mlp" | "tr"; None for the head-independent mediator
    root: Path = Path("CAUSE")
    results_root: Path = Path("results")
    logs_root: Path = Path("logs")

    @property
    def mediator_dir(self):
        return Path(self.root) / self.dataset / "modularity" / self.baseline / str(self.num_codebook)

    @property
    def head_dir(self):
        return Path(self.root) / self.dataset / self.baseline / str(self.num_codebook)

    @property
    def modular(self):
        return self.mediator_dir / "modular.npy"

    @property
    def segment(self):
        """The front door's segment module (also where a released segment file goes)."""
        return self.head_dir / f"segment_{self._head()}.pth"

    @property
    def fine_tuned_segment(self):
        """The segment module as fine-tuning left it; the front door's file stays as it was."""
        return self.head_dir / f"segment_{self._head()}_fine_tuned.pth"

    @property
    def cluster(self):
        return self.head_dir / f"cluster_{self._head()}.pth"

    @staticmethod
    def record(artifact):
        """The record of what made `artifact`: the same stem, `.json`."""
        return Path(artifact).with_suffix(".json")

    def resume_state(self, step):
        if step == "mediator":
            return self.mediator_dir / "resume" / "mediator.pt"
        return self.head_dir / "resume" / f"{step}_{self._head()}.pt"

    def resume_bank(self, step, rank):
        """A process's concept bank of an unfinished front door, beside its resume state."""
        return self.resume_state(step).with_suffix(f".bank{rank}.pt")

    @property
    def results(self):
        return Path(self.results_root) / self.dataset / self._head().upper() / self.baseline / str(self.num_codebook)

    @property
    def metrics(self):
        return self.results / "metrics.json"

    def logs(self, step):
        name = step if step == "mediator" else f"{step}_{self._head()}"
        return Path(self.logs_root) / self.dataset / f"{self.baseline}_{self.num_codebook}" / name

    @property
    def fingerprint_cache(self):
        """Content hashes of the files runs have read, by path, size and modification time."""
        return Path(self.root) / ".fingerprints.json"

    def _head(self):
        if self.head not in ("mlp", "tr"):
            raise ValueError(f"this artifact belongs to a head; expected head 'mlp' or 'tr', got {self.head!r}")
        return self.head
