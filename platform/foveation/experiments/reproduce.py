"""The paper's experiment on a data set (its Table 1): the D one-hot baselines, Random, Average
and foveation, each trained with the same budget, then evaluated together on whole slides.

Each run lives in ``<out>/runs/<label>[-seed<k>]`` (``-seed<k>`` whenever seeds are given;
``<label>/model`` its best checkpoint); a run
whose exported model was trained from the same config is reused, so a re-run only trains what
is missing. ``trainer="ray"`` trains through Ray Train + DeepSpeed (``training.trainer.fit``),
``"single"`` on one device over the slides decoded into memory (the science check: it tests the
method, not Ray). With several seeds the report adds mean and spread per mode.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from foveation.checkpoint import META, CheckpointError, read_config, save_checkpoint
from foveation.config import Config, MixConfig, what_it_trains
from foveation.errors import InputError
from foveation.io import storage
from foveation.models.mixing import is_learned

TRAINERS = ("ray", "single")


def modes(cfg: Config) -> list[MixConfig]:
    """The fixed baselines of the mixer registry (one run per patch for an indexed one: the
    one-hot baselines, then Random, Average), then the configured mix if it is learned."""
    from foveation.models.mixing import MIXERS, fixed_mixes, mixer

    out = []
    for mode in fixed_mixes():
        if MIXERS[mode].indexed:
            out += [MixConfig(mode, index=i) for i in range(cfg.patches.depth)]
        else:
            out.append(MixConfig(mode))
    if mixer(cfg.model.mix.mode).learned:
        out.append(cfg.model.mix)
    return out


def run_config(cfg: Config, mix: MixConfig, seed: int) -> Config:
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-{mix.label}-seed{seed}",
        model=dataclasses.replace(cfg.model, mix=mix),
        training=dataclasses.replace(cfg.training, seed=seed),
    )


def _done(model_uri: str, cfg: Config) -> bool:
    """An exported model trained from exactly this config. Compared as configs, not as text: a
    field added since the run was trained, at its default, does not make it stale, and neither
    do the fields that only change how a run executes (``config.EXECUTION_FIELDS``)."""
    try:
        return what_it_trains(read_config(model_uri)) == what_it_trains(cfg)
    except CheckpointError:  # missing, unreadable or no longer valid: train again
        return False


def train_single(cfg: Config, manifest: str, model_uri: str, log: Callable[[str], None]) -> None:
    from foveation.data.samples import load_manifest_split
    from foveation.training.loop import train

    # No per-epoch validation here: the science budget is hundreds of short epochs, and the
    # comparison is made on the test slides after training.
    res = train(cfg, load_manifest_split(manifest, "train"), None, log=lambda s: None)
    first, last = res.epochs[0], res.epochs[-1]
    meta = {
        "step": last.step,
        "epoch": len(res.epochs),
        "run": cfg.model.mix.label,
        "loss": [e.loss for e in res.epochs],
        "weight_mean": [list(e.weight_mean.values()) for e in res.epochs],  # by FoV, in order
        "weight_entropy": [e.weight_entropy for e in res.epochs],
        "fovnet_grad_norm": [e.fovnet_grad_norm for e in res.epochs],
    }
    save_checkpoint(model_uri, res.model.cpu(), cfg, meta)
    log(f"  {cfg.name}: loss {first.loss:.4f} -> {last.loss:.4f} over {last.step} steps")


@dataclass
class ReproduceResult:
    table: str
    report_uri: str
    metrics: dict[str, dict]  # run name -> summary
    seconds: float


def reproduce(
    cfg: Config,
    out: str,
    manifest: str | None = None,
    trainer: str = "ray",
    seeds: tuple[int, ...] | None = None,
    only: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> ReproduceResult:
    from foveation.evaluation.report import evaluation_report
    from foveation.evaluation.slides import evaluate_runs

    if trainer not in TRAINERS:
        raise InputError(f"trainer {trainer!r}: expected one of {TRAINERS}")
    t0 = time.perf_counter()
    manifest = storage.absolute(manifest or cfg.data.ingest.dest)
    out = storage.absolute(out)
    named = seeds is not None  # seeds asked for by name: run names carry them, even one
    seeds = seeds or (cfg.training.seed,)
    runs, histories = {}, {}

    def one(mix: MixConfig, seed: int) -> None:
        # "--seeds 0" then "--seeds 0 1" into one out: the second reuses the first's runs, and
        # seeds run in parallel processes meet in one report.
        name = f"{mix.label}-seed{seed}" if named or len(seeds) > 1 else mix.label
        rcfg = run_config(cfg, mix, seed)
        run_out = storage.join(out, "runs", name)
        model_uri = storage.join(run_out, "model")
        if _done(model_uri, rcfg):
            log(f"{name}: reusing {model_uri}")
        elif trainer == "ray":
            from foveation.training.trainer import RUN_NAME, fit, resumable

            # Continue an interrupted run of this config; anything else there is replaced.
            again = resumable(storage.join(run_out, RUN_NAME), rcfg)
            log(f"{name}: training through Ray Train" + (" (resuming)" if again else ""))
            fit(rcfg, run_out, manifest, resume=again, overwrite=not again, log=log)
        else:
            log(f"{name}: training on one device")
            train_single(rcfg, manifest, model_uri, log)
        runs[name] = model_uri
        histories[name] = storage.join(run_out, "history")

    chosen = [m for m in modes(cfg) if not only or m.label in only]
    # Every mode gets every seed: the criteria compare foveation with each baseline seed by seed.
    for seed in seeds:
        for mix in chosen:
            one(mix, seed)
    res = evaluate_runs(runs, manifest, "test", log=log)
    extra, notes = [], []
    if len(seeds) > 1:
        extra = ["## Mean and spread over seeds", "", seed_table(res.metrics, seeds), ""]
        crit = criteria(res, seeds, cfg)
        if crit:
            extra += ["## The science criteria", "", crit, ""]
    seconds = time.perf_counter() - t0
    notes.append(
        f"{len(runs)} runs, trainer {trainer}, seeds {list(seeds)}, {cfg.training.epochs} epochs "
        f"each; {seconds / 60:.1f} min in all"
    )
    uri, table = evaluation_report(
        res, storage.join(out, "report"), histories, extra, notes, f"Reproduction: {cfg.name!r}"
    )
    storage.write_bytes(
        storage.join(out, "report", "metrics.json"),
        json.dumps({k: _plain(v) for k, v in res.metrics.items()}, indent=1).encode(),
    )
    if extra:
        table = table + "\n\n" + "\n\n".join(extra[2::4])
    for name, m in res.metrics.items():
        if "apsm_by_cue" in m:
            cues = ", ".join(f"{k} {v:.0f} px" for k, v in m["apsm_by_cue"].items())
            table += f"\nmean APSM of {name} by the generator's cue: {cues}"
    return ReproduceResult(table, uri, res.metrics, seconds)


def seed_table(metrics: dict[str, dict], seeds: tuple[int, ...]) -> str:
    """mIoU and mIoU (kept) per mode: mean ± standard deviation over seeds."""
    by_mode: dict[str, list[dict]] = {}
    for name, m in metrics.items():
        mode, sep, _ = name.rpartition("-seed")
        if sep:
            by_mode.setdefault(mode, []).append(m)
    lines = ["| mode | seeds | mIoU (all) | mIoU (kept) |", "|---|---|---|---|"]
    for mode, ms in by_mode.items():
        a = np.array([m["miou"] for m in ms])
        b = np.array([m["miou_kept"] for m in ms])
        lines.append(
            f"| {mode} | {len(ms)} | {a.mean():.3f} ± {a.std():.3f} | {b.mean():.3f} ± {b.std():.3f} |"
        )
    return "\n".join(lines)


def criteria(res, seeds: tuple[int, ...], cfg: Config) -> str:
    """The science criteria (docs/method.md#science-criteria) as a Markdown table, each met or
    not: mIoU over the kept classes, per-seed paired differences between the learned mix and
    the best one-hot (best by its mean over seeds), Random and Average; a criterion holds when
    the mean difference minus one standard deviation clears its bar. Empty without a learned
    run or one-hot baselines. ``res``: ``evaluation.slides.EvaluationResult``."""
    from foveation.evaluation.slides import apsm_by_cue

    metrics = res.metrics

    def per_seed(label: str) -> np.ndarray | None:
        vals = [metrics.get(f"{label}-seed{s}", {}).get("miou_kept") for s in seeds]
        return None if any(v is None for v in vals) else np.array(vals, np.float64)

    labels = {name.rpartition("-seed")[0] for name in metrics if "-seed" in name}
    learned = sorted(lb for lb in labels if is_learned(lb))
    onehots = {lb: per_seed(lb) for lb in labels if lb.startswith("onehot-")}
    onehots = {k: v for k, v in onehots.items() if v is not None}
    if not learned or not onehots:
        return ""
    fov = per_seed(learned[0])
    if fov is None:
        return ""
    best = max(onehots, key=lambda k: onehots[k].mean())
    rows = ["| criterion | mean ± sd of the paired difference | bar | met |", "|---|---|---|---|"]

    def row(text: str, d: np.ndarray, bar: float) -> None:
        ok = d.mean() - d.std() >= bar if len(d) > 1 else bool(d.mean() >= bar)
        rows.append(
            f"| {text} | {d.mean():+.3f} ± {d.std():.3f} | {bar:+.2f} | {'yes' if ok else 'no'} |"
        )

    name = learned[0]
    row(f"{name} never far below the best one-hot ({best})", fov - onehots[best], -0.02)
    row(f"{name} beats the best one-hot ({best}) by 0.02", fov - onehots[best], 0.02)
    for base, bar in (("random", 1e-9), ("average", -0.01)):
        b = per_seed(base)
        if b is not None:
            row(f"{name} against {base}", fov - b, bar)
    rng = max(cfg.patches.fovs) - min(cfg.patches.fovs)
    gaps = []
    for s in seeds:
        by_cue = apsm_by_cue(res, f"{name}-seed{s}") or {}
        if "context" in by_cue and "texture" in by_cue:
            gaps.append(by_cue["context"] - by_cue["texture"])
    if len(gaps) == len(seeds):
        ok = min(gaps) >= 0.25 * rng
        rows.append(
            f"| APSM follows the cue: context - texture (px), every seed | "
            f"{', '.join(f'{g:+.0f}' for g in gaps)} | {0.25 * rng:+.0f} | {'yes' if ok else 'no'} |"
        )
    return "\n".join(rows)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


__all__ = ["META", "ReproduceResult", "modes", "reproduce", "run_config", "seed_table"]
