"""Tables and figures: the Table-1 analogue (per-class IoU, mIoU over all classes and over the
kept ones, pixel accuracy), APSM maps, and predictions beside the labels. Figures are PNG;
the report is Markdown; both go to storage through ``storage.write_bytes`` (atomic)."""

from __future__ import annotations

import io

import numpy as np

from foveation.config import Config
from foveation.io import storage

PALETTE = np.array(
    [[240, 240, 240], [80, 170, 80], [240, 180, 40], [200, 40, 40]] + [[40, 40, 40]] * 252,
    dtype=np.uint8,
)
PALETTE[255] = [0, 0, 0]


def metrics_table(rows: list[tuple[str, dict]], cfg: Config) -> str:
    """Markdown table, one row per run: IoU per class, mIoU (all), mIoU (kept), pixel accuracy."""
    names = cfg.evaluation.class_names
    kept = ", ".join(names[i] for i in cfg.evaluation.kept_classes)
    head = [
        "run",
        *[f"IoU {n}" for n in names],
        f"mIoU (all {len(names)})",
        f"mIoU ({kept})",
        "pixel acc",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        cells = [
            name,
            *[f"{m['iou'][n]:.3f}" for n in names],
            f"{m['miou']:.3f}",
            f"{m['miou_kept']:.3f}",
            f"{m['pixel_accuracy']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def apsm_figure(apsms: list[np.ndarray], titles: list[str], fovs: tuple[int, ...]) -> bytes:
    """APSM maps (expected FoV per location) side by side on one colour scale, small FoV bright
    as in the paper's Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(apsms), figsize=(3 * len(apsms) + 1, 3), squeeze=False)
    im = None
    for ax, a, t in zip(axes[0], apsms, titles, strict=True):
        im = ax.imshow(a, cmap="magma_r", vmin=min(fovs), vmax=max(fovs))
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), label="average patch size (px)")
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(
    out: str, title: str, table: str, figures: dict[str, bytes], notes: list[str]
) -> str:
    """Write figures and ``report.md`` under ``out``; returns the report's URI."""
    lines = [f"# {title}", "", table, ""]
    lines += [f"- {n}" for n in notes]
    lines.append("")
    for name, data in figures.items():
        storage.write_bytes(storage.join(out, name), data)
        lines += [f"![{name}]({name})", ""]
    uri = storage.join(out, "report.md")
    storage.write_bytes(uri, "\n".join(lines).encode())
    return uri


# -- the evaluation report (jobs.evaluate, jobs.reproduce) ----------------------------------

# The paper's Table 2 (single-class pixel accuracy, %, Gleason2019 test set): cited constants,
# not our measurements; shown beside ours for scale only.
PAPER_TABLE2 = {
    "paper: foveation (Jin et al. 2020)": (88.3, 83.8, 78.1),
    "paper: challenge overall top 1": (95.9, 2.24, 16.5),
    "paper: challenge overall top 2": (83.0, 52.7, 54.0),
    "paper: single-class best": (95.9, 70.7, 70.6),
}


def accuracy_table(rows: list[tuple[str, dict]], cfg: Config) -> str:
    """The paper's Table 2 form: per-class pixel accuracy (%) of the kept classes, our runs
    first, then the paper's leaderboard rows (marked as cited)."""
    names = [cfg.evaluation.class_names[i] for i in cfg.evaluation.kept_classes]
    head = ["run", *[f"acc {n} (%)" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        acc = m.get("class_accuracy", {})
        lines.append(
            "| "
            + " | ".join([name, *[f"{100 * acc.get(n, float('nan')):.1f}" for n in names]])
            + " |"
        )
    if len(names) == 3:
        for name, vals in PAPER_TABLE2.items():
            lines.append(
                "| " + " | ".join([f"*{name} (cited)*", *[f"{v:.1f}" for v in vals]]) + " |"
            )
    return "\n".join(lines)


def iou_bars(rows: list[tuple[str, dict]], class_names: tuple[str, ...]) -> bytes:
    """Per-class IoU bars, one group per class, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(class_names) + 3, 3.2))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(class_names))
    for i, (name, m) in enumerate(rows):
        ax.bar(x + i * width, [m["iou"][c] for c in class_names], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, class_names)
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    data = _png(fig)
    plt.close(fig)
    return data


def comparison_figure(
    image: np.ndarray, label: np.ndarray, masks: list[tuple[str, np.ndarray]]
) -> bytes:
    """Image | label | every run's prediction, titled (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", image), ("label", PALETTE[label])]
    panels += [(name, PALETTE[m]) for name, m in masks]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4), squeeze=False)
    for ax, (t, a) in zip(axes[0], panels, strict=True):
        ax.imshow(a, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    data = _png(fig)
    plt.close(fig)
    return data


def _load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def _crop_same(arrays: list[np.ndarray]) -> list[np.ndarray]:
    h = min(a.shape[0] for a in arrays)
    w = min(a.shape[1] for a in arrays)
    return [a[:h, :w] for a in arrays]


def evaluation_report(
    res,
    out: str,
    histories: dict[str, str] | None = None,
    extra: list[str] | None = None,
    notes: list[str] | None = None,
    title: str = "Evaluation",
    n_examples: int = 3,
) -> tuple[str, str]:
    """Write the report of a ``slide_eval.EvaluationResult`` under ``out``: the Table-1
    analogue (every run and the average expert), the Table-2 form, per-class IoU bars, APSM
    maps of every test slide and of one validation slide across epochs (from ``histories``:
    run -> directory of ``apsm_epoch_*.npy``) for the runs whose F chooses, and every run's
    prediction beside the label on a few slides. Returns (report URI, the Table-1 text).
    Whether F chooses in a run is the registry's word (``models.mixing.is_learned``)."""
    cfg = res.cfg
    rows = list(res.metrics.items())
    table = metrics_table(rows, cfg)
    figures: dict[str, bytes] = {"iou_per_class.png": iou_bars(rows, cfg.evaluation.class_names)}
    figures |= _apsm_figures(res, histories or {})
    cue_lines = _apsm_by_cue_section(res)
    figures |= _prediction_figures(res, n_examples)
    body = [
        "## Table 1 analogue: IoU per class, mIoU",
        "",
        table,
        "",
        "## Table 2 form: per-class pixel accuracy",
        "",
        accuracy_table(rows, cfg),
        "",
        *(extra or []),
        *cue_lines,
    ]
    uri = write_report(out, title, "\n".join(body), figures, notes or [])
    return uri, table


def _apsm_figures(res, histories: dict[str, str]) -> dict[str, bytes]:
    """For every run whose F chooses: its APSM maps of the test slides, and of one validation
    slide at five epochs across training when ``histories`` has the run's directory."""
    from foveation.models.mixing import is_learned

    fovs = res.cfg.patches.fovs
    figures: dict[str, bytes] = {}
    for run, m in res.metrics.items():
        if not is_learned(m.get("mix")):
            continue
        scores = list(res.slides[run].values())
        figures[f"apsm_test_{run}.png"] = apsm_figure(
            [s.apsm for s in scores], [s.slide_id for s in scores], fovs
        )
        hist = histories.get(run)
        files = sorted(u for u in _list(hist) if u.endswith(".npy")) if hist else []
        if files:
            picks = sorted({round(i * (len(files) - 1) / 4) for i in range(5)})
            figures[f"apsm_epochs_{run}.png"] = apsm_figure(
                [_load_npy(files[i]) for i in picks],
                [f"epoch {int(files[i].rsplit('_', 1)[1][:3])}" for i in picks],
                fovs,
            )
    return figures


def _apsm_by_cue_section(res) -> list[str]:
    """The report's lines on where foveation looks (mean APSM by the generator's cue, synthetic
    sets only; none without cue maps); each run's figures also go into its metrics
    (``apsm_by_cue``)."""
    from foveation.evaluation.slides import apsm_by_cue
    from foveation.metrics import CUE_NAMES
    from foveation.models.mixing import is_learned

    cue_lines = []
    for run, m in res.metrics.items():
        by_cue = apsm_by_cue(res, run) if is_learned(m.get("mix")) else None
        if by_cue:
            m["apsm_by_cue"] = by_cue
            cells = " | ".join(f"{by_cue.get(n, float('nan')):.1f}" for n in CUE_NAMES)
            cue_lines.append(f"| {run} | {cells} |")
    if not cue_lines:
        return []
    return [
        "## Where foveation looks: mean APSM (px) by the generator's cue",
        "",
        "| run | " + " | ".join(CUE_NAMES) + " |",
        "|---|" + "---|" * len(CUE_NAMES),
        *cue_lines,
        "",
        "Context-decided tissue should get larger FoVs than texture-decided tissue (in the "
        "blind regime the cue follows the class: benign and grade 3 context, grade 4 "
        "texture; in the informative regime it is drawn per region, whatever the class).",
        "",
    ]


def _prediction_figures(res, n_examples: int) -> dict[str, bytes]:
    """Image | label | every run's prediction on the first ``n_examples`` slides."""
    from foveation.evaluation.slides import thumbnail

    figures: dict[str, bytes] = {}
    runs = [r for r in res.slides]
    for row in res.rows[:n_examples]:
        sid = row["slide_id"]
        image, label = thumbnail(row)
        masks = [res.slides[r][sid].mask_thumb for r in runs if sid in res.slides[r]]
        cropped = _crop_same([image, label, *masks])
        figures[f"predictions_{sid}.png"] = comparison_figure(
            cropped[0], cropped[1], list(zip(runs, cropped[2:], strict=True))
        )
    return figures


def _list(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except storage.StorageError:
        return []
