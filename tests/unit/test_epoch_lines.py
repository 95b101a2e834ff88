"""The driver prints each epoch's line once, in order, from storage (no Ray)."""

from __future__ import annotations

import time

from foveation.io import storage
from foveation.training.trainer import EpochLines
from foveation.training.worker import write_epoch_line


def test_epoch_lines_are_printed_once_in_order_and_a_resumed_runs_old_lines_are_not(tmp_path):
    progress = str(tmp_path / "history" / "epochs")
    write_epoch_line(progress, 1, "epoch 1/3 (before the resume)")
    seen: list[str] = []
    with EpochLines(progress, seen.append, every_s=0.05):
        write_epoch_line(progress, 2, "epoch 2/3")
        time.sleep(0.3)  # polled while the run goes on, not only at the end
        assert seen == ["epoch 2/3"]
        write_epoch_line(progress, 3, "epoch 3/3")  # the last, just before the run ends
    assert seen == ["epoch 2/3", "epoch 3/3"]
    assert not [f for f in storage.list_files(progress) if not f.endswith(".txt")]


def test_no_progress_directory_yet_is_not_an_error(tmp_path):
    seen: list[str] = []
    with EpochLines(str(tmp_path / "nothing"), seen.append, every_s=0.05):
        time.sleep(0.1)
    assert seen == []


def test_both_trainers_print_an_epoch_as_the_one_line_of_its_record():
    """One record (``EpochMetrics``) and one line for it, whichever trainer ran the epoch: the
    Ray worker writes it for the driver to print, the single-device trainer logs it."""
    from foveation.training.recorder import EpochMetrics, epoch_line

    m = EpochMetrics(
        epoch=2,
        step=8,
        loss=0.123456,
        seconds=4.0,
        samples_per_s=64.25,
        megapixels_per_s=0.5,
        world_size=1,
        peak_memory_mb=100.0,
        weight_mean={"32": 0.5, "64": 0.3, "128": 0.2},
        weight_entropy=0.9,
        fovnet_grad_norm=0.00123,
        apsm={"all": 61.6},
        val={"miou": 0.4567},
    )
    assert epoch_line(m, 3) == (
        "epoch 2/3 step 8 loss 0.1235 val mIoU 0.457 64.2 locations/s mean weight per FoV "
        "[0.5, 0.3, 0.2] entropy 0.900 F grad 1.23e-03 APSM {'all': 62}"
    )
    plain = epoch_line(EpochMetrics(1, 4, 1.0, 1.0, 8.0, 0.1, 1, 1.0), 3)
    assert plain == (
        "epoch 1/3 step 4 loss 1.0000 8.0 locations/s mean weight per FoV [] entropy 0.000 "
        "F grad 0.00e+00"
    )
