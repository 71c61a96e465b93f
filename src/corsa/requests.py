"""Edit requests: the typed record, our JSONL reader with its validation, and the benchmark loaders.

Every problem in a user's file is reported as an InputError naming file, line and field, before any model is
loaded, so a typo costs a second rather than a training run. Benchmark files are someone else's data: records
that cannot be edits are skipped and counted rather than refused, and only a broken file is an error.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from corsa.answers import same_answer
from corsa.errors import InputError

Benchmark = Literal["counterfact", "zsre", "mquake"]


@dataclass(frozen=True)
class Neighbor:
    """A prompt about something else whose answer the edit must leave unchanged (a locality check)."""

    prompt: str
    answer: str


def invalid_character(text: str) -> int | None:
    """The 1-based position of the first character UTF-8 cannot hold, None when there is none. JSON can spell a
    lone surrogate ("\\ud800") and a command line decodes stray bytes to them; no tokenizer, database or file can
    hold one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start + 1
    return None


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: at `prompt` the model should answer `target_new` instead of `target_old`.

    Paraphrases say where the new answer must also hold; the neighborhood says where nothing may change. Frozen so
    a request can be shared between the trainer, the evaluator and the manifest without anyone mutating it.
    """

    prompt: str
    target_new: str
    target_old: str | None = None  # None: the trainer mines the base model's own current answer
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    id: str | None = None
    old_mined: bool = False  # target_old came from the model, not from the user
    subject_found: bool = False  # subject was read from the prompt (corsa.subjects), not given by the user
    # Later answers to the same prompt, in order (old -> target_new -> chain[0] -> ...): a revision chain for
    # `corsa bench revise`. One edit trains one answer, so `corsa edit` and `corsa update` refuse chains.
    chain: tuple[str, ...] = ()
    # Loader-only extras (e.g. MQuAKE's multi-hop questions); never read from a user's JSONL. Left out of eq and
    # hash because it is bookkeeping, not part of what the edit asks for (and a dict is not hashable).
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # "path:line" where the request was read, so errors found later (prompt too long) can still point at it.
    source: str | None = field(default=None, compare=False, hash=False, repr=False)
    # Normalized prompts a benchmark evaluates with, of this and every other request it trains (corsa.anchors.withheld):
    # training must not use them, so no anchor is one. Bookkeeping like `source`: never read or written.
    withheld: frozenset[str] = field(default=frozenset(), compare=False, hash=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for files and manifests: unset optional fields are left out; `source` never appears."""
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        out["prompt"] = self.prompt
        out["target_new"] = self.target_new
        if self.target_old is not None:
            out["target_old"] = self.target_old
        if self.subject is not None:
            out["subject"] = self.subject
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        if self.neighborhood:
            out["neighborhood"] = [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood]
        if self.chain:
            out["chain"] = list(self.chain)
        if self.old_mined:
            out["old_mined"] = True
        if self.subject_found:
            out["subject_found"] = True
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    def with_old(self, old: str, mined: bool) -> EditRequest:
        """The same request with its old answer filled in; `mined` records that the model, not the user, gave it."""
        return replace(self, target_old=old, old_mined=mined)


FIELDS = ("prompt", "target_new", "target_old", "subject", "paraphrases", "neighborhood", "id", "chain")
REQUIRED = ("prompt", "target_new")


