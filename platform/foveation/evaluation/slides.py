"""Whole-slide evaluation: every run's checkpoint on every slide of a split, one Ray task per
(run, slide), through the tiled whole-image inference reading the slide out of core
(``SlideReader``) into a sink that scores rows against the label pyramid as they arrive. Only
confusion matrices, F's mean weights, the APSM (x_r-sized) and small thumbnails come back.

The average-expert row (the paper's last Table-1 row) scores each annotator's map against the
fused (STAPLE) label on the same slides.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from foveation.config import Config
from foveation.errors import DataError, FoveationError
from foveation.io import storage
from foveation.metrics import CUE_NAMES, ConfusionMatrix, apsm_cue_means, apsm_cue_sums

EXPERT_RUN = "average expert"


class EvaluationError(FoveationError, RuntimeError):
    """Slides that could not be evaluated (each named with its cause), after the others were."""


@dataclass
class SlideScore:
    run: str
    slide_id: str
    matrix: np.ndarray  # [K, K] int64, rows = label, cols = prediction
    weight_mean: list[float] = field(default_factory=list)
    apsm: np.ndarray | None = None
    mask_thumb: np.ndarray | None = None
    error: str | None = None


class ScoringSink:
    """A sink that scores each block of predicted rows against the same rows of the label
    level 0, and keeps a nearest-neighbour thumbnail of the mask (every ``stride``-th pixel)."""

    def __init__(self, label_reader, num_classes: int, ignore_index: int, thumb_px: int) -> None:
        self.label, self.thumb_px = label_reader, thumb_px
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.weights = self.apsm = self.thumb = None

    def begin(self, height: int, width: int, num_classes: int) -> None:
        self.stride = max(1, math.ceil(max(height, width) / self.thumb_px))
        self.width = width
        self.thumb_rows: list[np.ndarray] = []

    def write_weights(self, weights: torch.Tensor, apsm: torch.Tensor) -> None:
        self.weights = weights.float().cpu().numpy()
        self.apsm = apsm.float().cpu().numpy()

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        mask = probs.argmax(0).to(torch.uint8).cpu().numpy()
        n = mask.shape[0]
        label = self.label.read_level(0, top, 0, n, self.width, (255,))[..., 0]
        self.cm.update(mask, label)
        first = (-top) % self.stride
        self.thumb_rows.append(mask[first :: self.stride, :: self.stride])

    def close(self) -> None:
        self.thumb = np.concatenate(self.thumb_rows) if self.thumb_rows else None


@functools.lru_cache(maxsize=4)
def _model(uri: str):
    from foveation.checkpoint import load_checkpoint

    return load_checkpoint(uri)  # safetensors weights only; cached per worker process


def score_slide(run: str, checkpoint_uri: str, row: dict, thumb_px: int = 256) -> SlideScore:
    """One run on one slide (a Ray task body; also callable in-process)."""
    from foveation.inference import segment
    from foveation.io.slides import SlideReader

    torch.set_num_threads(1)  # several tasks share the cores
    model, cfg, _ = _model(checkpoint_uri)
    image = SlideReader(row["image_uri"])
    label = SlideReader(row["label_uri"], rgb=False)
    try:
        if (label.height, label.width) != (image.height, image.width):
            raise DataError(
                f"{row['label_uri']}: label map is {label.width} x {label.height}, the slide "
                f"{row['image_uri']} is {image.width} x {image.height}; expected the same size"
            )
        sink = ScoringSink(label, cfg.model.num_classes, cfg.evaluation.ignore_index, thumb_px)
        with torch.no_grad():
            segment(model, image.as_source(0), cfg, sink)
    finally:
        image.close()
        label.close()
    wmean = sink.weights.reshape(sink.weights.shape[0], -1).mean(1).tolist()
    return SlideScore(run, row["slide_id"], sink.cm.matrix, wmean, sink.apsm, sink.thumb)


def score_experts(row: dict, num_classes: int, ignore_index: int) -> list[SlideScore]:
    """Each annotator's map on one slide against the fused label: one score per annotator."""
    from foveation.io.images import decode_label
    from foveation.io.slides import SlideReader

    label = SlideReader(row["label_uri"], rgb=False)
    try:
        fused = label.read_level(0, 0, 0, label.height, label.width, (255,))[..., 0]
    finally:
        label.close()
    out = []
    for uri in row.get("annotator_uris") or []:
        m = decode_label(storage.read_bytes(uri), uri)
        cm = ConfusionMatrix(num_classes, ignore_index)
        if m.shape != fused.shape:
            raise DataError(f"{uri}: annotator map {m.shape} differs from the label {fused.shape}")
        cm.update(np.where(m < num_classes, m, ignore_index), fused)
        out.append(SlideScore(f"{EXPERT_RUN}:{uri.rsplit('_', 1)[-1]}", row["slide_id"], cm.matrix))
    return out


