"""The `corsa` command: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from corsa.errors import InputError

# (argument dest, config field) of the training flags every method shares
TRAINING_FLAGS = (("epochs", "epochs"), ("seed", "seed"), ("lr", "lr"), ("batch_size", "batch_size"),
                  ("micro_batch_size", "micro_batch_size"), ("warmup_steps", "warmup_steps"),
                  ("lr_schedule", "lr_schedule"), ("stop_share", "learned_share"), ("patience", "patience"))


def _method_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields the user set; anything left unset keeps the method's default (its preset, else the paper's)."""
    out: dict[str, Any] = {}
    for flag, field in TRAINING_FLAGS:
        if getattr(args, flag, None) is not None:
            out[field] = getattr(args, flag)
    if args.bf16:
        out["bf16"] = True
    if args.no_early_stop:
        out["stop_when_learned"] = False
    from corsa.methods.registry import options

    for flag, (option, methods) in options().items():  # in each method's declared order
        # `corsa demo` has no --method: it declares only the flags every method it trains takes
        given = getattr(args, option.dest, None)
        if given is None or given is False:
            continue
        if hasattr(args, "method") and args.method not in methods:
            raise InputError(f"{flag} does not apply to --method {args.method}; it applies to --method "
                             f"{' and '.join(methods)}", field="--method")
        out[option.field] = given if option.type is not None else option.value
        out.update(option.also)
    return out


class Parser(argparse.ArgumentParser):
    """argparse, with an argument error in one line (the usage block buries it) that says where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def finite(text: str) -> float:
    """A float flag's type: a finite number (NaN and inf would train an adapter of NaNs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def whole(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An int flag's type: a whole number >= low (and <= high, where a larger one cannot work: `why`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}{why}, not {value}")
        return value

    parse.__name__ = f"whole number >= {low}"  # argparse names the type in its messages
    return parse


POSITIVE, COUNT = whole(1), whole(0)
SEED = whole(0, 2**32 - 1, " (the seed of every random generator used)")
THREADS = whole(1, os.cpu_count() or 1, f" (this machine has {os.cpu_count()} CPUs)")
# A negative number after a flag ("--lr -1e-3") reads, to argparse, as another flag unless it looks like "-1" or
# "-.5"; joined into "--lr=-1e-3" it is the flag's value, and the range check can answer it.
NEGATIVE_NUMBER = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _parsed(kind: Callable[[str], Any], text: str, flag: str) -> Any:
    """A value read with an argparse type (finite, whole(...)) outside argparse: from a list-valued flag or one
    that also takes a word; refused as an InputError naming the flag."""
    try:
        return kind(text)
    except argparse.ArgumentTypeError as exc:
        raise InputError(str(exc), field=flag) from None


def _number(text: str, flag: str) -> float:
    return _parsed(finite, text, flag)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="smollm2-135m (default), gemma-3-270m, a local folder or a hub id")
    p.add_argument("--epochs", type=POSITIVE, help="upper bound on epochs (training stops once all edits are learned)")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--lr", type=finite, help="learning rate (default: the --preset's; paper: 2e-4)")
    p.add_argument("--lr-schedule", choices=["constant", "linear"],
                   help="constant (default) or linear decay to 0 over --epochs (the released code's HF default)")
    p.add_argument("--warmup-steps", type=COUNT, help="linear warm-up steps (default 0; the released code uses 5)")
    p.add_argument("--batch-size", type=POSITIVE, help="effective batch size (paper: 16)")
    p.add_argument("--micro-batch-size", type=POSITIVE, help="split each batch to save memory; same result")
    p.add_argument("--no-early-stop", action="store_true", help="train all --epochs even once every edit is learned")
    p.add_argument("--stop-share", type=finite, help="stop once this share of the edits is learned for --patience "
                                                    "epochs in a row (default: the --preset's, else 1.0: every edit)")
    p.add_argument("--patience", type=POSITIVE, help="epochs in a row the edits must stay learned before training stops "
                                                "(default 2)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with native bf16; fp32, "
                                                       "with a note, where bf16 is slow)")
    p.add_argument("--threads", type=THREADS, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "qa"],
                   help="auto: the chat template when the model has one, else the paper's 'Q: ...\\nA:' prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preset", default="auto", choices=["auto", "paper"],
                   help="auto (default): the best setting measured for a known model (smollm2-135m: CoRSA ρ 0.5, lr "
                        "2e-3, --anchors 2 --anchor-loss kl --relation-anchors 2 and LoRA lr 2e-3 for one update; "
                        "ρ 0.5, lr 2e-4, --stop-share 0.95 for a store; "
                        "provenance in each manifest), else the paper's; paper: appendix A.2 exactly. Flags you set "
                        "override it")


def _add_method_flags(p: argparse.ArgumentParser, shared_by: tuple[str, ...] | None = None) -> None:
    """--method and every method's own flags; with `shared_by` (the demo's methods), no --method and only the
    flags all of those methods take."""
    # Choices, help and each method's own flags come from the method registry (corsa/methods/registry.py).
    from corsa.methods import REGISTRY
    from corsa.methods.registry import options

    if shared_by is None:
        p.add_argument("--method", default="corsa", choices=list(REGISTRY),
                       help="; ".join(spec.help for spec in REGISTRY.values()))
    for flag, (option, methods) in options().items():
        if shared_by is not None and not set(shared_by) <= set(methods):
            continue
        if option.type is None:
            p.add_argument(flag, dest=option.dest, action="store_true", help=option.help)
        else:
            kind = finite if option.type is float else option.type  # no NaN or inf reaches a config
            p.add_argument(flag, dest=option.dest, type=kind, choices=option.choices, help=option.help)