def _type(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- our JSONL ------------------------------------------------------------------------------------------------
class _Line:
    """Validation helpers bound to one line of one file, so every error says where it is."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def error(self, message: str, field: str | None = None) -> InputError:
        return InputError(message, path=self.path, line=self.line, field=field)

    def text(self, value: Any, name: str) -> str:
        # The text is kept as given (a leading space can matter to a tokenizer); only blank text is refused.
        if not isinstance(value, str):
            raise self.error(f"must be a non-empty string, got {_type(value)}", name)
        if not value.strip():
            raise self.error("must be a non-empty string", name)
        bad = invalid_character(value)
        if bad is not None:
            raise self.error(f"holds an invalid character (a lone surrogate at position {bad})", name)
        return value

    def texts(self, value: Any, name: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(f"must be a list of strings, got {_type(value)}", name)
        return tuple(self.text(v, f"{name}[{i}]") for i, v in enumerate(value))

    def neighbors(self, value: Any) -> tuple[Neighbor, ...]:
        if not isinstance(value, list):
            raise self.error(f"must be a list of {{\"prompt\", \"answer\"}} objects, got {_type(value)}",
                             "neighborhood")
        out = []
        for i, item in enumerate(value):
            name = f"neighborhood[{i}]"
            if not isinstance(item, dict):
                raise self.error(f"must be an object with prompt and answer, got {_type(item)}", name)
            extra = [k for k in item if k not in ("prompt", "answer")]
            if extra:
                raise self.error(f"unknown field '{extra[0]}' (allowed: prompt, answer)", name)
            for key in ("prompt", "answer"):
                if key not in item:
                    raise self.error("is required", f"{name}.{key}")
            out.append(Neighbor(self.text(item["prompt"], f"{name}.prompt"),
                                self.text(item["answer"], f"{name}.answer")))
        return tuple(out)

    def ident(self, value: Any) -> str:
        # Integers are accepted because spreadsheets and scripts emit them; floats and booleans are almost
        # certainly mistakes (1.0 and True would both collapse to an id that looks like an int).
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(f"must be a string or an integer, got {_type(value)}", "id")
        if isinstance(value, str) and not value.strip():
            raise self.error("must be a non-empty string or an integer", "id")
        return str(value)


def parse_request(obj: Any, path: str, line: int) -> EditRequest:
    """Validate one decoded JSONL object; checks that involve other lines are done by read_jsonl."""
    at = _Line(path, line)
    if not isinstance(obj, dict):
        raise at.error(f"each line must be a JSON object, got {_type(obj)}")
    for key in obj:
        if key not in FIELDS:
            raise at.error(f"unknown field '{key}' (allowed: {', '.join(FIELDS)})", key)
    for key in REQUIRED:
        if key not in obj:
            raise at.error("is required", key)
    req = EditRequest(
        prompt=at.text(obj["prompt"], "prompt"),
        target_new=at.text(obj["target_new"], "target_new"),
        target_old=at.text(obj["target_old"], "target_old") if "target_old" in obj else None,
        subject=at.text(obj["subject"], "subject") if "subject" in obj else None,
        paraphrases=at.texts(obj["paraphrases"], "paraphrases") if "paraphrases" in obj else (),
        neighborhood=at.neighbors(obj["neighborhood"]) if "neighborhood" in obj else (),
        id=at.ident(obj["id"]) if "id" in obj else None,
        chain=at.texts(obj["chain"], "chain") if "chain" in obj else (),
        source=f"{path}:{line}",
    )
    if req.target_old is not None and same_answer(req.target_new, req.target_old):
        raise at.error("is the same as target_old; an edit must change the answer", "target_new")
    answers = [req.target_new, *req.chain]
    for i in range(1, len(answers)):
        if same_answer(answers[i], answers[i - 1]):
            raise at.error("repeats the answer before it; each step of a chain must change the answer",
                           f"chain[{i - 1}]")
    return req


def json_lines(path: str | Path, folder_hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a JSONL file. A missing file, a folder (refused with
    `folder_hint`), a device, bytes that are not UTF-8 and invalid JSON are InputErrors naming the file and line.
    Decoding line by line (not the whole file at once) is what lets a bad byte be reported with its line."""
    name = str(path)
    if not os.path.exists(name):
        raise InputError("no such file", path=name)
    if os.path.isdir(name):
        raise InputError(f"is a folder; {folder_hint}", path=name)
    mode = os.stat(name).st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # /dev/zero would be read for ever; a pipe (<(...)) is fine
        raise InputError("is a device, not a file", path=name)
    try:
        with open(name, "rb") as fh:
            raw_lines = fh.read().split(b"\n")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=name) from None
    if raw_lines[0].startswith(b"\xef\xbb\xbf"):  # a BOM from Windows editors is not an error
        raw_lines[0] = raw_lines[0][3:]
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8",
                             path=name, line=lineno) from None
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=name, line=lineno) from None
        except RecursionError:
            raise InputError("JSON nested too deeply", path=name, line=lineno) from None


