"""Errors that end a job with a clear message instead of a traceback.

The command line maps them to exit codes: :class:`UsageError` exits 2 (like argparse), every other
:class:`SpeclabelError` exits 1. Row-level problems are never raised: they go to quarantine.
"""


class SpeclabelError(Exception):
    """A job failed for a reason the user can act on."""

    exit_code = 1


class ConfigError(SpeclabelError):
    """A setup, architecture or configuration file is invalid."""


class InputError(SpeclabelError):
    """An input as a whole cannot be used (missing, unreadable, wrong schema)."""


class IntegrityError(SpeclabelError):
    """A model or an input failed an integrity check; the message names the check."""


class UsageError(SpeclabelError):
    """The command line was wrong."""

    exit_code = 2
