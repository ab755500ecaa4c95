"""Errors a user can cause and fix by changing a setting: the entry points print them without a traceback."""


class UserError(Exception):
    """Base class: the message names the setting to change."""


class ConfigError(UserError, ValueError):
    """A configuration value that is well-typed but not usable (unknown choice, inconsistent sizes)."""


class WeightsError(UserError, RuntimeError):
    """Weights that cannot be found, read or matched to the backbone (a user-fixable problem)."""