def read_jsonl(path: str | Path) -> list[EditRequest]:
    """Read and validate a JSONL file of edit requests (one object per line; blank lines are skipped).

    Exact duplicates (same prompt, same target) are kept: they are harmless and the user may mean the weight.
    """
    name = str(path)
    requests: list[EditRequest] = []
    seen_prompt: dict[str, tuple[int, str]] = {}
    seen_id: dict[str, int] = {}
    for lineno, obj in json_lines(path, "give a .jsonl file (or --format counterfact|zsre|mquake for a benchmark)"):
        req = parse_request(obj, name, lineno)
        key = req.prompt.strip()
        if key in seen_prompt and not same_answer(seen_prompt[key][1], req.target_new):
            first, target = seen_prompt[key]
            raise InputError(f"same prompt as line {first}, which asks for '{target}' instead of "
                             f"'{req.target_new}'; one prompt can have only one new answer",
                             path=name, line=lineno, field="prompt")
        seen_prompt.setdefault(key, (lineno, req.target_new))
        if req.id is not None:
            if req.id in seen_id:
                raise InputError(f"id '{req.id}' is already used on line {seen_id[req.id]}; ids must be unique",
                                 path=name, line=lineno, field="id")
            seen_id[req.id] = lineno
        requests.append(req)
    if not requests:
        raise InputError("no edit requests found", path=name)
    return requests


def _split_source(source: str | None) -> tuple[str | None, int | None, str]:
    """'path:12' -> (path, 12, ''); 'path:record 3' (benchmarks) -> (path, None, 'record 3')."""
    if not source or ":" not in source:
        return source, None, ""
    path, _, tail = source.rpartition(":")  # the last ':' so that Windows drive letters survive
    if tail.isdigit():
        return path, int(tail), ""
    return path, None, tail


def check_lengths(requests: Iterable[EditRequest], count_tokens: Callable[[str], int], max_tokens: int,
                  path_hint: str | None = None, count_answer: Callable[[str], int] | None = None) -> None:
    """Refuse the first prompt (or paraphrase, or neighborhood prompt) that won't fit the model's context, and,
    given `count_answer`, the first prompt whose new or old answer would take a training sequence past it.

    `count_tokens` must count the fully formatted prompt (chat template included), since that is what the model
    sees; `count_answer` the answer as it is trained (end token included). `path_hint` names the file for requests
    that carry no `source` (built in code rather than read).
    """
    for r in requests:
        path, line, where = _split_source(r.source)
        prefix = f"{where}: " if where else ""
        texts = [("prompt", r.prompt)] + [(f"paraphrases[{i}]", p) for i, p in enumerate(r.paraphrases)]
        texts += [(f"neighborhood[{i}].prompt", n.prompt) for i, n in enumerate(r.neighborhood)]
        for name, text in texts:
            n = count_tokens(text)
            if n > max_tokens:
                raise InputError(f"{prefix}{name} is {n} tokens, longer than the model's context ({max_tokens})",
                                 path=path if path is not None else path_hint, line=line, field=name)
        if count_answer is None:
            continue
        for name, answer in (("target_new", r.target_new), ("target_old", r.target_old)):
            n = count_tokens(r.prompt) + count_answer(answer) if answer is not None else 0
            if n > max_tokens:
                raise InputError(f"{prefix}the prompt and its {name} are {n} tokens together, longer than the "
                                 f"model's context ({max_tokens})", path=path if path is not None else path_hint,
                                 line=line, field=name)


