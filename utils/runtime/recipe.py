"""How the training steps optimise: the recipes, and CAUSE's per-data-set optimiser settings.

The released CAUSE models come from 4 GPUs that each trained alone on rank 0..3's quarter of the
crops, batch 16, lr 1e-3 × 4; only rank 0's was kept. PriMaPs trained on one GPU (batch 32, lr 5e-3,
every image each epoch). A step's registry entry says how many GPUs its paper run had
(`Step.paper_gpus`); docs/runs.md, "Recipes", explains both.
"""
from dataclasses import dataclass
from types import MappingProxyType

from errors import UserError


class RecipeError(UserError):
    """A process count the recipe cannot split its batch over."""


@dataclass(frozen=True)
class Recipe:
    """How a training step optimises: the same numbers go into every record of what it made."""
    name: str
    processes: int
    global_batch: int
    batch_per_process: int
    lr: float
    shards: int  # the epoch's order is DistributedSampler's for this many replicas ...
    shared_batch: bool  # ... and the processes split one global batch (paper) or read a shard each (scaled)

    def describe(self):
        if self.shared_batch and self.shards == 1:
            return (f"recipe {self.name}: global batch {self.global_batch} split over {self.processes} process(es) "
                    f"({self.batch_per_process} each), lr {self.lr:g}, every training item each epoch")
        if self.shared_batch:
            return (f"recipe {self.name}: global batch {self.global_batch} split over {self.processes} process(es) "
                    f"({self.batch_per_process} each), lr {self.lr:g}, each epoch the quarter of the training set "
                    f"that the official rank 0 of {self.shards} read")
        return (f"recipe {self.name}: batch {self.batch_per_process} per process × {self.processes} process(es), "
                f"lr {self.lr:g}, every training item each epoch")

    def settings(self):
        """The recipe's part of a training step's identity. The paper recipe's process count is left out:
        it trains the same on any number of processes, so a run can also be resumed on another number."""
        settings = {"recipe": self.name, "global_batch": self.global_batch, "lr": self.lr}
        if not self.shared_batch:
            settings["processes"] = self.processes
        return settings

    def record(self):
        return {"name": self.name, "processes": self.processes, "batch_per_process": self.batch_per_process,
                "global_batch": self.global_batch, "lr": self.lr}


def recipe_for(cfg, paper_gpus, processes):
    """The recipe of a training step of `cfg` run as `processes` processes; `paper_gpus`: how many GPUs the
    paper's run trained on, each alone on its shard (the paper recipe reproduces rank 0's)."""
    if cfg.recipe == "paper":
        if cfg.batch_size % processes:
            raise RecipeError(
                f"the paper recipe splits the global batch of {cfg.batch_size} over the processes, and "
                f"{processes} processes cannot share it equally: use a process count that divides "
                f"{cfg.batch_size} (1, 2, 4, 8, 16 for the paper's 16) or --recipe scaled")
        return Recipe("paper", processes, cfg.batch_size, cfg.batch_size // processes, cfg.lr * paper_gpus,
                      paper_gpus, True)
    return Recipe("scaled", processes, cfg.batch_size * processes, cfg.batch_size, cfg.lr * processes,
                  processes, False)


@dataclass(frozen=True)
class CauseOptimisation:
    """CAUSE's optimiser settings on one data set (docs/cause.md §4-§5)."""
    front_door_clip: MappingProxyType  # gradient-norm clip of the segment module per head, step 2
    fine_tune_clip: MappingProxyType | None  # the same for step 3; None: no clipping
    weight_decay: float
    official: bool  # False: the official code has no values for this data set; these are the project's


# The official scripts clip only for cocostuff27 and cityscapes; elsewhere step 2 raises there,
# so the project reuses the cocostuff27 values in step 2 and does not clip in step 3.
# Read-only, so that no data set's values can be changed through another's.
_COCO_CLIP = MappingProxyType({"tr": 2.0, "mlp": 0.1})
_CITY_CLIP = MappingProxyType({"tr": 1.0, "mlp": 1.0})
_ELSEWHERE = CauseOptimisation(_COCO_CLIP, None, 1e-4, False)
CAUSE_OPTIMISATION = {
    "cocostuff27": CauseOptimisation(_COCO_CLIP, _COCO_CLIP, 1e-4, True),
    "cityscapes": CauseOptimisation(_CITY_CLIP, _CITY_CLIP, 0.0, True),
    "pascalvoc": _ELSEWHERE,
    "coco81": _ELSEWHERE,
    "coco171": _ELSEWHERE,
    "potsdam3": _ELSEWHERE,  # CAUSE never trained on Potsdam-3 (docs/primaps.md §5)
}
