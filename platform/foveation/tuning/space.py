"""The search space of a sweep: a list of points, each a patch set (FoVs, output size, x_r
scale), a mix mode, a learning rate and a seed, and how a point turns the base config into a
trial's config.

Points are plain dicts (what Ray Tune stores in a trial's config and shows in its tables) and
are all built, and validated as configs (the models' checks included:
``models.foveated.check_config``), before any trial starts: an empty or contradictory space
fails here with the point and the field that make it so. Mix modes are read from the registry
``models.mixing.MIXERS``, never from a list of names here.
"""

from __future__ import annotations

import itertools
from typing import Any

from foveation import config as C
from foveation.config import Config, ConfigError
from foveation.errors import InputError
from foveation.models.foveated import check_config
from foveation.models.mixing import MIXERS, split_label


class SpaceError(InputError):
    """The search space is empty or one of its points is not a valid config."""


def parse_mix(name: str) -> C.MixConfig:
    """A registered mix mode ("soft", "hard"...) or, for a mode that takes a patch index,
    "<mode>-N" ("onehot-2") -> the mix config."""
    mode, index = split_label(name)
    spec = MIXERS.get(mode)
    if spec is None:
        base, sep, _ = name.rpartition("-")
        if sep and base in MIXERS and MIXERS[base].indexed:
            raise SpaceError(f"tune.mixes: {name!r} is not {base}-N with N a patch index")
        known = sorted(f"{m}-N" if s.indexed else m for m, s in MIXERS.items())
        raise SpaceError(f"tune.mixes: unknown mix mode {name!r}; known: {known}")
    if spec.indexed and index is None:
        raise SpaceError(
            f"tune.mixes: {name!r} needs a patch index: write '{name}-0', '{name}-1'..."
        )
    try:
        return C.MixConfig(mode=mode, index=index)
    except ConfigError as exc:
        raise SpaceError(f"tune.mixes: {exc}") from None


def _single(fov: int, patch_size: int, xr_scale: int) -> dict[str, Any]:
    return {"fovs": [fov], "patch_size": patch_size, "xr_scale": xr_scale, "mix": "onehot-0"}