def _add_routing_flags(p: argparse.ArgumentParser, *, off: bool = True) -> None:
    """The routing flags; without `off`, no --no-route (a store is always routed; `corsa ask --no-route` asks
    one of its versions unrouted)."""
    if off:
        p.add_argument("--no-route", action="store_true",
                       help="answer every query with the adapter (default: only queries about an edit's subject; "
                            "the rest with the unedited model)")
    p.add_argument("--route-threshold", type=finite, help="similarity a query needs to an edit's subject key to be "
                   "answered with the adapter (default 0.95; docs/log/2026-12-05-routing.md)")
    p.add_argument("--route-depth", type=finite, help="layer of the routing keys, as a share of the model's depth "
                   "(default 0.17: layer 5 of SmolLM2-135M's 30)")
    p.add_argument("--no-route-hint", action="store_true", help="ask a routed question as it is (default: with its "
                   "matched edit's fact written in front, on top of the adapter)")
    p.add_argument("--no-route-relations", action="store_true", help="send a question about an edit's subject to "
                   "the adapter even when it asks another relation of it (default: \"What language is spoken in "
                   "France?\" is left to the unedited model after an edit of France's capital)")
    p.add_argument("--no-route-bare", action="store_true", help="key each edit's subject only as its prompt reads "
                   "it (default: also alone, so that a question opening with the subject is matched)")
    p.add_argument("--no-route-names", action="store_true", help="key an edit of a country only by the name its "
                   "prompt gives (default: also by its other names, adjective and people: \"Canadian\", \"USA\")")
    p.add_argument("--no-route-clauses", action="store_true", help="read a question only as written (default: also "
                   "from the start of each later clause, so a subject after an unrelated clause is matched)")


def _add_source_and_to(p: argparse.ArgumentParser, done: str) -> None:
    """What `corsa export` and `corsa quantize` read and where they write."""
    p.add_argument("source", help="a run folder written by `corsa edit`, a store (its current version), a version "
                   "folder of a store, or a PEFT adapter folder")
    p.add_argument("--to", required=True, help=f"output folder (replaced only with --overwrite, and only when corsa "
                   f"{done} into it)")


