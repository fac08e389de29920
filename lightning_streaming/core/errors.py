"""Exceptions raised by the streaming core; each message names the problem and the fix."""


class StreamingError(Exception):
    """Base class of every error raised by ``lightning_streaming``."""


class NotLocalError(StreamingError, ValueError):
    """The trunk contains an operation whose output at a pixel depends on far-away pixels,
    on the input's size, or on randomness, so tiles could not reproduce it exactly."""


class TileTooSmallError(StreamingError, ValueError):
    """The tile cannot hold the receptive field of even one output pixel.

    ``minimum_tile`` is the smallest usable tile size, one int per spatial dimension.
    """

    def __init__(self, message: str, minimum_tile: tuple[int, ...]):
        super().__init__(message)
        self.minimum_tile = minimum_tile


class StreamingMismatchError(StreamingError, AssertionError):
    """:func:`~lightning_streaming.verify` found streamed and conventional results that differ."""