def _preset_points(cfg: Config) -> list[dict[str, Any]]:
    t, p = cfg.tune, cfg.patches
    if t.preset == "tradeoff":  # the same pixels per patch: FoV and resolution trade
        return [_single(_even(p.patch_size * r), p.patch_size, p.xr_scale) for r in t.fov_ratios]
    if t.preset == "fov":  # full resolution: the patch is as big as its FoV
        sides = [_even(p.patch_size * r) for r in t.fov_ratios]
        return [_single(s, s, p.xr_scale) for s in sides]
    whole = t.whole_image or cfg.data.ingest.crop_size
    if whole is None:
        raise SpaceError(
            "tune.whole_image: the resolution preset needs the image side; set it or "
            "data.ingest.crop_size"
        )
    out = []
    for d in t.downsamples:
        if whole % d:
            raise SpaceError(f"tune.downsamples: {d} does not divide tune.whole_image {whole}")
        out.append(_single(whole, whole // d, p.xr_scale))
    return out


def _even(x: float) -> int:
    return round(x / 2) * 2


def _custom_points(cfg: Config) -> list[dict[str, Any]]:
    t, p = cfg.tune, cfg.patches
    bases = t.base_fovs or (p.fovs[0],)
    xrs = t.xr_scales or (p.xr_scale,)
    out = []
    for ratios, base, xr, mix in itertools.product(t.fov_sets, bases, xrs, t.mixes):
        fovs = [_even(base * r) for r in ratios]
        out.append({"fovs": fovs, "patch_size": p.patch_size, "xr_scale": xr, "mix": mix})
    return out


def points(cfg: Config) -> list[dict[str, Any]]:
    """Every point of the sweep, validated. Grid search repeats each ``num_samples`` times with
    a different seed; random search draws from this list."""
    t = cfg.tune
    base = _custom_points(cfg) if t.preset == "custom" else _preset_points(cfg)
    lrs = t.lrs or (None,)
    repeats = t.num_samples if t.search == "grid" else 1
    names = sorted(t.fields)
    combos = [
        dict(zip(names, vals, strict=True))
        for vals in itertools.product(*(t.fields[n] for n in names))
    ]
    out = []
    # Learning rates outermost: trials start in this order, so with the usual lrs (best guess
    # first) ASHA's first rungs are set by the likelier configs.
    for lr, pt, fields, rep in itertools.product(lrs, base, combos, range(repeats)):
        out.append(pt | {"lr": lr, "seed": t.seed + rep} | ({"fields": fields} if fields else {}))
    if not out:
        raise SpaceError("tune: the search space is empty")
    labels = set()
    for pt in out:
        trial_config(cfg, pt)  # raises SpaceError naming the point
        labels.add(label(pt))
    if len(labels) < len(out):
        raise SpaceError("tune: the search space lists the same point twice")
    return out


def label(point: dict[str, Any]) -> str:
    """A short, unique, file-name-safe name: ``fov64-128-256_p64_xr16_soft_lr0.001_s0``."""
    fovs = "-".join(str(f) for f in point["fovs"])
    lr = "" if point.get("lr") is None else f"_lr{point['lr']:g}"
    fields = "".join(
        f"_{name.rsplit('.', 1)[-1]}{_short(value)}"
        for name, value in sorted(point.get("fields", {}).items())
    )
    return (
        f"fov{fovs}_p{point['patch_size']}_xr{point['xr_scale']}_{point['mix']}{lr}{fields}"
        f"_s{point['seed']}"
    )


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def with_fields(cfg: Config, fields: dict[str, Any]) -> Config:
    """``cfg`` with dotted fields set (``{"training.entropy_weight": 0.01}``), coerced and
    validated as a config file's values are; a ConfigError names an unknown field."""
    data = cfg.to_dict()
    for name, value in fields.items():
        table, *path = name.split(".")
        node = data.setdefault(table, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = list(value) if isinstance(value, tuple) else value
    return C.config_from_dict(data)


def trial_config(base: Config, point: dict[str, Any]) -> Config:
    """The config of the trial at ``point``: the base with the point's patch set, mix, learning
    rate and seed, the sweep's per-trial epochs, and per-epoch checkpoints only (every report is
    a scheduler decision)."""
    t = base.tune
    try:
        patches = C.replace(
            base.patches,
            fovs=tuple(point["fovs"]),
            patch_size=int(point["patch_size"]),
            xr_scale=int(point["xr_scale"]),
        )
        mix = parse_mix(point["mix"])
        tc = base.training
        lrs = {}
        if point.get("lr") is not None:
            ratio = tc.lr_fovnet / tc.lr_encoder if tc.lr_encoder > 0 else 1.0
            lr = float(point["lr"])
            lrs = {"lr_encoder": lr, "lr_decoder": lr, "lr_fovnet": lr * ratio}
        training = C.replace(
            tc, epochs=t.epochs or tc.epochs, seed=tc.seed + int(point["seed"]), **lrs
        )
        cfg = C.replace(
            base,
            patches=patches,
            model=C.replace(base.model, mix=mix),
            training=training,
            distributed=C.replace(base.distributed, checkpoint_every_steps=None),
            name=f"{base.name}-{label(point)}",
        )
        if point.get("fields"):
            cfg = with_fields(cfg, point["fields"])
        check_config(cfg)
        return cfg
    except (ConfigError, SpaceError) as exc:
        raise SpaceError(f"tune: the point {point} is not a valid config: {exc}") from None


def best_config(base: Config, point: dict[str, Any]) -> Config:
    """What ``jobs.train`` should run: the trial's config with the base's full epoch budget and
    the default (empty) tune section."""
    cfg = trial_config(base, point)
    return C.replace(
        cfg,
        training=C.replace(cfg.training, epochs=base.training.epochs),
        distributed=base.distributed,
        tune=C.TuneConfig(),
        name=f"{base.name}-best",
    )


def single_patch(point: dict[str, Any]) -> tuple[int, float] | None:
    """(FoV, downsampling factor) of a point that uses one patch per location (D = 1, or a mix
    that takes a patch index, such as "onehot-2"), else None: the trade-off figure's x axis."""
    fovs = point["fovs"]
    _, index = split_label(point["mix"])
    if len(fovs) == 1:
        fov = fovs[0]
    elif index is not None:
        fov = fovs[index]
    else:
        return None
    return fov, fov / point["patch_size"]


def pixels_per_location(point: dict[str, Any]) -> int:
    """Input pixels the segmenter sees per location: D x P^2 (the memory budget)."""
    return len(point["fovs"]) * int(point["patch_size"]) ** 2
