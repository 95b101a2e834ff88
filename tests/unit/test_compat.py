"""What users hold keeps working: a checkpoint written by the platform before the one-batch-path
refactor (commit 48f8459; committed as a fixture, a tiny model) loads with today's code and gives
the outputs it gave then."""

from pathlib import Path

import torch

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
