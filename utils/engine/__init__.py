"""One engine per step, over the machinery they share.

    crop.py, mediator.py, front_door.py, fine_tune.py, evaluate.py        CAUSE (docs/cause.md)
    primaps_init.py, primaps.py (pseudo masks: primaps_masks.py), evaluate_primaps.py   PriMaPs-EM
    predict.py (predictors.py: the models it segments with)               a user's own images
    prepare_data.py                    a data set's layout from its published archives, before the crop step

Each step's engine has `work(ctx)` (and an evaluation `show_result(cfg, paths)`) and registers its step
(utils/runtime/steps.py), declaring in that entry the options it alone takes. Importing this package
registers the built-in steps, CAUSE's chain first. What they share, by job:

    runner.py   run_step: inputs, the lock, "already done", launch in every process
    status.py   a step's identity, the "already done" decision, the records beside its artifacts
    loop.py     the training loop (fit) and the Training objects it drives
    resume.py   resume states of unfinished training steps
    optim.py    precision and the optimiser step
    trained.py  trained models loaded from explicit files (CAUSE's modules, PriMaPs-EM's)
"""
# In CAUSE's chain's order: a chain runs its steps in the order they are registered.
from utils.engine import crop, mediator, front_door, fine_tune, evaluate  # noqa: F401
from utils.engine import primaps_init, evaluate_sota, primaps, evaluate_primaps  # noqa: F401
