"""A versioned store of knowledge updates: one LoRA adapter that keeps learning, with its history in SQLite.

Paper section 2.1: updates keep optimising the same LoRA parameters, each continuing from the adapter the last
update left. A store is a folder:

  store.db          every version (parent, time, method, config, edits, metrics, adapter checksum), the answers
                    recorded at each version, and which version is the head; one SQLite transaction per change
  versions/v0003/   a version's adapter and edit_manifest.json: written under a temporary name, renamed into place,
                    never modified afterwards
  .lock             held (flock) by the one process changing the store

Crash safety comes from the order of work: the new adapter folder is complete before the transaction that names
it commits, and the head only moves inside that transaction. A crash before the commit leaves the last committed
version as the head (a finished but unrecorded folder is removed by the next writer); a crash after it has lost
nothing. Version 0 is the base model, without an adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corsa import artifacts, models, presets
from corsa.answers import contains, same_answer
from corsa.editing import mine_old_answers, save_result, write_manifest
from corsa.errors import InputError
from corsa.evaluate.metrics import forgotten
from corsa.methods import REGISTRY, get, make_editor
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, check_lengths
from corsa.scoring import generate

DB = "store.db"
FORMAT = "corsa-store/1"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

SCHEMA = """
CREATE TABLE IF NOT EXISTS store (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES versions(version),
    kind TEXT NOT NULL CHECK (kind IN ('base', 'update', 'revert')),
    source INTEGER REFERENCES versions(version),  -- revert: the version whose adapter this one restores
    created TEXT NOT NULL,
    method TEXT,
    config TEXT,
    command TEXT,
    adapter TEXT,  -- folder relative to the store; NULL = the base model
    sha256 TEXT,
    metrics TEXT
);
CREATE TABLE IF NOT EXISTS edits (
    version INTEGER NOT NULL REFERENCES versions(version),
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    target_new TEXT NOT NULL,
    target_old TEXT,
    old_source TEXT NOT NULL,  -- user, mined (the model's answer before the update) or store (a revision)
    request TEXT NOT NULL,
    PRIMARY KEY (version, position)
);
CREATE TABLE IF NOT EXISTS answers (
    version INTEGER NOT NULL REFERENCES versions(version),
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (version, prompt)
);
"""

# The points an update passes, in order, reported to its `on_stage` callback (progress display, crash tests).
STAGES = ("locked", "trained", "adapter-written", "committed")


@dataclass(frozen=True)
class Version:
    version: int
    parent: int | None
    kind: str
    source: int | None
    created: str
    method: str | None
    config: dict[str, Any] | None
    command: str | None
    adapter: str | None
    sha256: str | None
    metrics: dict[str, Any]
    n_edits: int = 0


def adapter_sha256(folder: Path) -> str:
    """One checksum over the files that define the adapter (names included, so a swapped file is caught)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Store:
    """Read access to a store folder; the writing operations (`update`, `revert`) are functions below that take
    the store's lock first."""

    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root)
        if not (self.root / DB).exists() and not create:
            raise InputError(f"{self.root} is not a corsa store (no {DB}); `corsa update` creates one",
                             field="STORE")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / DB, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed version survives a power cut, not just a kill
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- reading -----------------------------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM store WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def initialised(self) -> bool:
        return self.meta("format") is not None

    @property
    def head(self) -> int:
        return int(self.meta("head", "0"))  # type: ignore[arg-type]

    def version(self, v: int) -> Version:
        row = self.db.execute("SELECT version, parent, kind, source, created, method, config, command, adapter, "
                              "sha256, metrics, (SELECT COUNT(*) FROM edits e WHERE e.version = v.version) "
                              "FROM versions v WHERE version = ?", (v,)).fetchone()
        if row is None:
            known = ", ".join(str(x.version) for x in self.versions())
            raise InputError(f"{self.root} has no version {v} (versions: {known})", field="VERSION")
        return Version(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]) if row[6] else None,
                       row[7], row[8], row[9], json.loads(row[10]) if row[10] else {}, row[11])

    def versions(self) -> list[Version]:
        ids = [r[0] for r in self.db.execute("SELECT version FROM versions ORDER BY version")]
        return [self.version(v) for v in ids]

    def edits(self, v: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT prompt, target_new, target_old, old_source FROM edits WHERE version = ? "
                               "ORDER BY position", (v,))
        return [{"prompt": p, "target_new": n, "target_old": o, "old_source": s} for p, n, o, s in rows]

    def facts(self, v: int) -> dict[str, str]:
        """prompt -> the answer the store holds at version v: its lineage's edits, the latest one winning."""
        ver = self.version(v)
        if ver.kind == "revert":
            return self.facts(ver.source)  # type: ignore[arg-type]
        held = self.facts(ver.parent) if ver.parent is not None else {}
        for e in self.edits(v):
            held[e["prompt"]] = e["target_new"]
        return held

    def answers(self, v: int) -> dict[str, str]:
        return dict(self.db.execute("SELECT prompt, answer FROM answers WHERE version = ?", (v,)).fetchall())

    def adapter_dir(self, v: int, *, verify: bool = True) -> Path | None:
        """The version's adapter folder (None for the base model), its checksum verified."""
        ver = self.version(v)
        if ver.adapter is None:
            return None
        folder = self.root / ver.adapter
        if verify:
            if not all((folder / f).exists() for f in ADAPTER_FILES):
                raise InputError(f"version {v}'s adapter is missing from {folder}", field="VERSION")
            if adapter_sha256(folder) != ver.sha256:
                raise InputError(f"version {v}'s adapter in {folder} does not match its recorded sha256; "
                                 "the file was changed outside corsa", field="VERSION")
        return folder

    def load(self, v: int | None = None, *, trainable: bool = False) -> tuple[torch.nn.Module, Formatter]:
        """The base model with version v's adapter (default: the head)."""
        from peft import PeftModel

        v = self.head if v is None else v
        base, tok, _ = models.load_model(self.meta("model"))
        formatter = Formatter(tok, self.meta("prompt_style", "auto"))  # type: ignore[arg-type]
        folder = self.adapter_dir(v)
        if folder is None:
            return base, formatter
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
        model.train(False)
        return model, formatter

    # --- writing (only under the lock) ----------------------------------------------------------------------------
    def _init(self, model: str | None, prompt_style: PromptStyle) -> None:
        created = artifacts.now()
        with self.transaction():
            for key, value in (("format", FORMAT), ("model", model or models.DEFAULT_MODEL),
                               ("prompt_style", prompt_style), ("head", "0"), ("created", created)):
                self.db.execute("INSERT INTO store VALUES (?, ?)", (key, value))
            self.db.execute("INSERT INTO versions (version, kind, created) VALUES (0, 'base', ?)", (created,))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _remove_unrecorded(self) -> None:
        """Folders a crashed writer left: temporary ones, and finished ones whose version was never committed."""
        folder = self.root / "versions"
        if not folder.exists():
            return
        recorded = {r[0] for r in self.db.execute("SELECT adapter FROM versions WHERE adapter IS NOT NULL")}
        for entry in folder.iterdir():
            if f"versions/{entry.name}" not in recorded:
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def locked(root: str | Path, *, create: bool = False) -> Iterator[Store]:
    """The store, held exclusively: a second writer is refused at once rather than queued or interleaved."""
    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    elif not (root / DB).exists():
        raise InputError(f"{root} is not a corsa store (no {DB})", field="STORE")
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{root} is being changed by another corsa process (pid {holder}); "
                             "run again when it has finished", field="STORE") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        store = Store(root, create=create)
        try:
            store._remove_unrecorded()
            yield store
        finally:
            store.close()
    finally:
        os.close(fd)  # closing releases the lock, also when the process is killed


