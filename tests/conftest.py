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


def _stage(module_items: list) -> int:
    """When a test module runs: 0 unit tests (no Ray process exists yet); 1 the multi-node
    modules (fixed or autoscaled clusters), before the session's Ray head starts; 2 the integration modules on that head;
    3 the ones using the session's Serve, last, since Serve is never stopped before the
    session ends. Each later stage's processes take cycles from an earlier one's: with the
    session head and Serve running beside it, the multi-node module took 370 s instead of
    258 s on 2 cores."""
    names = set().union(*(item.fixturenames for item in module_items))
    if "integration" not in module_items[0].path.parts:
        return 0
    if names & {"multinode", "autoscaled"}:
        return 1
    return 3 if "serve_port" in names else 2


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the modules by stage (``_stage``), keeping each module's tests together and in
    their order."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    stages = {path: _stage(group) for path, group in modules.items()}
    items.sort(key=lambda item: stages[item.path])  # stable: file order within a stage
