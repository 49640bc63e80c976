"""Errors a person can act on (printed as one line, exit ``exit_code``), and a requested stop."""

REQUEUE_EXIT_CODE = 75  # a run stopped for a requeue: sysexits.h EX_TEMPFAIL, "try again later"


class PegasusError(Exception):
    """A problem with the user's input; the message names the thing and the fix."""

    exit_code = 2
    reported = False  # True once printed, e.g. by rank 0 for every rank of a run


class ConfigError(PegasusError):
    """An invalid configuration: unknown key, wrong type or impossible value."""


class DataError(PegasusError):
    """A missing, empty, unreadable or corrupt data source or shard."""


class CheckpointError(PegasusError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class Preempted(Exception):  # noqa: N818 (not an error: a requested, clean stop)
    """Raised after the stop checkpoint is written; the process exits with REQUEUE_EXIT_CODE."""

    exit_code = REQUEUE_EXIT_CODE
