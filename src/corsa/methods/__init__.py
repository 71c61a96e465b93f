"""Method registry: a name maps to a config factory and an editor class. A new method is one module + one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corsa.methods.base import Editor, EditResult
from corsa.methods.corsa import CorsaConfig, CorsaEditor
from corsa.methods.flearning import FLearningEditor, flearning_config
from corsa.methods.lora import LoraEditor, lora_config
from corsa.methods.memit import MemitEditor, memit_config
from corsa.methods.merge import MergeEditor, merge_config
from corsa.methods.prepend import PrependEditor, prepend_config

REGISTRY: dict[str, tuple[Callable[..., Any], type]] = {
    "corsa": (CorsaConfig, CorsaEditor),
    "lora": (lora_config, LoraEditor),
    "flearning": (flearning_config, FLearningEditor),
    "prepend": (prepend_config, PrependEditor),
    "merge": (merge_config, MergeEditor),
    "memit": (memit_config, MemitEditor),
}

# Methods whose result is an adapter that a later update can keep training (stores, multi-update benchmarks).
CONTINUABLE = ("corsa", "lora")


def make_editor(name: str, **overrides: Any) -> Editor:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    config_factory, editor_cls = REGISTRY[name]
    return editor_cls(config_factory(**overrides))


__all__ = ["REGISTRY", "CorsaConfig", "CorsaEditor", "EditResult", "Editor", "LoraEditor", "make_editor"]