def _answer_all(model: torch.nn.Module, formatter: Formatter, prompts: list[str]) -> dict[str, str]:
    prompts = list(dict.fromkeys(prompts))
    return dict(zip(prompts, generate(model, formatter, prompts))) if prompts else {}


def plan_update(store: Store, requests: list[EditRequest]) -> tuple[list[EditRequest], list[str]]:
    """Revisions take the store's current answer as their old answer (the thing to push down); the rest keep
    the user's old answer, or have it mined from the current model later. Returns the requests and, per request,
    where its old answer comes from."""
    held = store.facts(store.head)
    out, sources = [], []
    seen: set[str] = set()
    for r in requests:
        if r.prompt in seen:
            raise InputError("the same prompt twice in one update; put the later answer in a later update",
                             path=r.source, field="prompt")
        seen.add(r.prompt)
        current = held.get(r.prompt)
        if current is None:
            out.append(r)
            sources.append("user" if r.target_old is not None else "mined")
            continue
        if same_answer(current, r.target_new):
            raise InputError(f"'{r.target_new}' is already the store's answer to this prompt (version "
                             f"{store.head})", path=r.source, field="target_new")
        out.append(dataclasses.replace(r, target_old=current, old_mined=False))
        sources.append("store")
    return out, sources


def update(root: str | Path, requests: list[EditRequest], *, method: str = "corsa", model: str | None = None,
           prompt_style: PromptStyle = "auto", progress: bool = True, command: str | None = None,
           preset: str = "auto", on_stage: Callable[[str], None] | None = None, **overrides: Any) -> Version:
    """Continue the store's head adapter on `requests` (creating the store on first use) and record the result
    as a new version. The DPO reference is the model as it was before this update (base + head adapter).

    Settings: the method's defaults, then the model's `update` preset (or `preset="paper"`), then `overrides`.
    `on_stage(name)` is called as the update passes each of STAGES."""

    spec = get(method)
    if not spec.continues:
        continuing = [m.name for m in REGISTRY.values() if m.continues]
        raise InputError(f"a store keeps one adapter that every update continues; {method} does not produce "
                         f"one (use {' or '.join(continuing)})", field="--method")
    stage = on_stage or (lambda name: None)
    chosen = presets.choose(preset, model, "update")
    # a bad config fails before anything is loaded or locked
    editor = make_editor(method, **presets.settings(chosen, method, overrides))
    t_start = time.perf_counter()
    with locked(root, create=True) as store:
        stage("locked")
        if not store.initialised:
            store._init(model, prompt_style)
        elif model is not None and model != store.meta("model"):
            raise InputError(f"{root} holds updates of model '{store.meta('model')}', not '{model}'",
                             field="--model")
        parent = store.head
        requests, sources = plan_update(store, requests)
        held_before = store.facts(parent)

        edited, formatter = store.load(parent, trainable=True)
        check_lengths(requests, formatter.prompt_length, models.context_length(edited, formatter.tokenizer))
        bf16 = bool(getattr(editor.config, "bf16", False))
        requests = mine_old_answers(edited, formatter, requests, autocast=bf16)
        # What the store answered before: recorded at the parent version, or asked now for prompts never asked.
        before = store.answers(parent)
        missing = [p for p in [*held_before, *(r.prompt for r in requests)] if p not in before]
        before.update(_answer_all(edited, formatter, missing))

        result = editor.edit(edited, formatter, requests, progress=progress)
        stage("trained")
        held_after = {**held_before, **{r.prompt: r.target_new for r in requests}}
        after = _answer_all(result.model, formatter, list(held_after))
        metrics = update_metrics(requests, held_before, before, after)
        metrics["timings"] = {**result.info.get("timings", {}), "wall_s": time.perf_counter() - t_start}
        metrics["steps"] = result.info.get("steps")

        v = int(store.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions").fetchone()[0])
        rel = f"versions/v{v:04d}"
        with artifacts.atomic_dir(store.root / rel) as tmp:
            save_result(spec, result, tmp)
            write_manifest(tmp, editor=editor, result=result, preset=chosen, command=command,
                           model={"name": store.meta("model")}, style=formatter.style,
                           timings=metrics["timings"], wall_time_s=time.perf_counter() - t_start,
                           store_version=v, parent_version=parent, metrics=metrics)
        sha = adapter_sha256(store.root / rel)
        stage("adapter-written")
        with store.transaction():
            store.db.execute(
                "INSERT INTO versions (version, parent, kind, created, method, config, command, adapter, sha256, "
                "metrics) VALUES (?, ?, 'update', ?, ?, ?, ?, ?, ?, ?)",
                (v, parent, artifacts.now(), editor.name, json.dumps(dataclasses.asdict(editor.config)), command, rel, sha,
                 json.dumps(metrics)))
            store.db.executemany(
                "INSERT INTO edits VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(v, k, r.prompt, r.target_new, r.target_old, s, json.dumps(r.to_dict()))
                 for k, (r, s) in enumerate(zip(requests, sources))])
            store.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                                 [(parent, p, a) for p, a in before.items()])
            store.db.executemany("INSERT INTO answers VALUES (?, ?, ?)", [(v, p, a) for p, a in after.items()])
            store.db.execute("UPDATE store SET value = ? WHERE key = 'head'", (str(v),))
        stage("committed")
        return store.version(v)


