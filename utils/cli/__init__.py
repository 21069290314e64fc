"""The entry points, above the engines: the step scripts' main (steps.py), `bash run` (pipeline.py),
and torchrun with one-line user errors (torchrun.py). Steps registered by other packages
(CAUSE_EXTRA_STEPS) are loaded here, before any entry point runs."""
from utils.runtime.steps import load_extra_steps

load_extra_steps()
