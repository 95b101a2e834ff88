"""Annotations drawn in QuPath (File > Export objects as GeoJSON), rasterised to label maps.

The file is a FeatureCollection (or a bare list of features, as QuPath also writes) of Polygon
or MultiPolygon features in level-0 pixel coordinates (x right, y down), each with
``properties.classification.name``. Holes are kept. Class names map to class ids through the
platform's one class table, ``evaluation.class_names`` (name i is class i), which also names the
classes of the GeoJSON that serving exports, so a file exported by the platform reads back as
the same label map. A name the table does not hold is an error naming the name and the file.

Rasterisation is ``rasterio.features.rasterize`` (a pixel takes a polygon's class when its
centre is inside), tile by tile: each tile burns only the polygons an STR-tree says meet it,
so the work and the memory of one call stay bounded by the tile, whatever the slide's size.
Where polygons overlap, the later feature in the file wins (QuPath's drawing order). Pixels no
polygon covers are ``unannotated``: the ignore index 255 (the loss and the metrics skip them)
or a named class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from foveation.errors import DataError
from foveation.geometry import IGNORE_INDEX


@dataclass(frozen=True)
class Annotation:
    geometry: object  # a valid shapely Polygon or MultiPolygon, level-0 px
    class_id: int


def class_ids(
    class_names: Sequence[str], class_map: dict[str, str] | None, uri: str
) -> dict[str, int]:
    """A file's class name -> class id: the table's names, and each ``class_map`` entry to
    its class (or 255 for "ignore"). A map to a class the table lacks names the entry."""
    ids = {name: i for i, name in enumerate(class_names)}
    out = dict(ids)
    for name, target in (class_map or {}).items():
        if target == "ignore":
            out[name] = IGNORE_INDEX
        elif target in ids:
            out[name] = ids[target]
        else:
            raise DataError(
                f"{uri}: class_map maps {name!r} to {target!r}, which is neither 'ignore' nor a "
                f"class of {list(class_names)} (evaluation.class_names)"
            )
    return out


def parse_qupath(
    data: bytes, uri: str, class_names: Sequence[str], class_map: dict[str, str] | None = None
) -> list[Annotation]:
    """The annotations of a QuPath GeoJSON file, in file order; ``class_map`` sends the
    file's class names to the table's (``class_ids``). Errors name ``uri``, the feature and
    what was expected; names that map to no class are listed all at once, with the names the
    file holds and the classes there are."""
    import shapely
    from shapely.geometry import shape

    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{uri}: not JSON ({exc}); expected QuPath's GeoJSON export") from None
    feats = doc.get("features") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    if not isinstance(feats, list):
        raise DataError(f"{uri}: expected a GeoJSON FeatureCollection or a list of features")
    ids = class_ids(class_names, class_map, uri)
    _check_names(feats, ids, uri, class_names)
    out = []
    for i, f in enumerate(feats):
        where = f"{uri}: feature {i}"
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise DataError(f"{where}: expected a Feature with a geometry")
        g = f["geometry"]
        if g.get("type") not in ("Polygon", "MultiPolygon"):
            raise DataError(
                f"{where}: geometry {g.get('type')!r}; expected Polygon or MultiPolygon"
            )
        cls = ((f.get("properties") or {}).get("classification") or {}).get("name")
        if not cls:
            raise DataError(f"{where}: no properties.classification.name")
        try:
            geom = shape(g)
        except (ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{where}: bad coordinates ({exc})") from None
        if not geom.is_valid:  # self-touching rings and the like: repaired, area kept
            geom = shapely.make_valid(geom)
        if not geom.is_empty:
            out.append(Annotation(geom, ids[cls]))
    return out


def _check_names(feats: list, ids: dict[str, int], uri: str, class_names: Sequence[str]) -> None:
    found = {
        ((f.get("properties") or {}).get("classification") or {}).get("name")
        for f in feats
        if isinstance(f, dict)
    } - {None, ""}
    unknown = sorted(n for n in found if n not in ids)
    if unknown:
        raise DataError(
            f"{uri}: classes {unknown} are not in the class table {list(class_names)} "
            f"(evaluation.class_names); the file names {sorted(found)}. Map them with "
            'data.ingest.class_map or the slide list\'s class_map column, e.g. {"Tumor": '
            '"grade3", "Other": "ignore"}'
        )


def unannotated_value(unannotated: str, class_names: Sequence[str]) -> int:
    """The label of pixels no annotation covers: 255 for "ignore", else the named class."""
    if unannotated == "ignore":
        return IGNORE_INDEX
    if unannotated not in class_names:
        raise DataError(
            f"data.ingest.unannotated: {unannotated!r} is neither 'ignore' nor a class of "
            f"{list(class_names)}"
        )
    return list(class_names).index(unannotated)


def rasterize(
    annotations: Sequence[Annotation],
    height: int,
    width: int,
    downsample: float = 1.0,
    fill: int = IGNORE_INDEX,
    tile: int = 2048,
    out: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """The label map [ceil(height / downsample), ceil(width / downsample)] (uint8) of
    ``annotations`` at ``downsample`` level-0 px a pixel, burnt tile by tile (into ``out``
    when given). ``origin`` (top, left, in output pixels) rasterises a window of a larger map:
    a whole slide's labels are made band by band and never need to fit in memory."""
    from rasterio.features import rasterize as burn
    from rasterio.transform import Affine
    from shapely import STRtree, box

    h, w = int(np.ceil(height / downsample)), int(np.ceil(width / downsample))
    if out is None:
        out = np.empty((h, w), np.uint8)
    elif out.shape != (h, w):
        raise ValueError(f"rasterize: out is {out.shape}, expected {(h, w)}")
    for top in range(0, h, tile):  # filled by tiles too: a memory map stays paged out
        out[top : top + tile] = fill
    if not annotations:
        return out
    tree = STRtree([a.geometry for a in annotations])
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            th, tw = min(tile, h - top), min(tile, w - left)
            x0, y0 = (origin[1] + left) * downsample, (origin[0] + top) * downsample
            hits = tree.query(box(x0, y0, x0 + tw * downsample, y0 + th * downsample))
            if len(hits) == 0:
                continue
            shapes = [(annotations[k].geometry, annotations[k].class_id) for k in sorted(hits)]
            out[top : top + th, left : left + tw] = burn(
                shapes,
                out_shape=(th, tw),
                transform=Affine(downsample, 0, x0, 0, downsample, y0),
                fill=fill,
                dtype="uint8",
            )
    return out
