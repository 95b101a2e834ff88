"""Tables and figures: the Table-1 analogue (per-class IoU, mIoU over all classes and over the
kept ones, pixel accuracy), APSM maps, and predictions beside the labels. Figures are PNG;
the report is Markdown; both go to storage through ``storage.write_bytes`` (atomic)."""

from __future__ import annotations

import io

import numpy as np

from foveation import storage
from foveation.config import Config

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


def prediction_figure(image: np.ndarray, label: np.ndarray, mask: np.ndarray) -> bytes:
    """Image | label | prediction, as one PNG (the paper's Fig. 5 form)."""
    from foveation.images import encode_png

    h = image.shape[0]
    gap = np.full((h, 4, 3), 255, np.uint8)
    return encode_png(np.concatenate([image, gap, PALETTE[label], gap, PALETTE[mask]], axis=1))


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
