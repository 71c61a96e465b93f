"""`corsa export`: an edited model in the forms other tools run (issue 31).

  merged     the base model with the adapter folded into its weights, as a transformers folder (safetensors and
             the tokenizer): `AutoModelForCausalLM.from_pretrained(DIR)` loads it, and so do vLLM, SGLang and
             llama.cpp's own converter.
  gguf       the merged model as one GGUF file for llama.cpp and Ollama: the base model's own GGUF (a packaged
             model's, or --base-gguf) with every adapted projection replaced by its merged weights (f32, f16 or
             q8_0) and everything else, metadata and tokenizer included, copied byte for byte
  gguf-lora  the adapter as a GGUF LoRA file for llama.cpp (`llama-cli -m BASE.gguf --lora lora.gguf`), written
             with the `gguf` package: llama.cpp's tensor names ("blk.0.attn_q.weight.lora_a"), A as [r, in] and B
             as [out, r] as PEFT stores them, alpha in the header (llama.cpp scales by alpha / r, as PEFT does).

An exported model answers every question with the edits applied: scope routing (corsa.routing) needs corsa at
inference time, so it stays with `corsa ask`; the export's record says so.

llama.cpp's converter reorders the rows of every llama-type q and k projection (`rotary_rows`): Hugging Face keeps
each head's rotary pairs as two halves, GGML's rope expects them interleaved. The same reordering applies to B,
whose rows are the projection's outputs; A (its inputs) is untouched. Only llama-type models are written as
gguf-lora: another architecture's layout is not checked here, and a wrong one would load without complaint and
answer wrongly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from corsa import artifacts, models
from corsa.errors import InputError
from corsa.loading import adapter_folder, adapter_prompt_style, store_holding
from corsa.prompts import Formatter
from corsa.quantize import (
    QuantConfig,
    calibration_items,
    input_hessians,
    is_quantized,
    low_rank,
    quantize_model,
    task_gradients,
    write_quantized,
)
from corsa.requests import FIELDS, EditRequest, parse_request
from corsa.store import DB, STORE_FILE, Store, attach_adapter

Format = Literal["merged", "gguf-lora", "gguf"]
FORMATS: tuple[str, ...] = ("merged", "gguf-lora", "gguf")
DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
RECORD = "corsa_export.json"
GGUF_FILE = "lora.gguf"
MODEL_GGUF_FILE = "model.gguf"
# Architectures whose gguf-lora layout is written (and tested) here: the transformers model type and the name
# llama.cpp gives it. SmolLM2 is a Llama.
GGUF_ARCHS = {"llama": "llama"}


def is_export(folder: Path) -> bool:
    """A folder `corsa export` wrote: it holds a readable export record."""
    try:
        return json.loads((folder / RECORD).read_text()).get("format", "").startswith("corsa-export/")
    except (OSError, ValueError, AttributeError):
        return False


def rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q or k projection (or of its LoRA B) in GGML's rope order: within each head, the rotary
    pair (i, i + d/2) that Hugging Face keeps as two halves becomes rows (2i, 2i + 1)."""
    out = weight.shape[0]
    if out % (2 * heads):
        raise ValueError(f"{out} rows do not split into {heads} heads of rotary pairs")
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def lora_pairs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A, B) per adapted module, by its name in the base model ("model.layers.0.mlp.up_proj")."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = value
    broken = [m for m, p in pairs.items() if set(p) != {"lora_A", "lora_B"}]
    if broken or not pairs:
        raise InputError(f"the adapter holds no complete LoRA pair{f' for {broken[0]}' if broken else ''}",
                         path=str(folder / "adapter_model.safetensors"))
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def check_finite(named: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse to export a model with a NaN or infinite weight: it would load anywhere and answer nothing."""
    for name, tensor in named.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{name} has values that are not finite; nothing was exported", path=str(where))


def plain_lora_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, refused where llama.cpp would scale it differently from PEFT."""
    config = json.loads((folder / "adapter_config.json").read_text())
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise InputError(f"a {flag.removeprefix('use_')} adapter cannot be written as gguf-lora (llama.cpp "
                             "scales every LoRA by alpha / r)", path=str(folder / "adapter_config.json"))
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise InputError(f"an adapter with a per-module {pattern} cannot be written as gguf-lora (one alpha "
                             "per file)", path=str(folder / "adapter_config.json"))
    return config


def gguf_tensors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Any
                 ) -> dict[str, torch.Tensor]:
    """llama.cpp's name for every LoRA tensor, with B's rows reordered for the q and k projections."""
    out = {}
    for module, (a, b) in pairs.items():
        name = gguf_name_of(module, config)
        out[f"{name}.lora_a"] = a
        out[f"{name}.lora_b"] = in_gguf_order(module, b, config)
    return out


