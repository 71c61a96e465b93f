"""Small, committed summaries of `corsa bench single` (and `multi`) run folders, and differences pooled over
several of them.

A run folder holds megabytes of answers and 39 MB adapters, so it is not committed; docs/RESULTS.md is generated
from summaries instead. A summary keeps what the page states and what its intervals need: each row's aggregate
rates and, for the compared metrics, each case's (sum, count), so a paired bootstrap can be recomputed from the
summary alone. The `schema` field names the layout; a reader refuses one it does not know rather than misread it.

Pooling: one claim on the page rests on several training seeds and several disjoint case subsets (one run folder
per subset). The unit resampled is a case; it carries the summed outcomes of every seed for both methods, so the
seed-to-seed spread of one case stays inside its unit and the interval is over cases, as in corsa.evaluate.stats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corsa import artifacts
from corsa.evaluate.metrics import with_other_targets
from corsa.evaluate.stats import COMPARED, SEED_MARK, base_name, bootstrap, case_totals, training_seed

SCHEMA = "corsa-summary/1"
# The training settings that tell one row's setting from another's; the rest are the methods' fixed defaults.
CONFIG_KEYS = ("lr", "rho", "lam", "beta", "use_sam", "use_dpo", "pcgrad", "epochs", "learned_share",
               "stop_when_learned", "bf16")
# Fields every record of one run folder shares (run_bench writes them into each record's header).
RUN_FIELDS = ("bench", "split", "seed", "subset", "n", "model")


def _read_records(run_dir: Path) -> list[dict[str, Any]]:
    paths = sorted(run_dir.glob("*/results.json"))
    if not paths:
        raise ValueError(f"{run_dir} holds no */results.json; is it a `corsa bench single` run folder?")
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        if "cases" not in record or "summary" not in record:
            # inject/revise folders score stages, not cases; their summaries would need another layout
            raise ValueError(f"{path} has no per-case results; only `corsa bench single` folders can be summarised")
        if "method" not in record:
            # `corsa bench quantize` rows score cases too, but name a quantized model, not a training method
            raise ValueError(f"{path} names no method; only `corsa bench single` and `multi` folders can be "
                             "summarised")
        if record.get("config") is None and record.get("adapters"):
            # a `corsa bench multi` row from before its records carried their settings (2026-12-07): its first part
            # adapter's manifest says how every part was trained, training seed included
            part = Path(record["adapters"][0])
            if (part / artifacts.MANIFEST).exists():
                record["config"] = artifacts.read_manifest(part).get("config")
        records.append(with_other_targets(record))
    # the order load_results gives: base first, then methods as they were run
    return sorted(records, key=lambda r: (r["method"] != "base", r.get("date") or ""))


def _compact(total: float) -> float | int:
    # generation metrics sum booleans (whole numbers); teacher-forced sums are fractions, six places are plenty
    return int(total) if float(total).is_integer() else round(total, 6)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    config = record.get("config") or {}
    cases = {}
    for case in record["cases"]:
        totals = {}
        for m in COMPARED:
            total, count = case_totals(case, m)
            if count:  # a metric that does not apply to the case (no old answer to retain) is left out
                totals[m] = [_compact(total), count]
        cases[str(case["id"])] = totals
    return {
        "method": record["method"],
        "training_seed": None if record["method"] == "base" else row_seed(record),
        "config": {k: config[k] for k in CONFIG_KEYS if k in config},
        "summary": dict(record["summary"]),
        "steps": (record.get("train") or {}).get("steps"),
        "edit_s": (record.get("timings") or {}).get("edit_s"),
        "cases": cases,
    }


def row_seed(record: dict[str, Any]) -> int | None:
    """The training seed of a record or summary row: the config's, else the `@seed<k>` of its name."""
    seed = record.get("training_seed", training_seed(record))
    if seed is None and SEED_MARK in record["method"]:
        tail = record["method"].partition(SEED_MARK)[2]
        seed = int(tail) if tail.isdigit() else None
    return seed