def _router(args: argparse.Namespace, *, only_given: bool = False) -> Any:
    """The routing setting the flags ask for; None with --no-route, and with `only_given` when no routing flag
    is given (a store then keeps, or a new one takes, its own)."""
    from corsa.routing import RouterConfig

    if getattr(args, "no_route", False):
        return None
    given = {k: v for k, v in (("threshold", args.route_threshold), ("depth", args.route_depth)) if v is not None}
    if args.no_route_hint:
        given["hint"] = False
    if args.no_route_relations:
        given["relations"] = False
    if args.no_route_bare:
        given["bare"] = False
    if args.no_route_names:
        given["names"] = False
    if args.no_route_clauses:
        given["clauses"] = False
    if only_given and not given:
        return None
    try:
        return RouterConfig(**given)
    except ValueError as exc:
        raise InputError(str(exc), field="--route-threshold" if "threshold" in str(exc) else "--route-depth") from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="corsa", description="Keep a language model's knowledge up to date "
                                     "with CoRSA-trained LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="train an adapter that makes the model give new answers")
    p.add_argument("edits", help="edit requests: JSONL (see README), or a benchmark file/folder with --format")
    p.add_argument("--out", required=True, help="output folder (PEFT adapter + edit_manifest.json)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "counterfact", "zsre", "mquake"])
    p.add_argument("--split", default="edit", help="benchmark split for --format counterfact (edit, train, val)")
    p.add_argument("--limit", type=POSITIVE, help="use only the first N edit requests")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_method_flags(p)
    _add_training_flags(p)
    _add_routing_flags(p)

    p = sub.add_parser("update", help="continue a store's adapter on new edits, recorded as a new version")
    p.add_argument("store", help="store folder (created on first use)")
    p.add_argument("edits", help="edit requests: JSONL (see README), or a benchmark file/folder with --format")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "counterfact", "zsre", "mquake"])
    p.add_argument("--split", default="edit", help="benchmark split for --format counterfact (edit, train, val)")
    p.add_argument("--limit", type=POSITIVE, help="use only the first N edit requests")
    _add_method_flags(p)
    _add_training_flags(p)
    _add_routing_flags(p, off=False)  # recorded when the update creates the store; a store keeps its own

    p = sub.add_parser("log", help="a store's versions: edits, metrics, checksums")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("revert", help="make an earlier version's adapter current again (as a new version)")
    p.add_argument("store")
    p.add_argument("version", type=COUNT)

    p = sub.add_parser("rebuild", help="make a store's store.db again from store.json and versions/*/version.json, "
                                       "after it was lost or damaged (every adapter checked against its sha256)")
    p.add_argument("store")

    p = sub.add_parser("history", help="the answer a prompt got at every version of a store")
    p.add_argument("store")
    p.add_argument("prompt")
    p.add_argument("--threads", type=THREADS)

    p = sub.add_parser("ask", help="print the model's greedy answer to a prompt")
    p.add_argument("prompt")
    p.add_argument("--adapter", help="a run folder written by `corsa edit`, a store (its current version) or any "
                   "PEFT adapter folder")
    p.add_argument("--model", default=None, help="base model (default: the adapter's, else smollm2-135m)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    p.add_argument("--threads", type=THREADS)
    p.add_argument("--no-route", action="store_true",
                   help="answer with the adapter even when the prompt is about none of its edits' subjects")
    p.add_argument("--why", action="store_true", help="also say (on stderr) which edit's scope the prompt falls in, "
                   "with its similarity, or why the unedited model answers it")

    p = sub.add_parser("export", help="write an edited model for other tools: merged weights (transformers "
                                      "folder) or a GGUF LoRA for llama.cpp")
    _add_source_and_to(p, "exported")
    p.add_argument("--format", default="merged", choices=["merged", "gguf", "gguf-lora"],
                   help="merged: base model with the adapter folded in (safetensors, loads with from_pretrained); "
                        "gguf: the merged model as one GGUF for llama.cpp / Ollama (llama-type models); gguf-lora: "
                        "the adapter for llama.cpp's --lora")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="how written weights are stored: "
                   "float32 (exact, default), float16, or q8_0 (--format gguf only)")
    p.add_argument("--base-gguf", help="--format gguf: the base model's GGUF to copy (default: a packaged model's "
                   "own, e.g. smollm2-135m's)")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --to")

    p = sub.add_parser("quantize", help="the edited model in 2-4 bits, keeping in 16 bits the weights its edits "
                                        "depend on (TaCQ conditioned on the edits)")
    _add_source_and_to(p, "quantized")
    p.add_argument("--bits", type=int, default=3, choices=[2, 3, 4, 8], help="bits per quantized weight (default 3)")
    p.add_argument("--keep", type=finite, default=0.5, help="percent of each matrix's weights kept in 16 bits "
                   "(default 0.5; 0 = plain round-to-nearest)")
    p.add_argument("--saliency", default="tacq", choices=["tacq", "magnitude"],
                   help="which weights are kept: tacq (default: |quantization change x task gradient|) or the "
                        "largest in magnitude")
    p.add_argument("--calibration", default="edits", choices=["edits", "general"],
                   help="TaCQ's task: the edits with their anchors and general questions (default), or general "
                        "questions only")
    p.add_argument("--group-size", type=whole(2), default=64, help="inputs sharing one scale and zero (default 64)")
    p.add_argument("--quantizer", default="gptq", choices=["rtn", "gptq"],  # QuantConfig.quantizer's, chosen on val
                   help="how the weights that are not kept are rounded: GPTQ on the calibration text (default) or "
                        "round-to-nearest")
    p.add_argument("--keep-scope", default="matrix", choices=["matrix", "model"],  # QuantConfig.keep_scope's
                   help="--keep percent of each matrix (default) or of the whole model, ranked together")
    p.add_argument("--calibration-contexts", type=whole(0, 8), default=0,  # QuantConfig.contexts_per_edit
                   help="--calibration edits: each edit's prompt also behind this many short texts the model "
                        "writes (0-8, default 0)")
    p.add_argument("--delta-rank", type=COUNT, default=0,  # QuantConfig.delta_rank
                   help="keep the adapter's change to each matrix beside it at this rank in 16 bits (its bits count "
                        "in the size; default 0: merged and quantized with the rest)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=THREADS)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions, "
                                     "/v1/models) for a run or a store, following the store's updates")
    p.add_argument("source", help="a store (its versions are the models; its name follows the current one), a run "
                   "folder written by `corsa edit`, or a PEFT adapter folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(1, 65535), default=8000)
    p.add_argument("--threads", type=THREADS)

    p = sub.add_parser("demo", help="edit the embedded fact set (or your own) with LoRA and CoRSA and compare")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--edits", help="a JSONL file of your own edits, each with the paraphrases and neighborhood "
                   "questions to measure it on (default: the 24 embedded facts, src/corsa/data/demo_edits.jsonl)")
    _add_training_flags(p)
    from corsa.demo import METHODS as DEMO_METHODS

    _add_method_flags(p, shared_by=DEMO_METHODS)  # --anchors, --relation-anchors, --contexts, ...
    _add_routing_flags(p)

    bench = sub.add_parser("bench", help="benchmarks: compare methods on real data").add_subparsers(
        dest="bench_command", required=True)
    for name, text in (("single", "one adapter per method on N edits at once (paper section 4.2)"),
                       ("ablation", "CoRSA with each component removed (paper Table 9), or a --lambda sweep"),
                       ("multi", ("the edits in --parts parts, one adapter each, every query routed to one "
                                  "(paper appendix B.2, Table 8)")),
                       ("compose", ("a CounterFact adapter and an MQuAKE adapter merged, linearly and with TIES: "
                                    "forgetting on both sets (paper appendix B.1, Figure 6)"))):
        p = bench.add_parser(name, help=text)
        p.add_argument("--bench", required=True, choices=["counterfact", "zsre", "mquake"])
        p.add_argument("--data", required=True, help="benchmarks folder (e.g. ../shared/benchmarks) or a file")
        p.add_argument("--out", required=True, help="run folder; a rerun skips finished methods and reuses a finished adapter")
        p.add_argument("--n", type=POSITIVE, default=200, help="edits in the seeded subset (MQuAKE: whole cases)")
        p.add_argument("--split", default="edit", help="CounterFact split: edit (report), val (tune), train")
        p.add_argument("--subset", type=COUNT, help="block k of the --seed shuffle, k = 0, 1, ...: subsets of one seed "
                                                  "share no case (default: the seed's own draw)")
        _add_routing_flags(p)
        p.add_argument("--mmlu-n", default="10", help="MMLU questions per subject, 'all' or 0 to skip")
        p.add_argument("--sample-runs", type=COUNT, default=0, help="also evaluate with sampling at T=0.7, K runs")
        p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
        p.add_argument("--train-seeds", help="comma-separated training seeds: every method is trained once per seed "
                       "on the same cases (rows <method>@seed<k>; the run's own seed keeps the plain name), and the "
                       "table adds each setting's mean and spread over seeds")
        if name in ("multi", "compose"):
            if name == "multi":
                p.add_argument("--parts", type=POSITIVE, default=5, help="adapters the edits are split into (paper: 5)")
            p.add_argument("--methods", default="lora,corsa" if name == "multi" else "lora,corsa,merge",
                           help="comma-separated adapter methods and settings, as for `corsa bench single`")
        elif name == "single":
            p.add_argument("--methods", default="lora,corsa",
                           help="comma-separated: lora, corsa, flearning, memit, merge, merge-ties, prepend, "
                                "corsa-no-sam, corsa-no-dpo, corsa-no-pcgrad, corsa-official-pcgrad, "
                                "corsa-lambda<v>, corsa-rho<v>, corsa-beta<v>, flearning-lambda<v>, merge-scale<v>, "
                                "memit-weight<v>, memit-layers<a>-<b>; settings combine with +, e.g. "
                                "corsa-rho0.5+lambda2")
        else:
            p.add_argument("--lambda", dest="lambdas", help="comma-separated λ values: run corsa-lambda<λ> each")
            p.add_argument("--rho", dest="rhos", help="comma-separated SAM radii: run corsa-rho<ρ> each")
            p.add_argument("--flearning-lambda", dest="forget_lambdas",
                           help="comma-separated F-Learning forgetting coefficients: run flearning-lambda<λ> each")
        _add_training_flags(p)
    p = bench.add_parser("code", help="API updates taught as edits, measured by running the code in the sandbox: "
                                      "UPass on CodeUpdateArena, SPass on HumanEval (paper section 5.3, Table 6)")
    p.add_argument("--data", required=True, help="benchmarks folder (with codeupdatearena/arena.jsonl) or the file")
    p.add_argument("--out", required=True, help="run folder; a rerun skips finished rows and reuses a finished adapter")
    p.add_argument("--n", type=POSITIVE, default=20, help="updates in the seeded subset (the release has 141)")
    p.add_argument("--methods", default="base,prepend,lora,flearning,corsa",
                   help="comma-separated: base, prepend and adapter methods (lora, flearning, corsa)")
    p.add_argument("--samples", type=POSITIVE, default=5, help="samples per problem for pass@1 and pass@5 (>= 5)")
    p.add_argument("--temperature", type=finite, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=384)
    p.add_argument("--humaneval-n", default="40", help="HumanEval problems in the seeded subset, or 'all'")
    p.add_argument("--workers", type=POSITIVE, default=2, help="sandboxed programs run at once")
    p.add_argument("--train-seeds", help="comma-separated training seeds for the adapter methods")
    _add_training_flags(p)
    p = bench.add_parser("quantize", help="the merged edited model quantized at several bits by round-to-nearest, "
                                          "magnitude-kept and TaCQ (general or edit-conditioned): edits, locality, "
                                          "MMLU")
    p.add_argument("--bench", default="counterfact", choices=["counterfact", "zsre"])
    p.add_argument("--data", required=True, help="benchmarks folder (e.g. ../shared/benchmarks)")
    p.add_argument("--out", required=True, help="run folder; a rerun skips finished rows")
    p.add_argument("--n", type=POSITIVE, default=50, help="edits in the seeded subset")
    p.add_argument("--split", default="edit", help="CounterFact split: edit (report), val (tune), train")
    p.add_argument("--subset", type=COUNT, help="block k of the --seed shuffle (default: the seed's own draw)")
    p.add_argument("--method", dest="adapter_method", default="corsa", choices=["corsa", "lora"],
                   help="the adapter that is quantized (its settings: the model's preset and the flags below)")
    p.add_argument("--bits", default="2,3,4", help="comma-separated bits (2, 3, 4, 8)")
    p.add_argument("--keep", type=finite, default=0.5, help="percent of each matrix kept in 16 bits (default 0.5)")
    p.add_argument("--quantizer", default="gptq", choices=["rtn", "gptq"],  # QuantConfig.quantizer's, chosen on val
                   help="rounding for every rule: GPTQ (default, as `corsa quantize`) or round-to-nearest")
    p.add_argument("--keep-scope", default="matrix", choices=["matrix", "model"],  # QuantConfig.keep_scope's
                   help="--keep percent of each matrix (default) or of the whole model, ranked together (rows "
                        "<rule>-global)")
    p.add_argument("--calibration-contexts", type=whole(0, 8), default=0,  # QuantConfig.contexts_per_edit
                   help="tacq-edits: each edit's prompt also behind this many model-written texts (0-8, default 0; "
                        "row tacq-edits-ctx<n>)")
    p.add_argument("--delta-rank", type=COUNT, default=0,  # QuantConfig.delta_rank
                   help="tacq-edits with the adapter's change kept beside each matrix at this rank, its --keep "
                        "lowered to spend the same bits (row tacq-edits-rank<k>; default 0)")
    p.add_argument("--mmlu-n", default="5", help="MMLU questions per subject, 'all' or 0 to skip")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    _add_training_flags(p)
    p = bench.add_parser("lifelong", help="T updates of B CounterFact edits, every method continuing its own model, "
                                          "measured after every update on every edit so far (AlphaEdit's protocol)")
    p.add_argument("--data", required=True, help="benchmarks folder (e.g. ../shared/benchmarks)")
    p.add_argument("--out", required=True, help="run folder; a rerun continues from the last finished update")
    p.add_argument("--updates", type=POSITIVE, default=20)
    p.add_argument("--batch", type=POSITIVE, default=50, help="edits per update (AlphaEdit: 100)")
    p.add_argument("--split", default="edit", help="CounterFact split: edit (report), val (tune)")
    p.add_argument("--subset", type=COUNT, help="block k of the --seed shuffle (default: the seed's own draw)")
    p.add_argument("--methods", default="corsa,lora,memit,alphaedit,flearning,merge",
                   help="comma-separated weight-editing methods and settings, as for bench single")
    p.add_argument("--mmlu-every", type=POSITIVE, default=5, help="updates between MMLU measurements")
    p.add_argument("--mmlu-n", type=POSITIVE, default=2, help="MMLU questions per subject")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    _add_training_flags(p)
    p = bench.add_parser("speed", help="time a LoRA step, a CoRSA step and their parts on the same batch")
    p.add_argument("--data", required=True, help="benchmarks folder (CounterFact val supplies the batch)")
    p.add_argument("--out", required=True, help="folder for speed.json and speed.md")
    p.add_argument("--models", default="smollm2-135m,gemma-3-270m", help="comma-separated model names or folders")
    p.add_argument("--steps", type=POSITIVE, default=5, help="timed repetitions per part (median reported)")
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=THREADS)
    for name, text in (("inject", "cross-dataset injection: CounterFact, then MQuAKE, in one adapter (Table 2)"),
                       ("revise", "continual revision: stored facts revised in a later update (Table 3, Fig. 3)")):
        p = bench.add_parser(name, help=text)
        p.add_argument("--data", required=True, help="benchmarks folder (e.g. ../shared/benchmarks)")
        p.add_argument("--out", required=True, help="run folder; a rerun skips finished methods")
        p.add_argument("--n", type=POSITIVE, default=100, help="edits in the first update")
        p.add_argument("--n2", type=POSITIVE, default=100, help="edits in the second update")
        p.add_argument("--methods", default="lora,corsa",
                       help="comma-separated, as for bench single; F-Learning, MEMIT and merging fold each update "
                            "into the weights before the next, prepend keeps every fact told so far")
        p.add_argument("--eval-after", default="each", choices=["each", "all"],
                       help="measure update efficacy right after each update, or once after the last")
        p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
        p.add_argument("--split", default="edit", help="CounterFact split of the "
                       + ("first update" if name == "inject" else "facts and revisions") + ": edit (report), val (tune)")
        p.add_argument("--train-seeds", help="comma-separated training seeds: every method is trained once per seed "
                       "on the same facts (rows <method>@seed<k>; the run's own seed keeps the plain name), each "
                       "compared with the baseline of its seed, and the table adds the comparison pooled over seeds")
        if name == "revise":
            p.add_argument("--n-revise", type=COUNT, default=50, help="first-update facts revised in the second")
            p.add_argument("--fractions", default="1",
                           help="comma-separated shares of the later updates' edits, e.g. 0.2,0.4,0.6,0.8,1")
            p.add_argument("--chains", help="JSONL of edit requests with a 'chain' of later answers (instead of "
                                            "chains built from CounterFact)")
        _add_training_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The error boundary: every failure a user can cause or fix is one line on stderr and exit code 2, with
    nothing half-written (outputs are atomic); anything else is a bug, reported in one line that says where its
    traceback was saved and how to report it (exit 1)."""
    import sqlite3

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(_join_negative_values(argv))
    except SystemExit as exc:  # --help (0) or an argument error, already printed in one line (2)
        return int(exc.code or 0)
    try:
        return _run(args, argv)
    except InputError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # an invalid configuration from the typed configs
        return _fail(_with_flag(str(exc).splitlines()[0]))
    except KeyboardInterrupt:
        print("corsa: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # a file we cannot read or write: say which, and why
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except sqlite3.DatabaseError as exc:
        where = getattr(args, "store", None) or getattr(args, "adapter", None) or "STORE"
        return _fail(f"{where}: its database cannot be used ({exc}); `corsa rebuild {where}` rebuilds it from the "
                     "version folders")
    except UnicodeError as exc:
        return _fail(f"text that is not valid UTF-8 ({exc.reason})")
    except Exception as exc:  # noqa: BLE001 -- a bug: keep the traceback for the report, but do not bury the user in it
        return _crash(exc, argv)


def _fail(message: str) -> int:
    print(f"corsa: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message held
    return 2


def _with_flag(message: str) -> str:
    """A config's message names its field ("lr must be ..."); add the flag the user types to set it."""
    from corsa.methods.registry import options

    flags = {option.field: flag for flag, (option, _) in options().items() if option.type is not None}
    flags.update({field: "--" + flag.replace("_", "-") for flag, field in TRAINING_FLAGS})
    field = message.split(" ", 1)[0]
    return f"{message} ({flags[field]})" if field in flags else message


