"""The library's main entry point: edit requests in, a PEFT adapter folder with its manifest out."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from corsa import artifacts, distributed, models
from corsa.errors import InputError
from corsa.methods import EditResult, make_editor
from corsa.methods.prepend import CONTEXT_FILE, PrependFormatter
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, check_lengths
from corsa.scoring import contains, generate


def mine_old_answers(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
                     max_new_tokens: int = 32, autocast: bool = False) -> list[EditRequest]:
    """Fill in a missing target_old with the model's own greedy answer, marked as mined.

    Users rarely know what a model currently believes, and DPO needs the answer to push down: the one the model
    would actually give is the most useful choice.
    """
    todo = [i for i, r in enumerate(requests) if r.target_old is None]
    if not todo:
        return list(requests)
    answers = generate(model, formatter, [requests[i].prompt for i in todo], max_new_tokens=max_new_tokens,
                       autocast=autocast)
    out = list(requests)
    for i, answer in zip(todo, answers):
        out[i] = requests[i].with_old(first_sentence(answer) or "(empty answer)", mined=True)
    return out


def first_sentence(text: str) -> str:
    """The first line, cut after its first sentence: chat models often add a paragraph of commentary, which
    would make y- long and mostly about something other than the fact."""
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"[.!?](\s|$)", line)
    return line[: match.start() + 1] if match else line


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def edit(requests: list[EditRequest], out: str | Path, *, method: str = "corsa", model: str | None = None,
         overwrite: bool = False, progress: bool = True, command: str | None = None,
         prompt_style: PromptStyle = "auto", **overrides: Any) -> tuple[Path, EditResult]:
    """Train an adapter on `requests` and write it to `out` (PEFT adapter + edit_manifest.json), atomically.

    Under torchrun (several processes) training is split across them; see corsa.distributed."""
    distributed.setup()
    artifacts.check_writable(out, overwrite)
    editor = make_editor(method, **overrides)  # a bad config fails here, before the model is loaded
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    base, tok, path = models.load_model(model)
    formatter = Formatter(tok, prompt_style)
    timings["load_s"] = time.perf_counter() - t
    check_lengths(requests, formatter.prompt_length, models.context_length(base, tok))

    t = time.perf_counter()
    bf16 = bool(getattr(editor.config, "bf16", False))
    requests = mine_old_answers(base, formatter, requests, autocast=bf16)
    timings["mining_s"] = time.perf_counter() - t

    result = editor.edit(base, formatter, requests, progress=progress)
    timings.update(result.info.pop("timings", {}))

    if distributed.is_main():  # under torchrun every process holds the same adapter; one writes it
        t = time.perf_counter()
        with artifacts.atomic_dir(out, overwrite) as tmp:
            if isinstance(result.formatter, PrependFormatter):  # no weights changed: the facts are the output
                artifacts.write_json(tmp / CONTEXT_FILE, result.formatter.record())
            else:
                result.model.save_pretrained(str(tmp))
            timings["save_s"] = time.perf_counter() - t
            manifest = {
                "format": "corsa-edit/1",
                "created": artifacts.now(),
                "command": command,
                "method": editor.name,
                "model": {"name": model or models.DEFAULT_MODEL, "path": path},
                "prompt_style": formatter.style,
                "seed": editor.config.seed,
                "processes": distributed.world_size(),
                "config": dataclasses.asdict(editor.config),
                **result.info,
                "edits": [r.to_dict() for r in result.requests],
                "mined_old_answers": {r.id or str(i): r.target_old for i, r in enumerate(result.requests)
                                      if r.old_mined},
                "already_new_before_edit": [r.id or str(i) for i, r in enumerate(result.requests)
                                            if r.old_mined and contains(r.target_old or "", r.target_new)],
                "curves": result.curves,
                "timings": timings,
                "wall_time_s": time.perf_counter() - t_start,
                "versions": artifacts.library_versions(),
            }
            artifacts.write_json(tmp / artifacts.MANIFEST, manifest)
    distributed.barrier()
    return Path(out), result


def load_edited(run_dir: str | Path, model: str | None = None) -> tuple[torch.nn.Module, Formatter]:
    """A base model with the adapter of a run folder (or any PEFT adapter folder) loaded, ready to answer."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    if (run_dir / "store.db").exists():  # a store: its current version
        from corsa.store import Store

        store = Store(run_dir)
        try:
            return store.load()
        finally:
            store.close()
    style = "auto"
    if (run_dir / artifacts.MANIFEST).exists():
        manifest = artifacts.read_manifest(run_dir)
        model = model or manifest["model"]["name"]
        style = manifest.get("prompt_style", "auto")
    elif (run_dir / "adapter_config.json").exists():
        model = model or json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    elif not (run_dir / CONTEXT_FILE).exists():
        raise InputError(f"{run_dir} holds no adapter (no adapter_config.json)", field="--adapter")
    base, tok, _ = models.load_model(model)
    if (run_dir / CONTEXT_FILE).exists():  # an in-context edit: the base model, asked with the facts in front
        record = json.loads((run_dir / CONTEXT_FILE).read_text())
        return base, PrependFormatter(tok, style, context=record["context"], template=record["template"])
    edited = PeftModel.from_pretrained(base, str(run_dir))
    edited.eval()
    return edited, Formatter(tok, style)