def summarize(run_dir: str | Path, *, commit: str | None = None, log: str | None = None) -> dict[str, Any]:
    """The summary of one run folder (no answers, no adapters).

    `commit` is the code the run was made with. Records do not carry one, and the checkout's HEAD when
    summarising is usually later than the run, so it is left null unless a record has one or the caller says.
    `log` is the docs/log/ entry that describes the run, linked from the page.
    """
    run_dir = Path(run_dir)
    records = _read_records(run_dir)
    first = records[0]
    for r in records[1:]:
        differ = [f for f in (*RUN_FIELDS, "case_ids") if r.get(f) != first.get(f)]
        if differ:
            raise ValueError(f"{run_dir}: {r['method']} differs from {first['method']} in {', '.join(differ)}; "
                             "one folder must hold one set of cases")
    commands = list(dict.fromkeys(str(r["command"]) for r in records if r.get("command")))
    commits = {r["commit"] for r in records if r.get("commit")}
    if commit is None and len(commits) == 1:
        commit = commits.pop()
    elif commit is None and commits:
        raise ValueError(f"{run_dir}: its records name several commits ({', '.join(sorted(commits))}); pass one")
    dates = [r["date"] for r in records if r.get("date")]
    return {
        "schema": SCHEMA,
        **{f: first.get(f) for f in RUN_FIELDS},
        "commands": commands,
        "commit": commit,
        "date": max(dates) if dates else None,
        "log": log,
        "rows": [_row(r) for r in records],
    }


