"""Errors that mean "the input is wrong" (not a bug): the CLI prints them without a traceback."""


class RewardInputError(ValueError):
    """Bad pixels, prompts, names or options; the message names the problem and the fix."""


class CheckpointNotFoundError(RewardInputError, FileNotFoundError):
    """A reward checkpoint that is neither a local file/folder nor reachable on the hub."""


class DamagedCheckpointError(RewardInputError):
    """A reward checkpoint that exists but does not parse (cut short or corrupted on disk)."""