@dataclass
class EvaluationResult:
    cfg: Config  # the first run's config (class names, patch set)
    metrics: dict[str, dict]  # run -> ConfusionMatrix.summary (+ weight_mean)
    slides: dict[str, dict[str, SlideScore]]  # run -> slide id -> score
    rows: list[dict]  # the evaluated manifest rows
    failed: dict[str, str]


def thumbnail(row: dict, px: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) thumbnails sampled like ``ScoringSink``'s mask thumbnail."""
    from foveation.io.slides import SlideReader

    out = []
    for uri, rgb in ((row["image_uri"], True), (row["label_uri"], False)):
        r = SlideReader(uri, rgb=rgb)
        try:
            stride = max(1, math.ceil(max(r.height, r.width) / px))
            # The coarsest level not coarser than the stride (real pyramids have downsamples
            # like 4.0003), sampled at the level-0 pixels the mask thumbnail takes.
            k = r.level_for(stride, 1)
            lv = r.levels[k]
            a = r.read_level(k, 0, 0, lv.height, lv.width, (255,) * r.bands)
            ds = lv.downsample
            rows = np.minimum((np.arange(0, r.height, stride) / ds).astype(int), lv.height - 1)
            cols = np.minimum((np.arange(0, r.width, stride) / ds).astype(int), lv.width - 1)
            a = a[rows[:, None], cols[None, :]]
            out.append(a[..., :3] if rgb else a[..., 0])
        finally:
            r.close()
    return out[0], out[1]


def evaluate_runs(
    runs: dict[str, str],
    manifest: str,
    split: str = "test",
    experts: bool = True,
    task_cpus: float = 1.0,
    log: Callable[[str], None] = print,
) -> EvaluationResult:
    """Score every run (name -> checkpoint URI) on every slide of ``split`` as Ray tasks."""
    from foveation.checkpoint import load_checkpoint

    cfgs = {}
    for name, uri in runs.items():  # fail on a bad checkpoint before any task starts
        _, cfgs[name], _ = load_checkpoint(uri)
    rows = _split_rows(manifest, split)
    cfg = next(iter(cfgs.values()))
    log(f"evaluate: {len(runs)} run(s) x {len(rows)} {split} slides as Ray tasks")
    scores = _score_all(runs, rows, cfg, experts, task_cpus)
    metrics, slides = {}, {}
    for name in runs:
        mine = [s for s in scores if s.run == name]
        metrics[name] = _run_summary(mine, cfg, cfgs[name].model.mix.label)
        slides[name] = {s.slide_id: s for s in mine}
        record_run_metrics(name, metrics[name], len(mine))
    expert_scores = [s for s in scores if s.run.startswith(EXPERT_RUN)]
    if expert_scores:
        metrics[EXPERT_RUN] = _expert_summary(expert_scores, cfg)
    return EvaluationResult(cfg, metrics, slides, rows, {})


def _split_rows(manifest: str, split: str) -> list[dict]:
    """The manifest's rows of ``split``, their URIs absolute (the tasks run elsewhere)."""
    from foveation.data.manifest import read_manifest

    rows = [r for r in read_manifest(manifest).to_pylist() if r["split"] == split]
    if not rows:
        raise DataError(f"manifest {manifest!r}: no slides in split {split!r}")
    for r in rows:
        r["image_uri"], r["label_uri"] = (
            storage.absolute(r["image_uri"]),
            storage.absolute(r["label_uri"]),
        )
        r["annotator_uris"] = [storage.absolute(u) for u in r.get("annotator_uris") or []]
    return rows


