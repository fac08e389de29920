"""High-scoring regions of a heatmap as GeoJSON polygons in the slide's level-0 pixel
coordinates, which QuPath (File > Import objects) and other slide viewers lay over the slide."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from .overlay import colorize, display_range
from .records import Heatmap

__all__ = ["heatmap_features", "mask_polygons"]

Point = tuple[int, int]


def _boundary_edges(mask: np.ndarray) -> list[tuple[Point, Point]]:
    """Unit edges between mask and non-mask pixels, directed with the mask on their right
    (in x-right, y-down pixel coordinates): outer boundaries run clockwise on screen."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    edges: list[tuple[Point, Point]] = []
    for (dy, dx), (a, b) in {
        (-1, 0): ((0, 0), (1, 0)),  # nothing above: the top edge, left to right
        (0, 1): ((1, 0), (1, 1)),  # nothing to the right: the right edge, downwards
        (1, 0): ((1, 1), (0, 1)),  # nothing below: the bottom edge, right to left
        (0, -1): ((0, 1), (0, 0)),  # nothing to the left: the left edge, upwards
    }.items():
        neighbour = padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
        rows, cols = np.nonzero(inner & ~neighbour)
        edges += [((c + a[0], r + a[1]), (c + b[0], r + b[1])) for r, c in zip(rows.tolist(), cols.tolist())]
    return edges


def _rings(mask: np.ndarray) -> list[list[Point]]:
    """Closed rings of the mask's boundary. Where two pixels touch only at a corner the ring
    turns right (keeps to its own pixel), so rings never cross."""
    outgoing: dict[Point, list[Point]] = defaultdict(list)
    for start, stop in _boundary_edges(mask):
        outgoing[start].append(stop)
    rings = []
    while outgoing:
        start = next(iter(outgoing))
        ring, point, direction = [start], start, None
        while True:
            choices = outgoing[point]
            if len(choices) > 1 and direction is not None:
                # Turn right relative to the way we came (mask on the right): (dx, dy) -> (-dy, dx).
                right = (point[0] - direction[1], point[1] + direction[0])
                following = right if right in choices else choices[0]
            else:
                following = choices[0]
            choices.remove(following)
            if not choices:
                del outgoing[point]
            direction = (following[0] - point[0], following[1] - point[1])
            point = following
            if point == start and (start not in outgoing or direction is not None and len(ring) > 2):
                break
            ring.append(point)
        rings.append(_simplify(ring))
    return rings


def _simplify(ring: list[Point]) -> list[Point]:
    """Drop the points in the middle of straight runs."""
    kept = []
    n = len(ring)
    for i, point in enumerate(ring):
        before, after = ring[i - 1], ring[(i + 1) % n]
        if (point[0] - before[0]) * (after[1] - point[1]) != (point[1] - before[1]) * (after[0] - point[0]):
            kept.append(point)
    return kept


def _area(ring: list[Point]) -> float:
    """Signed area (shoelace); positive for clockwise rings on screen (y down)."""
    x = np.array([p[0] for p in ring], dtype=np.float64)
    y = np.array([p[1] for p in ring], dtype=np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _inside(point: tuple[float, float], ring: list[Point]) -> bool:
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def mask_polygons(mask: np.ndarray) -> list[list[list[Point]]]:
    """The regions of a boolean mask as polygons, each ``[exterior, *holes]`` of closed
    rings of pixel-corner points ``(x, y)`` (the first point repeated at the end), pixel
    ``(r, c)`` being the square from ``(c, r)`` to ``(c + 1, r + 1)``."""
    rings = _rings(np.asarray(mask, dtype=bool))
    outer = [r for r in rings if _area(r) > 0]
    holes = [r for r in rings if _area(r) < 0]
    polygons: list[list[list[Point]]] = [[r] for r in outer]
    for hole in holes:
        probe = _probe(hole)
        owners = [p for p in polygons if _inside(probe, p[0])]
        if owners:  # the innermost exterior that contains it
            min(owners, key=lambda p: abs(_area(p[0]))).append(hole)
    return [[ring + ring[:1] for ring in polygon] for polygon in polygons]


def _probe(hole: list[Point]) -> tuple[float, float]:
    """A point just inside a hole ring's neighbouring mask pixel: the middle of its first
    edge, moved half a pixel to the edge's right (where the mask is)."""
    (x1, y1), (x2, y2) = hole[0], hole[1]
    dx, dy = np.sign(x2 - x1), np.sign(y2 - y1)
    return (x1 + x2) / 2 - 0.5 * dy, (y1 + y2) / 2 + 0.5 * dx


def heatmap_features(
    heatmap: Heatmap, threshold: float = 0.5, min_pixels: int = 4, analysed: np.ndarray | None = None
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the regions where the heatmap, as drawn in the overlay
    (between its median and 99th percentile), reaches ``threshold`` of the way up. Each
    feature is a QuPath annotation (``objectType``, ``classification`` named after the
    heatmap, ``measurements``: the region's mean and largest value and its area),
    coordinates in level-0 pixels of the slide.

    Args:
        heatmap: the heatmap.
        threshold: 0..1 of the drawn range.
        min_pixels: smaller regions (in heatmap pixels) are left out.
        analysed: the heatmap pixels that were computed (for the drawn range).
    """
    values, low, high = display_range(heatmap, analysed)
    level = np.clip((values - low) / (high - low), 0, 1)
    mask = level >= threshold
    if analysed is not None:
        mask &= analysed
    sy, sx = heatmap.to_level0
    colour = [int(v) for v in colorize(np.array([[0.85]]))[0, 0]]
    pixel_area = heatmap.spacing**2
    features = []
    for polygon in mask_polygons(mask):
        region = _fill(polygon, mask.shape)
        if region.sum() < min_pixels:
            continue
        coordinates = [[[round(x * sx, 2), round(y * sy, 2)] for x, y in ring] for ring in polygon]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": {
                "objectType": "annotation",
                "name": f"{heatmap.kind} >= {threshold:g} of range",
                "classification": {"name": f"{heatmap.kind} high", "color": colour},
                "isLocked": False,
                "measurements": {
                    f"{heatmap.kind} mean": float(heatmap.values[region].mean()),
                    f"{heatmap.kind} max": float(heatmap.values[region].max()),
                    "area um^2": float(region.sum() * pixel_area),
                },
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def _fill(polygon: list[list[Point]], shape: tuple[int, int]) -> np.ndarray:
    """The pixels a polygon covers: pixel centres with an odd number of its rings' vertical
    edges to their left (even-odd rule, so holes are left out)."""
    parity = np.zeros((shape[0], shape[1] + 1), dtype=np.int64)
    for ring in polygon:
        points = np.array(ring, dtype=np.int64)
        start, stop = points[:-1], points[1:]
        vertical = start[:, 0] == stop[:, 0]
        x = start[vertical, 0]
        low, high = np.minimum(start[vertical, 1], stop[vertical, 1]), np.maximum(start[vertical, 1], stop[vertical, 1])
        counts = high - low
        rows = np.repeat(low, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        np.add.at(parity, (rows, np.repeat(x, counts)), 1)
    return (np.cumsum(parity, axis=1)[:, :-1] % 2).astype(bool)
