"""Prompt-level editing metrics in both families the field uses, computed on the same edited model.

* Generation (`gen.*`): the model answers (greedy, so a number is reproducible) and the answer counts as correct
  when it contains the target, case-insensitively: the released CoRSA evaluation's test (reference doc 1.4),
  which is also what a user sees. Optional sampling (`sample.*`, temperature 0.7 as the released code) repeats
  reliability and generality over several seeded runs.
* Teacher-forced (`tf.*`): EasyEdit's token accuracy (reference doc 2.2): feed prompt + target and count the
  target tokens that are the argmax; partial credit, no end token. Its locality is agreement with the pre-edit
  model's argmax tokens on the neighborhood answer, not correctness.

docs/METRICS.md defines each metric; the tables headline the generation family (see there for why).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import mean, pstdev
from typing import Any

import torch

from corsa.answers import bare, contains, normalize
from corsa.prompts import Formatter
from corsa.requests import EditRequest
from corsa.scoring import generate, score_answers

# name -> what it measures. Order = table order.
METRICS: dict[str, str] = {
    "gen.reliability": "edit prompt answered with target_new (edit success)",
    "gen.generality": "paraphrase answered with target_new",
    "gen.locality": "neighborhood prompt answered with its true answer (correctness)",
    "gen.locality_agreement": "neighborhood answer identical to the pre-edit model's",
    "gen.neighbor_edit_target": ("neighborhood prompt answered with an edit's target_new (any edit's, its own "
                                 "included) that is not its true answer and was not in the pre-edit answer"),
    "gen.retention": "paraphrase still answered with target_old (outdated-knowledge retention)",
    "gen.old_on_prompt": "edit prompt still answered with target_old",
    "gen.other_target": "paraphrase answered with another edit's target_new instead of its own (edits mixed up)",
    "tf.reliability": "token accuracy of target_new after the edit prompt (EasyEdit rewrite_acc)",
    "tf.generality": "token accuracy of target_new after a paraphrase (EasyEdit rephrase_acc)",
    "tf.locality": "argmax tokens on the neighborhood answer equal to the pre-edit model's (EasyEdit locality)",
    "tf.locality_correct": "token accuracy of the neighborhood's true answer",
    "tf.retention": "token accuracy of target_old after a paraphrase",
    "tf.new_over_old": "log p(target_new) > log p(target_old) after a paraphrase",
}
# Locality beside edit success: an edit that answers its neighbours with new targets too has not succeeded.
HEADLINE = ["gen.reliability", "gen.generality", "gen.locality", "gen.locality_agreement", "gen.neighbor_edit_target",
            "gen.retention", "tf.reliability", "tf.generality", "tf.locality"]


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 32  # answers here are an entity or a sentence; 32 tokens hold either
    sample_runs: int = 0  # 0: greedy only. The released code samples once at temperature 0.7
    temperature: float = 0.7
    seed: int = 0
    batch_size: int = 16
    autocast: bool = False


def case_values(case: dict[str, Any], name: str) -> list[Any]:
    """A case's values of one metric: one per prompt (paraphrases, neighbors), one, or none (not applicable)."""
    v = case.get(name)
    return v if isinstance(v, list) else ([] if v is None else [v])


def _rate(values: Sequence[bool | float]) -> float | None:
    return float(mean(values)) if values else None


