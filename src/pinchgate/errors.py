"""Errors meant for users: one line, naming the file or option that is wrong."""


class PinchgateError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""


class CorpusError(PinchgateError):
    """A corpus that cannot be used at all (missing path, no usable utterances)."""


class AudioError(PinchgateError):
    """One audio file that cannot be read or used."""


class ModelLoadError(PinchgateError):
    """A model that cannot be loaded (no weights, unknown id offline, wrong type)."""