def write_gguf_lora(path: Path, tensors: dict[str, torch.Tensor], arch: str, alpha: float, dtype: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().float().cpu().numpy().astype(np.float16 if dtype == "f16"
                                                                              else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_config(path: str, fmt: str) -> Any:
    """The base model's transformers config, refused for an architecture whose llama.cpp layout is not written
    here."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", None) or config
    if config.model_type not in GGUF_ARCHS:
        raise InputError(f"{fmt} export knows llama.cpp's layout for {', '.join(GGUF_ARCHS)} models, not "
                         f"{config.model_type}; use --format merged", field="--format")
    return config


def base_gguf_reader(base_gguf: str | Path | None, model_name: str | None, config: Any) -> tuple[Any, Path]:
    """The base model's own GGUF (a reader, and where it is), checked to be a llama.cpp model of the same shape as
    the adapter's base."""
    import gguf

    path = Path(base_gguf) if base_gguf is not None else models.packaged_gguf(model_name)
    if path is None:
        raise InputError("--format gguf copies the base model's own GGUF and replaces the adapted weights; "
                         f"{model_name} has none here: give it with --base-gguf FILE, or export --format merged and "
                         "convert that folder with llama.cpp's convert_hf_to_gguf.py", field="--base-gguf")
    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        blocks = reader.fields[gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)].contents()
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"not a readable llama.cpp model GGUF ({exc})", path=str(path)) from None
    if arch != GGUF_ARCHS[config.model_type] or blocks != config.num_hidden_layers:
        raise InputError(f"a {arch} model of {blocks} blocks, not the adapter's base model ({config.model_type}, "
                         f"{config.num_hidden_layers} blocks)", path=str(path))
    return reader, path


def gguf_name_of(module: str, config: Any) -> str:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCHS[config.model_type].upper()],
                                     config.num_hidden_layers)
    base = names.get_name(module)
    if base is None:
        raise InputError(f"llama.cpp has no tensor for the adapted module {module}", field="--format")
    return f"{base}.weight"


def in_gguf_order(module: str, weight: torch.Tensor, config: Any) -> torch.Tensor:
    """A projection's (or LoRA B's) rows as llama.cpp's converter orders them (q and k: `rotary_rows`)."""
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    last = module.rsplit(".", 1)[-1]
    return rotary_rows(weight, heads[last]) if last in heads else weight


def write_merged_gguf(path: Path, reader: Any, replaced: dict[str, torch.Tensor], dtype: str) -> None:
    """The base GGUF with the tensors in `replaced` (by GGUF name, rows already in llama.cpp's order) written anew
    as `dtype`; every other tensor and every metadata field copied unchanged."""
    import gguf
    import numpy as np

    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer adds these itself
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    data = []
    for t in reader.tensors:
        if t.name in replaced:
            w = replaced[t.name].detach().float().cpu().numpy()
            kind = kinds[dtype]
            array = gguf.quants.quantize(w, kind) if dtype == "q8_0" else w.astype(
                np.float16 if dtype == "f16" else np.float32)
        else:
            kind, array = gguf.GGMLQuantizationType(t.tensor_type), t.data
        writer.add_tensor_info(t.name, array.shape, array.dtype, array.nbytes, raw_dtype=kind)
        data.append(array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array)
    writer.close()


