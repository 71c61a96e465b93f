"""The library's main entry point: edit requests in, a PEFT adapter folder with its manifest out."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from corsa import artifacts, distributed, models, presets, routing, subjects
from corsa.answers import contains
from corsa.errors import InputError
from corsa.methods import Editor, EditResult, MethodSpec, get
from corsa.methods.base import CONTEXT_FILE
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, check_lengths
from corsa.scoring import current_answers


def mine_old_answers(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
                     max_new_tokens: int = 32, autocast: bool = False) -> list[EditRequest]:
    """Fill in a missing target_old with the model's own greedy answer, marked as mined.

    Users rarely know what a model currently believes, and DPO needs the answer to push down: the one the model
    would actually give is the most useful choice.
    """
    todo = [i for i, r in enumerate(requests) if r.target_old is None]
    if not todo:
        return list(requests)
    answers = current_answers(model, formatter, [requests[i].prompt for i in todo], max_new_tokens=max_new_tokens,
                              autocast=autocast)
    out = list(requests)
    for i, answer in zip(todo, answers):
        out[i] = requests[i].with_old(answer or "(empty answer)", mined=True)
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter method saves (PEFT's adapter state dict), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def check_result(spec: MethodSpec, result: EditResult,
                 start: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Refuse to save a broken edit: an adapter holding NaN or inf, or one that does not change the model (the
    adapter it started from: `start`, else none). Non-finite settings are refused earlier, but finite ones can
    still diverge (too large a learning rate), and the divergence guard then restores the starting adapter: a
    run that learned nothing. Returns the checks, for the manifest."""
    def number(row: dict[str, float], key: str) -> float | None:  # the manifest is strict JSON: no NaN
        value = row.get(key)
        return value if value is not None and math.isfinite(value) else None

    curves = result.curves
    checks: dict[str, Any] = {"learned_share": number(curves[-1], "learned") if curves else None,
                              "first_loss": number(curves[0], "loss") if curves else None,
                              "last_loss": number(curves[-1], "loss") if curves else None}
    if spec.output != "adapter":
        return checks
    state = adapter_state(result.model)
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise InputError(f"training diverged: {len(bad)} of {len(state)} adapter tensors hold NaN or inf (first: "
                         f"{bad[0]}); nothing was written; try a smaller --lr", field="--lr")
    if start is None:
        # A fresh LoRA starts with B = 0: a B still all zero means the adapter adds nothing.
        change = sum(float(t.double().pow(2).sum()) for k, t in state.items() if "lora_B" in k) ** 0.5
    else:
        change = sum(float((t.double() - start[k].double()).pow(2).sum()) for k, t in state.items()
                     if k in start) ** 0.5
    nothing = nothing_learned(change, result.info.get("collapse"), len(curves), checks)
    if nothing:
        raise InputError(f"training learned nothing: {nothing}; nothing was written; check --lr (a smaller one "
                         "if the loss went to NaN) and the method's settings", field="--lr")
    checks.update(finite=True, adapter_change_norm=change)
    return checks


def nothing_learned(change: float, collapse: dict[str, Any] | None, steps: int, checks: dict[str, Any]) -> str | None:
    """Why a run whose adapter moved by `change` learned nothing, or None when it learned something."""
    if change == 0.0:
        return "the adapter is the one it started from"
    if collapse and not collapse.get("restored_share"):
        return f"training diverged (step {collapse['step']}) before any edit was learned"
    if steps < 2:  # one step shows no trend in the loss
        return None
    first, last = checks["first_loss"], checks["last_loss"]
    if not checks["learned_share"] and not (first is not None and last is not None and last < first):
        return "no edit was learned and the training loss did not fall"
    return None


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def edit(requests: list[EditRequest], out: str | Path, *, method: str = "corsa", model: str | None = None,
         overwrite: bool = False, progress: bool = True, command: str | None = None,
         prompt_style: PromptStyle = "auto", preset: str = "auto", scenario: presets.Scenario = "edit",
         route: routing.RouterConfig | None = routing.DEFAULT, **overrides: Any) -> tuple[Path, EditResult]:
    """Train an adapter on `requests` and write it to `out` (PEFT adapter + edit_manifest.json), atomically.

    `route`: how a loaded adapter decides which queries it answers (corsa.routing), recorded in the manifest;
    None answers every query with the adapter.

    Settings: the method's defaults, then the model's preset (`preset="auto"`; "paper" for appendix A.2 as
    written), then `overrides`; `scenario` "code" picks the paper's code settings (presets.PAPER_CODE). Under
    torchrun (several processes) training is split across them; see corsa.distributed."""
    distributed.setup()
    artifacts.check_writable(out, overwrite)
    requests = subjects.filled(requests)  # routing and the subject-swap anchors need each edit's subject
    chosen = presets.choose(preset, model, scenario)
    spec = get(method)
    editor = presets.editor(chosen, method, overrides)  # a bad config fails here
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    name = models.canonical(model)  # checked (fails fast, offline too) and recorded so it works from any folder
    t = time.perf_counter()
    base, tok, path = models.load_model(name)
    formatter = Formatter(tok, prompt_style)
    timings["load_s"] = time.perf_counter() - t
    check_lengths(requests, formatter.prompt_length, models.context_length(base, tok),
                  count_answer=formatter.answer_length)

    t = time.perf_counter()
    requests = mine_old_answers(base, formatter, requests, autocast=bool(getattr(editor.config, "bf16", False)))
    timings["mining_s"] = time.perf_counter() - t

    result = editor.edit(base, formatter, requests, progress=progress)
    timings.update(result.info.pop("timings", {}))
    checks = check_result(spec, result)
    result.info["routing"] = (routing.record(route, result.model, routing.edits_of(requests))
                              if route is not None and spec.output == "adapter" else None)

    if distributed.is_main():  # under torchrun every process holds the same adapter; one writes it
        t = time.perf_counter()
        with artifacts.atomic_dir(out, overwrite) as tmp:
            save_result(spec, result, tmp)
            timings["save_s"] = time.perf_counter() - t
            # Recorded so that a later load can tell a damaged or changed adapter from the one written here.
            sha = {"adapter_sha256": artifacts.adapter_sha256(tmp)} if spec.output == "adapter" else {}
            write_manifest(tmp, editor=editor, result=result, preset=chosen, command=command,
                           model={"name": name, "path": path}, style=formatter.style,
                           timings=timings, wall_time_s=time.perf_counter() - t_start, checks=checks, **sha)
    distributed.barrier()
    return Path(out), result


