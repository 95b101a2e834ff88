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
