"""Anchors: prompts an edit must leave alone, answered by the model as it is before the edit.

An edit trained only on its own prompt teaches the model "answer this kind of question with a new target" as
much as it teaches the fact: on CounterFact a same-relation question about another subject gets an edit's target
(issue 29). Training can also fit anchor prompts to the unedited model's own answers (the retention term of
corsa.methods.corsa). The user writes nothing for it; per edit, in this order:

  1. the request's own `neighborhood` prompts, when given (benchmarks withhold theirs: `withheld`);
  2. the edit's prompt with its subject swapped for another subject, of the same kind where the pool shipped with
     the package (data/anchor_pool.json, written for corsa) knows it: the other edits' subjects first, then the
     pool's;
  3. general questions from the same pool.

and, when asked for (`relations`), on top of those:

  4. questions that ask another relation of the edit's own subject ("What money is used in France?" for an edit
     of France's capital), from the pool's questions for the subject's kind; the kind comes from the pool's list
     of subjects or, failing that, from words in the edit's prompt ("born" -> a person). A question whose
     relation words appear in the edit's prompt asks the edited relation and is skipped. Routing by subject sends
     such questions to the adapter, and an adapter trained only on same-relation anchors answers them with a new
     target ("What language is spoken in France?" -> "Lyon" in the demo of 2026-12-05, docs/DEMO.md).

A swapped prompt that is itself one of the edits, or a prompt a benchmark withholds for its evaluation
(`withheld`), is never an anchor.
"""

from __future__ import annotations

import dataclasses
import json
import random
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from corsa.answers import normalize
from corsa.requests import EditRequest

Source = Literal["neighborhood", "subject-swap", "pool", "relation-swap"]


@dataclass(frozen=True)
class Anchor:
    prompt: str
    source: Source


@cache
def pool() -> dict[str, Any]:
    """The shipped pool: subjects by kind and general questions, with a line saying where they come from."""
    return json.loads(resources.files("corsa").joinpath("data", "anchor_pool.json").read_text())


@cache
def kinds() -> dict[str, str]:
    """The pool's subjects, normalized, with their kinds (a name listed under two kinds keeps the first): built
    once, since routing's relation gate asks for a kind with every query it reads."""
    out: dict[str, str] = {}
    for kind, names in pool()["subjects"].items():
        for n in names:
            out.setdefault(normalize(n), kind)
    return out


def kind_of(name: str) -> str | None:
    """The pool's kind of a subject (country, city, person, organisation), None when the pool does not list it."""
    return kinds().get(normalize(name))


def guess_kind(subject: str, prompt: str) -> str | None:
    """The subject's kind: the pool's when it lists the subject, else the first kind whose words the prompt has."""
    known = kind_of(subject)
    if known is not None:
        return known
    text = prompt.lower()
    return next((kind for kind, words in pool()["kind_words"] if any(w in text for w in words)), None)


def named_relations(subject: str, prompt: str, text: str) -> frozenset[int] | None:
    """Which of the pool's relations for the subject's kind (found from `subject` and the edit's `prompt`) `text`
    names by their words, as indices into the kind's list; None when the kind is unknown. The relation anchors
    (below) and routing's relation gate (corsa.routing.asks_other_relation) read relations this one way."""
    kind = guess_kind(subject, prompt)
    return None if kind is None else named_in(pool()["relations"][kind], text)


def named_in(relations: list[dict[str, Any]], text: str) -> frozenset[int]:
    """The indices of `relations` (one kind's, from the pool) whose words `text` has."""
    text = text.lower()
    return frozenset(i for i, r in enumerate(relations) if any(w in text for w in r["words"]))


def other_relations(subject: str, prompt: str) -> list[str]:
    """Questions about `subject` that ask a relation other than the one `prompt` edits (see the module's
    docstring, 4), in the pool's order; none when the subject's kind is unknown."""
    kind = guess_kind(subject, prompt)
    if kind is None:
        return []
    relations = pool()["relations"][kind]
    edited = named_in(relations, prompt)
    return [r["question"].format(subject) for i, r in enumerate(relations) if i not in edited]


