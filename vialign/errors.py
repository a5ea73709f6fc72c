"""Errors that mean "the input is wrong" (config, options, data), not a bug: the CLI prints their
message, which names the problem and the fix, without a traceback."""


class VialignInputError(ValueError):
    """A user-facing problem with an option, a file or a value."""


class ConfigError(VialignInputError):
    """A config file or override that does not fit the schema: the message names the key."""
