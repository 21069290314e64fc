"""The one place that names every file a run reads or writes.

The layout of the CAUSE artifacts is the official one (docs/cause.md §3-§5), so released CAUSE files
dropped into `CAUSE/` load unchanged:

    DATA/{crop folder of the data set}/                              crop (its record: record.json inside)
    CAUSE/{dataset}/modularity/{baseline}/{K}/modular.npy            mediator
    CAUSE/{dataset}/{baseline}/{K}/segment_{head}.pth                front door
    CAUSE/{dataset}/{baseline}/{K}/segment_{head}_fine_tuned.pth     fine-tune (the segment it ended with)
    CAUSE/{dataset}/{baseline}/{K}/cluster_{head}.pth                fine-tune
    results/{dataset}/{MLP|TR}/{baseline}/{K}/                       test (metrics.json, pictures)

PriMaPs-EM (docs/primaps.md; `mode` cause, backbone, stego or hp) and released STEGO and HP models
(docs/sota.md):

    CAUSE/{dataset}/primaps_masks/{masks name}/{image stem}.png      pseudo masks (masks.json: what made them)
    CAUSE/{dataset}/{baseline}/{K}/primaps_{head}.pth                train_primaps, cause mode
    CAUSE/{dataset}/primaps/{baseline}/init.pth                      train_primaps, backbone mode: PCA + k-means
    CAUSE/{dataset}/primaps/{baseline}/primaps.pth                   train_primaps, backbone mode
    CAUSE/{dataset}/primaps_{stego|hp}/{baseline}/primaps.pth        train_primaps on a STEGO or HP model
    results/{dataset}/PRIMAPS_{MLP|TR}/{baseline}/{K}/               test_primaps, cause mode
    results/{dataset}/PRIMAPS_{BACKBONE|STEGO|HP}/{baseline}/        test_primaps, the other modes
    results/{dataset}/{STEGO|HP}/{baseline}/                         test_sota

`baseline` is the backbone checkpoint's file stem; a STEGO or HP model's name (its file's stem, or
the folder of HP's ckpt.pth) where its code is the features; released_{stem} for a released PriMaPs
checkpoint (utils/runtime/config.Config.baseline). Beside every artifact a record with the same
stem (`segment_tr.json`, ...) says what made it (utils/runtime/records.py); the test step's
record is inside its metrics.json, the crop step's inside its folder. A step's other files follow
from its main artifact (RunFiles): its resume state in `resume/` beside it, the lock held while it
runs, its TensorBoard logs under `logs/` in a folder mirroring the artifact's.
"""
from dataclasses import dataclass
from pathlib import Path

from loader import dataset_info, existing_crop_dir