def export(source: str | Path, to: str | Path, fmt: Format = "merged", *, model: str | None = None,
           overwrite: bool = False, dtype: str = "f32", base_gguf: str | Path | None = None,
           command: str | None = None) -> Path:
    """Write the adapter of `source` (a run folder, a store's head, a version folder or a PEFT folder) as `fmt`
    into the folder `to`, atomically. Everything is checked before anything is written."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}", field="--format")
    allowed = DTYPES if fmt == "gguf" else ("f32", "f16")
    if dtype not in allowed:
        raise InputError(f"--format {fmt} writes {' or '.join(allowed)}, not {dtype}", field="--dtype")
    if base_gguf is not None and fmt != "gguf":
        raise InputError("--base-gguf is for --format gguf", field="--base-gguf")
    to = artifacts.check_writable(to, overwrite, owned=is_export, field="--to")
    folder, model_name = adapter_folder(source, model)
    path = models.resolve(model_name)
    record: dict[str, Any] = {"format": "corsa-export/1", "export": fmt, "dtype": dtype, "source": str(source),
                              "adapter": str(folder.resolve()), "adapter_sha256": artifacts.adapter_sha256(folder),
                              "model": models.canonical(model_name), "created": artifacts.now(), "command": command,
                              "routing": "none: an exported model answers every question with the edits applied "
                                         "(`corsa ask --adapter` answers only questions about the edits' subjects)",
                              "versions": artifacts.library_versions()}
    if fmt == "gguf-lora":
        config = llama_config(path, fmt)
        lora = plain_lora_config(folder)
        pairs = lora_pairs(folder)
        check_finite({f"{m}.{p}": t for m, ab in pairs.items() for p, t in zip(("lora_A", "lora_B"), ab)}, folder)
        tensors = gguf_tensors(pairs, config)
        record.update(file=GGUF_FILE, architecture=GGUF_ARCHS[config.model_type], rank=lora["r"],
                      alpha=lora["lora_alpha"], tensors=len(tensors))
        with artifacts.atomic_dir(to, overwrite, owned=is_export) as tmp:
            write_gguf_lora(tmp / GGUF_FILE, tensors, GGUF_ARCHS[config.model_type], lora["lora_alpha"], dtype)
            artifacts.write_json(tmp / RECORD, record)
        return to
    if fmt == "gguf":
        config = llama_config(path, fmt)
        reader, base_path = base_gguf_reader(base_gguf, model_name, config)
        adapted = list(lora_pairs(folder))
        merged, _, _ = merged_model(source, model)
        weights = dict(merged.named_parameters())
        replaced = {gguf_name_of(m, config): in_gguf_order(m, weights[f"{m}.weight"], config) for m in adapted}
        missing = sorted(set(replaced) - {t.name for t in reader.tensors})
        if missing:
            raise InputError(f"the base GGUF has no tensor {missing[0]}", field="--base-gguf")
        record.update(file=MODEL_GGUF_FILE, base_gguf=str(base_path.resolve()), replaced=len(replaced),
                      copied=len(reader.tensors) - len(replaced))
        with artifacts.atomic_dir(to, overwrite, owned=is_export) as tmp:
            write_merged_gguf(tmp / MODEL_GGUF_FILE, reader, replaced, dtype)
            record["bytes"] = (tmp / MODEL_GGUF_FILE).stat().st_size
            artifacts.write_json(tmp / RECORD, record)
        return to
    merged, formatter, _ = merged_model(source, model)
    tok = formatter.tokenizer
    if dtype == "f16":
        merged = merged.to(torch.float16)
    with artifacts.atomic_dir(to, overwrite, owned=is_export) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        record["parameters"] = sum(p.numel() for p in merged.parameters())
        record["bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        artifacts.write_json(tmp / RECORD, record)
    return to


def merged_model(source: str | Path, model: str | None = None
                 ) -> tuple[torch.nn.Module, Formatter, dict[str, Any]]:
    """The base model with the adapter of `source` folded in (refused if any weight is not finite), its
    formatter, and what identifies the source."""
    merged, formatter, record, _ = merged_with_deltas(source, model)
    return merged, formatter, record


def merged_with_deltas(source: str | Path, model: str | None = None, rank: int = 0
                       ) -> tuple[torch.nn.Module, Formatter, dict[str, Any],
                                  dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """merged_model's three, and the change the adapter makes to each matrix as a rank-`rank` product (up, down),
    by the matrix's module name in the merged model (none when `rank` is 0). Taken before merging, from PEFT's own
    delta of each adapted layer, so any LoRA variant's scaling is the one PEFT applies."""
    from peft.tuners.lora import LoraLayer

    folder, model_name = adapter_folder(source, model)
    base, tok, _ = models.load_model(model_name)
    adapted = attach_adapter(base, folder)
    deltas = {}
    if rank:
        for name, layer in adapted.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):  # its name is the merged model's module name
                change = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                if isinstance(change, torch.Tensor):
                    deltas[name] = low_rank(change, rank)
    merged = adapted.merge_and_unload()
    check_finite(dict(merged.state_dict()), folder)
    record = {"source": str(source), "adapter": str(folder.resolve()),
              "adapter_sha256": artifacts.adapter_sha256(folder), "model": models.canonical(model_name)}
    return merged.eval(), Formatter(tok, adapter_prompt_style(folder)), record, deltas


