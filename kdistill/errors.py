"""Errors a user can act on. The CLI prints their one-line message and exits with code 2."""


class UserError(Exception):
    """Bad input or configuration: the message names the file, row, column or key to fix."""


class ConfigError(UserError):
    """A recipe or `--set` override is invalid."""


class DataError(UserError):
    """A dataset file is missing, malformed or unusable."""
