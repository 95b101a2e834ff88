import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# jobs/ is run as modules from the repository root; make that true under pytest too.
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def debug_cfg():
    from foveation.config import load_config

    return load_config(ROOT / "jobs/configs/debug.toml")
