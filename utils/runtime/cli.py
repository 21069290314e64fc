"""The entry point every step script calls: parse the step's options, run its engine.

Errors a user can fix (errors.UserError: data layout, checkpoint, missing or stale artifact,
launch, diverged loss...) are printed as one line, exit status 2; anything else is a bug and keeps
its traceback. CAUSE_DEBUG=1 keeps the traceback of user errors too.
"""
import sys

from errors import UserError
from utils.runtime.distributed import debugging, torchrun_rank


def main(step, head=None, argv=None):
    from utils.engine import engine
    from utils.runtime.config import parse_config
    try:
        return engine(step).run(parse_config(step, head, argv))
    except UserError as err:
        if debugging():
            raise
        # Under torchrun every process checks the same inputs before training starts: rank 0 tells.
        if torchrun_rank() != 0 and not getattr(err, "raised_in_worker", False):
            sys.exit(2)
        print(f"error [{step.replace('_', ' ')}{' ' + head.upper() if head else ''}]: {err}", file=sys.stderr)
        sys.exit(2)
