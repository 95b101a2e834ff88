"""What a sweep leaves behind: the results table (one row per trial: its point, status and
validation scores), the best config as TOML for ``jobs.train``, and the trade-off figure of the
single-patch trials (the paper's Fig. 2a, from the sweep's own results)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from foveation.config import Config
from foveation.io import storage
from foveation.tuning import space

TABLE = "results.parquet"
TABLE_CSV = "results.csv"
BEST_CONFIG = "best.toml"
TRADEOFF_PNG = "tradeoff.png"
TRADEOFF_CSV = "tradeoff.csv"

FINISHED, STOPPED, ERROR, UNFINISHED = "finished", "stopped_early", "error", "unfinished"


@dataclass
class SweepResult:
    """What a sweep left behind (:func:`write_outputs`; ``tuning.sweep.run_sweep`` returns it)."""

    rows: list[dict]  # one per trial, as in the results table
    best: dict  # the best trial's row
    table_uri: str
    best_config_uri: str
    tradeoff_uri: str | None
    interrupted: bool  # some trials did not finish: run again with --resume


def _num(v: Any) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def trial_row(
    trial_id: str,
    point: dict,
    reports: list[dict],
    max_epochs: int,
    terminated: bool | None,
    error: str | None,
) -> dict[str, Any]:
    """One row of the table from a trial's point and its epoch reports (in order). ``val_miou``
    and the per-class IoUs are those of the trial's best epoch; ``terminated`` is Tune's word
    (None when unknown: then a trial short of ``max_epochs`` counts as stopped early)."""
    reports = [r for r in reports if _num(r.get("val_miou")) >= 0]  # epoch-end reports only
    last_epoch = int(max((_num(r.get("epoch")) for r in reports), default=0))
    if error:
        status = ERROR
    elif last_epoch >= max_epochs:
        status = FINISHED
    elif terminated is False:
        status = UNFINISHED
    else:
        status = STOPPED if reports else UNFINISHED
    single = space.single_patch(point)
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "label": space.label(point),
        "status": status,
        "depth": len(point["fovs"]),
        "fovs": ",".join(str(f) for f in point["fovs"]),
        "patch_size": int(point["patch_size"]),
        "xr_scale": int(point["xr_scale"]),
        "mix": point["mix"],
        "lr": point.get("lr"),
        "seed": int(point["seed"]),
        "single_fov": single[0] if single else None,
        "downsample": single[1] if single else None,
        "pixels_per_location": space.pixels_per_location(point),
        "epochs": last_epoch,
        "val_miou": math.nan,
        "best_epoch": None,
        "val_miou_last": math.nan,
        "peak_memory_mb": max((_num(r.get("peak_memory_mb")) for r in reports), default=math.nan),
        "seconds": float(sum(_num(r.get("seconds")) for r in reports)) if reports else 0.0,
        "error": error,
    }
    if reports:
        best = max(reports, key=lambda r: (_num(r["val_miou"]), -_num(r.get("epoch"))))
        row["val_miou"] = _num(best["val_miou"])
        row["best_epoch"] = int(_num(best.get("epoch")))
        row["val_miou_last"] = _num(reports[-1]["val_miou"])
        for key in sorted(best):
            if key.startswith("val_iou_") or key in ("val_miou_kept", "val_pixel_accuracy"):
                row[key] = _num(best[key])
    return row


def rows_of(grid, max_epochs: int) -> list[dict[str, Any]]:
    """The table's rows from Tune's ``ResultGrid``: one per trial, pending ones included (an
    interrupted sweep has trials that never reported: their results have no config)."""
    trials = grid._experiment_analysis.trials  # Tune's trials, in the grid's order
    rows = []
    for trial, res in zip(trials, grid, strict=True):
        df = res.metrics_dataframe
        reports = df.to_dict("records") if df is not None and len(df) else []
        terminated = trial.status in ("TERMINATED", "ERROR")
        error = None if res.error is None else str(res.error).strip().splitlines()[-1][:500]
        point = trial.config["point"]
        rows.append(trial_row(trial.trial_id, point, reports, max_epochs, terminated, error))
    return sorted(rows, key=lambda r: r["label"])


def best_row(rows: list[dict]) -> dict | None:
    """The trial with the highest val mIoU (ties: fewer pixels per location, then label)."""
    scored = [r for r in rows if not math.isnan(r["val_miou"])]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["val_miou"], -r["pixels_per_location"], r["label"]))


def table_bytes(rows: list[dict]) -> tuple[bytes, bytes]:
    """(Parquet, CSV) of the rows; columns missing from some rows are null there."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    pq_buf, csv_buf = io.BytesIO(), io.BytesIO()
    pq.write_table(table, pq_buf)
    pacsv.write_csv(table, csv_buf)
    return pq_buf.getvalue(), csv_buf.getvalue()


def point_of(row: dict) -> dict:
    """The point of the space a row was trained at (the inverse of :func:`trial_row`)."""
    lr = row.get("lr")
    return {
        "fovs": [int(f) for f in str(row["fovs"]).split(",")],
        "patch_size": int(row["patch_size"]),
        "xr_scale": int(row["xr_scale"]),
        "mix": row["mix"],
        "lr": None if lr is None or (isinstance(lr, float) and math.isnan(lr)) else float(lr),
        "seed": int(row["seed"]),
    }


def best_config_toml(base: Config, best: dict) -> str:
    """The best trial's config for ``jobs.train``: the full epoch budget, no tune section."""
    import tomli_w

    cfg = space.best_config(base, point_of(best))
    head = (
        f"# The best trial of sweep {base.name!r}: {best['label']} (trial {best['trial_id']}),\n"
        f"# val mIoU {best['val_miou']:.4f} at epoch {best['best_epoch']} of a short budget.\n"
        "# Train it in full with: python -m jobs.train --config <this file>\n"
    )
    return head + tomli_w.dumps({k: v for k, v in cfg.to_dict().items() if k != "tune"})


