"""A `corsa demo` folder's adapters evaluated again with another routing setting, without training.

    python bench/redemo.py [DEMO_DIR] [--out FILE] [--no-route-bare] [--no-route-names] [--no-route-relations]

Each adapter is loaded from its run folder, routed over its manifest's edits with the setting given (corsa.routing's
defaults otherwise), and asked the demo's questions as `corsa demo` asks them; the table is printed in the demo's
form and, with --out, written as JSON. The old answers training mined are not on record in a demo folder, so an
edit's old answer is the one its facts give (all 24 of the embedded facts give one).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from corsa import artifacts, demo, models, routing
from corsa.evaluate.metrics import evaluate
from corsa.loading import load_edited, scope_edits
from corsa.prompts import Formatter
from corsa.requests import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_dir", nargs="?", default="runs/demo")
    p.add_argument("--out")
    p.add_argument("--no-route-bare", action="store_true")
    p.add_argument("--no-route-names", action="store_true")
    p.add_argument("--no-route-relations", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = routing.RouterConfig(bare=not args.no_route_bare, names=not args.no_route_names,
                                  relations=not args.no_route_relations)
    recorded = json.loads(Path(args.demo_dir, "demo_results.json").read_text())
    # the facts the demo ran on: its own, or the file given to `corsa demo --edits`
    requests = read_jsonl(recorded["edits"]) if recorded.get("edits") else demo.demo_edits()
    base, tok, _ = models.load_model(recorded["model"])  # the model the demo ran with
    columns = {"base": evaluate(base, Formatter(tok), requests)}
    del base
    for method in ("lora", "corsa"):
        run_dir = f"{args.demo_dir}/{method}"
        model, formatter = load_edited(run_dir, route=False)
        edits = scope_edits(artifacts.read_manifest(run_dir))
        asked, asked_formatter = routing.answering(model, formatter, edits, config)
        columns[method] = evaluate(asked, asked_formatter, requests, reference=columns["base"])
    table = demo.format_table(columns)
    print(table)
    if args.out:
        artifacts.write_json(args.out, {"command": "python bench/redemo.py " + shlex.join(sys.argv[1:]),
                                        "routing": routing.record(config), "results": columns, "table": table})


if __name__ == "__main__":
    main()