def update_metrics(requests: list[EditRequest], held_before: dict[str, str], before: dict[str, str],
                   after: dict[str, str]) -> dict[str, Any]:
    """Efficacy on this update's edits and forgetting of what the store held before it (docs/METRICS.md).

    Forgetting: of the facts stored before this update and not revised by it, the share the model answered
    correctly before the update and wrongly after it (correct = the answer contains the stored target).
    """
    revised = {r.prompt for r in requests}
    kept = {p: t for p, t in held_before.items() if p not in revised}
    correct_before, lost = forgotten(kept, before, after)
    revisions = [r for r in requests if r.prompt in held_before]
    return {
        "efficacy": sum(contains(after[r.prompt], r.target_new) for r in requests) / len(requests),
        "n_edits": len(requests),
        "n_revisions": len(revisions),
        "old_answer_kept": (sum(contains(after[r.prompt], r.target_old or "\0") for r in revisions)
                            / len(revisions)) if revisions else None,
        "n_stored_before": len(kept),
        "correct_before": len(correct_before),
        "forgetting": len(lost) / len(correct_before) if correct_before else None,
        "forgotten": lost,
        "retained_accuracy": (sum(contains(after[p], t) for p, t in kept.items()) / len(kept)) if kept else None,
    }


def revert(root: str | Path, version: int, *, command: str | None = None) -> Version:
    """Make `version`'s adapter the head again, as a new version (nothing in the history is lost)."""
    with locked(root) as store:
        target = store.version(version)
        store.adapter_dir(version)  # checksum verified before the head moves
        parent = store.head
        source = target.source if target.kind == "revert" else version
        v = int(store.db.execute("SELECT MAX(version) + 1 FROM versions").fetchone()[0])
        with store.transaction():
            store.db.execute(
                "INSERT INTO versions (version, parent, kind, source, created, command, adapter, sha256, metrics) "
                "VALUES (?, ?, 'revert', ?, ?, ?, ?, ?, ?)",
                (v, parent, source, artifacts.now(), command, target.adapter, target.sha256,
                 json.dumps({"reverted_to": version})))
            store.db.executemany("INSERT INTO answers VALUES (?, ?, ?)",
                                 [(v, p, a) for p, a in store.answers(version).items()])
            store.db.execute("UPDATE store SET value = ? WHERE key = 'head'", (str(v),))
        return store.version(v)


def history(root: str | Path, prompt: str) -> list[tuple[Version, str]]:
    """Every version's answer to `prompt`: the recorded one, else asked now (and recorded)."""
    store = Store(root)
    try:
        out: list[tuple[Version, str]] = []
        cache: dict[str | None, str] = {}  # by adapter: a revert answers exactly as the version it restores
        model = formatter = None
        for ver in store.versions():
            recorded = store.answers(ver.version).get(prompt)
            if recorded is None and ver.adapter in cache:
                recorded = cache[ver.adapter]
            if recorded is None:
                from peft import PeftModel

                if model is None:
                    model, formatter = store.load(0)
                folder = store.adapter_dir(ver.version)
                asked = model if folder is None else PeftModel.from_pretrained(model, str(folder))
                recorded = generate(asked, formatter, [prompt])[0]
                if folder is not None:
                    model = asked.unload()  # back to the plain base model for the next version
                with store.transaction():
                    store.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                                     (ver.version, prompt, recorded))
            cache[ver.adapter] = recorded
            out.append((ver, recorded))
        return out
    finally:
        store.close()