def merge(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary of the same cases from several, each holding other training seeds: how a study goes on after its
    first run folder is gone (only its committed summary remains) or when seeds were trained into another folder.

    Refused (ValueError) unless every summary has the same run fields and the same cases, and no setting has a
    training seed in two of them (pooling would count it twice). `base` is kept once, from the first summary.
    """
    if not summaries:
        raise ValueError("no summaries to merge")
    first = summaries[0]
    ids = _case_ids(first)
    rows = list(first["rows"])
    held = {(base_name(r["method"]), row_seed(r)) for r in rows if r["method"] != "base"}
    for i, s in enumerate(summaries[1:], start=1):
        differ = [f for f in RUN_FIELDS if s.get(f) != first.get(f)]
        if differ:
            raise ValueError(f"summary {i} differs from summary 0 in {', '.join(differ)}; only the same cases merge")
        if _case_ids(s) != ids:
            raise ValueError(f"summary {i} holds other cases than summary 0; only the same cases merge")
        for r in s["rows"]:
            if r["method"] == "base":
                continue
            key = (base_name(r["method"]), row_seed(r))
            if key in held:
                raise ValueError(f"{key[0]} with training seed {key[1]} is in summary {i} and an earlier one")
            held.add(key)
            rows.append(r)
    # A merged summary's commit already lists several; each is named once however often summaries are merged.
    commits = list(dict.fromkeys(c for s in summaries if s.get("commit") for c in str(s["commit"]).split(", ")))
    dates = [s["date"] for s in summaries if s.get("date")]
    logs = list(dict.fromkeys(s["log"] for s in summaries if s.get("log")))
    return {**first, "commands": list(dict.fromkeys(c for s in summaries for c in s.get("commands") or [])),
            "commit": ", ".join(commits) or None, "date": max(dates) if dates else None,
            "log": logs[-1] if logs else None, "rows": rows}


def side_by_side(a: dict[str, Any], b: dict[str, Any], label: str) -> dict[str, Any]:
    """One summary holding `a`'s rows and `b`'s, each of `b`'s renamed `<label>:<method>` (its base row dropped):
    two runs of the same cases by other code (a rule's old and new word lists, say), so that pooled_difference
    pairs a row of one with the same row of the other case by case. Refused (ValueError) as merge refuses other
    cases or other run fields."""
    renamed = [{**r, "method": f"{label}:{r['method']}"} for r in b["rows"] if r["method"] != "base"]
    return merge([a, {**b, "rows": renamed}])


def _case_ids(summary: dict[str, Any]) -> set[str]:
    return {c for r in summary["rows"] for c in r["cases"]}


def dumps(summary: dict[str, Any]) -> str:
    """JSON with one line per case (and per config and summary): indented throughout, as write_json writes it,
    every [sum, count] would take four lines, some ten thousand for a 50-case run with six adapters, and a
    rerun's diff would be unreadable."""
    text = json.dumps(summary, indent=2)
    # a dict or list holding nothing nested but one-line lists goes on one line; json.dumps escapes newlines
    # inside strings, so only the layout's own line breaks are joined
    flat = re.compile(r"([\[{])\n\s*((?:[^\[\]{}]|\[[^\[\]{}\n]*\])*?)\n\s*([\]}])")
    while True:
        joined = flat.sub(lambda m: m[1] + re.sub(r"\n\s*", " ", m[2]) + m[3], text)
        if joined == text:
            return text + "\n"
        text = joined


def write_summary(run_dir: str | Path, path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Summarise `run_dir` into `path` (save_summary); returns the summary."""
    return save_summary(summarize(run_dir, **kwargs), path)


def save_summary(summary: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write `summary` to `path` atomically (a temp file renamed into place, so a reader never sees half a file,
    and `path` may be a summary the caller has just read); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(path, dumps(summary))
    return summary


def read_summary(path: str | Path) -> dict[str, Any]:
    """A summary file, refused (ValueError) unless it is one of the schema this module writes."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path}: schema {schema!r} is not {SCHEMA!r}; this reader does not know it")
    return data


@dataclass(frozen=True)
class PooledDifference:
    metric: str
    estimate: float  # pooled rate of b minus pooled rate of a, as a fraction
    low: float  # 95 % interval, percentile bootstrap over cases
    high: float
    cases: int  # units resampled: (subset, case) pairs
    seeds: tuple[int, ...]
    subsets: tuple[Any, ...]  # each summary's subset (None for a run without --subset)


def rows_by_seed(summary: dict[str, Any], method: str) -> dict[int | None, dict[str, Any]]:
    """The rows of one setting (`method` and `method@seed<k>`), keyed by training seed."""
    found: dict[int | None, dict[str, Any]] = {}
    for row in summary["rows"]:
        if base_name(row["method"]) != method:
            continue
        seed = row_seed(row)
        if seed in found:
            raise ValueError(f"{method}: two rows trained with seed {seed} ({found[seed]['method']}, {row['method']})")
        found[seed] = row
    return found


def pooled_difference(summaries: Sequence[dict[str, Any]], method_a: str, method_b: str, metric: str, *,
                      resamples: int = 2000, seed: int = 0, only_seeds: Sequence[int] | None = None
                      ) -> PooledDifference | None:
    """`method_b` minus `method_a` on `metric`, pooled over the summaries (disjoint case subsets) and every
    training seed, with a 95 % percentile bootstrap interval over cases; None when the metric has no values.

    Each case's unit sums its outcomes over the seeds, for a and for b alike; a seed is used only where both
    methods have it, and a seed one method has and the other lacks is refused (ValueError), as is a seed set that
    differs between subsets or a case that appears in two subsets: either would make "pooled over S seeds and
    K subsets" untrue. `only_seeds` narrows every summary to those training seeds first: how a setting run with one
    seed is compared with one run with three, on the seed they share (the result names the seeds it used).
    """
    if not summaries:
        raise ValueError("no summaries to pool")
    units: list[tuple[float, float, int]] = []
    seeds: tuple[int, ...] | None = None
    seen: dict[str, int] = {}
    for i, summary in enumerate(summaries):
        a, b = rows_by_seed(summary, method_a), rows_by_seed(summary, method_b)
        if only_seeds is not None:
            a, b = ({k: v for k, v in rows.items() if k in only_seeds} for rows in (a, b))
        where = f"summary {i} (subset {summary.get('subset')})"
        for name, rows in ((method_a, a), (method_b, b)):
            if not rows:
                raise ValueError(f"{where} has no rows of {name}")
        if a.keys() != b.keys():
            odd = sorted(map(str, a.keys() ^ b.keys()))
            raise ValueError(f"{where}: training seed {', '.join(odd)} is present for only one of {method_a} and "
                             f"{method_b}")
        these = tuple(sorted(a, key=lambda s: (s is None, s or 0)))
        if seeds is not None and these != seeds:
            raise ValueError(f"{where} has training seeds {these}, another subset {seeds}")
        seeds = these
        for case_id in a[these[0]]["cases"]:
            if case_id in seen:
                raise ValueError(f"case {case_id} is in summaries {seen[case_id]} and {i}: the subsets overlap")
            seen[case_id] = i
            totals = []
            for s in these:
                ta = a[s]["cases"].get(case_id, {}).get(metric)
                tb = b[s]["cases"].get(case_id, {}).get(metric)
                if ta is None or tb is None or ta[1] != tb[1] or not ta[1]:
                    break  # as paired_difference: a case counts only where both methods scored the same prompts
                totals.append((ta[0], tb[0], ta[1]))
            else:
                units.append((sum(t[0] for t in totals), sum(t[1] for t in totals), sum(t[2] for t in totals)))
    d = bootstrap(units, metric, resamples=resamples, seed=seed)
    if d is None:
        return None
    return PooledDifference(metric, d.estimate, d.low, d.high, d.cases, tuple(seeds or ()),
                            tuple(s.get("subset") for s in summaries))
