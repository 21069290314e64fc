"""The one place that names every artifact a run reads or writes.

The layout is the official one (SPEC §3-§5), so released CAUSE files dropped into
`CAUSE/` load unchanged:

    CAUSE/{dataset}/modularity/{baseline}/{K}/modular.npy        step 1
    CAUSE/{dataset}/{baseline}/{K}/segment_{mlp|tr}.pth          steps 2 and 3
    CAUSE/{dataset}/{baseline}/{K}/cluster_{mlp|tr}.pth          step 3
    results/{dataset}/{MLP|TR}/{baseline}/{K}/                   step 4 (metrics.json, pictures)

`baseline` is the backbone checkpoint's file stem. Resume states of unfinished steps
live beside the artifacts in `resume/`; their presence is what marks a step unfinished.
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
        return self.head_dir / f"segment_{self._head()}.pth"

    @property
    def cluster(self):
        return self.head_dir / f"cluster_{self._head()}.pth"

    def resume_state(self, step):
        if step == "mediator":
            return self.mediator_dir / "resume" / "mediator.pt"
        return self.head_dir / "resume" / f"{step}_{self._head()}.pt"

    @property
    def results(self):
        return Path(self.results_root) / self.dataset / self._head().upper() / self.baseline / str(self.num_codebook)

    @property
    def metrics(self):
        return self.results / "metrics.json"

    def logs(self, step):
        name = step if step == "mediator" else f"{step}_{self._head()}"
        return Path(self.logs_root) / self.dataset / f"{self.baseline}_{self.num_codebook}" / name

    def _head(self):
        if self.head not in ("mlp", "tr"):
            raise ValueError(f"this artifact belongs to a head; expected head 'mlp' or 'tr', got {self.head!r}")
        return self.head