def trained_earlier(requests: list[EditRequest], out: str | Path, *, method: str = "corsa", model: str | None = None,
                    prompt_style: PromptStyle = "auto", preset: str = "auto", scenario: presets.Scenario = "edit",
                    route: routing.RouterConfig | None = routing.DEFAULT, **overrides: Any
                    ) -> list[EditRequest] | None:
    """The requests as trained (old answers the model gave filled in) when `out` already holds the adapter that
    `edit` with these same arguments writes, else None.

    "The same" is what its manifest records: method, model, settings, routing setting, process count and edits (a
    mined old answer standing for one the request leaves out), and adapter files that still match their checksum.
    How a benchmark row stopped after training and before its evaluation goes on without training again: a code
    row trains for half an hour on 2 CPU cores. In-context methods are not looked up: they train nothing."""
    folder = Path(out)
    if get(method).output != "adapter" or not (folder / artifacts.MANIFEST).is_file():
        return None
    requests = subjects.filled(requests)  # as `edit` trains them
    manifest = artifacts.read_manifest(folder)
    editor = presets.editor(presets.choose(preset, model, scenario), method, overrides)
    wanted_routing = None if route is None else routing.record(route)
    recorded_routing = manifest.get("routing")
    same = (manifest.get("method") == editor.name
            and (manifest.get("model") or {}).get("name") == models.canonical(model)
            and prompt_style in ("auto", manifest.get("prompt_style"))
            # through JSON, as the manifest holds it (tuples become lists)
            and manifest.get("config") == json.loads(json.dumps(dataclasses.asdict(editor.config)))
            and manifest.get("processes") == distributed.world_size()
            and (recorded_routing is None if wanted_routing is None else recorded_routing is not None
                 and all(recorded_routing.get(k) == v for k, v in wanted_routing.items())))
    recorded = manifest.get("edits")
    if not same or not isinstance(recorded, list) or len(recorded) != len(requests):
        return None
    trained = []
    for request, done in zip(requests, recorded):
        if request.target_old is None and isinstance(done, dict) and done.get("old_mined"):
            request = request.with_old(done.get("target_old", ""), mined=True)
        if request.to_dict() != done:
            return None
        trained.append(request)
    files_intact = all((folder / name).is_file() for name in artifacts.ADAPTER_FILES) \
        and artifacts.adapter_sha256(folder) == manifest.get("adapter_sha256")
    return trained if files_intact else None


def save_result(spec: MethodSpec, result: EditResult, folder: Path) -> None:
    """What an edit leaves: the PEFT adapter, or for an in-context method the context it asks with."""
    if spec.output == "context":
        assert spec.save_context is not None  # MethodSpec checks it
        artifacts.write_json(folder / CONTEXT_FILE, spec.save_context(result.formatter))
    else:
        result.model.save_pretrained(str(folder))


def write_manifest(folder: Path, *, editor: Editor, result: EditResult, preset: presets.Preset, command: str | None,
                   model: dict[str, Any], style: str, timings: dict[str, float], wall_time_s: float,
                   **extra: Any) -> None:
    """edit_manifest.json, the one record of how an adapter was made, for `corsa edit` and a store's versions
    alike (`extra`: what only one of them knows, e.g. a store version's number, parent and metrics)."""
    requests = result.requests
    artifacts.write_json(folder / artifacts.MANIFEST, {
        "format": "corsa-edit/1",
        "created": artifacts.now(),
        "command": command,
        "method": editor.name,
        "model": model,
        "prompt_style": style,
        "seed": editor.config.seed,
        "processes": distributed.world_size(),
        "preset": preset.record(),
        **result.info,
        "config": dataclasses.asdict(editor.config),
        **extra,
        "edits": [r.to_dict() for r in requests],
        "mined_old_answers": {r.id or str(i): r.target_old for i, r in enumerate(requests) if r.old_mined},
        "already_new_before_edit": [r.id or str(i) for i, r in enumerate(requests)
                                    if r.old_mined and contains(r.target_old or "", r.target_new)],
        "curves": result.curves,
        "timings": timings,
        "wall_time_s": wall_time_s,
        "versions": artifacts.library_versions(),
    })
