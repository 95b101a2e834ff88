"""The store's manifest and its per-slide row files: what both ingest paths write (the cores
decoded whole in ``data.ingest``, the whole slides streamed in ``data.wsi``) and every reader
reads. One module, so neither ingest path imports the other for them.

    <dest>/rows/<id>.json     one row per finished slide, plus what a resumed run needs
                              (``source_key``, ``annotator_confusion``)
    <dest>/manifest.parquet   written last: the only entry point for readers

The schema (``MANIFEST_SCHEMA``) is docs/contracts.md#manifest.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from foveation.config import IngestConfig
from foveation.errors import DataError
from foveation.io import storage

SCHEMA_VERSION = 1
MANIFEST_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("slide_id", pa.string()),
        ("image_uri", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mpp", pa.float64()),
        ("level_downsamples", pa.list_(pa.float64())),
        ("label_uri", pa.string()),
        ("annotator_uris", pa.list_(pa.string())),
        ("truth_uri", pa.string()),
        ("cue_uri", pa.string()),
        ("split", pa.string()),
        ("class_fractions", pa.list_(pa.float64())),
        ("checksum", pa.string()),
        ("patient", pa.string()),  # the source's patient (patients.csv), or null
    ]
)
OPTIONAL_COLUMNS = {"patient"}  # added later: a manifest without it reads as all null


def manifest_row(
    *,
    slide_id: str,
    image_uri: str,
    width: int,
    height: int,
    mpp: float | None,
    level_downsamples: list[float],
    label_uri: str,
    annotator_uris: list[str],
    truth_uri: str | None,
    cue_uri: str | None,
    class_fractions: list[float],
    checksum: str,
) -> dict:
    """A freshly ingested slide's row, its columns in the schema's order (the row file's bytes
    depend on it); the split and the patient are filled in once every slide has landed."""
    return {
        "schema_version": SCHEMA_VERSION,
        "slide_id": slide_id,
        "image_uri": image_uri,
        "width": width,
        "height": height,
        "mpp": mpp,
        "level_downsamples": level_downsamples,
        "label_uri": label_uri,
        "annotator_uris": annotator_uris,
        "truth_uri": truth_uri,
        "cue_uri": cue_uri,
        "split": None,
        "class_fractions": class_fractions,
        "checksum": checksum,
    }


def manifest_columns(record: dict) -> dict:
    """The manifest's columns of a row file's record (without what only a resume needs)."""
    return {k: v for k, v in record.items() if k in MANIFEST_SCHEMA.names}


# -- row files: resume and skip ---------------------------------------------------------------


def row_uri(dest: str, slide_id: str) -> str:
    return storage.join(dest, "rows", f"{slide_id}.json")


def previous_row(dest: str, slide_id: str) -> dict | None:
    """The row file a previous run left for ``slide_id``; None when there is none or it cannot
    be read (the slide is then ingested again)."""
    uri = row_uri(dest, slide_id)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, storage.StorageError):
        return None


def write_row(dest: str, row: dict, source_key: str, annotator_confusion: dict) -> None:
    """A finished slide's row file: its row, and what a resumed run needs to skip it (the key)
    and to report it (each annotator's confusion against the fused map)."""
    record = row | {"source_key": source_key, "annotator_confusion": annotator_confusion}
    storage.write_bytes(row_uri(dest, row["slide_id"]), json.dumps(record).encode())


def source_key(
    image_checksum: str, map_bytes: list[bytes], cfg: IngestConfig, extra: tuple = ()
) -> str:
    """What decides a slide's outputs: its image, its annotators' maps, and the settings that
    shape the files (``extra``: what else reading the maps depends on). A change to any
    re-ingests the slide; anything else is "unchanged"."""
    h = hashlib.sha256(image_checksum.encode())
    if extra:
        h.update(repr(extra).encode())
    for b in map_bytes:
        h.update(hashlib.sha256(b).digest())
    shape = (
        cfg.crop_size,
        cfg.tile_size,
        cfg.sqrt2_levels,
        cfg.compression,
        cfg.quality,
        SCHEMA_VERSION,
    )
    h.update(repr(shape).encode())
    return h.hexdigest()


def is_current(prev: dict | None, key: str) -> bool:
    """Whether a previous run's row stands: made from the same source (``key``) and its files
    still there."""
    return bool(
        prev
        and prev.get("source_key") == key
        and storage.exists(prev["image_uri"])
        and storage.exists(prev["label_uri"])
    )


# -- the manifest -------------------------------------------------------------------------------


MANIFEST_FILE = "manifest.parquet"


def manifest_uri(dest_or_uri: str) -> str:
    """The manifest of the store ``dest_or_uri`` (or ``dest_or_uri`` itself, a ``.parquet``)."""
    if dest_or_uri.endswith(".parquet"):
        return dest_or_uri
    return storage.join(dest_or_uri, MANIFEST_FILE)


def write_manifest(dest: str, rows: list[dict]) -> str:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(dest, MANIFEST_FILE)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def read_manifest(dest_or_uri: str) -> pa.Table:
    uri = manifest_uri(dest_or_uri)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except storage.StorageError as exc:
        raise DataError(f"{uri}: no manifest ({exc}); run `python -m jobs.ingest` first") from None
    for name in OPTIONAL_COLUMNS - set(table.column_names):
        field = MANIFEST_SCHEMA.field(name)
        table = table.append_column(field, pa.nulls(len(table), field.type))
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DataError(
            f"{uri}: not a manifest of this platform (missing columns {sorted(missing)})"
        )
    return table