def write_jsonl(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as JSONL (one `to_dict()` per line), atomically: a crash leaves the old file or none.

    Note: `old_mined` and `meta` are written when set, and read_jsonl refuses them as unknown fields, so only
    user-style requests (not mined, not from a benchmark) read back unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file lives in the target's folder so that os.replace is a rename on one filesystem, not a copy.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in requests:
                fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file as 0600; give it the permissions an ordinary open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- benchmark loaders ----------------------------------------------------------------------------------------
SPLITS = {
    # split -> file names to try, in order. The first that exists wins.
    "counterfact": {s: [f"easyedit-counterfact-{s}.json"] for s in ("edit", "train", "val")},
    # zsRE has MEND's train file (we hold a 1k subset) and its eval file. "edit", the default, takes whichever is
    # present, the 1k train subset first; "train" and "eval" ask for exactly one.
    "zsre": {"edit": ["zsre_mend_train-1k.json", "zsre_mend_eval.json"], "train": ["zsre_mend_train-1k.json"],
             "eval": ["zsre_mend_eval.json"]},
}
# MQuAKE has no splits; the standard CF-3k file (v2 has its conflicts fixed) is preferred over the hard subset.
MQUAKE_FILES = ["MQuAKE-CF-3k-v2.json", "MQuAKE-CF-3k.json", "MQuAKE-hard.json"]


def benchmark_file(name: Benchmark, location: str | Path, split: str = "edit") -> Path:
    """Find a benchmark's file from a file path, the benchmark's own folder, or the benchmarks root."""
    if name not in ("counterfact", "zsre", "mquake"):
        raise InputError(f"unknown benchmark '{name}' (choose from counterfact, zsre, mquake)")
    location = Path(location)
    if location.is_file():
        return location  # the user named the file; the split has nothing left to choose
    if not location.exists():
        raise InputError("no such file or folder", path=str(location))
    folders = [location, location / name]
    if name == "mquake":
        wanted = list(MQUAKE_FILES)
        for folder in folders:
            # Any other MQuAKE*.json (e.g. MQuAKE-T.json) is accepted after the preferred ones.
            wanted += sorted(p.name for p in folder.glob("MQuAKE*.json") if p.name not in wanted)
    else:
        if split not in SPLITS[name]:
            raise InputError(f"unknown {name} split '{split}' (choose from {', '.join(SPLITS[name])})")
        wanted = SPLITS[name][split]
    for file in wanted:
        for folder in folders:
            if (folder / file).is_file():
                return folder / file
    raise InputError(f"no {name} data found: looked for {' or '.join(wanted)} here and in {name}/",
                     path=str(location))


def _key_name(keys: tuple[str | int, ...]) -> str:
    """("requested_rewrite", 0, "subject") -> "requested_rewrite[0].subject", the way the JSONL errors name fields."""
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keys))


class _Record:
    """One benchmark record, so that a missing or mistyped key names the file, the record and the key."""

    def __init__(self, data: Any, path: str, index: int):
        self.data, self.path, self.index = data, path, index
        if not isinstance(data, dict):
            raise InputError(f"record {index} is {_type(data)}, expected an object", path=path)

    def get(self, *keys: str | int) -> Any:
        value = self.data
        for depth, k in enumerate(keys, start=1):
            try:
                value = value[k]
            except (KeyError, IndexError, TypeError):
                name = _key_name(keys[:depth])
                raise InputError(f"record {self.index} has no '{name}'", path=self.path, field=name) from None
        return value

    def text(self, *keys: str | int) -> str:
        # Empty strings pass here: they make the record unusable (skipped), not the file broken.
        value = self.get(*keys)
        if not isinstance(value, str):
            raise InputError(f"record {self.index}: must be a string, got {_type(value)}", path=self.path,
                             field=_key_name(keys))
        return value

    def texts(self, *keys: str | int) -> list[str]:
        value = self.get(*keys)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"record {self.index}: must be a list of strings", path=self.path,
                             field=_key_name(keys))
        return list(value)


def _counterfact(rec: _Record) -> list[EditRequest]:
    case_id = rec.get("case_id")
    return [EditRequest(
        prompt=rec.text("prompt"), target_new=rec.text("target_new"), target_old=rec.text("ground_truth"),
        subject=rec.text("subject"), paraphrases=(rec.text("rephrase_prompt"),),
        neighborhood=(Neighbor(rec.text("locality_prompt"), rec.text("locality_ground_truth")),),
        id=f"cf-{case_id}", meta={"case_id": case_id},
    )]


def _zsre(rec: _Record) -> list[EditRequest]:
    answers = rec.texts("answers")
    return [EditRequest(
        # No answers leaves target_old empty, which marks the record unusable rather than silently mining one.
        prompt=rec.text("src"), target_new=rec.text("alt"), target_old=answers[0] if answers else "",
        subject=rec.text("subject"), paraphrases=(rec.text("rephrase"),),
        # EasyEdit keeps the "nq question: " prefix on locality prompts; so do we, to score the same prompts.
        neighborhood=(Neighbor(rec.text("loc"), rec.text("loc_ans")),),
        id=f"zsre-{rec.index}", meta={"index": rec.index, "answers": answers},
    )]


