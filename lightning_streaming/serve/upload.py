"""Accepting an upload: what its first bytes say it is (never its name), and saving it under
a generated name in the uploads folder."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Accepted", "UnsupportedUpload", "sniff", "save_upload", "ACCEPTED_FORMATS"]

_HEAD = 136

#: What the page tells users it takes.
ACCEPTED_FORMATS = (
    "whole-slide images in one file that OpenSlide reads (Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi, "
    "Leica .scn, Ventana .bif, Philips TIFF, Zeiss .czi, DICOM), and JPEG, PNG or TIFF images"
)
# Extensions kept from the user's name for TIFF-based files: OpenSlide recognises some
# vendors (Hamamatsu NDPI) by the extension as well as the content.
_TIFF_EXTENSIONS = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"}


@dataclass(frozen=True)
class Accepted:
    """An upload's kind (from its content) and the extension its stored copy gets."""

    kind: str
    extension: str


class UnsupportedUpload(ValueError):
    """The content is not an image format the service reads."""


def sniff(head: bytes, filename: str = "") -> Accepted:
    """The kind of file whose first bytes are ``head``.

    Raises:
        UnsupportedUpload: none of JPEG, PNG, TIFF/BigTIFF, DICOM or Zeiss CZI.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return Accepted("jpeg", ".jpg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Accepted("png", ".png")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        suffix = Path(filename).suffix.lower()
        return Accepted("tiff", suffix if suffix in _TIFF_EXTENSIONS else ".tif")
    if head[128:132] == b"DICM":
        return Accepted("dicom", ".dcm")
    if head.startswith(b"ZISRAWFILE"):
        return Accepted("czi", ".czi")
    raise UnsupportedUpload(
        "This file is not an image the service reads (its content is none of JPEG, PNG, TIFF, DICOM or CZI, "
        f"whatever its name says). It takes {ACCEPTED_FORMATS}."
    )


def save_upload(stream: BinaryIO, filename: str, folder: Path) -> tuple[str, Accepted, int]:
    """Check ``stream``'s content and copy it to ``folder`` under a generated name.

    Returns:
        the stored file's name, its kind, and its size in bytes.

    Raises:
        UnsupportedUpload: see :func:`sniff` (nothing is written then).
    """
    head = stream.read(_HEAD)
    accepted = sniff(head, filename)
    name = uuid.uuid4().hex + accepted.extension
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(head)
        shutil.copyfileobj(stream, out, 1 << 20)
        size = out.tell()
    return name, accepted, size
