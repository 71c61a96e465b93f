"""Where scope routing sends hand-written questions, without training: each paraphrase should reach its own edit,
each neighbour none (or, for a neighbour about an edited subject that asks another relation, none either).

    python bench/route_handwritten.py [FILE.jsonl ...] [--threshold T] [--no-relations] [--no-bare] [--no-names] [--clauses]
        [--find-subjects]
    python bench/route_handwritten.py --bench counterfact --data ../shared/benchmarks [--split val] [--n 100] [--seed 1]

FILE defaults to bench/data/handwritten-dev.jsonl (written for this project as a development set, like `val`:
settings may be chosen on it) and the demo's edits. Every edit of a file is keyed in one router, as one adapter of
`corsa edit` would be; the base model only runs (seconds). Prints the rates and every miss. With --bench, n cases
drawn (seeded) from a benchmark split are read instead, and the misses are printed only with --show.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import torch

from corsa import models, routing, subjects
from corsa.requests import load_benchmark, read_jsonl

DEV = Path(__file__).parent / "data" / "handwritten-dev.jsonl"
DEMO = Path(__file__).parent.parent / "src" / "corsa" / "data" / "demo_edits.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", default=[str(DEV), str(DEMO)])
    p.add_argument("--threshold", type=float, default=routing.DEFAULT.threshold)
    p.add_argument("--no-relations", action="store_true")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=routing.DEFAULT.bare)
    p.add_argument("--names", action=argparse.BooleanOptionalAction, default=routing.DEFAULT.names)
    p.add_argument("--clauses", action=argparse.BooleanOptionalAction, default=routing.DEFAULT.clauses)
    p.add_argument("--find-subjects", action="store_true",
                   help="hide each edit's subject and key the one corsa.subjects.find reads from its prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench", help="read n cases of this benchmark instead of files")
    p.add_argument("--data", help="the benchmarks folder (with --bench)")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--show", action="store_true", help="with --bench, print the misses too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = routing.RouterConfig(threshold=args.threshold, relations=not args.no_relations, bare=args.bare, names=args.names,
                                   clauses=args.clauses)
    model, tok, _ = models.load_model(None)
    sources = ([(f"{args.bench} {args.split} n={args.n} seed={args.seed}",
                 random.Random(args.seed).sample(load_benchmark(args.bench, args.data, args.split), args.n))]
               if args.bench else [(Path(file).name, read_jsonl(file)) for file in args.files])
    for name, requests in sources:
        if args.find_subjects:
            requests = [dataclasses.replace(r, subject=subjects.find(r.prompt)) for r in requests]
        router = routing.Router(model, tok, {"adapter": routing.edits_of(requests)}, config)
        paraphrases = [(r, q) for r in requests for q in r.paraphrases]
        neighbours = [(r, n.prompt) for r in requests for n in r.neighborhood]
        got = router.matched([q for _, q in paraphrases] + [q for _, q in neighbours])
        own = [m is not None and m.prompt == r.prompt for (r, _), m in zip(paraphrases, got)]
        kept = [m is None for m in got[len(paraphrases):]]
        print(f"{name}: {len(requests)} edits; paraphrases routed to their edit {sum(own)}/{len(own)}; "
              f"neighbours left to the base model {sum(kept)}/{len(kept)}")
        if args.bench and not args.show:
            continue
        for ((r, q), ok), m in zip(zip(paraphrases, own), got):
            if not ok:
                print(f"  paraphrase missed: {q!r} (edit {r.prompt!r}; matched {m.prompt if m else None!r})")
        for ((r, q), ok), m in zip(zip(neighbours, kept), got[len(paraphrases):]):
            if not ok:
                print(f"  neighbour routed: {q!r} (to edit {m.prompt!r})")


if __name__ == "__main__":
    main()
