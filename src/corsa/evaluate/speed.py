"""`corsa bench speed`: what a LoRA-SFT step and a CoRSA step cost on the same batch, and where the time goes.

All numbers of one model come from one process on the same 16 edits: medians over `steps` repetitions after a
warm-up, so the CoRSA/LoRA ratio is measured under the same machine load. FLOPs are counted by PyTorch's
FlopCounterMode (matrix multiplies and attention, forward and backward) on one untimed repetition; the machine's
matrix-multiply throughput is measured in the same run, so each step's achieved FLOP/s can be read as a share of
what this machine can do.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from corsa import artifacts, models
from corsa.methods.corsa import (
    CorsaConfig,
    CorsaTrainer,
    PairBatch,
    build_trainer,
    cache_reference,
    merged_direction,
    pair_batch,
)
from corsa.optim import pcgrad, sam
from corsa.prompts import Formatter
from corsa.requests import load_benchmark
from corsa.scoring import autocast_context, compute_context, token_logprobs, use_bf16


@dataclass(frozen=True)
class SpeedConfig:
    data: str
    models: tuple[str, ...] = ("smollm2-135m", "gemma-3-270m")
    batch_size: int = 16  # the paper's effective batch
    steps: int = 5
    bf16: bool = False
    seed: int = 0


def median_time(fn: Callable[[], Any], steps: int, sync: Callable[[], None] = lambda: None,
                warmup: bool = True) -> float:
    """Median wall seconds of `steps` calls of `fn`, each waited for with `sync` (the device's queue). One untimed
    call first unless the caller has just made one (warmup=False): the allocator, autotuning and lazy inits."""
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_throughput(device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a square matrix multiply: the machine's practical peak for the work a transformer does."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = _sync(device)
    seconds = median_time(lambda: a @ b, reps, sync)
    return 2 * size**3 / seconds


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_model(name: str, cfg: SpeedConfig) -> dict[str, Any]:
    model, tok, _ = models.load_model(name)
    device = next(model.parameters()).device
    sync = _sync(device)
    formatter = Formatter(tok)
    requests = load_benchmark("counterfact", cfg.data, "val")[: cfg.batch_size]
    corsa_cfg = CorsaConfig(bf16=cfg.bf16, seed=cfg.seed, batch_size=cfg.batch_size)
    lora_cfg = dataclasses.replace(corsa_cfg, use_dpo=False, use_sam=False, pcgrad=None)
    corsa = build_trainer(model, formatter, requests, corsa_cfg)
    model, pairs = corsa.model, corsa.pairs
    lora = CorsaTrainer(model, pairs, lora_cfg, formatter.pad_id)
    idx = list(range(len(pairs)))
    # Steps change the adapter; every repetition must see the same weights, so each timed call restores them.
    start = [p.detach().clone() for p in corsa.params]

    def fresh(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                for p, s in zip(corsa.params, start):
                    p.copy_(s)
            return fn()
        return call

    pb = pair_batch(pairs, idx, corsa_cfg.use_dpo, formatter.pad_id)
    batch = pb.batch
    grads = corsa.gradients(idx)
    direction, _ = merged_direction(grads, corsa_cfg)
    parts: dict[str, Callable[[], Any]] = {
        "reference_logprobs": lambda: cache_reference(model, formatter, requests, pairs, cfg.bf16),
        "lora_step": fresh(lambda: lora.step(idx)),
        "corsa_step": fresh(lambda: corsa.step(idx)),
        "forward": lambda: _forward(model, batch, cfg.bf16),
        "forward_1_backward": lambda: _forward_backward(model, pb, corsa, ("sft",)),
        "forward_2_backwards": lambda: _forward_backward(model, pb, corsa, ("sft", "dpo")),
        "gradients_one_sam_point": lambda: corsa.gradients(idx),
        "pcgrad": lambda: pcgrad.combine(grads.sft, grads.dpo, corsa_cfg.lam, "paper"),  # type: ignore[arg-type]
        "sam_perturb_restore": lambda: sam.restore(corsa.params, sam.perturb(corsa.params, direction, 0.05)),
    }
    with compute_context(model, cfg.bf16):  # as training and scoring run them
        seconds = {k: median_time(fn, cfg.steps, sync) for k, fn in parts.items()}
        flops = {k: _flops(parts[k]) for k in ("lora_step", "corsa_step", "forward")}
    model.train(False)
    bf16 = use_bf16(device, cfg.bf16)  # what the timed parts ran in: fp32 where bf16 is not fast here
    peak = matmul_throughput(device, torch.bfloat16 if bf16 else torch.float32)
    return {
        "model": name, "device": str(device), "batch_size": cfg.batch_size, "steps": cfg.steps, "bf16": bf16,
        "tokens": {"prefix": int(batch.prefix_ids.numel()), "prompts": int(batch.prompt_mask.sum()),
                   "answers": int(batch.answer_mask.sum()), "answer_rows": int(batch.answer_ids.shape[0])},
        "seconds": seconds, "ratio_corsa_over_lora": seconds["corsa_step"] / seconds["lora_step"],
        "flops": flops, "matmul_flops_per_s": peak,
        "achieved_share_of_matmul": {k: flops[k] / seconds[k] / peak for k in flops},
    }


def _forward(model: torch.nn.Module, batch: Any, bf16: bool) -> None:
    with torch.no_grad(), autocast_context(next(model.parameters()).device, bf16):
        token_logprobs(model, batch)


def _forward_backward(model: torch.nn.Module, pb: PairBatch, trainer: CorsaTrainer, which: tuple[str, ...]) -> None:
    """One forward and one backward per objective, as a CoRSA gradient point does (SFT alone: a LoRA step's)."""
    batch = pb.batch
    with autocast_context(trainer.device, trainer.cfg.bf16):
        tok_logp, _ = token_logprobs(model, batch)
    new = torch.isin(batch.rows, pb.new_rows)
    losses = {"sft": -tok_logp[new].mean(), "dpo": -tok_logp[~new].mean() if (~new).any() else tok_logp.sum() * 0}
    for k, name in enumerate(which):
        torch.autograd.grad(losses[name], trainer.params, retain_graph=k < len(which) - 1, allow_unused=True)


def run_speed(cfg: SpeedConfig, out: str | Path, command: str | None = None) -> dict[str, Any]:
    out = Path(out)
    for name in cfg.models:  # a model that cannot load fails now, not after the others have been timed
        models.resolve(name)
    results = [measure_model(name, cfg) for name in cfg.models]
    record = {"command": command, "config": dataclasses.asdict(cfg), "results": results,
              "threads": torch.get_num_threads(),
              "date": artifacts.now(),
              "versions": artifacts.library_versions(), "schema": "corsa-bench-speed/1"}
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(out / "speed.json", record)
    artifacts.write_text(out / "speed.md", format_speed(record) + "\n")
    print(format_speed(record))
    return record


def format_speed(record: dict[str, Any]) -> str:
    parts = list(record["results"][0]["seconds"])
    lines = ["| part | " + " | ".join(r["model"] for r in record["results"]) + " |",
             "|---" * (len(record["results"]) + 1) + "|"]
    for k in parts:
        lines.append(f"| {k} (s) | " + " | ".join(f"{r['seconds'][k]:.3f}" for r in record["results"]) + " |")
    lines.append("| **CoRSA step / LoRA step** | " + " | ".join(f"**{r['ratio_corsa_over_lora']:.2f}x**"
                                                           for r in record["results"]) + " |")
    lines.append("| matmul throughput (GFLOP/s) | " + " | ".join(f"{r['matmul_flops_per_s'] / 1e9:.0f}"
                                                             for r in record["results"]) + " |")
    for k in ("lora_step", "corsa_step", "forward"):
        lines.append(f"| {k}: GFLOP, share of matmul peak | " + " | ".join(
            f"{r['flops'][k] / 1e9:.0f}, {100 * r['achieved_share_of_matmul'][k]:.0f}%" for r in record["results"])
            + " |")
    lines += ["", (f"Medians of {record['config']['steps']} repetitions after a warm-up, batch of "
                   f"{record['config']['batch_size']} CounterFact val edits, {record['threads']} threads, bf16 "
                   f"{_bf16_text(record)}, CPU {record['versions'].get('cpu', 'not recorded')}, {record['date']}. "
                   f"Command: `{record['command']}`")]
    return "\n".join(lines)


def _bf16_text(record: dict[str, Any]) -> str:
    asked, used = record["config"]["bf16"], all(r["bf16"] for r in record["results"])
    return "asked for but not fast here, so fp32" if asked and not used else str(used)