def _mquake(rec: _Record) -> list[EditRequest]:
    case_id = rec.get("case_id")
    # Case-level facts every rewrite of the case shares: the multi-hop questions and their answers before and
    # after the edits, which the MQuAKE evaluation needs and nothing else reads.
    shared = {"questions": rec.texts("questions"), "new_answer": rec.text("new_answer"),
              "new_answer_alias": rec.texts("new_answer_alias"), "answer": rec.text("answer"),
              "answer_alias": rec.texts("answer_alias"), "new_single_hops": rec.get("new_single_hops")}
    for key in ("new_single_hops", "requested_rewrite"):
        if not isinstance(rec.get(key), list):
            raise InputError(f"record {rec.index}: must be a list, got {_type(rec.get(key))}", path=rec.path,
                             field=key)
    out = []
    for k in range(len(rec.get("requested_rewrite"))):
        template, subject = rec.text("requested_rewrite", k, "prompt"), rec.text("requested_rewrite", k, "subject")
        if "{}" not in template:
            raise InputError(f"record {rec.index}: prompt has no '{{}}' for the subject", path=rec.path,
                             field=f"requested_rewrite[{k}].prompt")
        out.append(EditRequest(
            # replace, not str.format: a stray brace elsewhere in a template must not crash the loader.
            prompt=template.replace("{}", subject), target_new=rec.text("requested_rewrite", k, "target_new", "str"),
            target_old=rec.text("requested_rewrite", k, "target_true", "str"), subject=subject,
            paraphrases=(rec.text("requested_rewrite", k, "question"),),
            id=f"mquake-{case_id}-{k}", meta={"case_id": case_id, "rewrite_index": k, **shared},
        ))
    return out


def _unusable(req: EditRequest) -> bool:
    """A benchmark record our JSONL reader would refuse: blank text, or a "new" answer that is the old one."""
    texts = [req.prompt, req.target_new, req.target_old or "", req.subject or "", *req.paraphrases]
    texts += [t for n in req.neighborhood for t in (n.prompt, n.answer)]
    return any(not t.strip() for t in texts) or same_answer(req.target_new, req.target_old or "")


def load_benchmark_with_report(name: Benchmark, location: str | Path,
                               split: str = "edit") -> tuple[list[EditRequest], int]:
    """Edit requests from a benchmark file, and how many edits were skipped as unusable.

    Skipped: blank text, target_new equal to target_old, a prompt already asked with another target_new, or an
    id already used. The count is of edits, so for MQuAKE it counts rewrites, not cases. `split` chooses the file
    for counterfact (edit, train, val) and zsre (edit, train, eval; see SPLITS); MQuAKE ignores it.
    """
    path = benchmark_file(name, location, split)
    where = str(path)
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=where) from None
    except RecursionError:
        raise InputError("JSON nested too deeply to be a benchmark file", path=where) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not valid UTF-8 (byte {exc.start + 1})", path=where) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=where, line=exc.lineno) from None
    if not isinstance(records, list):
        raise InputError(f"expected a JSON list of {name} records, got {_type(records)}", path=where)
    convert = {"counterfact": _counterfact, "zsre": _zsre, "mquake": _mquake}[name]
    out: list[EditRequest] = []
    seen_prompt: dict[str, str] = {}
    seen_id: set[str] = set()
    skipped = 0
    for index, data in enumerate(records):
        for req in convert(_Record(data, where, index)):
            key = req.prompt.strip()
            if (_unusable(req) or req.id in seen_id
                    or (key in seen_prompt and not same_answer(seen_prompt[key], req.target_new))):
                skipped += 1
                continue
            seen_prompt.setdefault(key, req.target_new)
            seen_id.add(req.id or "")
            out.append(replace(req, source=f"{where}:record {index}"))
    return out, skipped


def load_benchmark(name: Benchmark, location: str | Path, split: str = "edit") -> list[EditRequest]:
    """Edit requests from a benchmark; see load_benchmark_with_report for what is skipped."""
    return load_benchmark_with_report(name, location, split)[0]


def read_edits(path: str | Path, format: str = "jsonl", split: str = "edit", *,
               chains: bool = False) -> list[EditRequest]:
    """The CLI's single entry point: our JSONL, or a benchmark named by `format`. Revision chains are refused
    unless the caller applies them (`chains=True`)."""
    if format == "jsonl":
        requests = read_jsonl(path)
        for r in requests:
            if r.chain and not chains:
                file, line, _ = _split_source(r.source)
                raise InputError("one edit trains one answer; give each later answer in a later `corsa update`, "
                                 "or run the chain with `corsa bench revise --chains`", path=file, line=line,
                                 field="chain")
        return requests
    if format in ("counterfact", "zsre", "mquake"):
        return load_benchmark(format, path, split)  # type: ignore[arg-type]
    raise InputError(f"unknown format '{format}' (choose from jsonl, counterfact, zsre, mquake)")
