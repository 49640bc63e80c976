"""Errors a person can act on.

Every error that is the user's to fix (a config key, a missing file, a corrupt
shard) is a :class:`PegasusError`. The CLI prints its message on one line and
exits with its ``exit_code`` instead of showing a traceback.
"""


class PegasusError(Exception):
    """A problem with the user's input; the message names the thing and the fix."""

    exit_code = 2


class ConfigError(PegasusError):
    """An invalid configuration: unknown key, wrong type or impossible value."""


class DataError(PegasusError):
    """A missing, empty, unreadable or corrupt data source or shard."""


class CheckpointError(PegasusError):
    """A checkpoint that is missing, unreadable or does not fit the model."""