def _crash(exc: Exception, argv: list[str]) -> int:
    import tempfile
    import traceback

    report = "".join(traceback.format_exception(exc))
    fd, path = tempfile.mkstemp(prefix="corsa-crash-", suffix=".txt")
    with open(fd, "w") as fh:
        fh.write(f"corsa {shlex.join(argv)}\n\n{report}")
    print(f"corsa: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); this is a bug: "
          f"please report it with the command and the traceback saved in {path}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    # Imports are deferred so that `corsa --help` and input errors answer without loading torch.
    import warnings

    from transformers.utils import logging as hf_logging

    from corsa.editing import set_threads

    # Deprecation chatter from inside transformers/peft and per-load weight bars are noise to a CLI user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()
    set_threads(getattr(args, "threads", None))
    command = "corsa " + shlex.join(argv)
    if args.command == "edit":
        from corsa.artifacts import check_writable, describe_run
        from corsa.editing import edit

        overrides = _method_overrides(args)
        check_writable(args.out, args.overwrite)
        replaced = describe_run(args.out)
        requests = _requests(args)
        out, result = edit(requests, args.out, method=args.method, model=args.model, overwrite=args.overwrite,
                           preset=args.preset,
                           progress=not args.quiet, command=command, prompt_style=args.prompt_style,
                           route=_router(args), **overrides)
        last = result.curves[-1] if result.curves else {}
        from corsa import distributed

        if not distributed.is_main():
            return 0
        print(f"wrote {out} ({len(requests)} edits, {result.info['steps']} steps, "
              f"final loss {last.get('loss', float('nan')):.4f}, learned {last.get('learned', 0):.0%})"
              + (f"; it replaced {replaced}" if replaced else "") + _collapse_note(result.info.get("collapse"))
              + _routing_note(result.info.get("routing")) + _found_note(result.requests))
        return 0
    if args.command in ("update", "log", "revert", "history", "rebuild"):
        return _store_command(args, command)
    if args.command == "ask":
        from corsa import models
        from corsa.loading import load_edited
        from corsa.prompts import Formatter
        from corsa.scoring import generate

        _text(args.prompt, "PROMPT")
        if args.adapter:
            model, formatter = load_edited(args.adapter, args.model, route=not args.no_route)
        else:
            model, tok, _ = models.load_model(args.model)
            formatter = Formatter(tok)
        room = models.context_length(model, formatter.tokenizer)
        used = formatter.prompt_length(args.prompt)
        if used + args.max_new_tokens > room:
            raise InputError(f"the prompt ({used} tokens) and --max-new-tokens {args.max_new_tokens} do not fit the "
                             f"model's context ({room} tokens)", field="PROMPT")
        print(generate(model, formatter, [args.prompt], max_new_tokens=args.max_new_tokens)[0])
        if args.why:
            from corsa.routing import RoutedModel

            lines = (model.explain(args.prompt) if isinstance(model, RoutedModel)
                     else ["not routed: the adapter, if any, answers every prompt"])
            for line in lines:
                print(f"route: {line}", file=sys.stderr)
        return 0
    if args.command == "export":
        from corsa.export import RECORD, export, size_text

        out = export(args.source, args.to, args.format, model=args.model, overwrite=args.overwrite, dtype=args.dtype,
                     base_gguf=args.base_gguf, command=command)
        written = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != RECORD)
        print(f"wrote {out} ({args.format}, {args.dtype}, {size_text(written)}); it answers every question with the "
              "edits applied (routing stays with `corsa ask --adapter`)")
        return 0
    if args.command == "quantize":
        from corsa.export import quantize, size_text
        from corsa.quantize import QuantConfig

        cfg = QuantConfig(bits=args.bits, keep=args.keep, saliency=args.saliency, calibration=args.calibration,
                          group_size=args.group_size, quantizer=args.quantizer, keep_scope=args.keep_scope,
                          contexts_per_edit=args.calibration_contexts, delta_rank=args.delta_rank)
        out, record = quantize(args.source, args.to, cfg, overwrite=args.overwrite, command=command)
        print(f"wrote {out}: {args.bits}-bit, {record['kept_share']:.2%} of the quantized weights kept in 16 bits "
              f"({record['method']}), {record['bits_per_quantized_weight']:.2f} bits per quantized weight, "
              f"{size_text(record['bytes'])} on disk; ask it with `corsa ask PROMPT --adapter {out}`")
        return 0
    if args.command == "serve":
        from corsa.serve import serve

        serve(args.source, args.host, args.port)
        return 0
    if args.command == "demo":
        from corsa.demo import run_demo
        from corsa.requests import read_edits

        edits = read_edits(args.edits) if args.edits else None
        run_demo(args.out, model=args.model, progress=not args.quiet, prompt_style=args.prompt_style,
                 preset=args.preset, route=_router(args), edits=edits, source=args.edits, **_method_overrides(args))
        return 0
    if args.command == "bench":
        from corsa.evaluate.metrics import EvalConfig
        from corsa.evaluate.runner import ABLATION, BenchConfig, run_bench
        from corsa.routing import RouterConfig

        if args.bench_command == "speed":
            from corsa.evaluate.speed import SpeedConfig, run_speed

            run_speed(SpeedConfig(data=args.data, models=tuple(args.models.split(",")), batch_size=args.batch_size,
                                  steps=args.steps, bf16=args.bf16), args.out, command=command)
            return 0
        if args.bench_command == "code":
            from corsa.evaluate.codebench import CodeBenchConfig, run_code_bench

            seeds = tuple(_parsed(SEED, v, "--train-seeds") for v in _names(args.train_seeds)) if args.train_seeds \
                else (args.seed or 0,)
            humaneval_n = None if args.humaneval_n == "all" else _parsed(COUNT, args.humaneval_n, "--humaneval-n")
            run_code_bench(CodeBenchConfig(
                data=args.data, n=args.n, seed=args.seed or 0, methods=tuple(_names(args.methods)), model=args.model,
                prompt_style=args.prompt_style, preset=args.preset, samples=args.samples,
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, humaneval_n=humaneval_n,
                train_seeds=seeds, workers=args.workers, overrides=_method_overrides(args)),
                args.out, progress=not args.quiet, command=command)
            return 0
        if args.bench_command == "lifelong":
            from corsa.evaluate.lifelong import LifelongConfig, run_lifelong

            run_lifelong(LifelongConfig(
                data=args.data, updates=args.updates, batch=args.batch, seed=args.seed or 0, split=args.split,
                subset=args.subset, methods=tuple(_names(args.methods)), model=args.model,
                prompt_style=args.prompt_style, mmlu_every=args.mmlu_every, mmlu_n=args.mmlu_n,
                max_new_tokens=args.max_new_tokens, preset=args.preset, overrides=_method_overrides(args)),
                args.out, progress=not args.quiet, command=command)
            return 0
        if args.bench_command == "quantize":
            from corsa.evaluate.quantbench import run_quant_bench

            bits = tuple(_parsed(whole(2, 8), v, "--bits") for v in _names(args.bits))
            qcfg = BenchConfig(bench=args.bench, data=args.data, n=args.n, split=args.split, seed=args.seed or 0,
                               subset=args.subset, methods=(args.adapter_method,), model=args.model,
                               prompt_style=args.prompt_style, preset=args.preset, overrides=_method_overrides(args),
                               mmlu_n=None if args.mmlu_n == "all" else _parsed(COUNT, args.mmlu_n, "--mmlu-n"),
                               eval=EvalConfig(max_new_tokens=args.max_new_tokens, autocast=args.bf16))
            run_quant_bench(qcfg, args.out, bits=bits, keep=args.keep, quantizer=args.quantizer,
                            contexts_per_edit=args.calibration_contexts, keep_scope=args.keep_scope,
                            delta_rank=args.delta_rank, method=args.adapter_method,
                            progress=not args.quiet, command=command)
            return 0
        if args.bench_command in ("inject", "revise"):
            from corsa.evaluate.sequence import SequenceConfig, run_sequence

            revise = args.bench_command == "revise"
            methods = _names(args.methods)
            if args.train_seeds:
                methods = _with_seeds(methods, args.train_seeds, args.seed or 0)
            seq = SequenceConfig(
                kind=args.bench_command, data=args.data, n=args.n, n2=args.n2, split=args.split, seed=args.seed or 0,
                methods=tuple(methods), model=args.model, prompt_style=args.prompt_style,
                evaluate_after=args.eval_after,
                n_revise=args.n_revise if revise else 0, chains=args.chains if revise else None,
                fractions=tuple(_number(v, "--fractions") for v in args.fractions.split(",")) if revise else (1.0,),
                max_new_tokens=args.max_new_tokens, preset=args.preset, overrides=_method_overrides(args))
            run_sequence(seq, args.out, progress=not args.quiet, command=command)
            return 0
        if args.bench_command in ("single", "multi", "compose"):
            methods = _names(args.methods)
        elif args.lambdas or args.rhos or args.forget_lambdas:
            methods = [f"{name}{_number(v, flag)}" for name, flag, values in
                       (("corsa-lambda", "--lambda", args.lambdas), ("corsa-rho", "--rho", args.rhos),
                        ("flearning-lambda", "--flearning-lambda", args.forget_lambdas)) if values
                       for v in values.split(",")]
        else:
            methods = list(ABLATION)
        mmlu = None if args.mmlu_n == "all" else int(args.mmlu_n)
        seed = args.seed if args.seed is not None else 0  # picks the subset; also seeds training when given
        if args.train_seeds:
            methods = _with_seeds(methods, args.train_seeds, seed)
        cfg = BenchConfig(bench=args.bench, data=args.data, n=args.n, split=args.split, seed=seed,
                          subset=args.subset,
                          methods=tuple(methods), model=args.model, prompt_style=args.prompt_style, mmlu_n=mmlu,
                          preset=args.preset, overrides=_method_overrides(args),
                          route=not args.no_route, router=_router(args) or RouterConfig(),
                          eval=EvalConfig(max_new_tokens=args.max_new_tokens, sample_runs=args.sample_runs,
                                          seed=seed, autocast=args.bf16))
        if args.bench_command == "compose":
            from corsa.evaluate.compose import run_compose

            run_compose(cfg, args.out, progress=not args.quiet, command=command)
            return 0
        if args.bench_command == "multi":
            from corsa.evaluate.multi import run_multi

            run_multi(cfg, args.parts, args.out, progress=not args.quiet, command=command)
            return 0
        run_bench(cfg, args.out, progress=not args.quiet, command=command)
        return 0
    raise AssertionError(args.command)


