"""Old module names that still import: flat modules that moved into folders by concern.

``import foveation.slides`` (or ``from foveation.slides import open_slide``, as older READMEs
wrote) gives the very module object ``foveation.io.slides``, not a copy, so module state,
monkeypatching and ``isinstance`` checks agree under both names. A ``DeprecationWarning`` names
the new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "foveation.storage": "foveation.io.storage",
    "foveation.rangeio": "foveation.io.rangeio",
    "foveation.slides": "foveation.io.slides",
    "foveation.images": "foveation.io.images",
    "foveation.metrics": "foveation.evaluation.metrics",
    "foveation.slide_eval": "foveation.evaluation.slides",
    "foveation.report": "foveation.evaluation.report",
    "foveation.reproduce": "foveation.evaluation.reproduce",
}
"""Old name -> new name."""


class _OldNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2
        )
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system overwrites __spec__ next; restored below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _OldNameFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldNameFinder())