def evaluate(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             reference: dict[str, Any] | None = None, config: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """Per-case records and aggregate rates of METRICS.

    `reference` is this function's output for the unedited model on the same requests: agreement metrics
    compare against it. Without one (evaluating the unedited model itself) agreement is 1 by definition.
    """
    c = config
    prompts: list[str] = []
    for r in requests:
        prompts += [r.prompt, *r.paraphrases, *(n.prompt for n in r.neighborhood)]
    answers = iter(generate(model, formatter, prompts, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                            autocast=c.autocast))

    tf_pairs: list[tuple[str, str]] = []
    for r in requests:
        tf_pairs.append((r.prompt, r.target_new))
        tf_pairs += [(p, r.target_new) for p in r.paraphrases]
        tf_pairs += [(n.prompt, n.answer) for n in r.neighborhood]
        if r.target_old:
            tf_pairs += [(p, r.target_old) for p in r.paraphrases]
    scores = iter(score_answers(model, formatter, tf_pairs, batch_size=c.batch_size, autocast=c.autocast,
                                stop=False))

    cases: list[dict[str, Any]] = []
    for i, r in enumerate(requests):
        ref = reference["cases"][i] if reference else None
        prompt_answer = next(answers)
        para_answers = [next(answers) for _ in r.paraphrases]
        nb_answers = [next(answers) for _ in r.neighborhood]
        s_prompt = next(scores)
        s_para = [next(scores) for _ in r.paraphrases]
        s_nb = [next(scores) for _ in r.neighborhood]
        s_old = [next(scores) for _ in r.paraphrases] if r.target_old else []
        case: dict[str, Any] = {
            "id": r.id, "prompt": r.prompt, "target_new": r.target_new, "target_old": r.target_old,
            "answers": {"prompt": prompt_answer, "paraphrases": para_answers, "neighborhood": nb_answers},
            "neighborhood_truth": [n.answer for n in r.neighborhood],
            "tf_argmax_neighborhood": [list(s.argmax) for s in s_nb],
            "gen.reliability": contains(prompt_answer, r.target_new),
            "gen.generality": [contains(a, r.target_new) for a in para_answers],
            "gen.locality": [contains(a, n.answer) for a, n in zip(nb_answers, r.neighborhood)],
            "gen.locality_agreement": [a == (ref["answers"]["neighborhood"][k] if ref else a)
                                       for k, a in enumerate(nb_answers)],
            "gen.retention": [contains(a, r.target_old) for a in para_answers] if r.target_old else [],
            "gen.old_on_prompt": contains(prompt_answer, r.target_old) if r.target_old else None,
            "tf.reliability": s_prompt.token_accuracy,
            "tf.generality": [s.token_accuracy for s in s_para],
            "tf.locality": [_agreement(s.argmax, ref["tf_argmax_neighborhood"][k] if ref else s.argmax)
                            for k, s in enumerate(s_nb)],
            "tf.locality_correct": [s.token_accuracy for s in s_nb],
            "tf.retention": [s.token_accuracy for s in s_old],
            "tf.new_over_old": [n.logprob > o.logprob for n, o in zip(s_para, s_old)],
        }
        cases.append(case)
    mark_other_targets(cases)
    mark_neighbor_edit_targets(cases, reference["cases"] if reference else None)

    summary, counts = {}, {}
    for name in METRICS:
        values = [x for case in cases for x in case_values(case, name)]
        summary[name], counts[name] = _rate(values), len(values)

    if c.sample_runs:
        summary.update(_sampled(model, formatter, requests, c))
    return {"summary": summary, "counts": counts, "cases": cases}


def forgotten(held: Mapping[str, str], before: Mapping[str, str], after: Mapping[str, str]
              ) -> tuple[list[str], list[str]]:
    """Forgetting, the one definition the store and the multi-update benchmarks share (docs/METRICS.md): of the
    held facts (prompt -> the target the model should give), those answered correctly `before` an update, and
    of those, the ones answered wrongly `after` it. Returns (correct before, forgotten)."""
    correct = [p for p, t in held.items() if contains(before.get(p, ""), t)]
    return correct, [p for p in correct if not contains(after[p], held[p])]


def mark_other_targets(cases: list[dict[str, Any]]) -> None:
    """Set each case's `gen.other_target` from its stored paraphrase answers and every case's target_new."""
    targets = {normalize(c["target_new"]) for c in cases}
    for c in cases:
        c["gen.other_target"] = [other_target(a, c["target_new"], targets) for a in c["answers"]["paraphrases"]]


def mark_neighbor_edit_targets(cases: list[dict[str, Any]], reference: list[dict[str, Any]] | None) -> None:
    """Set each case's `gen.neighbor_edit_target` from its stored neighbourhood answers and true answers, every
    case's target_new, and `reference`: the unedited model's cases in the same order (None when `cases` are the
    unedited model's own: each answer is then its own "before", so nothing counts)."""
    targets = sorted({normalize(c["target_new"]) for c in cases})
    for i, c in enumerate(cases):
        after = c["answers"]["neighborhood"]
        before = reference[i]["answers"]["neighborhood"] if reference is not None else after
        c["gen.neighbor_edit_target"] = [neighbor_edit_target(a, b, truth, targets)
                                         for a, b, truth in zip(after, before, c["neighborhood_truth"])]


def with_other_targets(record: dict[str, Any], reference: dict[str, Any] | None = None,
                       truths: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """A results record written before `gen.other_target` or `gen.neighbor_edit_target` existed, with them computed
    from the answers the record holds (the functions evaluate() uses, so old and new runs are counted alike).

    The neighbour metric also needs the unedited model's record on the same cases (`reference`; the record itself
    for the unedited model) and each neighbourhood prompt's true answer, which records keep since the metric
    exists; for older ones the caller may give them as `truths` (one list per case, in order). Without either it
    stays missing rather than be guessed."""
    cases = record["cases"]
    if not all("answers" in c for c in cases):
        return record
    if "gen.other_target" not in record["summary"]:
        mark_other_targets(cases)
        _fill_rate(record, "gen.other_target")
    if "gen.neighbor_edit_target" in record["summary"] or reference is None:
        return record
    if [c.get("id") for c in reference["cases"]] != [c.get("id") for c in cases]:
        return record  # not the same cases: there is no "before" to compare with
    if truths is not None and len(truths) == len(cases):
        for c, truth in zip(cases, truths):
            c.setdefault("neighborhood_truth", list(truth))
    answered = all("neighborhood" in c.get("answers", {}) for c in [*cases, *reference["cases"]])
    if answered and all(len(c.get("neighborhood_truth", ())) == len(c["answers"]["neighborhood"]) for c in cases):
        mark_neighbor_edit_targets(cases, reference["cases"])
        _fill_rate(record, "gen.neighbor_edit_target")
    return record


def _fill_rate(record: dict[str, Any], name: str) -> None:
    """The record's aggregate of a metric just computed per case, pooled over prompts as evaluate() pools it."""
    values = [x for c in record["cases"] for x in c[name]]
    record["summary"][name] = _rate(values)
    record.setdefault("counts", {})[name] = len(values)


def other_target(answer: str, own: str, targets: set[str]) -> bool:
    """The answer is, word for word, another edit's new target (not its own): the edits were learned but bound
    to the wrong prompt. Exact match, not containment, so that a long answer that merely mentions a common target
    ("... in France ...") is not counted. DPO only pushes the *old* answer down; this failure is out of its reach."""
    said = bare(answer)
    return said != normalize(own) and said in targets


def neighbor_edit_target(answer: str, before: str, truth: str, targets: Iterable[str]) -> bool:
    """A neighbourhood prompt's answer gives some edit's new target: it contains (as gen.locality tests its true
    answer) one of `targets`, the target_new of every edit evaluated together, its own case's included, since an
    edit that leaks to its subject's neighbours is the bleed this looks for. A target counts only where it is news:
    not part of the neighbour's true answer (a right answer names it) and not already in the unedited model's
    answer `before` (the edit did not put it there). Containment rather than other_target's exact match because
    neighbourhood answers are often sentences; the two exceptions remove what containment would wrongly count."""
    return any(contains(answer, t) and not contains(truth, t) and not contains(before, t) for t in targets)


def _agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    return float(mean(a == b for a, b in zip(post, pre))) if post else 1.0


def _sampled(model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest],
             c: EvalConfig) -> dict[str, float]:
    """Reliability and generality under sampling, mean and std over seeded runs (the released protocol)."""
    rel, gen = [], []
    for run in range(c.sample_runs):
        prompts = [r.prompt for r in requests] + [p for r in requests for p in r.paraphrases]
        targets = [r.target_new for r in requests] + [r.target_new for r in requests for _ in r.paraphrases]
        answers = generate(model, formatter, prompts, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                           temperature=c.temperature, seed=c.seed + run, autocast=c.autocast)
        hits = [contains(a, t) for a, t in zip(answers, targets)]
        rel.append(mean(hits[: len(requests)]))
        if len(hits) > len(requests):
            gen.append(mean(hits[len(requests):]))
    out = {"sample.reliability": float(mean(rel)), "sample.reliability_std": float(pstdev(rel))}
    if gen:
        out.update({"sample.generality": float(mean(gen)), "sample.generality_std": float(pstdev(gen))})
    return out
