"""Loading an edited model from whatever `corsa edit` or `corsa update` left: a run folder, a store (its head
version), one version folder of a store, a plain PEFT adapter folder, or an in-context method's context.

An adapter is checked before it is used wherever a checksum is on record: a store's versions against store.db,
a version folder taken out of its store against its own version.json (or its manifest's adapter_sha256)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corsa import artifacts, models, routing
from corsa.artifacts import ADAPTER_FILES, adapter_sha256
from corsa.errors import InputError
from corsa.methods import get
from corsa.methods.base import CONTEXT_FILE
from corsa.prompts import Formatter
from corsa.quantize import is_quantized, load_quantized
from corsa.store import DB, STORE_FILE, VERSION_FILE, Store, attach_adapter


def load_edited(run_dir: str | Path, model: str | None = None, *, route: bool = True
                ) -> tuple[torch.nn.Module, Formatter]:
    """A base model with the adapter of a run folder (or any PEFT adapter folder) loaded, ready to answer.

    With `route`, an adapter whose manifest records a routing setting, and a store's version, answer only queries
    about their edits' subjects (corsa.routing); a plain PEFT folder, the portable export, answers everything."""
    run_dir = Path(run_dir)
    if (run_dir / DB).exists() or (run_dir / STORE_FILE).exists():  # a store: its current version, verified
        return load_version(run_dir, None, model, route=route)
    if is_quantized(run_dir):  # `corsa quantize` output: a whole model, no adapter, no routing
        return load_quantized(run_dir)
    owner = store_holding(run_dir)
    if owner is not None:  # one version of a store: the store's record decides what it is and what it must hold
        with Store(owner) as store:
            check_store_model(store, model)
            v = store.version_in(f"versions/{run_dir.resolve().name}")
            if v is None:
                raise InputError(f"{run_dir} lies in the store {owner} but is not one of its committed versions; "
                                 "not loaded", field="--adapter")
            return routing.answering(*store.load(v), store.scope(v), store.routing() if route else None)
    style, method, scope = "auto", None, None
    if (run_dir / artifacts.MANIFEST).exists():
        manifest = artifacts.read_manifest(run_dir)
        model = model or manifest["model"]["name"]
        style, method = manifest.get("prompt_style", "auto"), manifest.get("method")
        if route and manifest.get("routing"):
            scope = routing.from_record(manifest["routing"])
    elif (run_dir / "adapter_config.json").exists():
        model = model or json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    elif not (run_dir / CONTEXT_FILE).exists():
        raise InputError(f"{run_dir} holds no adapter (no adapter_config.json)", field="--adapter")
    verify_recorded_sha256(run_dir)
    base, tok, _ = models.load_model(model)
    if (run_dir / CONTEXT_FILE).exists():  # an in-context edit: the base model, asked with its context
        spec = get(method or "prepend")  # runs written before manifests named the method were prepend's
        assert spec.load_context is not None
        return base, spec.load_context(tok, style, json.loads((run_dir / CONTEXT_FILE).read_text()))
    edits = scope_edits(manifest) if scope else []
    return routing.answering(attach_adapter(base, run_dir), Formatter(tok, style), edits, scope)


def scope_edits(manifest: dict) -> list[routing.Edit]:
    """The facts a manifest's adapter answers for, as routing keys them.

    A store version's manifest lists every fact the version holds as its `scope` (earlier updates included);
    a run's manifest, only its own edits."""
    return [routing.Edit(e["prompt"], e.get("subject"), e["target_new"])
            for e in manifest.get("scope", manifest["edits"])]


def load_version(root: str | Path, v: int | None = None, model: str | None = None, *, route: bool = True
                 ) -> tuple[torch.nn.Module, Formatter]:
    """Version `v` of the store at `root` (default: its head), verified, answering as `corsa ask` does."""
    with Store(root) as store:
        check_store_model(store, model)
        v = store.head if v is None else v
        return routing.answering(*store.load(v), store.scope(v), store.routing() if route else None)


def check_store_model(store: Store, model: str | None) -> None:
    """A store's adapters answer with the store's model; another one asked for is refused, not ignored."""
    if model is not None and models.canonical(model) != store.meta("model"):
        raise InputError(f"{store.root} holds updates of model '{store.meta('model')}', not '{model}'; leave out "
                         "--model to ask with it", field="--model")


def store_holding(folder: Path) -> Path | None:
    """The store `folder` is a version folder of (STORE/versions/NAME with STORE/store.db), else None."""
    resolved = folder.resolve()
    owner = resolved.parent.parent
    return owner if resolved.parent.name == "versions" and (owner / DB).exists() else None


def verify_recorded_sha256(folder: Path) -> None:
    """Refuse an adapter folder whose files no longer match the checksum recorded beside them: a store version's
    version.json, or the manifest's adapter_sha256. A folder with no recorded checksum is loaded as it is."""
    recorded = None
    for name, key in ((VERSION_FILE, "sha256"), (artifacts.MANIFEST, "adapter_sha256")):
        try:
            recorded = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if recorded:
            break
    if not recorded or not all((folder / f).exists() for f in ADAPTER_FILES):
        return
    if adapter_sha256(folder) != recorded:
        raise InputError(f"{folder}'s adapter does not match the sha256 recorded beside it; the file was changed "
                         "after it was written", field="--adapter")


def adapter_folder(source: str | Path, model: str | None = None) -> tuple[Path, str | None]:
    """The adapter folder behind whatever `load_edited` accepts (a store's head version, a version folder, a run
    folder, a PEFT folder), its recorded checksum verified, and the base model it was trained on (`model` where the
    user names one; a store refuses another)."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist", field="SOURCE")
    owner = source if (source / DB).exists() or (source / STORE_FILE).exists() else store_holding(source)
    if owner is not None:
        with Store(owner) as store:
            check_store_model(store, model)
            v = store.head if owner == source else store.version_in(f"versions/{source.resolve().name}")
            if v is None:
                raise InputError(f"{source} lies in the store {owner} but is not one of its committed versions",
                                 field="SOURCE")
            folder = store.adapter_dir(v)
            if folder is None:
                raise InputError(f"{source}: version {v} is the base model, with no adapter to export", field="SOURCE")
            return folder, store.meta("model")
    if (source / artifacts.MANIFEST).exists():
        model = model or artifacts.read_manifest(source)["model"]["name"]
    elif (source / "adapter_config.json").exists():
        model = model or json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not all((source / f).exists() for f in ADAPTER_FILES):
        raise InputError(f"{source} holds no LoRA adapter (adapter_config.json and adapter_model.safetensors); an "
                         "in-context method's run has nothing to export", field="SOURCE")
    verify_recorded_sha256(source)
    return source, model


def adapter_prompt_style(folder: Path) -> str:
    """How the adapter in `folder` was trained to be asked: its manifest's prompt style, else "auto"."""
    if (folder / artifacts.MANIFEST).exists():
        return artifacts.read_manifest(folder).get("prompt_style", "auto")
    return "auto"
