"""The errors sparse-lightning raises for bad input: subclasses of ``ValueError`` / ``TypeError``.

The command catches them and prints one line (exit status 2) instead of a traceback.
"""


class ConfigError(ValueError):
    """An argument, recipe field or selection that can not be used, with a message naming it."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong type."""
