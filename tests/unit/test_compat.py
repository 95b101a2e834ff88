"""What users hold keeps working: a checkpoint written by the platform before the one-batch-path
refactor (commit 48f8459; committed as a fixture, a tiny model) loads with today's code and gives
the outputs it gave then."""

import sys
from pathlib import Path

import pytest
import torch

from foveation._moved import MOVED
from foveation.checkpoint import load_checkpoint

FIXTURE = Path(__file__).parent.parent / "fixtures" / "checkpoint-48f8459"


def test_a_checkpoint_written_before_the_refactor_loads_and_predicts_the_same():
    model, cfg, meta = load_checkpoint(str(FIXTURE))
    assert cfg.name == "compat-48f8459" and meta["step"] == 7
    expected = torch.load(FIXTURE / "expected.pt")
    model.eval()
    with torch.no_grad():
        w = model.location_weights(expected["xr"])
        logits, _ = model(expected["bank"], w)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_old_module_paths_in_the_readme_still_import():
    from foveation.patches import IGNORE_INDEX, XR_CONTEXT, PatchExtractor  # noqa: F401
    from foveation.training.loop import train  # noqa: F401


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_imports_under_its_old_name_as_the_same_object_with_a_warning(old):
    """Flat modules moved into io/ and evaluation/; earlier code (and READMEs: e.g.
    ``from foveation.slides import open_slide``) must keep working, on the very same module."""
    import importlib

    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert mod is new
    assert mod.__spec__.name == MOVED[old]  # reload and pickling still see the real module


def test_evaluate_still_imports_from_the_evaluation_package():
    from foveation.evaluation import evaluate
    from foveation.evaluation.inmemory import evaluate as new

    assert evaluate is new
