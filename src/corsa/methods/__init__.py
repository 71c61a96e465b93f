"""Editing methods. Each is one module of this package that ends with `register(MethodSpec(...))`; importing the
package imports every module in it, so a new method is one new file (corsa/methods/registry.py says what an entry
declares)."""

from __future__ import annotations

import importlib
import pkgutil

from corsa.methods.base import Editor, EditResult
from corsa.methods.registry import REGISTRY, MethodSpec, Option, Sweep, get, make_editor, register, unregister

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "EditResult", "Editor", "MethodSpec", "Option", "Sweep", "get", "make_editor", "register",
           "unregister"]
