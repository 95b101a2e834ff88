"""Make sure a store exists: generate the synthetic raw set where the source is empty, then
ingest (Ray tasks; slides unchanged since the last ingest are skipped). What the demo, the
reproduction and the sweep run first.

Generation writes only into an empty (or missing) source, or over a set whose settings record
(``synthetic.SETTINGS_FILE``) says this platform's generator wrote it: a set from anywhere else
(truth maps but no record) is somebody's data, and is an error rather than overwritten."""

from __future__ import annotations

from collections.abc import Callable

from foveation.config import Config
from foveation.errors import DataError
from foveation.io import storage


class ForeignSetError(DataError):
    """The source holds a slide set that this platform's generator did not write (truth maps
    but no settings record): generating there would delete somebody's data."""


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
    """The manifest's store URI, after generating (into an empty source, or over a set this
    platform generated with other settings) and ingesting. A source holding a set from
    elsewhere raises ForeignSetError before anything is written or Ray is started."""
    from foveation.data.ingest import ingest, ray_tasks
    from foveation.data.synthetic import write_synthetic_set

    raw = raw or cfg.data.ingest.source
    store = store or cfg.data.ingest.dest
    why = generation_needed(cfg, raw, store)
    if why:
        log(f"generating {cfg.data.synthetic.n_slides} synthetic slides into {raw} ({why})")
        remove_generated(raw)  # an old set's files would otherwise stay beside the new one's
        write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
    else:
        log(f"slides already in {raw}")
    log(f"ingesting into {store} (Ray tasks; unchanged slides are skipped)")
    from foveation.raycluster import init_ray

    init_ray(cfg.distributed.logical_cpus)
    summary = ingest(
        raw,
        store,
        cfg.ingest_settings(),
        cfg.model.num_classes,
        map_fn=ray_tasks(cfg.data.ingest),
        log=lambda s: None,
        kept_classes=cfg.evaluation.kept_classes,
        class_names=cfg.evaluation.class_names,
    )
    log(summary.text().splitlines()[0])
    return store


def remove_generated(raw: str) -> None:
    """Delete what the generator writes into ``raw`` (its folders and settings record) and
    nothing else: a set regenerated over an older one must not keep the older one's annotator
    maps (each slide's annotators are drawn anew, and a stale map would join the STAPLE fusion)."""
    from foveation.data import gleason
    from foveation.data.synthetic import SETTINGS_FILE, stored_settings

    if not has_files(raw):
        return
    if stored_settings(raw) is None:  # not written by the generator: never deleted
        raise ForeignSetError(foreign_set_message(raw, "files", "regenerating would delete them"))
    base = raw.rstrip("/")
    folders = {
        f[len(base) :].lstrip("/").split("/")[0]
        for f in storage.list_files(raw)
        if "/" in f[len(base) :].lstrip("/")
    }
    for name in sorted(folders):
        if name in (gleason.IMAGE_DIR, gleason.TRUTH_DIR, gleason.CUE_DIR) or gleason.MAP_DIR.match(
            name
        ):
            storage.remove_tree(storage.join(raw, name))
    if storage.exists(storage.join(raw, SETTINGS_FILE)):
        storage.remove_tree(storage.join(raw, SETTINGS_FILE))


def generation_needed(cfg: Config, raw: str, store: str | None = None) -> str | None:
    """Why the synthetic set must be (re)generated into ``raw``, or None to use what is there.
    Generation never writes beside or over data it did not write: only into an empty source, or
    over a set whose settings record says this platform generated it, with other settings. Real
    slides (no truth maps) are used as they are; a set with truth maps but no record (from
    another tool, or interrupted before its record) is a ForeignSetError, unless the store
    (``store``, default ``data.ingest.dest``) already holds a manifest: someone ingested it
    deliberately, so it is used as it is. A regenerated set with fewer slides than the old one
    would leave stale slides, so that is an error naming the folder."""
    from foveation.data import gleason
    from foveation.data.manifest import manifest_uri
    from foveation.data.synthetic import generator_settings, stored_settings

    if not has_files(raw):
        return "the source is empty"
    stored = stored_settings(raw)
    if stored is None:
        if not has_files(storage.join(raw, gleason.TRUTH_DIR)):
            return None  # real slides: used as they are
        if storage.exists(manifest_uri(store or cfg.data.ingest.dest)):
            return None  # a set from elsewhere, already ingested on purpose: used as it is
        truth = f"a slide set with truth maps ({gleason.TRUTH_DIR}/)"
        raise ForeignSetError(foreign_set_message(raw, truth, "generating would overwrite it"))
    wanted = generator_settings(cfg.data.synthetic, cfg.patches)
    if stored == wanted:
        return None
    old_n = stored.get("synthetic", {}).get("n_slides")
    if old_n is None:
        old_n = len(storage.list_files(storage.join(raw, gleason.TRUTH_DIR)))
    if old_n > cfg.data.synthetic.n_slides:
        raise DataError(
            f"{raw} holds a synthetic set of {old_n} slides generated with other settings than "
            f"data.synthetic and [patches] ask for ({cfg.data.synthetic.n_slides} slides); "
            f"remove that folder (and the store {cfg.data.ingest.dest}) and run again"
        )
    changed = sorted(
        k
        for k in set(stored.get("synthetic", {})) | set(wanted["synthetic"])
        if stored.get("synthetic", {}).get(k) != wanted["synthetic"].get(k)
    ) + [k for k in ("fovs", "patch_size", "xr_scale") if stored.get(k) != wanted[k]]
    return f"the set there was generated with other settings: {', '.join(changed)}"


def foreign_set_message(raw: str, holds: str, why: str) -> str:
    """What to do about a set this platform did not generate: keep it and ingest it as it is,
    or generate elsewhere. Named in full so that the user does not reach for ``rm``."""
    from foveation.data.synthetic import SETTINGS_FILE

    return (
        f"{raw} holds {holds} but no {SETTINGS_FILE}: this platform's generator did not write "
        f"it, and {why}. To train on it as it is, "
        f"ingest it first: python -m jobs.ingest --config CONFIG --source {raw} --dest STORE "
        "(with data.ingest.dest = STORE, the jobs then use it as it is; jobs.train and "
        "jobs.tune also take --manifest STORE); to generate the synthetic set instead, pass "
        "another destination: data.ingest.source in the config (jobs.demo: --raw DIR)"
    )