def _routing_note(scope: dict[str, Any] | None) -> str:
    if not scope:
        return ""
    if not scope["unscoped"]:
        return "; it answers only queries about its edits' subjects (--no-route: every query)"
    return (f"; {len(scope['unscoped'])} edit(s) name no subject found in their prompt (first: "
            f"'{scope['unscoped'][0]}'), so the adapter answers every query that no other adapter claims")


def _found_note(requests: list[Any]) -> str:
    found = [r for r in requests if r.subject_found]
    if not found:
        return ""
    return (f"; {len(found)} edit(s) gave no subject, so it was read from the prompt (first: '{found[0].subject}' "
            f"in '{found[0].prompt}'; the manifest marks them subject_found; give `subject` to set it)")


def _collapse_note(collapse: dict[str, Any] | None) -> str:
    if not collapse:
        return ""
    kept = collapse["restored_after_epochs"]
    return (f"; training diverged in epoch {collapse['epoch'] + 1} and the adapter "
            + (f"as it was after epoch {kept}" if kept else "it started from") + " was kept")


def _text(value: str, field: str) -> None:
    """Command-line text is decoded with surrogate escapes; bytes that are not UTF-8 cannot be asked or stored."""
    from corsa.requests import invalid_character

    if invalid_character(value) is not None:
        raise InputError("is not valid UTF-8 text", field=field)
    if not value.strip():
        raise InputError("is empty", field=field)


