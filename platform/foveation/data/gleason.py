"""The Gleason2019 challenge layout, read for the real data set and written for the synthetic one,
so one reader serves both:

    <root>/Train Imgs/slide001_core003.jpg
    <root>/Maps1_T/slide001_core003_classimg_nonconvex.png     (one folder per annotator, 1..6;
    ...                                                          a slide has 3 to 6 of them)
    <root>/Maps6_T/...
    <root>/Synthetic Truth/slide001_core003_truth.png          (synthetic sets only: true classes)
    <root>/Synthetic Cues/slide001_core003_cue.png             (synthetic sets only: cue map)
    <root>/patients.csv                                         (optional: slide_id,patient)

Annotator maps hold the challenge's raw values, mapped as the authors did: {0, 1, 2, 6} ->
benign (0), 3 -> grade 3 (1), 4 -> grade 4 (2), 5 -> grade 5 (3); any other value is an error
naming the file. ``root`` is a folder or an ``s3://`` prefix. ``patients.csv`` (a header
``slide_id,patient``, then one row per slide) groups cores of one patient: splits then keep each
patient's cores together (``assign_splits``); a slide it does not list is its own group.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from foveation import errors
from foveation.io import storage

IMAGE_DIR = "Train Imgs"
MAP_DIR = re.compile(r"^Maps(\d+)_T$")
MAP_SUFFIX = "_classimg_nonconvex.png"
TRUTH_DIR, TRUTH_SUFFIX = "Synthetic Truth", "_truth.png"
CUE_DIR, CUE_SUFFIX = "Synthetic Cues", "_cue.png"
PATIENTS_FILE = "patients.csv"
SLIDE_FILE = re.compile(r"^(slide\d+_core\d+)\.(jpg|jpeg|png|tif|tiff)$", re.IGNORECASE)

RAW_VALUES = {0: 0, 1: 0, 2: 0, 6: 0, 3: 1, 4: 2, 5: 3}
CLASS_TO_RAW = {0: 1, 1: 3, 2: 4, 3: 5}  # what the synthetic writer stores
_LUT = np.full(256, 255, np.uint8)
for _raw, _cls in RAW_VALUES.items():
    _LUT[_raw] = _cls


@dataclass(frozen=True)
class RawSlide:
    slide_id: str
    image_uri: str
    annotator_uris: tuple[str, ...]  # in annotator order (Maps1_T first)
    annotators: tuple[int, ...]  # which annotators (1..6)
    truth_uri: str | None = None
    cue_uri: str | None = None
    patient: str | None = None  # from patients.csv; None: the core is its own group
    label_kind: str = "gleason"
    """How the annotator files read: "gleason" (the challenge's raw values), "mask" (class
    ids, 255 unlabelled) or "qupath" (GeoJSON, ``data.annotations``)."""
    class_map: tuple[tuple[str, str], ...] = ()
    """The slide list's QuPath class names to the platform's, over ``data.ingest.class_map``."""
    mpp: float | None = None
    """µm per pixel given by the slide list, over what the slide's metadata says (None: the
    metadata's, ``io.slides.tiff_mpp``)."""


def map_labels(raw: np.ndarray, name: str) -> np.ndarray:
    """Raw Gleason2019 values -> class ids; unknown values are an error naming ``name``."""
    if raw.ndim != 2:
        raise errors.DataError(
            f"{name}: expected a single-channel label map, got shape {raw.shape}"
        )
    bad = sorted(set(np.unique(raw).tolist()) - set(RAW_VALUES))
    if bad:
        raise errors.DataError(
            f"{name}: unknown label values {bad[:10]}; expected Gleason2019 values {sorted(RAW_VALUES)}"
        )
    return _LUT[raw]


