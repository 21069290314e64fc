"""The one base class of errors a user can fix.

A run stops on these with one line naming the problem and the fix, and exit status 2
(bad data layout, a checkpoint that does not fit, a missing or stale artifact, a launch
that cannot start, a diverged loss, an option that makes no sense). Anything else is a
bug and keeps its traceback. CAUSE_DEBUG=1 shows the traceback of user errors too.

It lives at the top of the tree, apart from `utils`, because every layer raises it:
`loader`, `modules` and `models` never import from `utils`.
"""
import sys

USER_ERROR_STATUS = 2


class UserError(Exception):
    """A problem with the user's input, files or launch, told in one line."""


def tell(where, err):
    """Print the one line a user error is told in: "error [where]: message"."""
    print(f"error [{where}]: {err}", file=sys.stderr, flush=True)
