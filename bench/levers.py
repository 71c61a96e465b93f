"""Measure each speed lever of the CoRSA gradient point on the real default model, in one process.

    python bench/levers.py --data ../shared/benchmarks [--steps 5] [--threads 2] [--compile] \\
        [--out results/levers.json]

For one batch of 16 CounterFact val edits it times one forward and the two backward passes (SFT, DPO) that a
CoRSA gradient point needs, with each lever switched off in turn:
  all levers      corsa's path: common prefix once, each prompt once for y+ and y-, logits at answer positions
  no prefix       prompts shared between y+ and y-, but the common prefix (system turn) run per prompt
  no sharing      y+ and y- as separate full sequences (prefix and prompt run twice), logits at answer positions
  full logits     as "no sharing", but the output layer over every position (what a plain model(...) call does)
  bf16            all levers, under bf16 autocast, the frozen weights stored in fp32 (autocast casts them to bf16
                  in every forward pass)
  bf16, corsa     all levers, under bf16 autocast inside scoring.compute_context, corsa's path with --bf16: the
                  frozen linear weights held in bf16 for the whole run, attention in fp32 (bench/bf16.py measures
                  the two apart); the run also records the largest difference between its gradients and the
                  "bf16" ones
  one backward    all levers, both gradients from one batched backward pass (torch.autograd.grad with
                  is_grads_batched: vmap over the SFT and DPO cotangents) instead of two; the run also records the
                  largest difference between its gradients and the two-pass ones
  torch.compile   all levers, every decoder layer compiled (regional compilation, dynamic shapes); only with
                  --compile, run last because compiling changes the model in place; the first call's time
                  (compilation included) is reported separately
Medians over --steps repetitions after a warm-up; the first row is the reference for the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from common import model_and_edits  # bench/common.py: scripts run as `python bench/NAME.py`

from corsa import artifacts, scoring
from corsa.methods.corsa import CorsaConfig, attach_lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the decoder layers under torch.compile")
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tok, fmt, reqs = model_and_edits(args.data, args.threads)
    model = attach_lora(model, CorsaConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    prompts = [fmt.prompt_ids(r.prompt) for r in reqs]
    new = [fmt.answer_ids(r.target_new) for r in reqs]
    old = [fmt.answer_ids(r.target_old) for r in reqs]
    pad = tok.pad_token_id
    shared = scoring.make_shared_batch(prompts, [(i, a) for i, a in enumerate(new)] + [(i, a) for i, a in
                                                                                       enumerate(old)], pad)
    with mock.patch.object(scoring, "common_prefix_length", lambda seqs: 0):
        unprefixed = scoring.make_shared_batch(prompts, [(i, a) for i, a in enumerate(new)] +
                                               [(i, a) for i, a in enumerate(old)], pad)
    full = scoring.make_batch(list(zip(prompts, new)) + list(zip(prompts, old)), pad)
    n = len(reqs)

    def point(batch, autocast=False, full_logits=False, batched=False):
        with scoring.autocast_context("cpu", autocast):
            if full_logits:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                logits = logits[batch.rows, batch.positions].float()
                lp = F.log_softmax(logits, -1).gather(1, batch.targets[:, None]).squeeze(1)
            else:
                lp, _ = scoring.token_logprobs(model, batch)
        first = batch.rows < n
        sft, dpo = -lp[first].mean(), -lp[~first].mean()
        if batched:
            both = torch.autograd.grad(torch.stack([sft, dpo]), params, grad_outputs=torch.eye(2),
                                       is_grads_batched=True)
            return [g[0] for g in both], [g[1] for g in both]
        return torch.autograd.grad(sft, params, retain_graph=True), torch.autograd.grad(dpo, params)

    variants = {"all levers": lambda: point(shared), "no prefix": lambda: point(unprefixed),
                "no sharing": lambda: point(full), "full logits": lambda: point(full, full_logits=True),
                "bf16": lambda: point(shared, autocast=True), "one backward": lambda: point(shared, batched=True),
                "bf16, corsa": lambda: point(shared, autocast=True)}
    bf16 = scoring.use_bf16("cpu", True)  # else corsa runs the bf16 variants in fp32: nothing to time
    if not bf16:
        print("no fast bf16 on this CPU: the bf16 variants are left out")
        del variants["bf16"], variants["bf16, corsa"]
    two, one = point(shared), point(shared, batched=True)
    batched_max_diff = max((a - b).abs().max().item() for x, y in zip(two, one) for a, b in zip(x, y))
    print(f"one batched backward against two backward passes: largest gradient difference {batched_max_diff:.2e}")
    bf16_max_diff = None
    if bf16:
        autocast_only = point(shared, autocast=True)
        with scoring.compute_context(model, bf16=True):
            corsa_bf16 = point(shared, autocast=True)
        bf16_max_diff = max((a - b).abs().max().item()
                            for x, y in zip(autocast_only, corsa_bf16) for a, b in zip(x, y))
        print(f"bf16, corsa's path against autocast alone: largest gradient difference {bf16_max_diff:.2e}")
    if args.compile:
        variants["torch.compile"] = lambda: point(shared)
    seconds, first_call = {}, {}
    for name, fn in variants.items():
        if name == "torch.compile":
            # Regional compilation (each decoder layer, not the whole PEFT model, whose KV-cache handling breaks
            # graphs); dynamic shapes because batch lengths vary from step to step.
            # A CoRSA point runs two backward passes over one forward (retain_graph), which AOTAutograd's donated
            # buffers forbid.
            torch._functorch.config.donated_buffer = False
            # Dynamo guards on the layer's slot in the shared KV cache, so each decoder layer gets its own graph;
            # the default limit (8) would leave the other layers eager.
            layers = model.get_base_model().model.layers
            torch._dynamo.config.recompile_limit = 4 * len(layers)
            for layer in layers:
                layer.compile(dynamic=True)
        with scoring.compute_context(model, name == "bf16, corsa"):  # set up before the clock starts
            t = time.perf_counter()
            fn()
            first_call[name] = time.perf_counter() - t
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        seconds[name] = statistics.median(times)
    ref = seconds["all levers"]
    print("| variant | s per gradient point (1 fwd + 2 bwd) | vs all levers | first call (s) |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {s / ref:.2f}x | {first_call[name]:.1f} |")
    if args.out:
        artifacts.write_json(args.out, {
            "seconds": seconds, "first_call_seconds": first_call, "steps": args.steps, "threads": args.threads,
            "batched_backward_max_grad_diff": batched_max_diff, "bf16_corsa_max_grad_diff": bf16_max_diff,
            "tokens": {"prefix": shared.prefix_ids.numel(), "shared_prompt_tokens": int(shared.prompt_mask.sum()),
                       "full_tokens": int(full.attention_mask.sum())}})


if __name__ == "__main__":
    main()
