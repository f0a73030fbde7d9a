"""Errors that stop a run with a message saying what went wrong and what to do (CLI exit code 1), and the
stop on a signal (exit code 75)."""
from __future__ import annotations

# The largest magnitude a reward may have: advantages and losses are computed in float32.
FLOAT32_MAX = 3.4028234663852886e38


class NonFiniteError(RuntimeError):
    """A number the run depends on is NaN or infinite (weights, a reward, too many steps in a row)."""


class RewardFailure(RuntimeError):
    """The reward functions failed on too many samples for too long (a broken or hanging reward)."""


class RunBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


# The exit code of a run stopped by SIGTERM or SIGINT after saving a checkpoint (EX_TEMPFAIL: "try again"):
# rerunning the same command resumes it.
EXIT_INTERRUPTED = 75


class Interrupted(RuntimeError):
    """The run stopped on SIGTERM / SIGINT at a step boundary, after saving what it needs to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
