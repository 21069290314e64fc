"""The entry point every step script calls: parse the step's options, run its engine.

Errors a user can fix (errors.UserError: data layout, checkpoint, missing or stale artifact,
launch, diverged loss...) are printed as one line, exit status 2; anything else is a bug and keeps
its traceback. CAUSE_DEBUG=1 keeps the traceback of user errors too.
"""
import sys

from errors import USER_ERROR_STATUS, UserError, tell
from utils.runtime.distributed import debugging, torchrun_rank


def main(step, head=None, argv=None):
    from utils.engine import engine
    from utils.runtime.config import parse_config, step_label
    return guarded(step_label(step, head), lambda: engine(step).run(parse_config(step, head, argv)))


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
