"""A toy image set whose class cue lives at one scale only (the learning test and the quick
demo use it; ``synthetic.py`` is the scale-dependent slide generator).

Each image is H&E-looking (pink stroma, purple nuclei, pale lumina) with a label map of
Voronoi regions. All classes share the same colours, nuclei and noise; a class shows only as a
fine texture of period 2 px (none / checkerboard / vertical / horizontal stripes) that averages
to exactly zero over every aligned 2x2 block. So the cue survives only in the smallest-FoV,
full-resolution patch: area downsampling by 2 or more erases it. A model that learns from it
must choose the smallest FoV, which is what the "learning" test checks of the foveation net.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from foveation.config import ToyConfig
from foveation.data.samples import Sample
from foveation.io import storage
from foveation.io.images import decode_image, decode_label, encode_png

STROMA = np.array([232.0, 170.0, 200.0])
NUCLEUS = np.array([120.0, 70.0, 160.0])
LUMEN = np.array([245.0, 240.0, 245.0])
TEXTURE_AMPLITUDE = 14.0
NOISE_SIGMA = 5.0


def _texture(cls: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if cls == 1:
        t = ((yy + xx) % 2) * 2 - 1
    elif cls == 2:
        t = (xx % 2) * 2 - 1
    elif cls == 3:
        t = (yy % 2) * 2 - 1
    else:
        t = np.zeros((h, w))
    return t.astype(np.float32)


def generate_image(
    size: int, region_size: int, seed: int, num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [size, size, 3], label uint8 [size, size]) pair, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    # Voronoi regions, one class each; every class appears in most images.
    n_regions = max(2, round((size / region_size) ** 2))
    pts = rng.uniform(0, size, size=(n_regions, 2))
    classes = rng.permutation(np.arange(n_regions) % num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    label = classes[d2.argmin(-1)].astype(np.uint8)

    # Tissue: stroma with smooth colour drift, nuclei and lumina placed the same way for all classes.
    img = np.broadcast_to(STROMA, (size, size, 3)).astype(np.float32).copy()
    drift = rng.normal(0, 1, (size // 32 + 2, size // 32 + 2, 3))
    drift = np.kron(drift, np.ones((32, 32, 1)))[:size, :size] * 6.0
    img += drift
    for colour, count, radius in (
        (NUCLEUS, size * size // 900, 3.5),
        (LUMEN, size * size // 12000, 9.0),
    ):
        cy, cx = rng.uniform(0, size, (2, count))
        r = rng.uniform(0.6, 1.4, count) * radius
        for y, x, rr in zip(cy, cx, r, strict=True):
            y0, y1 = int(max(0, y - rr - 1)), int(min(size, y + rr + 2))
            x0, x1 = int(max(0, x - rr - 1)), int(min(size, x + rr + 2))
            m = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= rr * rr
            img[y0:y1, x0:x1][m] = colour
    for c in range(1, num_classes):
        m = label == c
        img[m] += TEXTURE_AMPLITUDE * _texture(c, size, size)[m][:, None]
    img += rng.normal(0, NOISE_SIGMA, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


SPLITS = ("train", "val", "test")


def generate_set(root: str, cfg: ToyConfig, num_classes: int = 4) -> str:
    """Write the image set under ``root`` (PNG images and labels, ``index.json`` last, so a set
    with an index is complete). Returns the index URI. Deterministic in ``cfg.seed``."""
    entries = []
    counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    seed_base = cfg.seed * 100_003
    i = 0
    for split in SPLITS:
        for _ in range(counts[split]):
            sid = f"syn{i:04d}"
            image, label = generate_image(cfg.size, cfg.region_size, seed_base + i, num_classes)
            img_png, lab_png = encode_png(image), encode_png(label)
            storage.write_bytes(storage.join(root, split, f"{sid}.png"), img_png)
            storage.write_bytes(storage.join(root, split, f"{sid}_label.png"), lab_png)
            fractions = (
                np.bincount(label.reshape(-1), minlength=num_classes)[:num_classes] / label.size
            )
            entries.append(
                {
                    "slide_id": sid,
                    "split": split,
                    "image": f"{split}/{sid}.png",
                    "label": f"{split}/{sid}_label.png",
                    "width": cfg.size,
                    "height": cfg.size,
                    "class_fractions": [float(f) for f in fractions],
                    "checksum": hashlib.sha256(img_png).hexdigest(),
                }
            )
            i += 1
    index = {"generator": "foveation.data.toy", "config": cfg.__dict__, "samples": entries}
    uri = storage.join(root, "index.json")
    storage.write_bytes(uri, json.dumps(index, indent=1).encode())
    return uri


def ensure_set(root: str, cfg: ToyConfig, num_classes: int = 4) -> str:
    """Generate the set unless a complete one made with the same settings is already there."""
    uri = storage.join(root, "index.json")
    if storage.exists(uri):
        index = json.loads(storage.read_bytes(uri))
        if index.get("config") == cfg.__dict__:
            return uri
    return generate_set(root, cfg, num_classes)


def load_split(root: str, split: str) -> list[Sample]:
    """Decode every sample of one split into memory (small sets only; slides stream elsewhere)."""
    index = json.loads(storage.read_bytes(storage.join(root, "index.json")))
    out = []
    for e in index["samples"]:
        if e["split"] != split:
            continue
        image = decode_image(storage.read_bytes(storage.join(root, e["image"])), e["image"])
        label = decode_label(storage.read_bytes(storage.join(root, e["label"])), e["label"])
        out.append(Sample(e["slide_id"], split, image, label))
    return out
