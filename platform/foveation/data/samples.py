"""A manifest split decoded into memory as ``Sample``s, for the single-device trainer (the
science check, which tests the method, not Ray) on sets small enough to hold."""

from __future__ import annotations

from foveation import storage
from foveation.data.toy import Sample


def load_manifest_split(manifest: str, split: str) -> list[Sample]:
    from foveation.data.ingest import read_manifest
    from foveation.slides import SlideReader

    out = []
    for row in read_manifest(manifest).to_pylist():
        if row["split"] != split:
            continue
        image = SlideReader(storage.absolute(row["image_uri"]))
        label = SlideReader(storage.absolute(row["label_uri"]), rgb=False)
        try:
            img = image.read_level(0, 0, 0, image.height, image.width)[..., :3]
            lab = label.read_level(0, 0, 0, label.height, label.width, (255,))[..., 0]
        finally:
            image.close()
            label.close()
        out.append(Sample(row["slide_id"], split, img, lab))
    return out
