"""Finding an edit's subject in its prompt when the request does not give one.

Scope routing keys an edit at the last token of its subject, and the subject-swap anchors replace the subject in
the prompt (corsa.routing, corsa.anchors): an edit without a subject makes its adapter answer every question. Most
subjects are names, and a name is what `find` reads from the prompt:

  1. the longest of: a name the package's tables know (the anchor pool's subjects, the country table) written in
     the prompt as whole words, and a run of capitalised words or numbers ("Danielle Darrieux", "Royal
     Conservatory of Music", "2016 Summer Olympics"), joined across "of", "the", "and", ... but never across
     punctuation, a sentence's first word only when it is not a question or function word ("What", "The"), a
     leading article and a trailing possessive ("Tesla's") left out;
  2. in a question, its last word before the question mark, when that is a content word ("Who invented the
     telephone?" -> "telephone").

Measured on CounterFact `val` with the subjects hidden, and on hand-written edits:
docs/log/2026-12-06-found-subjects.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from importlib import resources

from corsa import anchors
from corsa.requests import EditRequest

# Words that open a sentence in capitals without naming anything, and words too common to be a subject.
FUNCTION = frozenset({
    "a", "about", "after", "an", "and", "are", "as", "at", "be", "been", "before", "by", "can", "could", "did",
    "do", "does", "for", "from", "had", "has", "have", "he", "her", "his", "how", "i", "if", "in", "into", "is",
    "it", "its", "may", "me", "might", "my", "name", "no", "not", "of", "on", "or", "our", "she", "should", "so",
    "tell", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "to", "was",
    "we", "were", "what", "when", "where", "which", "while", "who", "whom", "whose", "why", "will", "with", "would",
    "you", "your", "give", "list"
})
# Lower-case words a name may hold between its capitalised ones ("Bank of America", "Leonardo da Vinci").
JOINERS = frozenset({
    "of", "the", "and", "&", "de", "da", "di", "del", "der", "van", "von", "la", "le", "du", "dos", "das", "y",
    "bin", "ibn", "al", "upon", "for", "on"
})
ARTICLES = ("the ", "a ", "an ")
WORD = re.compile(r"[\w'’.&-]+")
BREAK = re.compile(r"[?!,;:()\"“”]|(?<!\b[A-Z])\.(?=\s|$)")  # a name never runs across these; an initial's dot does


def filled(requests: list[EditRequest]) -> list[EditRequest]:
    """The requests, each that gives no subject with the one `find` reads from its prompt (marked
    `subject_found`); one where nothing is found stays without."""
    return [dataclasses.replace(r, subject=found, subject_found=True)
            if not (r.subject or "").strip() and (found := find(r.prompt)) else r for r in requests]


@cache
def country_names() -> dict[str, list[str]]:
    """Each country of the table shipped with the package (data/country_names.json, written for corsa), by its
    name in lower case, with the other names, adjective and people's names a question may call it by (scope
    routing keys an edit of a country by them too: corsa.routing.other_names)."""
    table = json.loads(resources.files("corsa").joinpath("data", "country_names.json").read_text())
    return {name.lower(): forms for name, forms in table["countries"].items()}


def known_names() -> list[str]:
    """The names the package's tables list: the anchor pool's subjects and the countries."""
    names = [n for ns in anchors.pool()["subjects"].values() for n in ns]
    return names + list(country_names())  # in lower case: `find` takes the name as the prompt writes it


@cache
def known_patterns() -> tuple[re.Pattern[str], ...]:
    """One pattern per known name, matching it as whole words in a lower-cased prompt; compiled once, since
    `find` runs on every request and every benchmark prompt."""
    return tuple(re.compile(r"(?<!\w)" + re.escape(n.lower()) + r"(?!\w)") for n in known_names())


def find(prompt: str) -> str | None:
    """The subject `prompt` is most likely about, as written in it; None when nothing looks like one."""
    lowered = prompt.lower()
    known = [prompt[m.start() : m.end()] for pattern in known_patterns() if (m := pattern.search(lowered))]
    candidates = [run for piece in BREAK.split(prompt) for run in capitalised_runs(piece)] + known
    if candidates:
        return max(candidates, key=len)  # the first of the longest: "Toyota Corolla E140" over "Toyota"
    if prompt.rstrip().endswith("?"):
        words = WORD.findall(prompt.rstrip()[:-1])
        if words and words[-1].isalpha() and len(words[-1]) > 2 and words[-1].lower() not in FUNCTION:
            return words[-1]
    return None


def capitalised_runs(text: str) -> list[str]:
    """The runs of capitalised words or numbers in `text` (one sentence piece, without punctuation that breaks a
    name), as written, without a leading article or a trailing possessive."""
    words = [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]
    runs, i = [], 0
    while i < len(words):
        if not named(words[i][0], first=i == 0):
            i += 1
            continue
        last = k = i
        while k + 1 < len(words):
            nxt = words[k + 1][0]
            if named(nxt, first=False):
                last = k = k + 1
            elif nxt.lower() in JOINERS and k + 2 < len(words) and named(words[k + 2][0], first=False):
                k += 1
            else:
                break
        run = text[words[i][1] : words[last][2]]
        run = re.sub(r"(['’]s|['’])$", "", run).rstrip(".")
        for article in ARTICLES:
            if run.lower().startswith(article) and len(run) > len(article):
                run = run[len(article):]
        if run and run.lower() not in FUNCTION:
            runs.append(run)
        i = last + 1
    return runs


def named(word: str, *, first: bool) -> bool:
    """Whether `word` can be part of a name: capitalised (within its first three letters: "iPhone", "d'Este",
    "al-Qasim") or a number, and, opening a sentence, not a question or function word."""
    if not (word[0].isdigit() or any(c.isupper() for c in word[:4])):
        return False
    return not (first and word.lower() in FUNCTION)
