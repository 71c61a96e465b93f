"""Loading an edited model from whatever `corsa edit` or `corsa update` left: a run folder, a store (its head
version), a plain PEFT adapter folder, or an in-context method's context."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corsa import artifacts, models
from corsa.errors import InputError
from corsa.methods import get
from corsa.methods.base import CONTEXT_FILE
from corsa.prompts import Formatter
from corsa.store import DB, Store


def load_edited(run_dir: str | Path, model: str | None = None) -> tuple[torch.nn.Module, Formatter]:
    """A base model with the adapter of a run folder (or any PEFT adapter folder) loaded, ready to answer."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    if (run_dir / DB).exists():  # a store: its current version, checksum verified
        store = Store(run_dir)
        try:
            return store.load()
        finally:
            store.close()
    style, method = "auto", None
    if (run_dir / artifacts.MANIFEST).exists():
        manifest = artifacts.read_manifest(run_dir)
        model = model or manifest["model"]["name"]
        style, method = manifest.get("prompt_style", "auto"), manifest.get("method")
    elif (run_dir / "adapter_config.json").exists():
        model = model or json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    elif not (run_dir / CONTEXT_FILE).exists():
        raise InputError(f"{run_dir} holds no adapter (no adapter_config.json)", field="--adapter")
    base, tok, _ = models.load_model(model)
    if (run_dir / CONTEXT_FILE).exists():  # an in-context edit: the base model, asked with its context
        spec = get(method or "prepend")  # runs written before manifests named the method were prepend's
        assert spec.load_context is not None
        return base, spec.load_context(tok, style, json.loads((run_dir / CONTEXT_FILE).read_text()))
    edited = PeftModel.from_pretrained(base, str(run_dir))
    edited.eval()
    return edited, Formatter(tok, style)
