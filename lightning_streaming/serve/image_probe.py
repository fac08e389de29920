"""Open an uploaded file in a separate, short-lived process and report its size and pixel
size: a file that crashes or hangs the image libraries takes down only that process.

Run as ``python -m lightning_streaming.serve.image_probe FILE``: prints one JSON object,
``{"width", "height", "levels", "spacing", "format", "whole"}`` or ``{"error"}``. It imports OpenSlide
and Pillow, not torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ImageFacts", "InspectionError", "inspect_file"]


@dataclass(frozen=True)
class ImageFacts:
    """What opening a file told: level-0 size, pyramid levels, um/px (None when unrecorded),
    the format, and whether reading it decodes it whole."""

    width: int
    height: int
    levels: int
    spacing: float | None
    format: str
    whole: bool  # decoded whole when read (an ordinary image), not region by region (OpenSlide)

    @property
    def pixels(self) -> int:
        return self.width * self.height


class InspectionError(ValueError):
    """The file cannot be opened as an image; the message is fit to show its owner."""


def inspect_file(path: Path, shown_name: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> ImageFacts:
    """Open ``path`` in a child process and read its facts.

    Raises:
        InspectionError: it cannot be opened, or opening it crashed or hung the child
            (messages name the file as ``shown_name``).
    """
    try:
        result = subprocess.run(
            [sys.executable, "-m", __name__, str(path)], capture_output=True, text=True, timeout=timeout, env=env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise InspectionError(f"Opening {shown_name} took longer than {timeout:g} s; the file may be damaged.") from None
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise InspectionError(
            f"{shown_name} could not be opened: the image library stopped (exit code {result.returncode}). "
            "The file is damaged or not a supported image."
        ) from None
    if "error" in answer:
        raise InspectionError(answer["error"].replace(str(path), shown_name))
    return ImageFacts(**answer)


def _facts(path: Path) -> dict[str, Any]:
    from lightning_streaming.data.errors import SlideOpenError
    from lightning_streaming.data.image_file import PlainImage, open_image

    try:
        handle = open_image(path)
    except SlideOpenError as error:
        return {"error": str(error)}
    width, height = handle.level_dimensions[0]
    levels = len(handle.level_dimensions)
    spacing = None
    try:
        x, y = float(handle.properties["openslide.mpp-x"]), float(handle.properties["openslide.mpp-y"])
        spacing = (x + y) / 2 if x > 0 and y > 0 else None
    except (KeyError, ValueError):
        pass
    whole = isinstance(handle, PlainImage)
    fmt = getattr(handle, "format", "image") if whole else handle.properties.get("openslide.vendor", "slide")
    handle.close()
    return {"width": int(width), "height": int(height), "levels": levels, "spacing": spacing,
            "format": str(fmt), "whole": whole}  # fmt: skip


if __name__ == "__main__":
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # only the header is read here; the size limit is the service's
    print(json.dumps(_facts(Path(sys.argv[1]))))
