"""Errors that mean "the input is wrong", as opposed to a bug: the CLI prints them without a traceback."""


class PipelineInputError(ValueError):
    """A user-facing problem with a model path, a pipeline, a size or an option; the message says the fix."""


class ModelNotFoundError(PipelineInputError, FileNotFoundError):
    """The model is neither a local diffusers folder, a built-in name, nor a hub id that can be reached."""
