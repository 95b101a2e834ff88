"""A list of slides as the source of ingest: a CSV or Parquet file (a path or an ``s3://``
URI) with one row per slide, for data that is not in the Gleason2019 layout.

    image_uri        required: the image (what ``io.images`` decodes: PNG, JPEG, TIFF)
    slide_id         optional: defaults to the image's file name without its extension
    annotation_uri   optional: QuPath GeoJSON (``.geojson``/``.json``: ``data.annotations``) or a
                     label mask of class ids (PNG/TIFF; 255 = unlabelled); several annotators'
                     files separated by ";" are fused by STAPLE
    patient          optional: keeps a patient's slides in one split (``assign_splits``)
    class_map        optional: a JSON object of QuPath class names to classes or "ignore",
                     over ``data.ingest.class_map`` (``{"Tumor": "grade3", "Other": "ignore"}``)
    mpp              optional: µm per pixel, for a slide whose metadata gives none (a plain
                     TIFF's resolution in inches, a PNG) or a wrong one; 0.05 to 50

Relative URIs are taken relative to the list's folder. Errors name the list, the line and
what was expected. Whole-slide images (SVS, NDPI, MRXS, pyramidal TIFF, OME-TIFF) are ingested
out of core (``data.wsi``); other images are decoded whole, as the Gleason2019 JPEGs are.
"""

from __future__ import annotations

import io
import posixpath
import re

from foveation.data.gleason import RawSlide
from foveation.errors import DataError
from foveation.io import storage

LIST_SUFFIXES = (".csv", ".parquet")
GEOJSON_SUFFIXES = (".geojson", ".json")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_slide_list(source: str) -> bool:
    return source.lower().endswith(LIST_SUFFIXES)


def _rows(uri: str) -> list[dict]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            opts = pacsv.ConvertOptions(strings_can_be_null=True, column_types=None)
            table = pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    except Exception as exc:  # pyarrow raises several kinds for a malformed file
        raise DataError(f"{uri}: cannot read the slide list ({exc})") from None
    if "image_uri" not in table.column_names:
        raise DataError(
            f"{uri}: the slide list has no 'image_uri' column (columns: {table.column_names}); "
            "expected image_uri[, slide_id, annotation_uri, patient, class_map, mpp]"
        )
    return table.to_pylist()


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(base, uri) if base else uri


def slide_id_of(uri: str) -> str:
    """A slide's id from its file name: the name without its extension (``.ome.tif`` and
    ``.ome.tiff`` count as one)."""
    name = posixpath.basename(uri.rstrip("/"))
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return posixpath.splitext(name)[0]


def _blank(value) -> bool:
    """An empty cell: missing, null, or only spaces."""
    return value is None or str(value).strip() == ""


def _class_map(value, where: str) -> tuple[tuple[str, str], ...]:
    """The list's ``class_map`` cell: empty, or a JSON object of names to names."""
    import json

    if _blank(value):
        return ()
    try:
        data = json.loads(str(value))
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise DataError(
            f"{where}: class_map {str(value)[:80]!r}: expected a JSON object of QuPath class "
            'names to classes or "ignore", e.g. {"Tumor": "grade3", "Other": "ignore"}'
        )
    return tuple(sorted(data.items()))


def _mpp(value, where: str) -> float | None:
    """The list's ``mpp`` cell: empty, or µm per pixel in the range a scanner gives."""
    from foveation.io.slides import MPP_RANGE, plausible_mpp

    if _blank(value):
        return None
    mpp = plausible_mpp(value)
    if mpp is None:
        raise DataError(
            f"{where}: mpp {value!r}: expected µm per pixel from {MPP_RANGE[0]} to {MPP_RANGE[1]}"
        )
    return mpp


def scan_list(uri: str) -> list[RawSlide]:
    """The slides of a list, sorted by slide id."""
    base = posixpath.dirname(uri)
    out: dict[str, RawSlide] = {}
    for line, r in enumerate(_rows(uri), start=2):
        where = f"{uri}, line {line}"
        image = str(r.get("image_uri") or "").strip()
        if not image:
            raise DataError(f"{where}: empty image_uri")
        sid = str(r.get("slide_id") or "").strip() or slide_id_of(image)
        if not _ID.match(sid):
            raise DataError(f"{where}: slide id {sid!r} must be letters, digits, '.', '_' or '-'")
        if sid in out:
            raise DataError(f"{where}: slide id {sid!r} is listed twice")
        anns = [a.strip() for a in str(r.get("annotation_uri") or "").split(";") if a.strip()]
        kinds = {"qupath" if a.lower().endswith(GEOJSON_SUFFIXES) else "mask" for a in anns}
        if len(kinds) > 1:
            raise DataError(f"{where}: annotators mix QuPath GeoJSON and masks; expected one kind")
        patient = r.get("patient")
        mpp = _mpp(r.get("mpp"), where)
        class_map = _class_map(r.get("class_map"), where)
        out[sid] = RawSlide(
            sid,
            _resolve(image, base),
            tuple(_resolve(a, base) for a in anns),
            tuple(range(1, len(anns) + 1)),
            patient=str(patient) if patient not in (None, "") else None,
            label_kind=kinds.pop() if kinds else "mask",
            mpp=mpp,
            class_map=class_map,
        )
    if not out:
        raise DataError(f"{uri}: the slide list has no rows")
    return [out[k] for k in sorted(out)]
