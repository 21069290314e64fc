"""torchrun for the step scripts: `python -m utils.cli.torchrun [torchrun's options] SCRIPT [options]`.

The same launcher as `torchrun` (it parses the same options and calls the same code), with one
difference: when a process met a user error (errors.UserError: it printed its one line and exited
with status 2) and the others only stopped after it, the launch ends as a single process would,
with that line and status 2, instead of torchrun's report of failed children. Any other failure is
reported as torchrun reports it.
"""
import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from errors import USER_ERROR_STATUS
from utils.runtime.distributed import PEER_STOPPED_STATUS

# How the other processes of a run end after one met a user error: their collective lost its peer,
# or the launcher stopped them.
FOLLOWING = {USER_ERROR_STATUS, PEER_STOPPED_STATUS, -signal.SIGTERM}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # The agent logs each failed child at error level; a user error has already been told in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        if USER_ERROR_STATUS in codes and codes <= FOLLOWING:
            return USER_ERROR_STATUS
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
