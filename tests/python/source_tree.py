"""Importing spattn for the tests of its pure-Python parts (demo, distill).

The installed package is used when it imports (conftest.py imports it first). Otherwise the source
tree's python/ directory goes on sys.path, unless PYTHONPATH already names another spattn, and if
the package still does not import (its compiled extension is not built) a bare package object is
installed so that the pure-Python subpackages load on their own.
"""

import importlib
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = os.path.join(ROOT, "python")


def import_spattn():
    """(the spattn module, whether it is the real package with its extension)."""
    if PY not in sys.path and not any(
            os.path.isfile(os.path.join(p, "spattn", "__init__.py"))
            for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p):
        sys.path.insert(0, PY)
    try:
        return importlib.import_module("spattn"), True
    except ImportError:
        for name in [n for n in sys.modules if n == "spattn" or n.startswith("spattn.")]:
            del sys.modules[name]
        pkg = types.ModuleType("spattn")
        pkg.__path__ = [os.path.join(PY, "spattn")]
        sys.modules["spattn"] = pkg
        return pkg, False