def tradeoff(rows: list[dict], class_names: tuple[str, ...]) -> list[dict]:
    """The trade-off table: per single-patch configuration (FoV, output size), the best trial's
    per-class IoU and mIoU, ordered from the finest resolution to the coarsest, then by FoV."""
    groups: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r["single_fov"] is None or math.isnan(r["val_miou"]):
            continue
        key = (int(r["single_fov"]), r["patch_size"])
        if key not in groups or r["val_miou"] > groups[key]["val_miou"]:
            groups[key] = r
    out = []
    for (fov, p), r in sorted(groups.items(), key=lambda kv: (kv[1]["downsample"], kv[0][0])):
        entry = {
            "fov": fov,
            "patch_size": p,
            "downsample": r["downsample"],
            "pixels_per_location": r["pixels_per_location"],
            "peak_memory_mb": r["peak_memory_mb"],
            "trial_id": r["trial_id"],
            "val_miou": r["val_miou"],
        }
        for name in class_names:
            entry[f"iou_{name}"] = r.get(f"val_iou_{name}", math.nan)
        out.append(entry)
    return out


def tradeoff_figure(points: list[dict], class_names: tuple[str, ...], title: str) -> bytes:
    """Per-class IoU and mIoU across the single-patch configurations; the best configuration of
    each class (a star) and of the mean (a ring) marked: the paper's Fig. 2a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(points))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(points) + 2), 4.2))
    colours = plt.get_cmap("tab10")
    for c, name in enumerate(class_names):
        y = np.array([p[f"iou_{name}"] for p in points], dtype=float)
        ax.plot(x, y, "o-", color=colours(c), label=name, lw=1.5)
        if np.isfinite(y).any():
            b = int(np.nanargmax(y))
            ax.plot(x[b], y[b], "*", color=colours(c), ms=16, mec="black", mew=0.8)
    m = np.array([p["val_miou"] for p in points], dtype=float)
    ax.plot(x, m, "s-", color="black", lw=2.5, label="mIoU")
    b = int(np.nanargmax(m))
    ax.plot(x[b], m[b], "o", ms=20, mfc="none", mec="red", mew=2.5, label="best mean")
    ax.set_xticks(
        x,
        [f"FoV {p['fov']}\n{p['patch_size']} px\n1/{p['downsample']:g} res" for p in points],
        fontsize=8,
    )
    ax.set_ylabel("validation IoU")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def tradeoff_text(points: list[dict], class_names: tuple[str, ...]) -> str:
    head = f"{'FoV':>6} {'P':>5} {'res':>6} " + " ".join(f"{n:>8}" for n in class_names)
    lines = [head + f" {'mIoU':>7} {'peak MB':>8}"]
    for p in points:
        ious = " ".join(f"{p[f'iou_{n}']:8.3f}" for n in class_names)
        lines.append(
            f"{p['fov']:>6} {p['patch_size']:>5} {'1/' + format(p['downsample'], 'g'):>6} "
            f"{ious} {p['val_miou']:7.3f} {p['peak_memory_mb']:8.0f}"
        )
    best = {
        n: points[int(np.nanargmax([p[f"iou_{n}"] for p in points]))]["fov"] for n in class_names
    }
    lines.append("best FoV per class: " + ", ".join(f"{n} {f}" for n, f in best.items()))
    return "\n".join(lines)


def summary_text(rows: list[dict]) -> str:
    lines = [f"{'trial':<12} {'status':<14} {'epochs':>6} {'val mIoU':>9} {'peak MB':>8}  point"]
    for r in sorted(rows, key=lambda r: -(r["val_miou"] if not math.isnan(r["val_miou"]) else -1)):
        lines.append(
            f"{r['trial_id']:<12} {r['status']:<14} {r['epochs']:>6} {r['val_miou']:>9.4f} "
            f"{r['peak_memory_mb']:>8.0f}  {r['label']}"
        )
    return "\n".join(lines)


def write_outputs(
    cfg: Config,
    out: str,
    rows: list[dict],
    interrupted: bool,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Write the table, the best config and the trade-off figure into ``out``."""
    pq_bytes, csv_bytes = table_bytes(rows)
    table_uri = storage.join(out, TABLE)
    storage.write_bytes(table_uri, pq_bytes)
    storage.write_bytes(storage.join(out, TABLE_CSV), csv_bytes)
    log(summary_text(rows))
    log(f"results table: {table_uri} (and {TABLE_CSV})")
    best = best_row(rows)
    best_uri = ""
    if best is not None and not interrupted:
        best_uri = storage.join(out, BEST_CONFIG)
        storage.write_bytes(best_uri, best_config_toml(cfg, best).encode())
        log(f"best: {best['label']} val mIoU {best['val_miou']:.4f} -> {best_uri}")
    names = cfg.evaluation.class_names
    trade = tradeoff(rows, names)
    trade_uri = None
    if len(trade) >= 2:
        trade_uri = storage.join(out, TRADEOFF_PNG)
        title = f"FoV / resolution trade-off, sweep {cfg.name!r} ({cfg.tune.preset}), validation"
        storage.write_bytes(trade_uri, tradeoff_figure(trade, names, title))
        storage.write_bytes(storage.join(out, TRADEOFF_CSV), table_bytes(trade)[1])
        log(tradeoff_text(trade, names))
        log(f"trade-off figure: {trade_uri}")
    return SweepResult(rows, best or {}, table_uri, best_uri, trade_uri, interrupted)
