"""The repository's scripts and benchmarks, loaded as modules from their files (they are not in a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """The file at ``relative`` (from the repository's root, e.g. ``benchmarks/scale.py``) as a module, registered in
    ``sys.modules`` under its file's name (dataclasses look their module up there)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
