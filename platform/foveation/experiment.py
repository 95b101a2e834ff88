"""The embedded-default experiment on one device: make the image set if missing, train the
foveated segmenter, evaluate on the test split, write a checkpoint, the report and figures.
``jobs.train`` calls this (the Ray issue replaces the training part with Ray Train)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from foveation import storage
from foveation.checkpoint import save_checkpoint
from foveation.config import Config
from foveation.data.toy import ensure_set, load_split
from foveation.evaluation import evaluate
from foveation.report import apsm_figure, metrics_table, prediction_figure, write_report
from foveation.training.loop import train


@dataclass
class ExperimentResult:
    metrics: dict
    table: str
    report_uri: str
    checkpoint_uri: str


def run_local(cfg: Config, out: str, log: Callable[[str], None] = print) -> ExperimentResult:
    ensure_set(cfg.data.root, cfg.data.toy, cfg.model.num_classes)
    train_set = load_split(cfg.data.root, "train")
    val_set = load_split(cfg.data.root, "val")
    test_set = load_split(cfg.data.root, "test")
    log(
        f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test images in {cfg.data.root}"
    )
    result = train(cfg, train_set, val_set, log)
    device = next(result.model.parameters()).device
    metrics = evaluate(result.model, test_set, cfg, device=device, keep_outputs=3)
    outputs = metrics.pop("outputs")
    run = cfg.model.mix.label
    ckpt = save_checkpoint(
        storage.join(out, "checkpoint"),
        result.model,
        cfg,
        {
            "step": result.epochs[-1].step,
            "epoch": len(result.epochs),
            "metrics": metrics,
            "run": run,
        },
    )
    table = metrics_table([(run, metrics)], cfg)
    n_ep = len(result.apsm_history)  # the paper's Fig. 4: one slide's APSM at a few epochs
    epochs = sorted({round(i * (n_ep - 1) / 4) for i in range(5)}) if n_ep else []
    figures = {
        "apsm_test.png": apsm_figure(
            [o["apsm"] for o in outputs], [o["slide_id"] for o in outputs], cfg.patches.fovs
        ),
        "apsm_epochs.png": apsm_figure(
            [result.apsm_history[i] for i in epochs],
            [f"epoch {i + 1}" for i in epochs],
            cfg.patches.fovs,
        ),
    }
    for o in outputs:
        figures[f"prediction_{o['slide_id']}.png"] = prediction_figure(
            o["image"], o["label"], o["mask"]
        )
    fovs = ", ".join(
        f"{f}px {w:.2f}" for f, w in zip(cfg.patches.fovs, metrics["weight_mean"], strict=True)
    )
    notes = [
        f"config: {cfg.name}; mix mode {run}; {len(result.epochs)} epochs, {result.epochs[-1].step} steps",
        f"mean foveation weight per FoV on the test images: {fovs}",
        f"checkpoint: {ckpt}",
    ]
    report = write_report(out, f"Foveation run {cfg.name!r}", table, figures, notes)
    return ExperimentResult(metrics, table, report, ckpt)
