"""Errors for bad slide data: each names the file, the problem and what to do about it."""

from __future__ import annotations

import os


class SlideError(Exception):
    """Base class of the errors raised for a slide or a manifest row that cannot be used.

    Attributes:
        path: the file concerned (None when there is none).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist (or is not a file)."""


class SlideOpenError(SlideError):
    """OpenSlide cannot open the file: an unsupported format or a damaged header."""


class SlideReadError(SlideError):
    """The file opened but a region could not be decoded (damaged tile data)."""


class RegionOutOfBoundsError(SlideError, ValueError):
    """A requested region lies (partly) outside the slide at the requested spacing."""


class SpacingError(SlideError, ValueError):
    """A slide cannot be read at the requested spacing (finer than its level 0: no upsampling)."""


class MissingSpacingError(SpacingError):
    """Reading by spacing needs the slide's pixel size, and the slide does not record one."""


class ManifestError(SlideError, ValueError):
    """A manifest file that cannot be read: missing columns, no rows, an unreadable CSV."""


class LabelParseError(ManifestError):
    """A manifest row whose target does not parse (not a number, an unknown class)."""
