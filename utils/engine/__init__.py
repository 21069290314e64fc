"""One engine per step, and the loop the training steps share (loop.py).

    crop        crop.py         the cropped training sets (SPEC §2)
    mediator    mediator.py     the concept clusterbook (SPEC §3)
    front_door  front_door.py   the segmentation head (SPEC §4)
    fine_tune   fine_tune.py    the cluster probe (SPEC §5)
    test        evaluate.py     prediction, CRF, metrics (SPEC §6)
    primaps     primaps.py      PriMaPs-EM's prototypes (PRIMAPS.md §1-§2; pseudo masks: primaps_masks.py)
    test_primaps  evaluate_primaps.py  PriMaPs-EM's evaluation (PRIMAPS.md §3)

predict.py (a user's own images, not a pipeline step) has its engine in predict.py, and the models
it segments with in predictors.py; prepare_data.py (a data set's layout from its published archives,
before the crop step) has its engine in prepare_data.py.

Each step's module has `run(cfg)`; `engine(step)` imports only the one asked for, so `--help` stays fast.
"""
import importlib

MODULES = {"crop": "crop", "mediator": "mediator", "front_door": "front_door", "fine_tune": "fine_tune",
           "test": "evaluate", "primaps": "primaps", "test_primaps": "evaluate_primaps"}


def engine(step):
    return importlib.import_module(f"utils.engine.{MODULES[step]}")
