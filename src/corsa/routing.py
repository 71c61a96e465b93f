"""Scope routing: a query is answered with an edit's adapter only when it is about one of the edits' subjects,
and otherwise by the unedited model, so a fact the user did not edit cannot change (issue 29).

An adapter trained on "the capital of France is now Lyon" also answers "the capital of China?" with Lyon:
training alone did not keep neighbouring facts (docs/log/2026-12-04-anchors.md). Routing leaves them to the
base model instead. The key of an edit is the unedited model's hidden state, at one early layer, at the last
token of the edit's subject: the position where a causal model recalls facts about a subject (ROME's "subject
last token"). A query's score for an edit is the highest cosine similarity between that key and the query's
hidden state at any of its tokens, so a paraphrase that names the subject anywhere in a longer sentence scores
close to 1, and a same-relation question about another subject scores low. The query goes to the adapter whose
edits score highest, when that score reaches the threshold; else to no adapter. Keys at the question's last token
or averaged over it separated paraphrases from neighbours far worse (docs/log/2026-12-05-routing.md).

A subject match is refused when the query asks another relation of the subject than the edit does ("What
language is spoken in France?" after an edit of France's capital; `asks_other_relation`): routed, it would be asked
with the edit's fact in front and answered with the new capital (docs/log/2026-12-06-relation-gate.md). It is
refused too when the query replaces a number of the subject by another ("the 2008 Summer Olympics" against an edit
of the 2016 ones; `names_another_number`) or a part of its name ("Geoffrey Lloyd" against "Innes Lloyd";
`names_another_entity`).

Every text is read after a fixed prefix, because the first token of any sequence carries the same large
activation in every sequence (an attention sink): a subject at position 0 would look like every other one.

A subject is keyed as written and with its first letter's case flipped (see `cased`), in the edit's prompt and alone
(`key_texts`), since a question may open with it; every text is read without its quotation marks (`unquoted`). An
edit whose subject is not given, or not found in its prompt, cannot be scoped: an adapter holding one answers every
query (routing would otherwise silently drop that edit); `unscoped` says which.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from corsa import anchors, subjects
from corsa.methods.prepend import PrependConfig, fact_text
from corsa.prompts import Formatter

PREFIX = "Question: "


@dataclass(frozen=True)
class RouterConfig:
    # Layer as a share of the model's depth, so the setting carries to models of other depths; measured on
    # SmolLM2-135M (30 layers) on CounterFact `val` (docs/log/2026-12-05-routing.md).
    depth: float = 0.17  # layer 5 of 30
    threshold: float = 0.95  # cosine similarity; the same log, chosen on `val` paraphrases against neighbours
    # Ask a routed query with its matched edit's fact written in front (HintFormatter). On: on 50 CounterFact `val`
    # edits it raised generality from 62 to 86 % (lora) and 74 to 86 % (corsa) (docs/log/2026-12-05-routing.md).
    hint: bool = True
    # Refuse a subject match when the query asks another relation of the subject than the edit does
    # (asks_other_relation). On: on CounterFact `val` (2 subsets x 3 seeds) routed CoRSA's generality moved by
    # -0.7 points (-1.7 to +0.0), edit success and neighbours unchanged (docs/log/2026-12-06-relation-gate.md).
    relations: bool = True
    # Key each subject also as it reads alone, at the start of a text (`key_texts`): a question that opens with
    # its subject ("Iron is written with the symbol") reads it with no context before it, unlike the key read
    # inside the edit's prompt. On: 3 more of 192 hand-written dev and demo paraphrases routed, 1 more of 200 on
    # CounterFact `val`, no neighbour more (docs/log/2026-12-06-handwritten-routing.md).
    bare: bool = True
    # Key an edit of a country also by the country's other names, adjective and people ("Canadian", "Mexicans",
    # "USA"; `other_names`), each in the subject's place: "What is the Canadian capital?" names no "Canada"
    # (docs/log/2026-12-06-handwritten-routing.md).
    names: bool = True
    # Read a question also from the start of each later clause (`readings`): "To get to work every day, Robert Dale
    # Owen has to" reads the subject after an unrelated clause, and its state there is not the key's. On: one more
    # paraphrase of 100 routed to its edit on each of CounterFact `val` seeds 1, 2 and 3, none lost and no
    # neighbour more routed there or on the hand-written dev and demo edits (docs/log/2026-12-07-clause-routing.md).
    clauses: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"routing depth must be in [0, 1], not {self.depth}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"routing threshold must be in [-1, 1], not {self.threshold}")


DEFAULT = RouterConfig()


@dataclass(frozen=True)
class Edit:
    """What routing needs of an edit: its prompt and its subject (and its new answer, for a hint)."""

    prompt: str
    subject: str | None
    target_new: str = ""


def subject_span(prompt: str, subject: str | None) -> tuple[int, int] | None:
    """Where `subject` is in `prompt` (case-insensitively), None when it is not given or not there."""
    if not subject or not subject.strip():
        return None
    start = prompt.lower().find(subject.strip().lower())
    return None if start < 0 else (start, start + len(subject.strip()))


def cased(prompt: str, span: tuple[int, int]) -> list[str]:
    """The prompt as written, and with the subject's first letter in the other case: a subject is often written
    lower-case mid-sentence ("the symbol for gold") and capitalised at the start of a rephrasing ("Gold has
    which symbol?"), and the two are different tokens."""
    a, b = span
    first = prompt[a]
    other = first.lower() if first.isupper() else first.upper()
    texts = [prompt]
    if other != first:
        texts.append(prompt[:a] + other + prompt[a + 1 : b] + prompt[b:])
    return texts


def key_texts(prompt: str, span: tuple[int, int], bare: bool, names: Sequence[str] = ()
              ) -> list[tuple[str, tuple[int, int]]]:
    """The texts an edit is keyed by, each with its subject's span: the prompt in both cases of the subject's first
    letter (`cased`) and, when `bare`, the subject alone in both; then the same for each of the subject's other
    `names`, put in its place in the prompt."""
    a, b = span
    texts = []
    for name in (prompt[a:b], *names):
        named = (a, a + len(name))
        texts += [(text, named) for text in cased(prompt[:a] + name + prompt[b:], named)]
        if bare:
            texts += [(text, (0, len(name))) for text in cased(name, (0, len(name)))]
    return texts


def other_names(subject: str | None) -> list[str]:
    """What else a question may call `subject` ("Canadian", "Canadians" for Canada): the country table's forms,
    none for a subject it does not list."""
    if not subject:
        return []
    name = subject.strip().lower()
    return subjects.country_names().get(name.removeprefix("the "), [])


# Quotation marks, and an apostrophe that does not stand inside a word ("Philosopher's" keeps its own).
QUOTES = re.compile(r"[\"\u201c\u201d\u201e\u00ab\u00bb]|(?<!\w)['\u2018\u2019]|['\u2018\u2019](?!\w)")


def unquoted(text: str) -> str:
    """`text` as routing reads it: without quotation marks, which make a quoted title other tokens than the same
    title unquoted ("'Pride and Prejudice'")."""
    return QUOTES.sub("", text)


SENTENCE_END = re.compile(r"[.!?;\n](?=\s|$)")
# Where a later clause or sentence of a question starts: after its punctuation and white space, or a new line.
CLAUSE_START = re.compile(r"[.!?;:,]\s+(?=\S)|\n\s*(?=\S)")


def readings(query: str, clauses: bool) -> list[str]:
    """The texts a question is scored by: as written and, when `clauses`, from the start of each later clause, so
    that a subject after an unrelated clause is also read with nothing before it, as a bare key is."""
    if not clauses:
        return [query]
    return list(dict.fromkeys([query, *(query[m.end():] for m in CLAUSE_START.finditer(query))]))


def subject_sentence(query: str, subject: str | None) -> str:
    """The sentence of `query` that names `subject` (all of it when the subject is not written in it): a
    CounterFact rephrasing opens with an unrelated sentence ("He also was a director of the English-Speaking
    Union. Albert Calmette's life ended in"), whose words say nothing of what is asked."""
    span = subject_span(query, subject)
    if span is None:
        return query
    starts = [m.end() for m in SENTENCE_END.finditer(query, 0, span[0])]
    end = SENTENCE_END.search(query, span[1])
    return query[starts[-1] if starts else 0 : end.end() if end else len(query)]


@lru_cache(maxsize=1 << 16)
def edited_relations(edit: Edit) -> frozenset[int] | None:
    """The pool's relations the edit's prompt names (corsa.anchors.named_relations), read once per edit rather than
    once per query the relation gate checks against it."""
    return anchors.named_relations(edit.subject or "", edit.prompt, edit.prompt)


def asks_other_relation(edit: Edit, query: str) -> bool:
    """Whether `query`, though about the edit's subject, asks another relation of it: the edit's prompt names
    some of the pool's relations for the subject's kind (corsa.anchors.named_relations), the query's sentence
    about the subject names some, and they share none. "What language is spoken in France?" asks another
    relation than "What is the capital of France?", and its answer is not the edit's business. False whenever the
    pool does not know the subject's kind or the edited relation, so an edit the pool cannot read is never
    refused."""
    if not edit.subject:
        return False
    edited = edited_relations(edit)
    if not edited:
        return False
    asked = anchors.named_relations(edit.subject, edit.prompt, subject_sentence(query, edit.subject))
    return bool(asked) and not asked & edited


NUMBER = re.compile(r"\d+")


def names_another_number(edit: Edit, query: str) -> bool:
    """Whether `query` lacks a number that the edit's subject holds and holds another one: it is about another
    edition of the subject ("the 2008 Summer Olympics" against an edit of the 2016 ones), which the subject key,
    read at the subject's last token, barely tells apart."""
    wanted = set(NUMBER.findall(edit.subject or ""))
    given = set(NUMBER.findall(query))
    return bool(wanted - given) and bool(given - wanted)


def keyed_span(edit: Edit) -> tuple[int, int] | None:
    """Where the edit's subject is in its prompt as routing reads both (`unquoted`), up to its last letter or digit
    (the key of "Brandon Jenkins (football player)" is read at "player", not at a bracket every other bracket
    matches); None when it cannot be keyed."""
    span = subject_span(unquoted(edit.prompt), edit.subject and unquoted(edit.subject))
    if span is None:
        return None
    text, (a, b) = unquoted(edit.prompt), span
    while b > a + 1 and not text[b - 1].isalnum():
        b -= 1
    return a, b


def names_another_entity(edit: Edit, query: str) -> bool:
    """Whether every place `query` writes the last word of the edit's subject lies in a name that replaces a
    capitalised word of the subject by another ("Geoffrey Lloyd" against an edit of "Innes Lloyd", "Chicago
    Marathon" against "USS Chicago") or goes on past it ("Golden Axe Warrior" against "Golden Axe", "Paris Hilton"
    against "Paris"; a company's legal form, "Apple Inc." against "Apple", is not another name): another entity,
    which the subject key, read at the subject's last token, barely tells apart. A name that only adds to the
    subject ("Apple CEO Tim Cook" for "Tim Cook"), one that writes it in part ("Einstein" for "Albert Einstein"),
    or another name of it is not refused. Names are read as corsa.subjects reads them."""
    words = subjects.WORD.findall(edit.subject or "")
    if not words:
        return False
    last, known = words[-1].lower(), {w.lower() for w in words}
    capitals = {w.lower() for w in words if capitalised(w)}
    runs = [subjects.WORD.findall(run) for piece in subjects.BREAK.split(query)
            for run in subjects.capitalised_runs(piece)]
    written = sum(w.lower() == last for w in subjects.WORD.findall(query))
    others = 0
    for run in runs:
        name = {w.lower() for w in run if capitalised(w)}
        for i, w in enumerate(run):
            if w.lower() != last:
                continue
            # a part of the name replaced (a capitalised word the subject has not, and one of its own missing), or
            # the name going on past the subject's last word ("Golden Axe Warrior" against "Golden Axe")
            replaced = bool(name - known and capitals - name)
            goes_on = any(capitalised(v) and v.lower() not in known and v.lower() not in LEGAL_FORMS
                          for v in run[i + 1:])
            others += replaced or goes_on
    return written > 0 and others == written


# A company's legal form written after its name names the same company ("Apple Inc.", "Siemens AG"), in lower
# case; a form written with inner dots ("S.A.") is no name word anyway (`capitalised` asks for letters only).
# docs/log/2026-12-06-handwritten-routing-rule.md, candidate 9.
LEGAL_FORMS = frozenset({"inc", "incorporated", "corp", "corporation", "co", "company", "ltd", "limited", "llc",
                         "llp", "plc", "ag", "sa", "se", "nv", "gmbh"})


def capitalised(word: str) -> bool:
    return word[0].isupper() and word.isalpha()


def unscoped(edits: Sequence[Edit]) -> list[str]:
    """The prompts of the edits that cannot be keyed: no subject given, or not written in the prompt."""
    return [e.prompt for e in edits if keyed_span(e) is None]


def key_layer(config: RouterConfig, model: torch.nn.Module) -> int:
    """The layer whose states are the keys: `depth` of the model's layers, at least the first."""
    return max(1, round(config.depth * decoder_layers(model)))


def decoder_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config  # multimodal configs nest the text model's
    return int(config.num_hidden_layers)


def encode(tokenizer: Any, text: str) -> dict[str, list[Any]]:
    """Token ids and each token's character span; a slow tokenizer (no offsets) gets them by decoding prefixes."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return {"input_ids": list(enc["input_ids"]), "offset_mapping": [tuple(o) for o in enc["offset_mapping"]]}
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    return {"input_ids": ids, "offset_mapping": list(zip([0, *ends[:-1]], ends))}


@torch.no_grad()
def token_states(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], layer: int,
                 batch_size: int = 32) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Per text: the unit-length hidden states at `layer` of the text's own tokens (the prefix left out), and each
    token's character span in the text. `model` must be the unedited model (callers disable adapters)."""
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = [encode(tokenizer, PREFIX + t) for t in chunk]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.zeros((len(enc), width), dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # right padding: a token's state never depends on what follows it
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       output_hidden_states=True).hidden_states[layer]
        for i, e in enumerate(enc):
            # A token belongs to the text when it ends after the prefix (a BPE token may carry the prefix's space).
            own = [k for k, (_, end) in enumerate(e["offset_mapping"]) if end > len(PREFIX)]
            spans = [(max(a - len(PREFIX), 0), b - len(PREFIX)) for a, b in (e["offset_mapping"][k] for k in own)]
            out.append((F.normalize(hidden[i, own].float(), dim=-1).cpu(), spans))
    return out


def subject_key(states: torch.Tensor, spans: list[tuple[int, int]], span: tuple[int, int]) -> torch.Tensor:
    """The state at the subject's last token: the last token that starts before the subject ends."""
    last = max(k for k, (a, _) in enumerate(spans) if a < span[1])
    return states[last]


@contextlib.contextmanager
def unedited(model: torch.nn.Module) -> Iterator[None]:
    """`model` with every adapter switched off (a plain model is already unedited)."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else contextlib.nullcontext():
        yield


class KeyCache:
    """Edit keys computed so far, by layer, keyed text and subject span. A key depends only on the unedited model,
    so the routers of a store's versions (each update answers before and after training; `corsa history` asks
    every version) share one cache instead of running the model again over every stored fact. One cache serves
    one base model."""

    def __init__(self) -> None:
        self.keys: dict[tuple[int, str, tuple[int, int]], torch.Tensor] = {}

    def get(self, model: torch.nn.Module, tokenizer: Any, layer: int,
            wanted: Sequence[tuple[str, tuple[int, int]]]) -> list[torch.Tensor]:
        missing = list(dict.fromkeys((text, span) for text, span in wanted if (layer, text, span) not in self.keys))
        with unedited(model):
            states = token_states(model, tokenizer, [text for text, _ in missing], layer)
        for (text, span), (s, spans) in zip(missing, states):
            self.keys[layer, text, span] = subject_key(s, spans, span)
        return [self.keys[layer, text, span] for text, span in wanted]


class Router:
    """Which adapter answers a query, and which edit it is about: keys of each adapter's edits, computed once with
    the unedited model (or taken from `cache`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, scopes: Mapping[str, Sequence[Edit]],
                 config: RouterConfig = DEFAULT, cache: KeyCache | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.layer = key_layer(config, model)
        self.names = list(scopes)
        self.edits = [e for es in scopes.values() for e in es]
        self.edit_owner = torch.tensor([self.names.index(n) for n, es in scopes.items() for _ in es], dtype=torch.long)
        self.unscoped = {name: missing for name, es in scopes.items() if (missing := unscoped(es))}
        found = [(i, text, key_span) for i, e in enumerate(self.edits)
                 if (span := keyed_span(e)) is not None
                 for text, key_span in key_texts(unquoted(e.prompt), span, config.bare,
                                                 other_names(e.subject) if config.names else ())]
        keys = (cache or KeyCache()).get(model, tokenizer, self.layer, [(text, span) for _, text, span in found])
        self.keys = torch.stack(keys) if keys else torch.zeros((0, 1))
        self.key_edit = torch.tensor([i for i, _, _ in found], dtype=torch.long)
        self.known: dict[str, int | None] = {}  # query -> matched edit: generation and scoring ask the same queries

    def edit_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """[query, edit]: the query's best similarity to any key of the edit (-1 for an edit without keys)."""
        out = torch.full((len(prompts), len(self.edits)), -1.0)
        if not len(self.keys) or not prompts:
            return out
        texts = [readings(unquoted(p), self.config.clauses) for p in prompts]
        with unedited(self.model):
            states = token_states(self.model, self.tokenizer, [t for ts in texts for t in ts], self.layer)
        start = 0
        for q, ts in enumerate(texts):
            # Per key: its best token in any reading of the query.
            best = torch.cat([s for s, _ in states[start : start + len(ts)]]) @ self.keys.T
            out[q].scatter_reduce_(0, self.key_edit, best.max(0).values, reduce="amax")
            start += len(ts)
        return out

    def scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """[query, adapter]: the best of the adapter's edits."""
        per_edit = self.edit_scores(prompts)
        out = torch.full((len(prompts), len(self.names)), -1.0)
        return out.scatter_reduce(1, self.edit_owner.expand_as(per_edit), per_edit, reduce="amax")

    def matched(self, prompts: Sequence[str]) -> list[Edit | None]:
        """Per query, the edit whose subject it matches best, when that reaches the threshold, leaving out the edits
        whose subject's number the query replaces by another and (with `relations` on) those whose relation the
        query does not ask."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.known))
        for prompt, row in zip(new, self.edit_scores(new)):
            for i in (row >= self.config.threshold).nonzero().flatten().tolist():
                if self.refusal(self.edits[i], prompt):
                    row[i] = -1.0  # the next subject match may ask this relation (France's language edit)
            best = int(row.argmax()) if len(row) else -1
            self.known[prompt] = best if best >= 0 and row[best] >= self.config.threshold else None
        return [None if (i := self.known[p]) is None else self.edits[i] for p in prompts]

    def refusal(self, edit: Edit, prompt: str) -> str | None:
        """Why a query that matches the edit's subject is still not the edit's business, or None when it is."""
        if names_another_number(edit, prompt):
            return "it names another number than the edit's subject"
        if names_another_entity(edit, prompt):
            return "it names another entity that shares the subject's last word"
        if self.config.relations and asks_other_relation(edit, prompt):
            return "it asks another relation of the subject than the edit"
        return None

    def explain(self, prompt: str) -> list[str]:
        """Where `prompt` goes and why, one line each (`corsa ask --why`): every edit whose subject it matches,
        with its similarity and whether it was refused, or the closest edit when none matches."""
        row = self.edit_scores([prompt])[0]
        chosen = self.matched([prompt])[0]
        order = row.argsort(descending=True).tolist()
        lines = []
        for i in order:
            if row[i] < self.config.threshold:
                break
            edit = self.edits[i]
            why = self.refusal(edit, prompt)
            verdict = "answers it" if edit is chosen else f"refused: {why}" if why else "a closer match answers it"
            lines.append(f"edit {edit.prompt!r} (subject {edit.subject!r}), similarity {float(row[i]):.3f}: {verdict}")
        if chosen is None:
            closest = f"; closest: {self.edits[order[0]].prompt!r} at {float(row[order[0]]):.3f}" if order else ""
            lines.append(f"the unedited model answers it (threshold {self.config.threshold}{closest})")
        return lines

    def routes(self, prompts: Sequence[str]) -> list[str | None]:
        """Per query, the adapter that answers it, or None for the unedited model. An adapter holding an edit
        without a subject answers whatever no scoped adapter claims."""
        fallback = next(iter(self.unscoped), None)
        self.matched(prompts)
        return [fallback if (i := self.known[p]) is None else self.names[int(self.edit_owner[i])] for p in prompts]


class Routes(Protocol):
    def routes(self, prompts: Sequence[str]) -> list[str | None]: ...

    def explain(self, prompt: str) -> list[str]: ...


class Matches(Protocol):
    def matched(self, prompts: Sequence[str]) -> list[Edit | None]: ...


class RoutedModel(torch.nn.Module):
    """A PEFT model whose adapters each answer only the queries routed to them (corsa.scoring.Routed): `generate`
    and `score_answers` split every batch by route. Called directly (e.g. by MMLU) it is the plain PEFT model with
    its active adapter on, which over-counts any damage rather than hiding it."""

    def __init__(self, model: torch.nn.Module, router: Routes):
        super().__init__()
        self.model = model
        self.router = router

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.model.config

    def routes(self, prompts: Sequence[str]) -> list[str | None]:
        return self.router.routes(prompts)

    def explain(self, prompt: str) -> list[str]:
        """Where `prompt` goes and why, one line per reason (`corsa ask --why`)."""
        return self.router.explain(prompt)

    @contextlib.contextmanager
    def using(self, route: str | None) -> Iterator[None]:
        if route is None:
            with unedited(self.model):
                yield
            return
        active = self.model.active_adapter
        self.model.set_adapter(route)
        try:
            yield
        finally:
            self.model.set_adapter(active)


def answering(model: torch.nn.Module, formatter: Formatter, edits: Sequence[Edit],
              config: RouterConfig | None = DEFAULT, cache: KeyCache | None = None
              ) -> tuple[torch.nn.Module, Formatter]:
    """The model and formatter that answer as `corsa ask` does: the adapter only inside the edits' scope, asked
    with hints when the setting says so. Unchanged without a setting (None), an adapter, or edits."""
    if config is None or not hasattr(model, "disable_adapter") or not edits:
        return model, formatter
    router = Router(model, formatter.tokenizer, {model.active_adapter: edits}, config, cache)
    return RoutedModel(model, router), asking(formatter, router, config.hint)


def edits_of(requests: Sequence[Any]) -> list[Edit]:
    """Routing's view of edit requests (anything with `prompt`, `subject` and `target_new`)."""
    return [Edit(r.prompt, r.subject, r.target_new) for r in requests]


@dataclass
class HintFormatter(Formatter):
    """Asks a query that routing matched to an edit with that edit's fact written in front, the way in-context
    editing asks (the prepend method's template), and any other query as it is. The fact comes from the edits the
    adapter was trained on, found by the router: nothing about the query is looked up elsewhere."""

    router: Matches | None = None
    template: str = PrependConfig.template

    def prompt_ids(self, prompt: str) -> list[int]:
        edit = self.router.matched([prompt])[0] if self.router is not None else None
        if edit is None or not edit.target_new:
            return super().prompt_ids(prompt)
        return super().prompt_ids(self.template.format(fact=fact_text(edit), query=prompt))


def asking(formatter: Formatter, router: Matches, hint: bool) -> Formatter:
    """How a routed model is asked: with the matched edit's fact in front when `hint`, else as before."""
    if not hint:
        return formatter
    return HintFormatter(formatter.tokenizer, formatter.style, router=router)


def record(config: RouterConfig, model: torch.nn.Module | None = None, edits: Sequence[Edit] = ()
           ) -> dict[str, Any]:
    """What a manifest says about routing: the setting, and with the model and its edits the key layer and the
    edits it cannot scope (found without computing any key)."""
    out: dict[str, Any] = {"kind": "subject-key", "depth": config.depth, "threshold": config.threshold,
                           "hint": config.hint, "relations": config.relations, "bare": config.bare,
                           "names": config.names, "clauses": config.clauses}
    if model is not None:
        out["layer"] = key_layer(config, model)
        out["unscoped"] = unscoped(edits)
    return out


def from_record(recorded: Mapping[str, Any]) -> RouterConfig:
    """The setting a manifest's routing record (`record`) was made with. A record older than a switch has not got
    its key, and was made without what the switch turns on."""
    return RouterConfig(depth=recorded["depth"], threshold=recorded["threshold"], hint=recorded.get("hint", False),
                        relations=recorded.get("relations", False), bare=recorded.get("bare", False),
                        names=recorded.get("names", False), clauses=recorded.get("clauses", False))
