"""The entry point of every step script: parse the step's options, run the steps its script runs
first, then the step's engine (utils/engine/runner.run_step).

    python -m utils.cli.steps STEP [--head HEAD] [OPTION ...]   any registered step, script or not

Errors a user can fix (errors.UserError: data layout, checkpoint, missing or stale artifact,
launch, diverged loss...) are printed as one line, exit status 2; anything else is a bug and keeps
its traceback. CAUSE_DEBUG=1 keeps the traceback of user errors too.
"""
import argparse
import importlib
import sys

from errors import USER_ERROR_STATUS, UserError, tell
from utils.engine.runner import run_step
from utils.runtime.config import build_parser, make_config
from utils.runtime.distributed import debugging, torchrun_rank
from utils.runtime.options import HEADS
from utils.runtime.steps import STEPS


def engine_of(step):
    """The module of a step's engine (imported only when the step runs, so `--help` stays fast)."""
    return importlib.import_module(step.engine)


def run(name, head=None, argv=None):
    """Run step `name` (its script's head `head`) from its script's command line `argv`."""
    step = STEPS[name]
    given = vars(build_parser(step).parse_args(argv))
    for first, needed in step.runs_first.items():
        if needed(given):
            run_step(make_config(STEPS[first], None, given), engine_of(STEPS[first]))
    return run_step(make_config(step, head, given), engine_of(step))


def main(name, head=None, argv=None):
    return guarded(STEPS[name].label(head), lambda: run(name, head, argv))


def guarded(label, work):
    """work()'s result; a user error ends the process with one line, "error [label]: ...", and status 2."""
    try:
        return work()
    except UserError as err:
        if debugging():
            raise
        # Under torchrun every process checks the same inputs before training starts: rank 0 tells.
        if torchrun_rank() != 0:
            sys.exit(USER_ERROR_STATUS)
        tell(label, err)
        sys.exit(USER_ERROR_STATUS)


def _command_line(argv):
    """(step, its script's head, its options) of `python -m utils.cli.steps STEP [--head HEAD] ...`."""
    chosen = argparse.ArgumentParser(prog="python -m utils.cli.steps", add_help=False)
    chosen.add_argument("step", choices=sorted(STEPS))
    known, rest = chosen.parse_known_args(argv)
    if STEPS[known.step].head != "script":
        return known.step, None, rest
    heads = argparse.ArgumentParser(prog=f"python -m utils.cli.steps {known.step}", add_help=False)
    heads.add_argument("--head", choices=HEADS, required=True)
    head, rest = heads.parse_known_args(rest)
    return known.step, head.head, rest


if __name__ == "__main__":
    main(*_command_line(sys.argv[1:]))
