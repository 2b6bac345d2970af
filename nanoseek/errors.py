"""The ground floor: the error classes every layer raises for a problem the user can fix.

``UserError`` is printed by :func:`nanoseek.cli.main` as one line (exit status 2), never a
traceback; ``ConfigError`` is the one a config value raises (unknown key, wrong type, out of
range). Everything in ``nanoseek/`` may import this module; it imports nothing from nanoseek, so
library code never needs the command line (:mod:`nanoseek.cli`) to report an error.
"""


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit status 2."""


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type, out of range, or inconsistent with another."""


__all__ = ["UserError", "ConfigError"]
