"""Errors that mean "the user asked for something that cannot be done".

The CLI turns an :class:`AdaptsoupError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``, ``\\x1b``), so that it
    prints on one line whatever a user's file name or recipe key holds."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class AdaptsoupError(Exception):
    """A usage or input error with a message fit to show a user as is: always one line (:func:`one_line`)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(one_line(str(arg)) for arg in args))


class CheckpointError(AdaptsoupError):
    """A checkpoint could not be read, or does not fit the model."""


class DataError(AdaptsoupError):
    """An image folder is missing, empty or malformed."""


class ModelError(AdaptsoupError):
    """A model cannot be used for the requested operation (for example: not a ViT)."""
