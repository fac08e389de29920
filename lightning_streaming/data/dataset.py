"""A dataset of whole slides from a manifest: tissue-cropped, cropped or padded to the input
size, augmented, as uint8 images or as lazy region sources for the streamer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..core import RegionSource
from .augment import Augmentation, ColourJitter, ColourSource, Orientation, OrientedSource, WindowSource
from .errors import SlideError
from .layout import Layout
from .manifest import Manifest, Task
from .policy import OnError, SkipCounter, check_on_error
from .slide import Slide
from .source import SlideRegionSource, StackedSource, read_all
from .tissue import TissueDetection, TissueMask

__all__ = ["SlideBatch", "SlideDataset", "SlideView", "collate_slides"]

log = logging.getLogger(__name__)

_OPEN_SLIDES = 8


class SlideView(NamedTuple):
    """Which slide pixels an image shows: the identity of a prediction, and how to map the
    image (and heatmaps computed on it) back onto the slide.

    Image pixel ``i`` along an axis is pixel ``i + offset`` of the view assembled from the
    slide's ``rows`` (or ``cols``) runs at ``spacing`` (see :class:`Layout`); outside the
    view it is white padding.

    Attributes:
        path: the slide file.
        spacing: um per pixel of the image.
        base_spacing: the manifest's level-0 spacing for the slide (None: the file's own).
        rows, cols: runs of slide pixels at ``spacing`` the view is made of.
        offset: ``(row, col)`` of the image's first pixel in the view (negative: padding).
        shape: ``(height, width)`` of the image.
        line: the manifest line of the slide.
    """

    path: str
    spacing: float
    base_spacing: float | None
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    offset: tuple[int, int]
    shape: tuple[int, int]
    line: int

    def slide_pixels(self, axis: int) -> np.ndarray:
        """For each image pixel along ``axis`` (0: rows, 1: columns), the slide pixel at
        ``spacing`` it shows, or -1 for padding."""
        runs = self.rows if axis == 0 else self.cols
        view = np.arange(self.shape[axis], dtype=np.int64) + self.offset[axis]
        out = np.full(self.shape[axis], -1, dtype=np.int64)
        start = 0
        for a, b in runs:
            inside = (view >= start) & (view < start + b - a)
            out[inside] = view[inside] - start + a
            start += b - a
        return out


class SlideBatch(NamedTuple):
    """A batch of slides with their identity (what :class:`SlideDataModule`'s predict loader
    yields): ``images`` (uint8 ``(N, 3, H, W)`` or a lazy source), ``targets`` (None for a
    manifest without targets) and one :class:`SlideView` per image."""

    images: Tensor | RegionSource
    targets: Tensor | None
    slides: list[SlideView]


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"input_size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


class SlideDataset(Dataset):
    """Slides listed in a :class:`Manifest`, each one image at ``spacing`` um/px.

    For each slide: tissue is detected on a coarse view (:class:`TissueDetection`) and the
    image is the tissue's bounding box (optionally with empty rows and columns removed);
    then, for training, a random orientation (flips, 90-degree rotations), a random crop
    to ``input_size`` that contains tissue (or white padding where the image is smaller)
    and colour jitter; for evaluation, a centre crop or padding. Images are uint8,
    ``(3, H, W)``: normalise them per tile inside the streamed forward
    (:class:`Uint8Normalize` as the model's ``tile_transform``).

    With ``lazy=True`` an item's image is a :class:`~lightning_streaming.RegionSource`
    ``(1, 3, H, W)`` instead: nothing is read until the streamer asks for a tile's region,
    and every augmentation above is applied to each region read, so the slide is never
    materialised (not even as uint8). Batch such items with :func:`collate_slides`.

    Randomness is drawn from ``(seed, epoch, index)``: the same sample in the same epoch is
    augmented identically whatever the number of workers or processes. The epoch comes
    from the sampler (:class:`EpochSampler`, :class:`ClassBalancedSampler` yield
    ``(index, epoch)``) or from :meth:`set_epoch`.

    Bad samples (a slide that cannot be opened or decoded, has no spacing) follow
    ``on_error``: ``"raise"`` stops with an error naming the file and the problem;
    ``"skip"`` logs a warning, returns the next good sample in its place (so batches and
    DDP processes stay in step) and counts it; :meth:`take_skipped` returns the count,
    and :class:`SlideDataModule` reports it at every epoch end. Manifest rows that do not
    parse are handled the same way when the manifest is read. With ``lazy=True`` the
    dataset opens each slide and detects its tissue (which decodes a coarse view), but
    the full-resolution pixels are decoded later, by the streamer in the training step:
    damaged tiles found there raise :class:`SlideReadError` (naming the file and region)
    whatever ``on_error`` says.

    Args:
        manifest: a :class:`Manifest` or the path of a CSV manifest.
        spacing: um per pixel of the images.
        input_size: crop/pad every image to this ``(height, width)`` (or int); None keeps
            each slide's tissue image whole (variable sizes: use a batch size of 1).
        train: random orientation, crop and colour (True), or centre crop only (False).
        augmentation: what training samples undergo (default :class:`Augmentation()`).
        tissue: tissue detection settings, or None to use the whole slide.
        remove_empty: also remove empty rows and columns between tissue parts.
        tissue_crop: training crops contain a random tissue pixel (else: uniform).
        lazy: items are lazy region sources instead of uint8 tensors.
        on_error: ``"raise"`` or ``"skip"`` (see above).
        seed: base seed of the augmentation.
        cache_dir: folder to keep tissue masks in (``.npz``, keyed by the slide's path,
            size, modification time, spacing override and the detection settings); None
            keeps them in memory only.
        max_skips: how many bad samples in a row ``"skip"`` tolerates before raising.
        with_slide: items are ``(image, target, SlideView)``: each image's slide and the
            pixels it shows (evaluation only, ``train=False``), for predictions and heatmaps.
        task, classes, num_classes: passed to :meth:`Manifest.read` when ``manifest`` is a path.

    Example::

        train = ls.SlideDataset("train.csv", spacing=8.0, input_size=2048, train=True)
        image, label = train[0]                         # (3, 2048, 2048) uint8, int
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike,
        spacing: float,
        input_size: int | Sequence[int] | None = None,
        *,
        train: bool = False,
        augmentation: Augmentation | None = None,
        tissue: TissueDetection | None = TissueDetection(),
        remove_empty: bool = False,
        tissue_crop: bool = True,
        lazy: bool = False,
        on_error: OnError = "raise",
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        max_skips: int = 16,
        with_slide: bool = False,
        task: Task = "classification",
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        check_on_error(on_error)
        if with_slide and train:
            raise ValueError("with_slide=True describes evaluation images (train=False); training images are augmented")
        if not (isinstance(spacing, (int, float)) and spacing > 0):
            raise ValueError(f"spacing must be a positive number of um per pixel, got {spacing!r}")
        self.manifest = (
            manifest
            if isinstance(manifest, Manifest)
            else Manifest.read(manifest, task=task, classes=classes, num_classes=num_classes, on_error=on_error)
        )
        self.spacing = float(spacing)
        self.input_size = _pair(input_size)
        self.train = train
        self.augmentation = (augmentation if augmentation is not None else Augmentation()) if train else None
        self.tissue = tissue
        self.remove_empty = remove_empty
        self.tissue_crop = tissue_crop
        self.lazy = lazy
        self.on_error = on_error
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_skips = max_skips
        self.with_slide = with_slide
        self.epoch = 0
        self.skips = SkipCounter()
        self._slides: OrderedDict[int, Slide] = OrderedDict()
        self._masks: dict[str, TissueMask] = {}
        self._bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.manifest.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slides": OrderedDict()}

    def set_epoch(self, epoch: int) -> None:
        """The epoch for indices given without one (plain samplers)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> list[int]:
        """Class index of every sample (classification manifests)."""
        if self.manifest.task != "classification":
            raise ValueError(f"labels exist for classification manifests, this one is {self.manifest.task!r}")
        return [int(row.target) for row in self.manifest.rows]  # type: ignore[arg-type]

    def take_skipped(self) -> int:
        """Requested samples that were bad and replaced (under ``on_error="skip"``) since the
        last call, in all worker processes."""
        return self.skips.take()

    # -- items --------------------------------------------------------------------------

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} slides")
        index %= n
        for attempt in range(self.max_skips + 1):
            i = (index + attempt) % n
            if attempt == 1:
                self.skips.add()  # one per requested sample that was replaced
            if i in self._bad and self.on_error == "skip":
                self._skip(i, self._bad[i], repeat=True)
                continue
            try:
                return self.item(i, epoch)
            except SlideError as error:
                if self.on_error == "raise":
                    raise
                self._bad[i] = str(error)
                self._skip(i, str(error), repeat=False)
        raise RuntimeError(
            f"{self.max_skips + 1} bad samples in a row from index {index} of {self.manifest.path}: the data is "
            "mostly unusable; see the warnings above, fix the files or the manifest"
        )

    def _skip(self, index: int, reason: str, repeat: bool) -> None:
        row = self.manifest.rows[index]
        if repeat:
            log.debug("skipping %s (line %d) again: %s", row.slide, row.line, reason)
        else:
            log.warning("skipping %s (%s line %d), replaced by the next sample: %s", row.slide,
                        self.manifest.path.name, row.line, reason)

    def slide(self, index: int) -> Slide:
        """The slide of sample ``index`` (kept open, a few per process)."""
        if index in self._slides:
            self._slides.move_to_end(index)
            return self._slides[index]
        row = self.manifest.rows[index]
        slide = Slide(row.slide, base_spacing=row.base_spacing)
        self._slides[index] = slide
        if len(self._slides) > _OPEN_SLIDES:
            self._slides.popitem(last=False)[1].close()
        return slide

    def tissue_mask(self, index: int) -> TissueMask | None:
        """The tissue mask of sample ``index``: the manifest's ``tissue_mask`` file if it
        names one, else detected (and cached); None without tissue detection."""
        saved = self.manifest.rows[index].tissue_mask
        if saved is not None:
            key = str(saved)
            if key not in self._masks:
                self._masks[key] = TissueMask.load(saved)
            return self._masks[key]
        if self.tissue is None:
            return None
        slide = self.slide(index)
        stat = slide.path.stat()
        key = json.dumps(
            [str(slide.path), stat.st_size, stat.st_mtime_ns, slide.base_spacing, repr(self.tissue)], sort_keys=True
        )
        if key in self._masks:
            return self._masks[key]
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        cached = self.cache_dir / f"{slide.path.stem}-{digest}.tissue.npz" if self.cache_dir else None
        if cached is not None and cached.is_file():
            mask = TissueMask.load(cached)
        else:
            mask = self.tissue.detect(slide)
            if mask.empty:
                log.warning("no tissue found in %s (threshold %.1f): using the whole slide", slide.path, mask.threshold)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(f".{os.getpid()}.part")
                mask.save(partial)
                os.replace(partial, cached)
        self._masks[key] = mask
        return mask

    def layout(self, index: int) -> Layout:
        """Which slide rows and columns sample ``index``'s image shows, before augmentation."""
        slide = self.slide(index)
        size = slide.size(self.spacing)
        mask = self.tissue_mask(index)
        if mask is None or mask.empty:
            return Layout.full(size)
        return Layout.from_mask(mask, self.spacing, size, remove_empty=self.remove_empty)

    def source(self, index: int, epoch: int = 0) -> RegionSource:
        """Sample ``index``'s image in ``epoch`` as a lazy ``(1, 3, H, W)`` uint8 source."""
        slide = self.slide(index)
        layout = self.layout(index)
        view: RegionSource = SlideRegionSource(slide, self.spacing, layout)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        orientation, jitter = Orientation(), ColourJitter()
        if self.augmentation is not None:
            orientation, jitter = self.augmentation.sample(rng)
        if orientation != Orientation():
            view = OrientedSource(view, orientation)
        if self.input_size is not None:
            offset = self._offset(index, view.shape[2:], layout, orientation, rng)
            view = WindowSource(view, offset, self.input_size)
        if not jitter.identity:
            view = ColourSource(view, jitter)
        return view

    def item(self, index: int, epoch: int = 0) -> tuple[Any, ...]:
        """Sample ``index`` in ``epoch``, raising on a bad slide whatever ``on_error`` says:
        ``(image, target)``, or ``(image, target, SlideView)`` with ``with_slide``."""
        source = self.source(index, epoch)
        image = source if self.lazy else read_all(source)[0]
        row = self.manifest.rows[index]
        if not self.with_slide:
            return image, row.target
        layout = self.layout(index)
        shape = tuple(int(n) for n in source.shape[2:])
        offset = (0, 0)
        if self.input_size is not None:
            offset = tuple((n - s) // 2 for n, s in zip(layout.shape, self.input_size))  # the centre crop of _offset
        view = SlideView(
            str(row.slide), self.spacing, row.base_spacing, layout.rows, layout.cols, offset, shape, row.line
        )
        return image, row.target, view

    def _offset(
        self,
        index: int,
        shape: Sequence[int],
        layout: Layout,
        orientation: Orientation,
        rng: np.random.Generator,
    ) -> tuple[int, int]:
        assert self.input_size is not None
        size = self.input_size
        u = rng.uniform(size=4)  # always drawn: the stream of draws does not depend on the slide
        if not self.train:
            return (shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2
        point = self._tissue_point(index, layout, orientation, shape, u[2:]) if self.tissue_crop else None
        offset = []
        for axis in (0, 1):
            room = shape[axis] - size[axis]
            if room <= 0:  # pad: place the image at a random position in the window
                offset.append(-int(u[axis] * (-room + 1)))
            elif point is not None:  # a window holding the tissue point anywhere inside it
                offset.append(min(max(point[axis] - int(u[axis] * size[axis]), 0), room))
            else:
                offset.append(int(u[axis] * (room + 1)))
        return offset[0], offset[1]

    def _tissue_point(
        self, index: int, layout: Layout, orientation: Orientation, shape: Sequence[int], u: np.ndarray
    ) -> tuple[int, int] | None:
        mask = self.tissue_mask(index)
        if mask is None or mask.empty:
            return None
        pixels = torch.nonzero(mask.mask)
        r, c = pixels[min(int(u[0] * len(pixels)), len(pixels) - 1)].tolist()
        scale = mask.spacing / self.spacing
        point = layout.to_image(int((r + u[1]) * scale), int((c + u[1]) * scale))
        if point is None:
            return None
        h, w = (shape[1], shape[0]) if orientation.transpose else (shape[0], shape[1])  # before orientation
        row, col = point
        row, col = min(row, h - 1), min(col, w - 1)
        if orientation.transpose:
            row, col = col, row
        if orientation.flip_rows:
            row = shape[0] - 1 - row
        if orientation.flip_cols:
            col = shape[1] - 1 - col
        return row, col


def collate_slides(samples: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Batch ``(image, target)`` samples: images (uint8 tensors of one size) are stacked;
    lazy sources of one shape become one :class:`StackedSource`; class indices become a
    ``LongTensor``, tensor targets are stacked. Samples ``(image, target, SlideView)`` make
    a :class:`SlideBatch` (targets None when the manifest has none).

    Raises:
        ValueError: images of different sizes (set ``input_size``, or a batch size of 1).
    """
    if samples and len(samples[0]) == 3:
        images, targets = _collate_pairs([(s[0], s[1]) for s in samples])
        return SlideBatch(images, targets, [s[2] for s in samples])
    return _collate_pairs(samples)


def _collate_pairs(samples: Sequence[tuple[Any, ...]]) -> tuple[Any, Any]:
    images, targets = zip(*samples)
    if all(isinstance(i, Tensor) for i in images):
        if len({tuple(i.shape) for i in images}) > 1:
            raise ValueError(
                f"cannot batch images of different sizes {sorted({tuple(i.shape) for i in images})}: set input_size "
                "to crop/pad every image to one size, or use batch_size=1"
            )
        batch: Tensor | RegionSource = torch.stack(list(images))
    else:
        batch = images[0] if len(images) == 1 else StackedSource(list(images))  # type: ignore[arg-type]
    if all(t is None for t in targets):
        target: Any = None
    elif all(isinstance(t, int) for t in targets):
        target = torch.tensor(targets, dtype=torch.int64)
    else:
        target = torch.stack([torch.as_tensor(t) for t in targets])
    return batch, target
