"""Small slides that behave like a vendor's, for tests: an Aperio SVS (a tiled TIFF pyramid
whose first ImageDescription starts "Aperio", with MPP and AppMag as Aperio writes them;
OpenSlide reads it as format "aperio") and an OME-TIFF pyramid (OME-XML with PhysicalSizeX,
reduced levels in SubIFDs, as Bio-Formats' bfconvert and QuPath write it). Tiles are
deflate-compressed (tifffile writes JPEG only with imagecodecs; OpenSlide and libvips decode
other compressions through libtiff)."""

from __future__ import annotations

import numpy as np


def write_svs(path: str, image: np.ndarray, mpp: float = 0.499, levels: int = 3) -> None:
    import tifffile

    h, w = image.shape[:2]
    head = "Aperio Image Library v12.0.0 \r\n"
    with tifffile.TiffWriter(path) as tif:
        desc = f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) -|AppMag = 20|MPP = {mpp:.4f}"
        tif.write(
            image,
            tile=(256, 256),
            compression="zlib",
            photometric="rgb",
            description=desc,
            metadata=None,
        )
        for k in range(1, levels):
            lv = _block_mean(image, 2**k)
            tif.write(
                lv,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                description=f"{head}{w}x{h} -> {lv.shape[1]}x{lv.shape[0]}",
                metadata=None,
            )


def write_ome_tiff(path: str, image: np.ndarray, mpp: float = 0.25, levels: int = 3) -> None:
    import tifffile

    opts = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}
    per_cm = 1e4 / mpp
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    meta |= {"PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            image,
            subifds=levels - 1,
            resolution=(per_cm, per_cm),
            resolutionunit="CENTIMETER",
            metadata=meta,
            **opts,
        )
        for k in range(1, levels):
            tif.write(_block_mean(image, 2**k), subfiletype=1, **opts)


def _block_mean(image: np.ndarray, f: int) -> np.ndarray:
    """Each f x f block's mean (what a scanner's reduced levels hold), edge blocks dropped."""
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    blocks = image[:h, :w].reshape(h // f, f, w // f, f, -1).astype(np.float32)
    return np.ascontiguousarray(np.rint(blocks.mean((1, 3))).astype(np.uint8))
