"""The shipped recipe learns where to look, quickly enough for every CI run: on a tiny
informative synthetic set (docs/method.md#synthetic-regimes), 128 steps of the demo's recipe
(per-FoV segmenters, own loss, soft mix) segment about as well as the best fixed FoV measured
offline, and F's chosen FoV is larger on context-decided tissue than on texture-decided tissue.

The set: 16 train and 4 test slides of 384 px at the demo's geometry, with the fine texture at
6x its default contrast so that it is learned within the budget (at the default contrast
nothing is learned in a CI-sized budget, by any mode). The reference numbers were measured
offline with the same code and set, seeds 0-2 (``OFFLINE`` below). About 65 s on 2 cores (the
target is 2 minutes); the earlier 240 steps at 4x contrast took 143 s."""

import dataclasses

import numpy as np
import pytest

from foveation.data.samples import Sample
from foveation.data.synthetic import GeneratorParams, TissueScales, generate_slide
from foveation.evaluation.inmemory import evaluate
from foveation.metrics import CUE_NAMES, apsm_cue_sums
from foveation.training.loop import train

STEPS, N_TRAIN, N_TEST, SIZE, CONTRAST = 128, 16, 4, 384, 6.0

# mIoU over benign, G3, G4 on the 4 test slides, seeds 0, 1, 2 (measured 2026-12-01, one thread,
# this test's code with the mix set to each one-hot). The recipe's mean chosen FoV on context /
# texture tissue was 85 / 39, 84 / 42 and 94 / 42 px.
OFFLINE = {
    "onehot-0": (0.511, 0.466, 0.504),
    "onehot-1": (0.297, 0.364, 0.287),
    "onehot-2": (0.424, 0.397, 0.377),
    "recipe": (0.622, 0.561, 0.585),
}


def _slides(cfg):
    scales = TissueScales.from_patches(cfg.patches)
    params = GeneratorParams(regime="informative", texture_contrast=CONTRAST)
    slides = [generate_slide(SIZE, SIZE, scales, 1000 + i, params) for i in range(N_TRAIN + N_TEST)]
    train_set = [Sample(f"t{i}", "train", s.image, s.truth) for i, s in enumerate(slides[:N_TRAIN])]
    test_set = [Sample(f"e{i}", "test", s.image, s.truth) for i, s in enumerate(slides[N_TRAIN:])]
    return train_set, test_set, [s.cue for s in slides[N_TRAIN:]]


@pytest.mark.slow
def test_the_demos_recipe_matches_the_best_fixed_fov_and_looks_where_the_cue_says(debug_cfg):
    assert debug_cfg.model.segmenters == "per_fov" and debug_cfg.training.per_fov_loss == "own"
    cfg = dataclasses.replace(
        debug_cfg,
        training=dataclasses.replace(
            debug_cfg.training, epochs=STEPS * 2 // N_TRAIN, batch_size=2, seed=0
        ),
        # Evaluated as the offline numbers were: abutting tiles (also the cheaper forward).
        inference=dataclasses.replace(debug_cfg.inference, overlap=0.0),
    )
    train_set, test_set, cues = _slides(cfg)
    result = train(cfg, train_set, None, log=lambda s: None)
    m = evaluate(result.model, test_set, cfg, keep_outputs=len(test_set))
    sums, counts = np.zeros(len(CUE_NAMES)), np.zeros(len(CUE_NAMES))
    for out, cue in zip(m["outputs"], cues, strict=True):
        a, b = apsm_cue_sums(out["apsm"], cue, cfg.patches.xr_scale)
        sums, counts = sums + a, counts + b
    apsm = dict(zip(CUE_NAMES, sums / np.maximum(counts, 1), strict=True))
    # Within 0.05 of the best fixed FoV's mean (0.494, the 32 px one-hot): the recipe's seeds
    # spread by 0.06 (and all three beat it by 0.07-0.13); a run that learned nothing scores
    # about 0.2.
    best_fixed = max(np.mean(v) for k, v in OFFLINE.items() if k.startswith("onehot"))
    assert m["miou_kept"] >= best_fixed - 0.05, (m["miou_kept"], best_fixed)
    # The chosen FoV follows the cue by a clear margin (a quarter of the FoV range).
    fovs = cfg.patches.fovs
    assert apsm["context"] - apsm["texture"] >= 0.25 * (fovs[-1] - fovs[0]), apsm