def central_crop(a: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size x size`` crop (the paper: 4400); smaller sides are kept whole."""
    if size is None:
        return a
    H, W = a.shape[:2]
    h, w = min(H, size), min(W, size)
    t, left = (H - h) // 2, (W - w) // 2
    return a[t : t + h, left : left + w]


def scan(root: str) -> list[RawSlide]:
    """Every slide under ``root`` with its annotators' maps, sorted by slide id."""
    try:
        files = storage.list_files(root)
    except storage.StorageError as exc:
        raise errors.DataError(f"{root!r}: cannot list the source ({exc})") from None
    base = root.rstrip("/")
    images: dict[str, str] = {}
    maps: dict[str, dict[int, str]] = {}
    extra: dict[str, dict[str, str]] = {}
    map_dirs: dict[int, int] = {}
    patients_uri = None
    for uri in files:
        rel = uri[len(base) :].lstrip("/")
        parts = rel.split("/")
        if parts == [PATIENTS_FILE]:
            patients_uri = uri
        if len(parts) != 2:
            continue
        folder, name = parts
        if folder == IMAGE_DIR:
            m = SLIDE_FILE.match(name)
            if m:
                images[m.group(1)] = uri
        elif (md := MAP_DIR.match(folder)) is not None:
            k = int(md.group(1))
            map_dirs.setdefault(k, 0)
            if name.endswith(MAP_SUFFIX):
                maps.setdefault(name[: -len(MAP_SUFFIX)], {})[k] = uri
                map_dirs[k] += 1
        elif folder == TRUTH_DIR and name.endswith(TRUTH_SUFFIX):
            extra.setdefault(name[: -len(TRUTH_SUFFIX)], {})["truth"] = uri
        elif folder == CUE_DIR and name.endswith(CUE_SUFFIX):
            extra.setdefault(name[: -len(CUE_SUFFIX)], {})["cue"] = uri
    if not images:
        raise errors.DataError(
            f"{root!r}: no slides found; expected the Gleason2019 layout "
            f"'{IMAGE_DIR}/slideNNN_coreNNN.jpg' with 'MapsK_T/slideNNN_coreNNN{MAP_SUFFIX}'"
        )
    for name in _top_level_dirs(root):  # an annotator folder with no files lists no files
        if (md := MAP_DIR.match(name)) is not None:
            map_dirs.setdefault(int(md.group(1)), 0)
    empty = sorted(k for k, n in map_dirs.items() if n == 0)
    if empty:
        names = ", ".join(posixpath.join(base, f"Maps{k}_T") for k in empty)
        raise errors.DataError(
            f"annotator folder(s) with no maps: {names}; expected files named slideNNN_coreNNN{MAP_SUFFIX}"
        )
    patients = read_patients(patients_uri, set(images)) if patients_uri else {}
    out = []
    for sid in sorted(images):
        ann = maps.get(sid, {})
        ks = tuple(sorted(ann))
        e = extra.get(sid, {})
        out.append(
            RawSlide(
                sid,
                images[sid],
                tuple(ann[k] for k in ks),
                ks,
                e.get("truth"),
                e.get("cue"),
                patients.get(sid),
            )
        )
    return out


def read_patients(uri: str, slide_ids: set[str]) -> dict[str, str]:
    """slide id -> patient from a ``slide_id,patient`` CSV; a malformed file or a row naming a
    slide the source does not hold is an error naming the file."""
    text = storage.read_bytes(uri).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"slide_id", "patient"} <= set(rows[0]):
        raise errors.DataError(
            f"{uri}: expected a CSV with a header 'slide_id,patient' and a row a slide"
        )
    out = {}
    for i, r in enumerate(rows, start=2):
        sid, patient = (r.get("slide_id") or "").strip(), (r.get("patient") or "").strip()
        if not sid or not patient:
            raise errors.DataError(f"{uri}, line {i}: empty slide_id or patient")
        if sid not in slide_ids:
            raise errors.DataError(f"{uri}, line {i}: slide {sid!r} is not in {IMAGE_DIR}/")
        if out.get(sid, patient) != patient:
            raise errors.DataError(f"{uri}, line {i}: slide {sid!r} is given two patients")
        out[sid] = patient
    return out


def _top_level_dirs(root: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError:
        return []
    return [
        posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory
    ]


def slide_id(index: int, cores_per_slide: int = 4) -> str:
    return f"slide{index // cores_per_slide + 1:03d}_core{index % cores_per_slide + 1:03d}"


def assign_splits(
    slide_ids: list[str],
    val_fraction: float,
    test_fraction: float,
    test_count: int | None,
    seed: int,
    groups: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """Seeded train / val / test split, independent of listing order. ``groups`` (slide id ->
    patient) keeps each group's slides in one split; a slide without one is its own group. The
    sizes are counted in slides: test, then val, take whole groups in a seeded order until they
    reach theirs (so they may exceed it by less than a group); without groups this is a seeded
    split of the slides themselves."""
    ids = sorted(slide_ids)
    groups = groups or {}
    key = {sid: ("patient", groups[sid]) if groups.get(sid) else ("slide", sid) for sid in ids}
    members: dict[tuple, list[str]] = {}
    for sid in ids:
        members.setdefault(key[sid], []).append(sid)
    keys = sorted(members)
    rng = np.random.default_rng(seed)
    n = len(ids)
    n_test = min(n, test_count) if test_count is not None else round(n * test_fraction)
    n_val = round(n * val_fraction)
    if n >= 3:  # keep every split non-empty when asked for and possible
        n_test = max(n_test, 1 if (test_count or test_fraction) else 0)
        n_val = max(n_val, 1 if val_fraction else 0)
    n_val = min(n_val, max(0, n - n_test - 1))
    split = {}
    taken = {"test": 0, "val": 0}
    for k in (keys[i] for i in rng.permutation(len(keys))):
        name = "test" if taken["test"] < n_test else "val" if taken["val"] < n_val else "train"
        if name != "train":
            taken[name] += len(members[k])
        for sid in members[k]:
            split[sid] = name
    return split
