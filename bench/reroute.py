"""A `corsa bench single` or `corsa bench multi` run's adapters evaluated again with another routing setting,
without training.

    python bench/reroute.py RUN_DIR --out NEW_DIR [--methods lora,corsa@seed1] [--no-route-hint]
        [--route-threshold T] [--route-relations | --no-route-relations] [--route-clauses | --no-route-clauses]

NEW_DIR gets the run's records that routing does not change as they are (unedited and unrouted rows; a multi run's
oracle rows) and a `<method>-routed` row per method, routed with the setting given (corsa.routing's defaults
otherwise), so one training run answers for several settings. A multi run's routed row is measured over all its
part adapters, loaded into one model as the run loaded them.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from corsa.evaluate import multi, runner
from corsa.routing import RouterConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--no-route-hint", action="store_true")
    p.add_argument("--route-threshold", type=float, default=RouterConfig.threshold)
    p.add_argument("--route-depth", type=float, default=RouterConfig.depth)
    p.add_argument("--route-relations", action=argparse.BooleanOptionalAction, default=RouterConfig.relations,
                   help="refuse a subject match that asks another relation (corsa.routing.asks_other_relation)")
    p.add_argument("--route-bare", action=argparse.BooleanOptionalAction, default=RouterConfig.bare,
                   help="key each subject also as it reads alone (corsa.routing.key_texts)")
    p.add_argument("--route-clauses", action=argparse.BooleanOptionalAction, default=RouterConfig.clauses,
                   help="read a question also from each later clause's start (corsa.routing.readings)")
    p.add_argument("--methods", help="comma-separated rows of the run to reroute (default: every adapter)")
    args = p.parse_args()
    config = RouterConfig(depth=args.route_depth, threshold=args.route_threshold, hint=not args.no_route_hint,
                          relations=args.route_relations, bare=args.route_bare,
                          clauses=args.route_clauses)
    reroute = multi.reroute if multi.is_multi_run(args.run) else runner.reroute
    reroute(args.run, args.out, config, command="python bench/reroute.py " + shlex.join(sys.argv[1:]),
            methods=args.methods.split(",") if args.methods else None)


if __name__ == "__main__":
    main()
