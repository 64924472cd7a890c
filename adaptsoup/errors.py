"""Errors that mean "the user asked for something that cannot be done".

The CLI turns an :class:`AdaptsoupError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class AdaptsoupError(Exception):
    """A usage or input error with a message fit to show a user as is."""


class CheckpointError(AdaptsoupError):
    """A checkpoint could not be read, or does not fit the model."""


class DataError(AdaptsoupError):
    """An image folder is missing, empty or malformed."""


class ModelError(AdaptsoupError):
    """A model cannot be used for the requested operation (for example: not a ViT)."""
