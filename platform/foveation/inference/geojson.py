"""Label map -> GeoJSON polygons in the form QuPath imports (File > Import objects): a
FeatureCollection of annotations, each feature's ``properties`` holding ``objectType:
"annotation"`` and ``classification: {name, color}``; coordinates are level-0 pixels (x to
the right, y down), as QuPath's image space.

Polygons are exact pixel boundaries: every boundary edge between a class pixel and another
pixel is directed with the class on its right, edges are chained into rings (at a vertex
where two pixels of the class touch only diagonally the ring turns right, so rings follow
4-connectivity, as libvips' ``labelregions`` that groups each component's outer ring with its
holes), and collinear vertices are dropped. Each ring's signed (shoelace) area is positive
for an outer ring and negative for a hole, so a class's polygon area equals its pixel count.

Such a ring may touch itself at a vertex (a component closing on itself through a diagonal
touch), which strict tools reject ("Ring Self-intersection"). So each class's rings become
shapely polygons that ``shapely.make_valid`` splits at those vertices (area unchanged), and the
pieces of one class, from every tile of a large map, are merged with ``shapely.union_all``:
one valid MultiPolygon per class whose area is still the pixel count (integer vertices, exact
arithmetic). ``simplify_px`` optionally simplifies (topology preserved) by a tolerance in label
pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import mapping

PALETTE = [(0, 170, 0), (255, 200, 0), (255, 100, 0), (220, 0, 0), (0, 120, 255), (160, 0, 200)]

# Directions: 0 east (+x), 1 south (+y), 2 west, 3 north; turning right is d + 1 (y down).
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


def class_rings(mask: np.ndarray) -> list[tuple[list[tuple[int, int]], tuple[int, int]]]:
    """Rings of the True pixels of ``mask`` [h, w]: (vertices [(x, y), ...] without the
    closing repeat, (row, col) of a pixel of the class on the ring's right)."""
    m = np.pad(mask.astype(bool), 1)
    w = mask.shape[1]
    edges = []  # (x0, y0, direction, pixel row, pixel col), all in unpadded coordinates
    # Horizontal boundaries at grid line y between padded rows y and y + 1.
    top = m[1:, 1:-1] & ~m[:-1, 1:-1]  # [h + 1, w]: pixel (y, x) in, the one above out
    ys, xs = np.nonzero(top)
    edges.append(np.stack([xs, ys, np.zeros_like(xs), ys, xs], 1))  # east along its top
    bottom = m[:-1, 1:-1] & ~m[1:, 1:-1]  # pixel (y - 1, x) in, (y, x) out
    ys, xs = np.nonzero(bottom)
    edges.append(np.stack([xs + 1, ys, np.full_like(xs, 2), ys - 1, xs], 1))  # west along bottom
    left = m[1:-1, 1:] & ~m[1:-1, :-1]  # [h, w + 1]: pixel (y, x) in, the one left out
    ys, xs = np.nonzero(left)
    edges.append(np.stack([xs, ys + 1, np.full_like(xs, 3), ys, xs], 1))  # north along left
    right = m[1:-1, :-1] & ~m[1:-1, 1:]  # pixel (y, x - 1) in, (y, x) out
    ys, xs = np.nonzero(right)
    edges.append(np.stack([xs, ys, np.ones_like(xs), ys, xs - 1], 1))  # south along right
    e = np.concatenate(edges).astype(np.int64)
    if len(e) == 0:
        return []
    stride = w + 2
    start = e[:, 1] * stride + e[:, 0]
    end = (e[:, 1] + _DY[e[:, 2]]) * stride + (e[:, 0] + _DX[e[:, 2]])
    # Outgoing edges per vertex: one, or two at a diagonal touch (keyed by direction).
    out: dict[int, int | dict[int, int]] = {}
    for i, v in enumerate(start.tolist()):
        prev = out.get(v)
        if prev is None:
            out[v] = i
        else:
            d = prev if isinstance(prev, dict) else {int(e[prev, 2]): prev}
            d[int(e[i, 2])] = i
            out[v] = d
    dirs = e[:, 2].tolist()
    ends = end.tolist()
    used = np.zeros(len(e), bool)
    rings = []
    for first in range(len(e)):
        if used[first]:
            continue
        verts = []
        i = first
        while True:
            used[i] = True
            nxt = out[ends[i]]
            j = nxt if isinstance(nxt, int) else nxt[(dirs[i] + 1) % 4]
            if dirs[j] != dirs[i]:
                verts.append(ends[i])
            if j == first:
                break
            i = j
        pts = [(v % stride, v // stride) for v in verts]
        rings.append((pts, (int(e[first, 3]), int(e[first, 4]))))
    return rings


def ring_area(pts: Sequence[tuple[int, int]]) -> float:
    """Signed shoelace area: > 0 for outer rings, < 0 for holes (this module's orientation)."""
    a = np.asarray(pts, dtype=np.float64)
    x, y = a[:, 0], a[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)


def polygons(labels: np.ndarray, cls: int, regions: np.ndarray | None = None):
    """Polygons (outer ring, holes...) of class ``cls`` in a label map: each 4-connected
    component's outer ring with its holes. ``regions``: the map's ``labelregions``."""
    mask = labels == cls
    if not mask.any():
        return []
    if regions is None:
        regions = region_ids(labels)
    shells: dict[int, list] = {}
    holes: dict[int, list] = {}
    for pts, (r, c) in class_rings(mask):
        comp = int(regions[r, c])
        (shells if ring_area(pts) > 0 else holes).setdefault(comp, []).append(pts)
    out = []
    for comp, outer in shells.items():
        for k, ring in enumerate(outer):  # one outer ring per component (4-connectivity)
            out.append([ring, *(holes.get(comp, []) if k == 0 else [])])
    return out


def region_ids(labels: np.ndarray) -> np.ndarray:
    """4-connected regions of equal value (libvips ``labelregions``)."""
    import pyvips

    im = pyvips.Image.new_from_array(np.ascontiguousarray(labels.astype(np.uint8)))
    return im.labelregions().numpy().reshape(labels.shape)


def class_geometry(
    labels: np.ndarray,
    cls: int,
    regions: np.ndarray | None = None,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
):
    """The pixels of class ``cls`` as one valid shapely geometry (empty when absent); pixel
    (row, col) maps to level-0 ``x = (col + offset_x) * scale``, given in label pixels."""
    dx, dy = offset[0] * scale, offset[1] * scale
    parts = [
        shapely.Polygon(*_scaled(poly, scale, dx, dy)) for poly in polygons(labels, cls, regions)
    ]
    if not parts:
        return shapely.Polygon()
    arr = np.array(parts, dtype=object)
    bad = ~shapely.is_valid(arr)
    if bad.any():
        arr[bad] = shapely.make_valid(arr[bad], method="structure", keep_collapsed=False)
    return shapely.union_all(arr)


def _scaled(poly, scale: float, dx: float, dy: float):
    shell, *holes = ([(x * scale + dx, y * scale + dy) for x, y in ring] for ring in poly)
    return shell, holes


def merge(pieces: Iterable) -> object:
    """One valid geometry from a class's pieces (e.g. one per tile): shared edges dissolve."""
    pieces = [p for p in pieces if not p.is_empty]
    return shapely.union_all(np.array(pieces, dtype=object)) if pieces else shapely.Polygon()


def as_multipolygon(geom) -> dict:
    """GeoJSON MultiPolygon of the polygonal parts of ``geom`` (collapsed lines dropped)."""
    polys = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and not p.is_empty]
    return mapping(shapely.MultiPolygon(polys))


def feature(geom, cls: int, name: str) -> dict:
    """One QuPath annotation feature of class ``cls`` named ``name``."""
    return {
        "type": "Feature",
        "geometry": as_multipolygon(geom),
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(PALETTE[cls % len(PALETTE)])},
            "isLocked": False,
        },
    }


