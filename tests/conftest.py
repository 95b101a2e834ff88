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


def _prometheus_tool(name: str) -> str:
    """The path of Debian's ``prometheus`` or ``promtool``. Missing: the test is skipped on a
    developer's machine and fails under .ci/run (which installs the package and sets
    FOVEATION_REQUIRE_PROMETHEUS), so CI never passes by skipping."""
    import shutil

    path = shutil.which(name)
    if path is None:
        msg = f"{name} (Debian's prometheus package) is not installed; .ci/run installs it"
        if os.environ.get("FOVEATION_REQUIRE_PROMETHEUS"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _prometheus_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _prometheus_tool("prometheus")