def _score_all(
    runs: dict[str, str], rows: list[dict], cfg: Config, experts: bool, task_cpus: float
) -> list[SlideScore]:
    """Every (run, slide) and, with ``experts``, every annotated slide's annotators, as Ray
    tasks; any that fails fails the evaluation, naming every (run, slide) that did."""
    from foveation.raycluster import ray_map

    k, ignore = cfg.model.num_classes, cfg.evaluation.ignore_index
    items = [("run", name, uri, row) for name, uri in runs.items() for row in rows]
    if experts:
        items += [("experts", None, None, row) for row in rows if row.get("annotator_uris")]

    def work(item):
        kind, name, uri, row = item
        if kind == "run":
            return [score_slide(name, uri, row)]
        return score_experts(row, k, ignore)

    failed: dict[str, str] = {}

    def on_error(item, exc):
        failed[f"{item[1] or EXPERT_RUN} / {item[3]['slide_id']}"] = f"{type(exc).__name__}: {exc}"
        return []

    scores: list[SlideScore] = []
    for part in ray_map(work, items, num_cpus=task_cpus, desc="slides", on_error=on_error):
        scores.extend(part)
    if failed:
        raise EvaluationError(
            "evaluation failed on: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return scores


def _run_summary(scores: list[SlideScore], cfg: Config, mix: str) -> dict:
    """One run's scores over its slides (``ConfusionMatrix.summary``), with F's mean weights
    and the run's mix."""
    ev = cfg.evaluation
    cm = ConfusionMatrix(cfg.model.num_classes, ev.ignore_index)
    for s in scores:
        cm.matrix += s.matrix
    summary = cm.summary(ev.kept_classes, ev.class_names)
    summary["weight_mean"] = np.mean([s.weight_mean for s in scores], 0).tolist()
    summary["mix"] = mix
    return summary


def _expert_summary(scores: list[SlideScore], cfg: Config) -> dict:
    """The average-expert row: each annotator's pooled confusion against the fused label,
    averaged (``data.staple.average_expert``), with the mean per-class accuracy."""
    from foveation.data.staple import average_expert

    ev = cfg.evaluation
    per: dict[str, ConfusionMatrix] = {}
    for s in scores:
        cm = per.setdefault(s.run, ConfusionMatrix(cfg.model.num_classes, ev.ignore_index))
        cm.matrix += s.matrix
    summary = average_expert(per, ev.kept_classes, ev.class_names)
    summary["class_accuracy"] = {
        n: float(v)
        for n, v in zip(
            ev.class_names, np.mean([cm.class_accuracy() for cm in per.values()], 0), strict=True
        )
    }
    return summary


def record_run_metrics(run: str, summary: dict, slides: int) -> None:
    """An evaluated run's scores as gauges (``foveation_eval_*``, labelled by run name), for
    the evaluation dashboard's "per-class IoU over time"."""
    from foveation import monitoring

    for cls, iou in summary["iou"].items():
        monitoring.record("foveation_eval_iou", iou, run=run, **{"class": cls})
    monitoring.record("foveation_eval_miou", summary["miou"], run=run)
    monitoring.record("foveation_eval_pixel_accuracy", summary["pixel_accuracy"], run=run)
    monitoring.record("foveation_eval_slides_total", slides, run=run)


def apsm_by_cue(res: EvaluationResult, run: str) -> dict[str, float] | None:
    """Mean APSM (px) of ``run`` over the x_r cells whose centre the generator's cue map marks
    as context-decided, texture-decided or either (synthetic sets only; None without cue maps).
    Foveation should choose larger FoVs where context decides and smaller where texture does."""
    from foveation.io.images import decode_label

    s = res.cfg.patches.xr_scale
    sums = np.zeros(len(CUE_NAMES))
    counts = np.zeros(len(CUE_NAMES))
    for row in res.rows:
        score = res.slides.get(run, {}).get(row["slide_id"])
        if not row.get("cue_uri") or score is None or score.apsm is None:
            continue
        cue = decode_label(storage.read_bytes(storage.absolute(row["cue_uri"])), row["cue_uri"])
        s_, c_ = apsm_cue_sums(score.apsm, cue, s)
        sums += s_
        counts += c_
    if not counts.any():
        return None
    return apsm_cue_means(sums, counts)
