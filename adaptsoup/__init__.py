"""adaptsoup: Self-Soupervision — make a deployed ViT robust to distribution shift without target labels.

Importing the package registers adaptsoup's small ViT architectures with timm: at once when timm is already
imported, else the moment timm is (so ``import adaptsoup`` stays light — no torch — for the command line's
help and errors).  ``load_model``, ``read_checkpoint``, ``save_checkpoint`` and ``CheckpointMeta`` are
imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

__all__ = ["CheckpointMeta", "load_model", "read_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"

_LAZY = {"CheckpointMeta": "adaptsoup.core.checkpoint", "read_checkpoint": "adaptsoup.core.checkpoint",
         "save_checkpoint": "adaptsoup.core.checkpoint", "load_model": "adaptsoup.core.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaptsoup' has no attribute {name!r}")


def _register_architectures() -> None:
    importlib.import_module("adaptsoup.core.models")  # its @register_model functions run on import


class _AfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``timm`` with the other finders, runs its module, then registers adaptsoup's architectures."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):  # the finders after this one: site-packages, editable installs ...
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        _register_architectures()


if "timm" in sys.modules:
    _register_architectures()
elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimm())
