"""Open an image file for :class:`~lightning_streaming.Slide`: OpenSlide for whole-slide
formats, Pillow for ordinary images (JPEG, PNG, TIFF without tiles, ...) that OpenSlide does
not read. Both give the part of OpenSlide's interface a Slide uses; each library is imported
only when a file is opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SlideOpenError

__all__ = ["PlainImage", "open_image", "read_errors"]

# Pillow modes that are 8 bits per channel, converted to RGB(A) as they are.
_EIGHT_BIT = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}
_CENTIMETER = 3  # TIFF ResolutionUnit


def _openslide() -> Any:
    try:
        import openslide
    except ModuleNotFoundError:  # the "slides" extra is not installed
        return None
    return openslide


class PlainImage:
    """An ordinary image file as a one-level slide, read through Pillow.

    It is decoded whole (as 8-bit RGB or RGBA) on the first read and kept while open: fine for
    images that fit in memory as uint8; convert larger ones to a tiled pyramidal TIFF, which
    OpenSlide reads region by region. Its pixel size comes from a TIFF resolution in
    centimetres (as OpenSlide's generic TIFF reads it); other files record none.
    """

    def __init__(self, path: Path) -> None:
        try:
            from PIL import Image
        except ModuleNotFoundError:
            raise SlideOpenError(
                f"{str(path)!r} is not a slide format OpenSlide reads, and reading ordinary images (JPEG, PNG, "
                "TIFF) needs Pillow: pip install 'lightning_streaming[slides]' (or pip install pillow)",
                path,
            ) from None
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise SlideOpenError(
                f"{str(path)!r}: {error}. If you trust the file, raise Pillow's limit before opening it "
                "(PIL.Image.MAX_IMAGE_PIXELS = None), or convert it to a tiled pyramidal TIFF",
                path,
            ) from error
        if image.mode not in _EIGHT_BIT:
            image.close()
            raise SlideOpenError(
                f"{str(path)!r} is a {image.mode} image; slides are read as 8-bit RGB. Convert it to 8 bits per "
                "channel (scaling its values to 0-255) first",
                path,
            )
        self._image: Any = image
        self._pixels: Any = None
        self.format = image.format or "image"
        self.level_dimensions = (image.size,)  # (width, height), as OpenSlide gives it
        self.level_downsamples = (1.0,)
        self.properties = {"image.format": self.format, "image.mode": image.mode}
        tags = getattr(image, "tag_v2", None)  # TIFF tags: ResolutionUnit 296, XResolution 282, YResolution 283
        if tags is not None and tags.get(296) == _CENTIMETER and float(tags.get(282, 0)) > 0 < float(tags.get(283, 0)):
            self.properties["openslide.mpp-x"] = str(1e4 / float(tags[282]))
            self.properties["openslide.mpp-y"] = str(1e4 / float(tags[283]))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        """RGBA pixels of the box at ``location`` (x, y) of ``size`` (width, height)."""
        if self._pixels is None:
            keep_alpha = "A" in self._image.mode or "a" in self._image.mode or "transparency" in self._image.info
            self._pixels = self._image.convert("RGBA" if keep_alpha else "RGB")
            self._image.close()
        x, y = location
        return self._pixels.crop((x, y, x + size[0], y + size[1])).convert("RGBA")

    def close(self) -> None:
        self._image.close()
        self._pixels = None


def open_image(path: Path) -> Any:
    """A handle on ``path``: ``openslide.OpenSlide`` for the formats OpenSlide reads, else a
    :class:`PlainImage` for the ones Pillow reads.

    Raises:
        SlideOpenError: neither can open it (the message says why and what to do).
    """
    openslide = _openslide()
    if openslide is not None:
        try:
            return openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as error:
            unsupported: Exception = error
        except openslide.OpenSlideError as error:
            raise SlideOpenError(
                f"OpenSlide cannot open {str(path)!r}: {error}. The file is damaged or uses a variant OpenSlide "
                "does not support; re-export it from the scanner software or leave it out",
                path,
            ) from error
    try:
        return PlainImage(path)
    except SlideOpenError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises several types for files it cannot read
        if openslide is None:
            raise SlideOpenError(
                f"{str(path)!r} is not an image Pillow reads ({error}), and reading whole-slide formats needs "
                "OpenSlide: pip install 'lightning_streaming[slides]'",
                path,
            ) from error
        raise SlideOpenError(
            f"{str(path)!r} is not a slide format OpenSlide reads ({unsupported}) nor an image Pillow reads; "
            "OpenSlide reads Aperio .svs, tiled generic TIFF, Hamamatsu .ndpi/.vms, MIRAX .mrxs, Leica .scn, "
            "Ventana .bif, Philips TIFF, Zeiss .czi and DICOM, Pillow reads JPEG, PNG, TIFF and others. Convert the "
            "file (e.g. to a tiled pyramidal TIFF) or leave it out",
            path,
        ) from error


def read_errors(handle: Any) -> tuple[type[BaseException], ...]:
    """What reading a region of ``handle`` raises when the file's pixel data is damaged."""
    if isinstance(handle, PlainImage):
        return (OSError, ValueError, SyntaxError)  # Pillow's decoders
    return (_openslide().OpenSlideError,)
