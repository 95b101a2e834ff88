"""Typed configuration: one frozen dataclass per concern, loaded from TOML and validated.

Every check of the config's own values runs in ``__post_init__`` so a bad config fails when it
is loaded, with a message naming the field (``patches.fovs``, ``model.mix.index``...), never an
hour into a run. The tables the checks read and the models build on live here too (the mix
modes ``MIX_MODES``, the segmenter layouts ``SEGMENTER_LAYOUTS``), so there is one list of each.
The checks that need the models (a known backbone, the segmenter's output stride) run where
models are built, in ``foveation.models.foveated.check_config``: this module imports nothing
from ``foveation`` but the error base (``foveation.errors``), so every other part can import it
(docs/contracts.md, docs/architecture.md). Configs are passed as arguments and never mutated;
:func:`replace` derives variants (a baseline, a sweep trial) from a base config.

The typed-TOML loader is public and shared with other settings (``foveation.serving.settings``):
:func:`read_toml` reads a file, :func:`dataclass_from_dict` builds any frozen dataclass from
nested tables (coercing and checking types, refusing unknown keys), :func:`require` is the
check of every ``__post_init__``, :func:`drop_none` turns a dataclass dict back into TOML data.
It stays plain stdlib rather than pydantic v2: the type coercion it would replace is ~50 lines,
while the cross-field checks in ``__post_init__`` and the error wording (field then file) would
stay, so pydantic would remove little code and add a translation of its error format.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from foveation.errors import InputError


class ConfigError(InputError):
    """A config value is missing, of the wrong type, or inconsistent with another: the message
    reads "<field or file>: <what was expected>"."""


def require(cond: bool, where: str, msg: str) -> None:
    """Raise ``ConfigError("<where>: <msg>")`` unless ``cond``; ``where`` is the field's dotted
    path (``patches.fovs``), so the message says what to fix."""
    if not cond:
        raise ConfigError(f"{where}: {msg}")


PADDING_MODES = ("constant", "reflect")
RESAMPLE_MODES = ("area", "reference")
INFERENCE_MODES = ("tiled", "dense")
BLENDS = ("gaussian", "flat")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("", "inductor", "aot_eager", "eager")
ADAM_IMPLS = ("default", "foreach", "fused")


@dataclass(frozen=True)
class PatchSetConfig:
    """Geometry of the patch bank (docs/method.md, "Geometry")."""

    fovs: tuple[int, ...] = (64, 128, 256)
    """Field-of-view side lengths in full-resolution pixels, strictly increasing (P1 < ... < PD)."""
    patch_size: int = 64
    """Side length every patch is resized to (the segmenter's input)."""
    xr_scale: int = 16
    """Downsampling factor s of the low-resolution copy x_r; one candidate location per x_r pixel."""
    padding: str = "constant"
    """Out-of-image fill: "constant" (the mean colour, i.e. zero after normalisation) or "reflect"."""
    resample: str = "area"
    """"area": area-correct downsampling from a per-scale pyramid (default, fast);
    "reference": the authors' crop then bilinear resize without antialiasing (parity only)."""
    mpp: float | None = None
    """The model's resolution in microns per pixel: FoVs, x_r and labels are in pixels of this
    size. Whole-slide prediction (``jobs.predict``, Serve's slide jobs) reads a slide that
    declares another mpp resampled to it (``io.slides.ScaledSource``), so a 20x and a 40x scan
    give the same prediction; a slide whose metadata gives no trustworthy mpp
    (``io.slides.tiff_mpp``) is refused, naming how to give it (a slide list's ``mpp``
    column), never resampled by a guess. None: every slide is read at its own resolution."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fovs", tuple(int(f) for f in self.fovs))
        w = "patches"
        require(self.mpp is None or self.mpp > 0, f"{w}.mpp", "must be > 0 (microns per pixel)")
        require(len(self.fovs) >= 1, f"{w}.fovs", "needs at least one field of view")
        require(self.patch_size >= 8, f"{w}.patch_size", f"must be >= 8, got {self.patch_size}")
        require(
            all(a < b for a, b in zip(self.fovs, self.fovs[1:], strict=False)),
            f"{w}.fovs",
            f"must be strictly increasing, got {list(self.fovs)}",
        )
        require(
            self.fovs[0] >= self.patch_size,
            f"{w}.fovs",
            f"every FoV must be >= patch_size {self.patch_size} (patches are only ever "
            f"downsampled), got {list(self.fovs)}",
        )
        require(
            all(f % 2 == 0 for f in self.fovs),
            f"{w}.fovs",
            f"must be even so patches centre on a pixel corner, got {list(self.fovs)}",
        )
        require(
            self.xr_scale >= 2 and self.xr_scale % 2 == 0,
            f"{w}.xr_scale",
            f"must be an even integer >= 2, got {self.xr_scale}",
        )
        require(
            self.xr_scale <= self.fovs[0],
            f"{w}.xr_scale",
            f"must be <= the smallest FoV {self.fovs[0]} or predictions leave gaps",
        )
        require(self.padding in PADDING_MODES, f"{w}.padding", f"must be one of {PADDING_MODES}")
        require(
            self.resample in RESAMPLE_MODES, f"{w}.resample", f"must be one of {RESAMPLE_MODES}"
        )

    @property
    def depth(self) -> int:
        """D, the number of patches per location."""
        return len(self.fovs)


@dataclass(frozen=True)
class MixMode:
    """What callers need to know of a mix mode, besides its function: the one table of modes is
    ``MIX_MODES`` here, below the models, so the config checks a mode when it loads and
    ``foveation.models.mixing.MIXERS`` pairs each entry with its function (adding a mode is
    one entry here and one function there)."""

    learned: bool
    """F's weights decide the mix, so the mode trains F and its APSM means something; False: a
    fixed baseline that ignores w (reproductions train one per mode, or per patch if indexed)."""
    indexed: bool = False
    """Takes ``model.mix.index`` (a patch, 0 = smallest FoV); its label is "<mode>-<index>"."""


# Order matters to readers of ``mixing.fixed_mixes()``: the one-hot baselines, Random, Average.
MIX_MODES: dict[str, MixMode] = {
    "soft": MixMode(learned=True),
    "hard": MixMode(learned=True),
    "gumbel": MixMode(learned=True),
    "onehot": MixMode(learned=False, indexed=True),
    "random": MixMode(learned=False),
    "average": MixMode(learned=False),
}
"""Every mix mode (``model.mix.mode``) and its properties (docs/method.md, "Mix modes")."""


@dataclass(frozen=True)
class MixConfig:
    """How the foveation weights combine the D patches (docs/method.md, "Mix modes")."""

    mode: str = "soft"
    """A name of ``MIX_MODES``: soft, hard, gumbel, onehot, random, average."""
    index: int | None = None
    """For an indexed mode ("onehot"): which patch (0 = smallest FoV)."""
    straight_through: str = "plain"
    """For "hard": "plain" (onehot + w - sg(w)) or "inverse" (the authors' onehot + log w - sg(log w))."""
    gumbel_hard: bool = False
    """For "gumbel": straight-through one-hot samples instead of relaxed ones."""
    tau_min: float = 0.1
    """For "gumbel": the annealed temperature max(tau_min, exp(-step / total_steps))."""
    argmax_at_eval: bool = False
    """For "soft": at evaluation and inference, the one-hot of argmax w instead of w: one patch
    per location. With per-FoV segmenters a location then costs one segmenter, not D."""

    def __post_init__(self) -> None:
        require(bool(self.mode), "model.mix.mode", "must name a mix mode")
        require(
            self.mode in MIX_MODES,
            "model.mix.mode",
            f"unknown mix mode {self.mode!r}; known: {sorted(MIX_MODES)}",
        )
        if MIX_MODES[self.mode].indexed:
            require(
                self.index is not None and self.index >= 0,
                "model.mix.index",
                f"{self.mode} mode needs index >= 0",
            )
        require(
            self.straight_through in ("plain", "inverse"),
            "model.mix.straight_through",
            f"must be 'plain' or 'inverse', got {self.straight_through!r}",
        )
        require(self.tau_min > 0, "model.mix.tau_min", "must be > 0")

    @property
    def label(self) -> str:
        """A short run name: "soft", "onehot-2", "average"..."""
        return f"{self.mode}-{self.index}" if MIX_MODES[self.mode].indexed else self.mode


@dataclass(frozen=True)
class SegmenterLayout:
    """How many segmenters a model has and what the mixing coefficients h mix: what the model
    builds, the optimiser groups and the training step read of ``model.segmenters``."""

    per_fov: bool
    """One segmenter per FoV, each reading its own patch, h mixing their class probabilities;
    False: one segmenter reads the mix of the D patches (h mixes inputs)."""

    @property
    def own_loss(self) -> bool:
        """Whether it allows ``training.per_fov_loss = "own"`` (each FoV's segmenter trained on
        its own patch alone); a layout without a segmenter per FoV trains on the mixture, its
        one loss, whatever ``per_fov_loss`` says."""
        return self.per_fov

    def count(self, depth: int) -> int:
        """The segmenters it builds for D = ``depth`` patches: the factor on the segmenter's
        parameters, memory and (with h dense) compute."""
        return depth if self.per_fov else 1


SEGMENTER_LAYOUTS: dict[str, SegmenterLayout] = {
    "shared": SegmenterLayout(per_fov=False),
    "per_fov": SegmenterLayout(per_fov=True),
}
"""``model.segmenters``: one segmenter for the mix (the paper's), or one per FoV."""


@dataclass(frozen=True)
class ModelConfig:
    """The foveated segmenter: foveation net F, mixer, and segmenter on a timm backbone."""

    backbone: str = "hrnet_w18_small"
    """A name from ``foveation.models.segmenter.BACKBONES`` (or "timm:<name>" for any timm
    features model; checked when the model is built)."""
    num_classes: int = 4
    head_channels: int | None = None
    """Width of the head's 3x3 conv; default: the concatenated width / 4 (720 -> 180 for W48)."""
    fovnet_width: int | None = None
    """Channels of F's two hidden convs; default 8 * D (40 for D = 5, as the paper)."""
    pretrained: str | None = None
    """A local ImageNet checkpoint for the backbone (timm's or the HRNet authors' format)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mix: MixConfig = field(default_factory=MixConfig)
    segmenters: str = "shared"
    """"shared": the paper's one segmenter reads the mix of the D patches (h mixes inputs).
    "per_fov": D segmenters, one per FoV, each reads its own patch and h mixes their class
    probabilities (docs/method.md#per-fov-segmenters). Every mode of a reproduction, baselines
    included, gets the same choice, so they compare like with like."""

    def __post_init__(self) -> None:
        require(
            self.segmenters in SEGMENTER_LAYOUTS,
            "model.segmenters",
            f"must be one of {tuple(SEGMENTER_LAYOUTS)}, got {self.segmenters!r}",
        )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        require(bool(self.backbone), "model.backbone", "must name a backbone")
        require(self.num_classes >= 2, "model.num_classes", "must be >= 2")
        require(len(self.mean) == 3 and len(self.std) == 3, "model.mean/std", "need 3 values (RGB)")
        require(all(s > 0 for s in self.std), "model.std", "must be > 0")
        if self.pretrained is not None:
            require(
                Path(self.pretrained).is_file(),
                "model.pretrained",
                f"weight file {self.pretrained!r} does not exist (no weights can be downloaded here; "
                "give a local timm or HRNet ImageNet checkpoint, or leave it unset for random init)",
            )

    @property
    def layout(self) -> SegmenterLayout:
        """The layout ``segmenters`` names (``SEGMENTER_LAYOUTS``)."""
        return SEGMENTER_LAYOUTS[self.segmenters]

    @property
    def pad_value(self) -> tuple[int, int, int]:
        """The mean colour in uint8: padding with it is zero padding after normalisation."""
        return tuple(round(m * 255) for m in self.mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class ToyConfig:
    """The toy set (``foveation.data.toy``): a class cue at one scale only."""

    n_train: int = 24
    n_val: int = 4
    n_test: int = 4
    size: int = 256
    """Side length of each generated image in pixels."""
    region_size: int = 96
    """Typical side of a class region in pixels."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            require(getattr(self, name) >= 1, f"data.toy.{name}", "must be >= 1")
        require(self.size >= 32, "data.toy.size", "must be >= 32")
        require(self.region_size >= 8, "data.toy.region_size", "must be >= 8")


IMAGE_FORMATS = ("png", "jpg")


SYNTHETIC_REGIMES = ("blind", "informative")


@dataclass(frozen=True)
class SyntheticConfig:
    """The scale-dependent synthetic slides (``foveation.data.synthetic``); tissue scales follow
    the patch set."""

    n_slides: int = 12
    size: int = 1024
    """Side length of each slide in pixels."""
    seed: int = 0
    grade5_fraction: float = 0.02
    texture_contrast: float = 1.0
    """Fine-texture amplitude in units of the luminance noise (near 1: as weak as tissue): grade
    4's in the blind regime, every texture-decided region's in the informative one."""
    noise_sigma: float = 5.0
    n_annotators: int = 6
    annotators_per_slide: tuple[int, int] = (3, 6)
    """Each slide is labelled by a random number of annotators in this range (Gleason2019: 3-6)."""
    image_format: str = "png"
    """"png" keeps the weak texture cue intact; "jpg" (quality 95) mimics the real data."""
    regime: str = "blind"
    """"blind": the classes look alike at x_r, so x_r cannot tell where to look (the ablation);
    "informative": a tissue-architecture cue that survives downsampling shows which scale
    decides a region, without giving away the class (docs/method.md#f-must-see-where-to-look)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "annotators_per_slide", tuple(int(v) for v in self.annotators_per_slide)
        )
        w = "data.synthetic"
        require(
            self.regime in SYNTHETIC_REGIMES,
            f"{w}.regime",
            f"must be one of {SYNTHETIC_REGIMES}, got {self.regime!r}",
        )
        require(self.n_slides >= 1, f"{w}.n_slides", "must be >= 1")
        require(self.size >= 64, f"{w}.size", "must be >= 64")
        require(0 <= self.grade5_fraction < 0.5, f"{w}.grade5_fraction", "must be in [0, 0.5)")
        require(
            self.noise_sigma >= 0 and self.texture_contrast >= 0,
            f"{w}.noise_sigma/texture_contrast",
            "must be >= 0",
        )
        lo, hi = (*self.annotators_per_slide, 0, 0)[:2]
        require(
            len(self.annotators_per_slide) == 2 and 1 <= lo <= hi <= self.n_annotators,
            f"{w}.annotators_per_slide",
            f"must be [min, max] with 1 <= min <= max <= n_annotators ({self.n_annotators})",
        )
        require(
            self.image_format in IMAGE_FORMATS,
            f"{w}.image_format",
            f"must be one of {IMAGE_FORMATS}",
        )


COMPRESSIONS = ("jpeg", "deflate", "lzw", "none")


@dataclass(frozen=True)
class IngestConfig:
    """Raw slides (Gleason2019 layout, a folder or an s3:// prefix) -> pyramidal TIFFs, fused
    label pyramids and a Parquet manifest (``foveation.data.ingest``)."""

    source: str = "runs/data/synthetic-raw"
    dest: str = "runs/data/ingested"
    crop_size: int | None = 4400
    """Side of the central crop (the paper: 4400); unset keeps whole images."""
    tile_size: int = 256
    """256 px: with the sqrt(2) levels, the paper-size bank decodes about 2x its pixels (512: 2.6x)."""
    sqrt2_levels: bool = True
    """Also write a pyramid at 1/sqrt(2) beside each slide (``<id>.s2.tif``), so every FoV is read
    from a level at most sqrt(2) finer than it needs."""
    compression: str = "jpeg"
    quality: int = 90
    """JPEG quality of image tiles (labels are always stored losslessly)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    test_count: int | None = None
    """A fixed number of test slides instead of a fraction (the paper: 30 of 298)."""
    split_seed: int = 0
    task_cpus: float = 0.5
    """Logical CPUs per Ray ingest task (fractional on small machines: docs/architecture.md)."""
    max_error_fraction: float = 0.5
    """The job fails when more than this fraction of slides cannot be ingested."""
    unannotated: str = "ignore"
    """QuPath GeoJSON sources: the label of pixels no polygon covers, "ignore" (255: the loss
    and the metrics skip them) or a class name of ``evaluation.class_names``."""
    class_map: dict[str, str] = field(default_factory=dict)
    """QuPath GeoJSON sources: a project's class names to the platform's, e.g. ``{Tumor =
    "grade3", Stroma = "benign", Other = "ignore"}`` (several names may map to one class;
    "ignore": 255, skipped by the loss and the metrics). A name not in it must be a class of
    ``evaluation.class_names`` itself. A slide list's ``class_map`` column adds to it."""
    mpp: float | None = None
    """Microns per pixel of the store: a whole slide that declares another mpp is resampled to
    it as it is ingested (libvips, streamed: the image by area, the labels by nearest), so a
    20x and a 40x scan train alike. Unset: ``patches.mpp`` (``Config.ingest_settings``); both unset:
    every slide keeps its own scale. A slide that declares no mpp is taken to be at it."""

    def __post_init__(self) -> None:
        w = "data.ingest"
        require(self.crop_size is None or self.crop_size >= 64, f"{w}.crop_size", "must be >= 64")
        require(
            self.tile_size in (128, 256, 512, 1024),
            f"{w}.tile_size",
            "must be 128, 256, 512 or 1024",
        )
        require(
            self.compression in COMPRESSIONS, f"{w}.compression", f"must be one of {COMPRESSIONS}"
        )
        require(1 <= self.quality <= 100, f"{w}.quality", "must be in [1, 100]")
        require(self.mpp is None or self.mpp > 0, f"{w}.mpp", "must be > 0 (microns per pixel)")
        require(
            0 <= self.val_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1,
            f"{w}.val_fraction/test_fraction",
            "must be in [0, 1) and sum to less than 1",
        )
        require(self.task_cpus > 0, f"{w}.task_cpus", "must be > 0")
        require(0 <= self.max_error_fraction <= 1, f"{w}.max_error_fraction", "must be in [0, 1]")
        require(
            isinstance(self.class_map, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.class_map.items()),
            f"{w}.class_map",
            f"must be a table of QuPath class names to class names, got {self.class_map!r}",
        )


LOADERS = ("auto", "stream", "memory")
"""``data.pipeline.loader``: how Ray Train workers get training batches."""


@dataclass(frozen=True)
class PipelineConfig:
    """The Ray Data pipeline from a manifest to training batches (``foveation.data.pipeline``)."""

    reader_actors: int = 2
    """Actors that read patch banks (each caches its open slides)."""
    actor_cpus: float = 0.5
    """Logical CPUs per reader actor (fractional on a laptop: docs/architecture.md)."""
    tissue_threshold: float = 225.0
    """x_r pixels whose mean luminance is at or above this are background and never sampled."""
    block_size: int = 1 << 20
    """Bytes per ranged GET block of S3 slides."""
    max_blocks: int = 32
    """Blocks each open S3 slide keeps cached."""
    max_error_fraction: float = 0.1
    """The epoch fails (with a summary) when more than this fraction of slides cannot be read."""
    loader: str = "auto"
    """How Ray Train workers get training batches: "stream" (the reader actors above cut them
    from slides in storage, out of core), "memory" (each worker decodes its shard of the slides
    once and cuts every epoch's batches in-process, with the same extractor and the same
    locations), or "auto": memory when a worker's shard decodes to at most ``memory_limit_mb``.
    On a laptop, memory is about 4x faster: the readers no longer compete with the trainer."""
    memory_limit_mb: float = 1024.0
    """The decoded size (RGB and label) of one worker's shard up to which "auto" holds it."""

    def __post_init__(self) -> None:
        w = "data.pipeline"
        require(
            self.loader in LOADERS,
            f"{w}.loader",
            f"must be 'auto', 'stream' or 'memory', got {self.loader!r}",
        )
        require(self.memory_limit_mb >= 0, f"{w}.memory_limit_mb", "must be >= 0")
        require(self.reader_actors >= 1, f"{w}.reader_actors", "must be >= 1")
        require(self.actor_cpus > 0, f"{w}.actor_cpus", "must be > 0")
        require(0 < self.tissue_threshold <= 256, f"{w}.tissue_threshold", "must be in (0, 256]")
        require(
            self.block_size >= 4096 and self.max_blocks >= 1,
            f"{w}.block_size/max_blocks",
            "too small",
        )
        require(0 <= self.max_error_fraction <= 1, f"{w}.max_error_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    root: str = "runs/data/toy"
    """Where the toy set lives (a path or URI); generated there when missing."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


WARMUP_MIXES = ("average", "random", "smallest")
PER_FOV_LOSSES = ("mixture", "own")


@dataclass(frozen=True)
class TrainingConfig:
    """The paper's optimisation (docs/method.md, "Training") plus guards against collapse."""

    epochs: int = 8
    batch_size: int = 2
    """Images per step; all their sampled locations go through one forward and one backward."""
    locations_per_image: int = 16
    lr_encoder: float = 2e-5
    lr_decoder: float = 2e-5
    lr_fovnet: float = 2e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-4
    """Applied to conv / linear weights only, never to BN or biases."""
    poly_power: float = 0.9
    grad_clip: float | None = None
    uniform_warmup_fraction: float = 0.0
    """Fraction of steps that use ``warmup_mix`` before F chooses (docs/method.md#collapse): the
    segmenter first learns every scale's cue, then F learns to choose."""
    warmup_mix: str = "average"
    """The mix of the warm-up: "average" (every patch at 1/D), "random" (one patch per
    location, drawn uniformly: the segmenter learns each scale alone, as a hard choice sees it)
    or "smallest" (the smallest FoV, full resolution, everywhere: the fine detail a shared-scale
    segmenter is slowest to learn is learned first; docs/method.md#every-fov)."""
    entropy_weight: float = 0.0
    """Weight of an entropy bonus on F's weights (positive keeps them spread, negative makes
    each location's choice decisive)."""
    entropy_weight_end: float | None = None
    """If set, the entropy weight moves linearly from ``entropy_weight`` (first step after the
    warm-up) to this (last step): e.g. spread early, decisive late."""
    per_fov_loss: str = "mixture"
    """With ``model.segmenters = "per_fov"`` and a learned mix: "mixture" trains every part on
    the loss of the mixed output; "own" trains each FoV's segmenter on its own patch alone, as
    its one-hot baseline is trained, and F on the mixture with the segmenters' outputs held
    fixed (docs/method.md#per-fov-segmenters)."""
    scale_target_weight: float = 0.0
    """Weight of the hindsight scale target (docs/method.md#scale-target): each location's loss
    under each single patch (no gradient) gives a target q = softmax(-loss_d / T) that F's
    weights are trained towards with cross entropy, so F learns from x_r which scale wins where,
    not only through the mix. 0: off (the paper's recipe)."""
    scale_target_temperature: float = 0.1
    """T of the hindsight target: lower is closer to the best patch's one-hot."""
    every_fov_weight: float = 0.0
    """Weight of an auxiliary loss that trains the segmenter on every patch of the bank alone,
    at every location, after the warm-up (docs/method.md#every-fov): the segmenter stays competent at every FoV
    whatever F chooses, so the hindsight target (computed from these same losses, at no extra
    cost) compares scales fairly. Costs D more forward and backward passes a step. 0: off."""
    class_weights: tuple[float, ...] | None = None
    seed: int = 0
    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" (autocast of the forward; weights and optimiser stay fp32).
    "fp16" needs a GPU (and gets DeepSpeed's loss scaling); CPUs run fp32 or bf16."""
    device: str = "cpu"
    """"cpu", "cuda", "cuda:N" or "auto"."""
    # Speed levers (training/speed.py): none changes what is computed beyond float rounding.
    channels_last: bool = False
    """The segmenters' weights and inputs in channels-last memory (NHWC), the layout GPU
    tensor-core convolutions run without transposes."""
    compile: str = ""
    """A ``torch.compile`` backend for each segmenter's forward: "inductor" (GPUs), "aot_eager"
    (checks the graph capture on CPU), "eager"; "" runs eagerly. Compiling costs the first steps
    (and a new batch shape) seconds to minutes; the weights' names do not change."""
    adam: str = "default"
    """torch's Adam implementation: "default" (torch chooses), "foreach" (one kernel per
    operation over all parameters) or "fused" (one kernel per step)."""
    cudnn_benchmark: bool = False
    """cuDNN times its convolution algorithms once per shape and keeps the fastest (CUDA only;
    the step's shapes are fixed). Process-wide once set: evaluation in the same process keeps
    it."""

    def __post_init__(self) -> None:
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(v) for v in self.class_weights))
        w = "training"
        for name in ("epochs", "batch_size", "locations_per_image"):
            require(
                getattr(self, name) >= 1, f"{w}.{name}", f"must be >= 1, got {getattr(self, name)}"
            )
        for name in ("lr_encoder", "lr_decoder", "lr_fovnet"):
            require(getattr(self, name) >= 0, f"{w}.{name}", "must be >= 0")
        require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{w}.beta1/beta2", "must be in [0, 1)"
        )
        require(
            0 <= self.uniform_warmup_fraction < 1,
            f"{w}.uniform_warmup_fraction",
            "must be in [0, 1)",
        )
        require(self.grad_clip is None or self.grad_clip > 0, f"{w}.grad_clip", "must be > 0")
        require(
            self.warmup_mix in WARMUP_MIXES,
            f"{w}.warmup_mix",
            f"must be one of {WARMUP_MIXES}, got {self.warmup_mix!r}",
        )
        require(self.scale_target_weight >= 0, f"{w}.scale_target_weight", "must be >= 0")
        require(self.scale_target_temperature > 0, f"{w}.scale_target_temperature", "must be > 0")
        require(self.every_fov_weight >= 0, f"{w}.every_fov_weight", "must be >= 0")
        require(
            self.per_fov_loss in PER_FOV_LOSSES,
            f"{w}.per_fov_loss",
            f"must be one of {PER_FOV_LOSSES}, got {self.per_fov_loss!r}",
        )
        require(self.precision in PRECISIONS, f"{w}.precision", f"must be one of {PRECISIONS}")
        require(
            self.compile in COMPILE_BACKENDS,
            f"{w}.compile",
            f"must be one of {COMPILE_BACKENDS}, got {self.compile!r}",
        )
        require(
            self.adam in ADAM_IMPLS, f"{w}.adam", f"must be one of {ADAM_IMPLS}, got {self.adam!r}"
        )
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{w}.device",
            f"must be 'cpu', 'cuda[:N]' or 'auto', got {self.device!r}",
        )


PLACEMENTS: dict[str, str] = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
"""``distributed.placement`` -> Ray's placement-group strategy for the Train workers."""


@dataclass(frozen=True)
class DistributedConfig:
    """How ``jobs.train`` spreads training over a Ray cluster (``foveation.training.trainer``):
    Ray Train workers, each a DeepSpeed data-parallel rank. Only this section changes between a
    laptop and a GPU cluster."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One or more GPUs per worker (``gpus_per_worker``); the job fails at once without them,
    unless the cluster's autoscaler may add them (then it says so and waits)."""
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker: fractional on a laptop (docs/architecture.md, "Ray on 2 cores")."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0, 1 or 2 (3 partitions parameters, which F's separate forward on
    x_r does not go through)."""
    checkpoint_every_steps: int | None = None
    """A checkpoint every N optimiser steps as well as at the end of every epoch."""
    keep_checkpoints: int = 2
    """Best K checkpoints kept by val mIoU (the latest is always kept too, for resuming)."""
    max_failures: int = 1
    """Times Ray Train restarts a failed worker group from the last checkpoint."""
    logical_cpus: int = 4
    """CPUs a local Ray (no cluster address) declares: more than cores, so fractional workers
    and reader actors fit on a 2-core laptop."""
    threads_per_worker: int | None = None
    """Torch CPU threads in each worker. Unset: Ray's rule, ``floor(cpus_per_worker)`` (so 1 on
    a laptop, where ``cpus_per_worker`` is a share of more logical CPUs than cores, and Tune's
    concurrent trials do not oversubscribe the cores). 0: every core the worker's process may
    run on, divided among the workers on its node: for a run that has the machine to itself
    (the demo: 1.38x the steps/s of one thread on 2 cores, ``jobs.benchmark threads``); not for
    Tune sweeps, whose concurrent trials would each take every core. N: N threads."""

    placement: str = "pack"
    """Where Ray puts the workers (``PLACEMENTS``): "pack" fills a node first (the default,
    and all a laptop has); "spread" one worker per node where there are enough nodes, so a
    node lost costs one rank, and the process group really crosses machines (best effort: after
    a node loss the restarted group may pack onto the nodes left); "strict_spread" always one
    worker per node, waiting for enough nodes (a replacement, or the autoscaler's) to start."""
    shared_filesystem: bool = False
    """Every node mounts the same disk (NFS, a laptop's one disk): local paths may then be
    handed to workers on other nodes. Without it, a run on a cluster of more than one node must
    read its slides from and write its outputs to object storage (an s3:// URI), and a local
    path is refused before any worker starts (``trainer.check_paths``)."""

    def __post_init__(self) -> None:
        w = "distributed"
        require(
            self.placement in PLACEMENTS,
            f"{w}.placement",
            f"must be one of {sorted(PLACEMENTS)}, not {self.placement!r}",
        )
        require(self.num_workers >= 1, f"{w}.num_workers", "must be >= 1")
        require(self.gpus_per_worker > 0, f"{w}.gpus_per_worker", "must be > 0")
        require(self.cpus_per_worker > 0, f"{w}.cpus_per_worker", "must be > 0")
        require(self.zero_stage in (0, 1, 2), f"{w}.zero_stage", "must be 0, 1 or 2")
        require(
            self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
            f"{w}.checkpoint_every_steps",
            "must be >= 1",
        )
        require(self.keep_checkpoints >= 1, f"{w}.keep_checkpoints", "must be >= 1")
        require(self.max_failures >= 0, f"{w}.max_failures", "must be >= 0")
        require(self.logical_cpus >= 1, f"{w}.logical_cpus", "must be >= 1")
        require(
            self.threads_per_worker is None or self.threads_per_worker >= 0,
            f"{w}.threads_per_worker",
            "must be >= 0 (0: every core, shared among the node's workers)",
        )


@dataclass(frozen=True)
class InferenceConfig:
    mode: str = "tiled"
    """"tiled": stride near the smallest FoV, overlap-add (default); "dense": the paper's stride s."""
    overlap: float = 0.25
    """Tiled mode: fraction of the smallest FoV that neighbouring tiles share (0 = none). The
    segmenter's forward grows by about 1 / (1 - overlap)^2: 1.8x at 0.25, the default, against
    1.06x without overlap, which leaves seams (docs/method.md#inference)."""
    blend: str = "gaussian"
    """How overlapping predictions are averaged: "gaussian" weighs each tile's pixels by a
    Gaussian of their distance from its centre (sigma a sixth of the tile), so a pixel near one
    tile's border is decided by the tile it is central in; "flat": equal weights. Both are
    normalised by the weights' sum, so where tiles do not overlap they are the same."""
    batch_size: int = 16
    """Locations per segmenter forward."""

    def __post_init__(self) -> None:
        require(self.mode in INFERENCE_MODES, "inference.mode", f"must be one of {INFERENCE_MODES}")
        require(0 <= self.overlap < 1, "inference.overlap", "must be in [0, 1)")
        require(self.blend in BLENDS, "inference.blend", f"must be one of {BLENDS}")
        require(self.batch_size >= 1, "inference.batch_size", "must be >= 1")


@dataclass(frozen=True)
class EvaluationConfig:
    class_names: tuple[str, ...] = ("benign", "grade3", "grade4", "grade5")
    kept_classes: tuple[int, ...] = (0, 1, 2)
    """Classes in the second mean ("kept"); the first mean is over all classes, as the paper's
    "Overall" (Grade 5 is ~2% of Gleason2019 pixels and left out of the paper's means)."""
    ignore_index: int = 255
    """Not a setting: the label value that no loss or metric counts is one constant,
    ``foveation.geometry.IGNORE_INDEX`` (the value ingest writes for unlabelled pixels, that the
    label cutter pads with and the loss skips). The field stays so that configs and checkpoints
    that carry it still load; any other value is a ConfigError when a model is built
    (``models.foveated.check_config``: this module does not import geometry)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "kept_classes", tuple(int(c) for c in self.kept_classes))
        require(
            len(self.kept_classes) >= 1, "evaluation.kept_classes", "must name at least one class"
        )


TUNE_PRESETS = ("custom", "fov", "resolution", "tradeoff")
TUNE_SEARCHES = ("grid", "random")
TUNE_SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune sweep over patch-set configurations (``jobs.tune``, ``foveation.tuning``).

    Every trial is a short ``jobs.train`` run of the base config with one point of the space
    applied. A "custom" space is the product of ``fov_sets`` x ``base_fovs`` x ``xr_scales`` x
    ``mixes`` x ``lrs``; the output size ``patches.patch_size`` stays fixed (the pixel budget per
    patch). The three presets are the paper's analyses (Sec. 2.1, Fig. 2), each over single-patch
    configurations (D = 1):

    - "fov": patches of ``patches.patch_size`` x ``fov_ratios`` pixels at full resolution
      (the pixels per patch grow with the FoV);
    - "resolution": the whole image (``whole_image`` px) downsampled by each of ``downsamples``
      (the pixels per patch shrink);
    - "tradeoff": FoVs ``patches.patch_size`` x ``fov_ratios`` all resized to
      ``patches.patch_size``: the same pixels per patch, the paper's fixed memory budget.
    """

    preset: str = "custom"
    fov_sets: tuple[tuple[float, ...], ...] = ((1.0, 2.0, 4.0),)
    """Custom: patch sets as FoV ratios of the smallest (the first is 1, strictly increasing);
    each gives D and the FoVs ``base_fov x ratio``."""
    base_fovs: tuple[int, ...] = ()
    """Custom: smallest FoVs in px to try; empty: the base config's ``patches.fovs[0]``."""
    xr_scales: tuple[int, ...] = ()
    """Custom: x_r downsampling factors to try; empty: the base config's."""
    mixes: tuple[str, ...] = ("soft",)
    """Custom: mix modes, names of ``MIX_MODES``; one that takes a patch index as "<mode>-N"
    ("onehot-2")."""
    lrs: tuple[float, ...] = ()
    """Learning rates of the segmenter (encoder and decoder) to try; F's keeps the base ratio
    ``lr_fovnet / lr_encoder``. Empty: the base config's."""
    fov_ratios: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Presets "fov" and "tradeoff": FoVs as multiples of ``patches.patch_size``."""
    downsamples: tuple[int, ...] = (1, 2, 4)
    """Preset "resolution": downsampling factors of the whole image."""
    whole_image: int | None = None
    """Preset "resolution": the image side in px; default ``data.ingest.crop_size``."""
    search: str = "grid"
    """"grid": every point ``num_samples`` times; "random": ``num_samples`` points drawn."""
    num_samples: int = 1
    seed: int = 0
    """Of the random search, and added to each repeat's training seed."""
    epochs: int | None = None
    """Epochs per trial (the short budget; ASHA's max_t); default ``training.epochs``. The best
    config is written with the base's ``training.epochs``, the full budget."""
    scheduler: str = "asha"
    """"asha" stops trials whose val mIoU trails at a rung; "fifo" runs every trial to the end."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: the top 1/reduction_factor of trials at each rung go on."""
    fields: dict[str, tuple] = field(default_factory=dict)
    """Any config fields to search, by dotted name, each with its values (the grid is their
    product, crossed with the patch-set space): ``[tune.fields]`` with, e.g.,
    ``"training.scale_target_weight" = [0.0, 1.0]`` and ``"model.mix.mode" = ["soft", "gumbel"]``.
    Every value is checked as the base config would check it, before any trial starts."""
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.25
    """Logical CPUs of each trial's driver (its Ray Train workers and reader actors take
    ``[distributed]`` and ``[data.pipeline]``'s on top)."""
    max_failures: int = 2
    """Restarts of a trial whose driver was lost (its process killed, its node gone); a
    restarted trial resumes its run from the last checkpoint Ray Train registered. Losing
    only a trial's Train workers is ``distributed.max_failures``' to retry, inside the trial."""

    def __post_init__(self) -> None:
        w = "tune"
        require(isinstance(self.fields, dict), f"{w}.fields", "must be a table of lists")
        for name, values in self.fields.items():
            require(
                isinstance(values, list | tuple) and len(values) >= 1,
                f"{w}.fields.{name}",
                f"must be a non-empty list of values, got {values!r}",
            )
            require(
                name.count(".") >= 1 and not name.startswith("tune."),
                f"{w}.fields.{name}",
                "must be a dotted config field outside [tune], e.g. 'training.entropy_weight'",
            )
        for name in ("fov_sets", "base_fovs", "xr_scales", "mixes", "lrs", "fov_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "fov_sets", tuple(tuple(map(float, s)) for s in self.fov_sets))
        require(self.preset in TUNE_PRESETS, f"{w}.preset", f"must be one of {TUNE_PRESETS}")
        require(self.search in TUNE_SEARCHES, f"{w}.search", f"must be one of {TUNE_SEARCHES}")
        require(
            self.scheduler in TUNE_SCHEDULERS, f"{w}.scheduler", f"must be one of {TUNE_SCHEDULERS}"
        )
        for name in ("fov_sets", "mixes", "fov_ratios", "downsamples"):
            require(len(getattr(self, name)) >= 1, f"{w}.{name}", "is empty: nothing to search")
        for ratios in self.fov_sets:
            require(
                len(ratios) >= 1
                and ratios[0] == 1.0
                and all(a < b for a, b in itertools.pairwise(ratios)),
                f"{w}.fov_sets",
                f"each set starts at 1 and increases strictly, got {list(ratios)}",
            )
        require(all(r >= 1 for r in self.fov_ratios), f"{w}.fov_ratios", "must all be >= 1")
        require(all(d >= 1 for d in self.downsamples), f"{w}.downsamples", "must all be >= 1")
        require(all(lr >= 0 for lr in self.lrs), f"{w}.lrs", "must all be >= 0")
        require(self.num_samples >= 1, f"{w}.num_samples", "must be >= 1")
        require(self.epochs is None or self.epochs >= 1, f"{w}.epochs", "must be >= 1")
        require(self.grace_period >= 1, f"{w}.grace_period", "must be >= 1")
        require(self.reduction_factor > 1, f"{w}.reduction_factor", "must be > 1")
        require(self.max_concurrent_trials >= 1, f"{w}.max_concurrent_trials", "must be >= 1")
        require(self.trial_cpus > 0, f"{w}.trial_cpus", "must be > 0")
        require(self.max_failures >= 0, f"{w}.max_failures", "must be >= 0")


@dataclass(frozen=True)
class Config:
    """The whole config of a run; ``config.toml`` of a checkpoint is this, serialised."""

    patches: PatchSetConfig = field(default_factory=PatchSetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    name: str = "run"

    def __post_init__(self) -> None:
        d, k = self.patches.depth, self.model.num_classes
        mix = self.model.mix
        if MIX_MODES[mix.mode].indexed:
            require(
                mix.index is not None and mix.index < d,
                "model.mix.index",
                f"must be < D = {d} (patches.fovs)",
            )
        if self.training.class_weights is not None:
            require(
                len(self.training.class_weights) == k,
                "training.class_weights",
                f"needs {k} values (model.num_classes), got {len(self.training.class_weights)}",
            )
        require(
            len(self.evaluation.class_names) == k,
            "evaluation.class_names",
            f"needs {k} names (model.num_classes), got {len(self.evaluation.class_names)}",
        )
        require(
            all(0 <= c < k for c in self.evaluation.kept_classes),
            "evaluation.kept_classes",
            f"must be class ids in [0, {k})",
        )
        require(
            not (self.training.precision == "fp16" and not self.distributed.use_gpu),
            "training.precision",
            "'fp16' needs GPUs (distributed.use_gpu = true); use 'bf16' or 'fp32' on CPU",
        )
        require(
            not (self.training.precision == "fp16" and self.distributed.zero_stage != 0),
            "training.precision",
            "'fp16' autocast gets DeepSpeed's loss scaler only with distributed.zero_stage = 0; "
            "use 'bf16' (no scaling needed) with ZeRO 1 or 2",
        )

    def ingest_settings(self) -> IngestConfig:
        """``data.ingest`` as ingest runs it: the store's mpp defaults to the model's."""
        ic = self.data.ingest
        return dataclasses.replace(ic, mpp=ic.mpp if ic.mpp is not None else self.patches.mpp)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data for TOML (unset optionals absent)."""
        return drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def drop_none(obj: Any) -> Any:
    """``obj`` (``dataclasses.asdict`` of a config) as TOML data: TOML has no null, so keys whose
    value is None are left out (an unset optional is simply absent), and tuples become lists."""
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, tuple | list):
        return [drop_none(v) for v in obj]
    return obj


T = typing.TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of the (frozen) dataclass ``cls`` from nested dicts, as read from TOML.

    Values are coerced to the field types (int -> float, lists -> tuples, nested tables ->
    nested dataclasses) and checked (a string where a number belongs is an error); unknown keys
    are errors; the class's own ``__post_init__`` checks run. Every ConfigError names the field
    by its dotted path under ``where`` (the table's own path: "" for the root, "serve"...)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def read_toml(source: str | Path, what: str = "config file") -> dict[str, Any]:
    """The tables of a TOML file; a ConfigError naming the file (as ``what``) when it does not
    exist or is not valid TOML."""
    path = Path(source)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def in_file(exc: ConfigError, source: str | Path, what: str = "config file") -> ConfigError:
    """``exc`` with the file it came from in front: ``config file 'x.toml': patches.fovs: ...``."""
    return ConfigError(f"{what} {str(source)!r}: {exc}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested dicts (a parsed TOML file, a checkpoint's)."""
    return dataclass_from_dict(Config, data, "")


def load_config(source: str | Path) -> Config:
    """Load and validate a TOML config file; every error names the file and the field. The
    checks that need the models run when a model is built
    (``foveation.models.foveated.check_config``)."""
    data = read_toml(source)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise in_file(exc, source) from None


def replace(cfg: Any, **changes: Any) -> Any:
    """A validated copy with some fields changed (``replace(cfg.model, mix=MixConfig('average'))``)."""
    return dataclasses.replace(cfg, **changes)


EXECUTION_FIELDS = {
    "training": ("channels_last", "compile", "adam", "cudnn_benchmark"),
    "distributed": ("threads_per_worker",),
}
"""Fields that change how a run executes, not what it trains (within float rounding): a model
trained with other values is the same model for reuse and resumption."""


def what_it_trains(cfg: Config) -> Config:
    """``cfg`` with its ``EXECUTION_FIELDS`` at their defaults: two configs train the same
    model when these are equal (``reproduce._done``, ``trainer.resumable``)."""
    out = cfg
    for section, names in EXECUTION_FIELDS.items():
        sub = getattr(out, section)
        defaults = {n: f.default for f in dataclasses.fields(sub) if (n := f.name) in names}
        out = dataclasses.replace(out, **{section: dataclasses.replace(sub, **defaults)})
    return out
