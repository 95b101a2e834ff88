"""Make sure a store exists: generate the synthetic raw set where the source is empty, then
ingest (Ray tasks; slides unchanged since the last ingest are skipped). What the demo and the
reproduction run first."""

from __future__ import annotations

from collections.abc import Callable

from foveation.config import Config
from foveation.io import storage


def has_files(uri: str) -> bool:
    """Whether ``uri`` holds any file (a missing folder or bucket prefix holds none)."""
    try:
        return bool(storage.list_files(uri))
    except storage.StorageError:
        return False


def ensure_store(
    cfg: Config,
    raw: str | None = None,
    store: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """The manifest's store URI, after generating (only into an empty source) and ingesting."""
    from foveation.data.ingest import ingest, ray_tasks
    from foveation.data.synthetic import write_synthetic_set
    from foveation.raycluster import init_ray

    raw = raw or cfg.data.ingest.source
    store = store or cfg.data.ingest.dest
    if not has_files(raw):  # generate only into an empty source, never beside real data
        log(f"generating {cfg.data.synthetic.n_slides} synthetic slides into {raw}")
        write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
    else:
        log(f"slides already in {raw}")
    log(f"ingesting into {store} (Ray tasks; unchanged slides are skipped)")
    init_ray(cfg.distributed.logical_cpus)
    summary = ingest(
        raw,
        store,
        cfg.data.ingest,
        cfg.model.num_classes,
        map_fn=ray_tasks(cfg.data.ingest),
        log=lambda s: None,
        kept_classes=cfg.evaluation.kept_classes,
        class_names=cfg.evaluation.class_names,
    )
    log(summary.text().splitlines()[0])
    return store