def _names(text: str) -> list[str]:
    """A comma-separated --methods value as a list, blanks dropped."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _with_seeds(methods: list[str], seeds: str, default: int) -> list[str]:
    """Each method once per training seed, seed by seed; the default seed (the one a plain row is trained with)
    keeps the plain name so that a run folder's earlier rows are reused."""
    from corsa.evaluate.stats import SEED_MARK

    out = []
    for text in seeds.split(","):
        k = _parsed(SEED, text.strip(), "--train-seeds")
        out += [m if k == default else f"{m}{SEED_MARK}{k}" for m in methods]
    return out


def _requests(args: argparse.Namespace) -> list[Any]:
    """`edit` and `update` read their edits the same way: a file or benchmark, optionally cut to --limit."""
    from corsa.requests import read_edits

    requests = read_edits(args.edits, args.format, split=args.split)
    return requests if args.limit is None else requests[: args.limit]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _store_command(args: argparse.Namespace, command: str) -> int:
    from corsa import store

    if args.command == "update":
        overrides = _method_overrides(args)
        requests = _requests(args)
        v = store.update(args.store, requests, method=args.method, model=args.model, prompt_style=args.prompt_style,
                         preset=args.preset, progress=not args.quiet, command=command,
                         route=_router(args, only_given=True), **overrides)
        m = v.metrics
        forgetting = "n/a" if m["forgetting"] is None else f"{m['forgetting']:.0%}"
        print(f"{args.store}: version {v.version} ({_count(m['n_edits'], 'edit')}, "
              f"{_count(m['n_revisions'], 'revision')}): "
              f"efficacy {m['efficacy']:.0%}, forgetting {forgetting} of "
              f"{_count(m['correct_before'], 'fact')} held before")
        return 0
    if args.command == "rebuild":
        print("\n".join(store.rebuild(args.store).summary()))
        return 0
    if args.command == "revert":
        v = store.revert(args.store, args.version, command=command)
        print(f"{args.store}: version {v.version} restores version {args.version} (sha256 {v.sha256 or 'base'})")
        return 0
    if args.command == "history":
        _text(args.prompt, "PROMPT")
        for v, answer in store.history(args.store, args.prompt):
            print(f"v{v.version} {v.kind:<7} {json.dumps(answer, ensure_ascii=False)}")  # one line per version
        return 0
    s = store.Store(args.store)
    try:
        versions, head = s.versions(), s.head
        if args.json:
            print(json.dumps({"head": head, "model": s.meta("model"),
                              "versions": [{**dataclasses.asdict(v), "edits": s.edits(v.version)} for v in versions]},
                             indent=2))
            return 0
        print(f"store {args.store}: model {s.meta('model')}, head = version {head}")
        for v in versions:
            m = v.metrics
            # Locality beside efficacy; n/a for an update without neighbourhood prompts (or recorded before).
            neighbors = "neighbours n/a" if m.get("locality_agreement") is None else (
                f"neighbours ({m['n_neighbors']}): as before {m['locality_agreement']:.0%}, correct "
                f"{m['locality']:.0%}, given an edit's new answer {m['neighbor_edit_target']:.0%}")
            what = {"base": "base model", "revert": f"revert to v{m.get('reverted_to')}"}.get(
                v.kind, f"{v.method}, {_count(v.n_edits, 'edit')}, efficacy {m.get('efficacy', 0):.0%}, forgetting "
                        f"{'n/a' if m.get('forgetting') is None else format(m['forgetting'], '.0%')}, {neighbors}")
            mark = "*" if v.version == head else " "
            print(f"{mark} v{v.version:<3} {v.created}  parent {'-' if v.parent is None else v.parent:<3} "
                  f"{(v.sha256 or '')[:12]:<12}  {what}")
        return 0
    finally:
        s.close()


if __name__ == "__main__":
    sys.exit(main())
