"""The entry points, above the engines: the step scripts' main (steps.py), `bash run` (pipeline.py),
and torchrun with one-line user errors (torchrun.py). Steps registered by other packages
(CAUSE_EXTRA_STEPS) are loaded here, after the built-in ones (the engine package registers them),
before any entry point runs."""
import utils.engine  # noqa: F401
from utils.runtime.steps import load_extra_steps

load_extra_steps()