@dataclass(frozen=True)
class ArtifactPaths:
    dataset: str
    baseline: str
    num_codebook: int
    head: str | None = None  # "mlp" | "tr"; None for the head-independent mediator
    root: Path = Path("CAUSE")
    results_root: Path = Path("results")
    logs_root: Path = Path("logs")
    primaps_mode: str | None = None  # cause, backbone, stego, hp: which PriMaPs artifacts (None outside PriMaPs)
    data_dir: Path = Path("data")
    sota_family: str | None = None  # "stego" | "hp": the released model a step reads, if any

    @property
    def crops(self):
        """The cropped training set (training also reads STEGO's folder when only it exists); None for a
        data set that trains on its images as they are."""
        info = dataset_info(self.dataset)
        if info.crops is None:
            return None
        return existing_crop_dir(info, self.data_dir) or Path(self.data_dir) / info.crops.folder

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

    @property
    def results(self):
        return Path(self.results_root) / self.dataset / self._head().upper() / self.baseline / str(self.num_codebook)

    @property
    def metrics(self):
        return self.results / "metrics.json"

    @property
    def fingerprint_cache(self):
        """Content hashes of the files runs have read, kept while a file's size, modification and change times stay."""
        return Path(self.root) / ".fingerprints.json"

    def primaps_masks(self, name):
        """The pseudo masks of one data set, backbone and mask settings (`name` says which)."""
        return Path(self.root) / self.dataset / "primaps_masks" / name

    def primaps_mask_files(self, name, image_files):
        """The cached pseudo mask of each training image: named after the image file's stem."""
        folder = self.primaps_masks(name)
        return [folder / f"{Path(image).stem}.png" for image in image_files]

    @property
    def sota_results(self):
        """test_sota's metrics.json and pictures of a released STEGO or HP model."""
        if self.sota_family not in ("stego", "hp"):
            raise ValueError(f"a released model's results need sota_family 'stego' or 'hp', got {self.sota_family!r}")
        return Path(self.results_root) / self.dataset / self.sota_family.upper() / self.baseline

    @property
    def sota_metrics(self):
        return self.sota_results / "metrics.json"

    @property
    def primaps_dir(self):
        """Cause mode: beside the CAUSE files the prototypes start from; the other modes: a folder of their own."""
        mode = self._primaps()
        if mode == "cause":
            return self.head_dir
        return Path(self.root) / self.dataset / ("primaps" if mode == "backbone" else f"primaps_{mode}") / self.baseline

    @property
    def primaps(self):
        """PriMaPs-EM's prototypes (θ_R, θ_M), the initial ones and the linear probe."""
        return self.primaps_dir / (f"primaps_{self._head()}.pth" if self._primaps() == "cause" else "primaps.pth")

    @property
    def primaps_init(self):
        """Backbone mode's initial prototypes: PCA, then cosine k-means (in backbone mode's folder)."""
        return Path(self.root) / self.dataset / "primaps" / self.baseline / "init.pth"

    @property
    def primaps_results(self):
        if self._primaps() == "cause":
            return (Path(self.results_root) / self.dataset / f"PRIMAPS_{self._head().upper()}" / self.baseline
                    / str(self.num_codebook))
        return Path(self.results_root) / self.dataset / f"PRIMAPS_{self._primaps().upper()}" / self.baseline

    @property
    def primaps_metrics(self):
        return self.primaps_results / "metrics.json"

    def _primaps(self):
        if self.primaps_mode not in ("cause", "backbone", "stego", "hp"):
            raise ValueError(f"PriMaPs artifacts need primaps_mode cause, backbone, stego or hp, got "
                             f"{self.primaps_mode!r}")
        return self.primaps_mode

    def _head(self):
        if self.head not in ("mlp", "tr"):
            raise ValueError(f"this artifact belongs to a head; expected head 'mlp' or 'tr', got {self.head!r}")
        return self.head


def paths_of(cfg):
    """The ArtifactPaths of a run's Config (None for what its step does not take)."""
    def option(name):
        return getattr(cfg, name, None)
    return ArtifactPaths(cfg.dataset, cfg.baseline, option("num_codebook"), cfg.head, option("output_root"),
                         option("results_root"), option("logs_root"), option("mode"), option("data_dir"),
                         cfg.sota_family)


@dataclass(frozen=True)
class RunFiles:
    """The files of one run of a step besides its artifacts, all named after its main artifact and the
    step's run name ("front_door_tr"): its resume state, each process's concept bank, the lock held
    while it runs, and its TensorBoard logs."""
    artifact: Path
    name: str
    output_root: Path
    logs_root: Path

    @property
    def resume_state(self):
        return Path(self.artifact).parent / "resume" / f"{self.name}.pt"

    def resume_bank(self, rank):
        """A process's concept bank of an unfinished front door, beside its resume state."""
        return self.resume_state.with_suffix(f".bank{rank}.pt")

    @property
    def lock(self):
        return Path(self.artifact).parent / f".{self.name}.lock"

    @property
    def logs(self):
        """logs/ mirrors the artifact's folder under the output root."""
        return Path(self.logs_root) / Path(self.artifact).parent.relative_to(self.output_root) / self.name
