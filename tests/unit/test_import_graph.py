"""The house's import order holds: every import in ``platform/foveation`` points down the package
order documented in docs/architecture.md, and no file imports another in a loop.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function
counts as much as one at the top: a lower layer that needs a higher one takes a callback."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "platform" / "foveation"

ORDER = (
    "errors",
    "config",
    "geometry",
    "metrics",
    "monitoring",
    "io",
    "raycluster",
    "localcluster",
    "patches",
    "models",
    "data",
    "checkpoint",
    "inference",
    "training",
    "evaluation",
    "experiments",
    "tuning",
    "serving",
    "prediction",
)
"""The package order, lowest first: a unit may import only units before it (and its own files)."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The ``foveation`` modules a file imports (``from foveation.x import y`` gives
    ``foveation.x.y`` when that is a module, else ``foveation.x``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "foveation"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "foveation":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {_module_name(p): p for p in FILES}


def _unit(module: str) -> str | None:
    """The layer a module belongs to: ``foveation.data.wsi`` -> ``data``; the package root
    (``foveation``, holding only ``__version__``) belongs to none and may be imported by all."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_unit_is_placed_in_the_order():
    units = {_unit(m) for m in MODULES} - {None}
    assert units <= set(ORDER), (
        f"place these in ORDER and docs/architecture.md: {units - set(ORDER)}"
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_package_order(path):
    here = _unit(_module_name(path))
    if here is None:
        return
    upward = [
        target
        for target in sorted(_imports(path))
        if (there := _unit(target)) not in (None, here) and ORDER.index(there) > ORDER.index(here)
    ]
    assert not upward, f"{path.relative_to(ROOT)} ({here}) imports higher layers: {upward}"


def test_no_file_imports_another_in_a_loop():
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package's __init__ re-exporting its own files is not a loop of concerns.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