def swap_subjects(subject: str, others: list[str], rng: random.Random) -> list[str]:
    """Subjects to put in `subject`'s place, best first: when the pool knows `subject`'s kind, the other edits'
    subjects of that kind and then the pool's (a question about a country stays about a country); otherwise the
    other edits' subjects and then the whole pool. Never `subject` itself."""
    kinds = pool()["subjects"]
    kind = kind_of(subject)
    if kind is not None:
        first, rest = [o for o in others if kind_of(o) == kind], list(kinds[kind])
    else:
        first, rest = list(others), [n for names in kinds.values() for n in names]
    rng.shuffle(first)
    rng.shuffle(rest)
    seen = {normalize(subject)}
    out = []
    for name in first + rest:
        if normalize(name) not in seen:
            seen.add(normalize(name))
            out.append(name)
    return out


def edit_rng(seed: int, prompt: str, stream: int = 0) -> random.Random:
    """One edit's generator, fixed by `seed` and its prompt (not its place in the batch); `stream` tells apart the
    independent draws made for one edit."""
    return random.Random(seed * 1_000_003 + zlib.crc32(prompt.encode()) + stream)


def build(requests: list[EditRequest], per_edit: int, seed: int = 0, relations: int = 0) -> list[tuple[Anchor, ...]]:
    """Up to `per_edit` anchors for each request, then up to `relations` more that ask other relations of its
    subject (see the module's docstring for where they come from). The choice is random but fixed by `seed` and
    the edit's prompt, so one edit gets the same anchors in any batch."""
    if per_edit <= 0 and relations <= 0:
        return [() for _ in requests]
    edited = {normalize(r.prompt) for r in requests}.union(*(r.withheld for r in requests))
    subjects = [r.subject for r in requests if r.subject and r.subject in r.prompt]
    questions = [q for q in pool()["questions"] if normalize(q) not in edited]
    out = []
    for r in requests:
        rng = edit_rng(seed, r.prompt)
        chosen: list[Anchor] = [Anchor(n.prompt, "neighborhood") for n in r.neighborhood][:per_edit]
        if r.subject and r.subject in r.prompt and len(chosen) < per_edit:
            for name in swap_subjects(r.subject, subjects, rng):
                prompt = r.prompt.replace(r.subject, name)
                if normalize(prompt) not in edited and len(chosen) < per_edit:
                    chosen.append(Anchor(prompt, "subject-swap"))
        if len(chosen) < per_edit:
            chosen += [Anchor(q, "pool") for q in rng.sample(questions, min(per_edit - len(chosen), len(questions)))]
        if relations > 0 and r.subject:
            # its own stream, so asking for these leaves the anchors above as they were
            asked = [q for q in other_relations(r.subject, r.prompt) if normalize(q) not in edited]
            edit_rng(seed, r.prompt, stream=1).shuffle(asked)
            chosen += [Anchor(q, "relation-swap") for q in asked[:relations]]
        out.append(tuple(chosen))
    return out


def withheld(requests: list[EditRequest], evaluated: list[EditRequest] | None = None) -> list[EditRequest]:
    """The requests as a benchmark may train on them: without the paraphrases and neighbourhood prompts it will
    evaluate with, so nothing of the evaluation reaches training (or anchors). The paraphrases and neighbourhood
    prompts of every evaluated request (default: these requests; a benchmark that trains in parts gives all of
    them) also go in each copy's `withheld`, and `build` never makes one of them an anchor: a subject
    swap or a pool question can write, word for word, a question the evaluation asks about another edit."""
    held = frozenset(normalize(p) for r in (requests if evaluated is None else evaluated)
                     for p in (*r.paraphrases, *(n.prompt for n in r.neighborhood)))
    return [dataclasses.replace(r, paraphrases=(), neighborhood=(), withheld=held) for r in requests]


def with_mined(originals: list[EditRequest], trained: list[EditRequest]) -> list[EditRequest]:
    """The evaluation's requests (`originals`, paraphrases and neighbourhood included) with the old answers that
    training filled in (mined from the model) on the withheld copies it was given."""
    return [dataclasses.replace(o, target_old=t.target_old, old_mined=t.old_mined) for o, t in zip(originals, trained)]