def edits_of_source(source: str | Path) -> list[EditRequest]:
    """The edits the adapter of `source` holds: a store's facts at its head (the latest request of each prompt),
    or a run's manifest edits; none for a bare PEFT folder."""
    source = Path(source)
    folder, _ = adapter_folder(source)
    owner = source if (source / DB).exists() or (source / STORE_FILE).exists() else store_holding(source)
    if owner is not None:
        with Store(owner) as store:
            v = store.head if owner == source else store.version_in(f"versions/{source.resolve().name}")
            latest = dict(store.lineage_edits(store.head if v is None else v, "request"))
        return [user_request(json.loads(r), str(owner / DB), k + 1) for k, r in enumerate(latest.values())]
    if not (folder / artifacts.MANIFEST).exists():
        return []
    edits = artifacts.read_manifest(folder).get("edits") or []
    return [user_request(e, str(folder / artifacts.MANIFEST), k + 1) for k, e in enumerate(edits)]


def user_request(recorded: dict[str, Any], where: str, k: int) -> EditRequest:
    """A recorded edit as a request again: the fields a user may write (bookkeeping such as `meta` and
    `old_mined` left out), checked as a JSONL line is."""
    return parse_request({key: v for key, v in recorded.items() if key in FIELDS}, where, k)


def size_text(n_bytes: int) -> str:
    """A file size for people: 512 bytes, 3.4 MiB."""
    size, unit = float(n_bytes), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n_bytes} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def quantize(source: str | Path, to: str | Path, cfg: QuantConfig | None = None, *,
             requests: list[EditRequest] | None = None, overwrite: bool = False, command: str | None = None
             ) -> tuple[Path, dict[str, Any]]:
    """`corsa quantize`: merge the adapter of `source` into its base model, quantize it with `cfg`
    (corsa.quantize) and write the folder `to` atomically. The edits that condition TaCQ come from the source's
    record unless `requests` are given."""
    cfg = cfg or QuantConfig()
    to = artifacts.check_writable(to, overwrite, owned=is_quantized, field="--to")
    t0 = time.perf_counter()
    model, formatter, source_record, deltas = merged_with_deltas(source, rank=cfg.delta_rank)
    if cfg.delta_rank and not deltas:
        raise InputError(f"{source}'s adapter has no LoRA layer whose change could be kept", field="--delta-rank")
    if requests is None:
        requests = edits_of_source(source)
    tacq = cfg.saliency == "tacq" and cfg.keep > 0
    if (tacq or cfg.quantizer == "gptq") and cfg.calibration == "edits" and not requests:
        raise InputError(f"{source} records no edits to condition the quantization on; pass --calibration general",
                         field="--calibration")
    grads = hessians = None
    if tacq or cfg.quantizer == "gptq":
        keep_items, margins = calibration_items(model, formatter, requests, cfg)
        if tacq:
            grads = task_gradients(model, formatter, keep_items, margins, cfg)
        if cfg.quantizer == "gptq":  # the same text as the task: the new answers, not the old ones
            hessians = input_hessians(model, formatter, keep_items + [(p, new) for p, new, _ in margins])
    tensors, counts = quantize_model(model, cfg, grads, hessians, deltas)
    task = "the edits and general questions" if cfg.calibration == "edits" else "general questions"
    if cfg.calibration == "edits" and cfg.contexts_per_edit:
        task = f"the edits (each prompt also behind {cfg.contexts_per_edit} model-written contexts) and general questions"
    rounding = "round-to-nearest" if cfg.quantizer == "rtn" else f"GPTQ on {task}"
    method = (rounding if cfg.keep == 0 else f"largest |W| kept, {rounding}" if cfg.saliency == "magnitude"
              else f"TaCQ, |(Q(W) - W) * dL/dW| on {task}, {rounding}")
    if cfg.keep > 0 and cfg.keep_scope == "model":
        method += f"; the {cfg.keep} % kept ranked over the whole model"
    if cfg.delta_rank:
        method += f"; the adapter's change kept beside each matrix at rank {cfg.delta_rank} in 16 bits"
    record = {"config": asdict(cfg), **counts, "method": method, "source": source_record, "edits": len(requests),
              "created": artifacts.now(), "command": command, "seconds": time.perf_counter() - t0,
              "routing": "none: the quantized model answers every question with the edits applied",
              "versions": artifacts.library_versions()}
    with artifacts.atomic_dir(to, overwrite, owned=is_quantized) as tmp:
        write_quantized(tmp, tensors, model, formatter, record)
    return to, record
