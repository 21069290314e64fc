"""The entry point every step script calls: parse the shared arguments, run one engine.

Errors a user can fix (bad data layout, wrong checkpoint, missing earlier step, busy
port...) are printed as one clear message instead of a traceback.
"""
import sys

from utils.config import parse_config
from utils.distributed import LaunchError
from utils.engine import NonFiniteLossError

# Problems with the user's input or run (data layout, checkpoint, artifacts, launch, a diverged
# loss) are raised as these; anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, ValueError, LaunchError, NonFiniteLossError)


def run_crop(cfg):
    from loader import DATASETS, existing_crop_dir, write_cropped_dataset
    # Crop sets are renamed into place only when complete; STEGO's own folder is read by training too.
    existing = existing_crop_dir(DATASETS[cfg.dataset], cfg.data_dir)
    if existing is not None and not cfg.restart:
        print(f"[crop] {existing} exists; skipping")
        return existing
    return write_cropped_dataset(cfg.dataset, cfg.data_dir, num_workers=cfg.num_workers)


def step_runner(step):
    """The engine of a step (imported lazily so `--help` stays fast)."""
    if step == "crop":
        return run_crop
    from utils import evaluate, fine_tune, front_door, mediator
    return {"mediator": mediator.run, "front_door": front_door.run,
            "fine_tune": fine_tune.run, "test": evaluate.run}[step]


def main(step, head=None, argv=None):
    try:
        return step_runner(step)(parse_config(step, head, argv))
    except USER_ERRORS as err:
        print(f"error [{step}{' ' + head.upper() if head else ''}]: {err}", file=sys.stderr)
        sys.exit(2)
