"""The entry points, above the engines: the step scripts' main (steps.py), `bash run` (pipeline.py),
and torchrun with one-line user errors (torchrun.py)."""