def class_features(
    geoms: dict[int, object], class_names: Sequence[str], simplify_px: float = 0.0, scale=1.0
) -> list[dict]:
    """One feature per class with a non-empty geometry in ``geoms`` (class id -> geometry),
    simplified by ``simplify_px`` label pixels (``scale`` level-0 px each) when > 0."""
    feats = []
    for cls, name in enumerate(class_names):
        g = geoms.get(cls)
        if g is None or g.is_empty:
            continue
        if simplify_px > 0:
            g = shapely.make_valid(g.simplify(simplify_px * scale, preserve_topology=True))
        feats.append(feature(g, cls, name))
    return feats


def features(
    labels: np.ndarray,
    class_names: Sequence[str],
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    simplify_px: float = 0.0,
) -> list[dict]:
    """One valid MultiPolygon annotation per class present in ``labels`` (see
    ``class_geometry`` for the coordinates)."""
    regions = region_ids(labels)
    geoms = {
        cls: class_geometry(labels, cls, regions, scale, offset) for cls in range(len(class_names))
    }
    return class_features(geoms, class_names, simplify_px, scale)


def tiled_features(
    labels: np.ndarray,
    class_names: Sequence[str],
    tile: int = 1024,
    scale: float = 1.0,
    simplify_px: float = 0.0,
) -> list[dict]:
    """``features`` of a large label map traced ``tile`` px at a time (the tracer's edge lists
    stay small) and merged across tiles per class: one valid MultiPolygon per class."""
    pieces: dict[int, list] = {}
    for r0 in range(0, labels.shape[0], tile):
        for c0 in range(0, labels.shape[1], tile):
            part = labels[r0 : r0 + tile, c0 : c0 + tile]
            regions = region_ids(part)
            for cls in range(len(class_names)):
                geom = class_geometry(part, cls, regions, scale, (c0, r0))
                if not geom.is_empty:
                    pieces.setdefault(cls, []).append(geom)
    merged = {cls: merge(p) for cls, p in pieces.items()}
    return class_features(merged, class_names, simplify_px, scale)


def feature_collection(feats: Iterable[dict]) -> dict:
    return {"type": "FeatureCollection", "features": list(feats)}


def dumps(collection: dict) -> bytes:
    return json.dumps(collection, separators=(",", ":")).encode()
