"""A versioned store of knowledge updates: one LoRA adapter that keeps learning, with its history in SQLite.

Paper section 2.1: updates keep optimising the same LoRA parameters, each continuing from the adapter the last
update left. A store is a folder:

  store.json                 the store's identity, written once at creation: format, id (a random uuid), model,
                             prompt style, creation time
  store.db                   every version (parent, time, method, config, edits, metrics, adapter checksum), the
                             answers recorded at each version, and which version is the head; one SQLite
                             transaction per change (rollback journal, synchronous=FULL)
  versions/v0003/            an update's adapter, edit_manifest.json and version.json; a revert's folder holds only
                             its version.json. Written under a temporary name, renamed into place, never modified
  versions/v0003/version.json
                             the version's own durable record (everything store.db holds about it, with the store's
                             id), so that `rebuild` can make store.db again from store.json and these records
  .lock                      held (flock) by the one process changing the store

Every update and every revert makes a new version, numbered one above the highest, and moves the head to it; the
head is therefore always the highest version. Version 0 is the base model, without an adapter.

Crash safety comes from the order of work: the new version's folder (adapter and record) is complete and flushed
before the transaction that names it commits, and the head only moves inside that transaction. A crash before the
commit leaves the last committed version as the head; a crash after it has lost nothing.

What corsa deletes: only what it can prove it wrote and never committed. The next writer removes temporary folders
whose process died (artifacts.clean_orphans) and a finished folder whose version.json carries this store's id, the
next version number and the head as its parent (a crash between the rename and the commit). Any other folder under
versions/ that store.db does not record is left alone and named in a warning, and new versions take a free folder
name beside it. A folder that is not a store is never made into one, and a store whose store.db is lost or
unreadable is refused, never started again: `corsa rebuild STORE` (`rebuild` below) restores it from the records.

Readers (log, ask, history) open store.db read-only, so they work on a store they cannot write; `history` records
the answers it had to ask for only when it can write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from corsa import artifacts, models, presets, routing, subjects
from corsa.answers import contains, normalize, same_answer
from corsa.artifacts import ADAPTER_FILES, adapter_sha256
from corsa.editing import adapter_state, check_result, mine_old_answers, save_result, write_manifest
from corsa.errors import InputError
from corsa.evaluate.metrics import forgotten, neighbor_edit_target
from corsa.methods import REGISTRY, get
from corsa.prompts import Formatter, PromptStyle
from corsa.requests import EditRequest, check_lengths
from corsa.scoring import generate

DB = "store.db"
STORE_FILE = "store.json"
VERSION_FILE = "version.json"
LOCK = ".lock"
FORMAT = "corsa-store/1"
VERSION_FORMAT = "corsa-store-version/1"
# A new or rebuilt store.db is written under this prefix in the store folder, then renamed; only under the lock.
DB_TMP_PREFIX = f".{DB}.tmp-"

SCHEMA = """
CREATE TABLE store (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES versions(version),
    kind TEXT NOT NULL CHECK (kind IN ('base', 'update', 'revert')),
    source INTEGER REFERENCES versions(version),  -- revert: the version whose adapter this one restores
    created TEXT NOT NULL,
    method TEXT,
    config TEXT,
    command TEXT,
    adapter TEXT,  -- adapter folder relative to the store; NULL = the base model; a revert names the restored one
    sha256 TEXT,
    metrics TEXT,
    folder TEXT  -- the version's own folder (its version.json); NULL for version 0 and stores made before it
);
CREATE TABLE edits (
    version INTEGER NOT NULL REFERENCES versions(version),
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    target_new TEXT NOT NULL,
    target_old TEXT,
    old_source TEXT NOT NULL,  -- user, mined (the model's answer before the update) or store (a revision)
    request TEXT NOT NULL,
    PRIMARY KEY (version, position)
);
CREATE TABLE answers (
    version INTEGER NOT NULL REFERENCES versions(version),
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (version, prompt)
);
"""
# What a store.db must hold to be read (`folder` came later: a writer adds it to older stores).
REQUIRED_COLUMNS = {
    "store": {"key", "value"},
    "versions": {"version", "parent", "kind", "source", "created", "method", "config", "command", "adapter",
                 "sha256", "metrics"},
    "edits": {"version", "position", "prompt", "target_new", "target_old", "old_source", "request"},
    "answers": {"version", "prompt", "answer"},
}

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


@dataclass(frozen=True)
class RebuildReport:
    """What `rebuild` did."""

    root: Path
    versions: tuple[int, ...]  # the versions restored from their records (version 0, the base model, not counted)
    head: int
    damaged: Path | None  # where the unreadable store.db was moved; None when there was none
    unrecognised: tuple[Path, ...]  # folders under versions/ holding no record of this store: left alone

    def summary(self) -> list[str]:
        """The lines `corsa rebuild` prints."""
        n = len(self.versions)
        lines = [f"{self.root}: {DB} rebuilt from {n} version record{'' if n == 1 else 's'}; head = version {self.head}"]
        if self.damaged is not None:
            lines.append(f"the unreadable {DB} was kept as {self.damaged}")
        lines += [f"left alone (not a version of this store): {p}" for p in self.unrecognised]
        return lines


def attach_adapter(base: torch.nn.Module, folder: Path, *, trainable: bool = False) -> torch.nn.Module:
    """`base` with the PEFT adapter in `folder`. An unreadable adapter file, or an adapter made for a model of
    another shape, is an InputError naming the folder rather than a library traceback."""
    from peft import PeftModel
    from safetensors import safe_open

    try:
        json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable adapter_config.json ({exc})", path=str(folder)) from None
    try:
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
            fh.keys()  # the header is parsed and checked against the file's length here
    except Exception as exc:  # noqa: BLE001 -- safetensors' own error type, OSError, or whatever a damaged header raises
        raise InputError(f"adapter_model.safetensors is damaged or not a safetensors file ({exc})",
                         path=str(folder)) from None
    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise InputError("the adapter was trained on a model of another shape than the one it is loaded on "
                         f"({str(exc).split('size mismatch', 1)[1].strip().splitlines()[0]})",
                         path=str(folder)) from None
    model.train(trainable)
    return model


def check_store_folder(root: Path) -> bool:
    """Whether `root` holds a store (True) or is a place to make one (False: missing, or empty). Anything else is
    refused: a file, a folder holding other things, and a store whose store.db is gone (it is rebuilt, not
    started again, so its versions are never lost)."""
    if root.is_symlink() and not root.exists():
        raise InputError(f"{root} is a broken symbolic link", field="STORE")
    if not root.exists():
        return False
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a store folder", field="STORE")
    if (root / DB).exists():
        return True
    # The lock and a database a killed writer never renamed into place are what a store's creation leaves first.
    content = {p.name for p in root.iterdir() if p.name != LOCK and not p.name.startswith(DB_TMP_PREFIX)}
    if not content:
        return False
    if content & {STORE_FILE, "versions"}:
        raise InputError(f"{root / DB} is missing, but the folder holds a store's versions; "
                         f"`corsa rebuild {shlex.quote(str(root))}` makes it again from their records", field="STORE")
    raise InputError(f"{root} is not empty and is not a corsa store (no {DB}); choose a new or empty folder",
                     field="STORE")


def connect(root: Path, *, write: bool) -> sqlite3.Connection:
    """store.db, opened for writing or read-only. A reader of a folder it cannot write opens the file as immutable
    (SQLite could not take its read lock there); where an interrupted transaction's journal lies beside the
    database, a reader that can write opens it normally so that SQLite rolls the transaction back first."""
    path = root / DB
    journal = root / f"{DB}-journal"
    if write or (os.access(root, os.W_OK) and journal.exists() and journal.stat().st_size > 0):
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")  # a committed version survives a power cut, not just a kill
        db.execute("PRAGMA foreign_keys=ON")
        return db
    mode = "mode=ro" if os.access(root, os.W_OK) else "immutable=1"
    return sqlite3.connect(f"{path.absolute().as_uri()}?{mode}", uri=True, timeout=30, isolation_level=None)


def check_database(db: sqlite3.Connection, root: Path) -> None:
    """Refuse a store.db that is damaged or is not a corsa store's database, pointing at `corsa rebuild`."""
    path = root / DB
    try:
        problem = db.execute("PRAGMA quick_check").fetchone()[0]
        if problem == "ok":
            tables = {t: {row[1] for row in db.execute(f"PRAGMA table_info({t})")} for t in REQUIRED_COLUMNS}
            lacking = [t for t, cols in REQUIRED_COLUMNS.items() if not cols <= tables[t]]
            found = db.execute("SELECT value FROM store WHERE key = 'format'").fetchone() if not lacking else None
            if lacking:
                problem = f"no complete {', '.join(lacking)} table"
            elif found is None or found[0] != FORMAT:
                problem = f"its format is {found[0] if found else 'not recorded'}, not {FORMAT}"
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise InputError(f"{path} is busy (another process holds it); run again shortly", field="STORE") from None
        problem = str(exc)
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem != "ok":
        raise InputError(f"{path} is damaged or not a corsa store database ({problem}); "
                         f"`corsa rebuild {shlex.quote(str(root))}` makes it again from the version records",
                         field="STORE")


def read_store_file(root: Path) -> dict[str, Any]:
    """store.json, checked: the identity a rebuild starts from."""
    path = root / STORE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{root} has no {STORE_FILE}, so its database cannot be rebuilt (stores made by an older "
                         "corsa keep no records beside their versions)", field="STORE") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable ({exc})", path=str(path)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not all(
            isinstance(data.get(k), str) for k in ("id", "model", "prompt_style", "created")):
        raise InputError(f"not a {FORMAT} record (format, id, model, prompt_style, created)", path=str(path))
    if "routing" in data:  # absent from stores made before routing was recorded
        try:
            routing.from_record(data["routing"])
        except (TypeError, KeyError, ValueError) as exc:
            raise InputError(f"its routing record is not one corsa wrote ({exc})", path=str(path),
                             field="routing") from None
    return data


class Store:
    """A store folder's database. Readers open it read-only (`Store(root)`); the writing operations (`update`,
    `revert`) are functions below that hold the store's lock (`locked`) and open it for writing."""

    def __init__(self, root: str | Path, *, write: bool = False):
        self.root = Path(root)
        if not check_store_folder(self.root):
            raise InputError(f"{self.root} is not a corsa store (no {DB}); `corsa update` creates one",
                             field="STORE")
        self.db = connect(self.root, write=write)
        try:
            check_database(self.db, self.root)
            self.columns = {row[1] for row in self.db.execute("PRAGMA table_info(versions)")}
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM store WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def head(self) -> int:
        return int(self.meta("head", "0"))  # type: ignore[arg-type]

    def routing(self) -> routing.RouterConfig:
        """How the store's versions are asked (`corsa ask`, `history`, the answers an update records): the setting
        recorded when the store was created, or today's default for a store made before one was recorded."""
        recorded = self.meta("routing")
        return routing.DEFAULT if recorded is None else routing.from_record(json.loads(recorded))

    @property
    def last(self) -> int:
        """The highest version committed (the head, as every change makes a new version and moves it there)."""
        return int(self.db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0])

    @property
    def has_updates(self) -> bool:
        """Whether an update was ever committed, which fixes the store's model and prompt style."""
        return self.db.execute("SELECT EXISTS (SELECT 1 FROM versions WHERE kind = 'update')").fetchone()[0] == 1

    QUERY = ("SELECT version, parent, kind, source, created, method, config, command, adapter, sha256, metrics, "
             "(SELECT COUNT(*) FROM edits e WHERE e.version = v.version) FROM versions v")

    @staticmethod
    def row_version(row: tuple[Any, ...]) -> Version:
        return Version(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]) if row[6] else None,
                       row[7], row[8], row[9], json.loads(row[10]) if row[10] else {}, row[11])

    def version(self, v: int) -> Version:
        row = self.db.execute(f"{self.QUERY} WHERE version = ?", (v,)).fetchone()
        if row is None:
            raise InputError(f"{self.root} has no version {v} (versions 0 to {self.last})", field="VERSION")
        return self.row_version(row)

    def versions(self) -> list[Version]:
        return [self.row_version(row) for row in self.db.execute(f"{self.QUERY} ORDER BY version")]

    def edits(self, v: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT prompt, target_new, target_old, old_source FROM edits WHERE version = ? "
                               "ORDER BY position", (v,))
        return [{"prompt": p, "target_new": n, "target_old": o, "old_source": s} for p, n, o, s in rows]

    def facts(self, v: int) -> dict[str, str]:
        """prompt -> the answer the store holds at version v: its lineage's edits, the latest one winning. A revert
        holds what the version it restores held. One query however long the lineage (no Python recursion)."""
        self.version(v)  # an unknown version is refused by name
        return dict(self.lineage_edits(v, "target_new"))  # a later edit of a prompt overwrites an earlier one

    def lineage_edits(self, v: int, column: str) -> list[tuple[str, Any]]:
        """(prompt, `column`) of every edit in version v's lineage, oldest first. One query however long the
        lineage (no Python recursion)."""
        assert column in ("target_new", "request")  # a column name, never user text
        return self.db.execute(f"""
            WITH RECURSIVE lineage(version, depth) AS (
                SELECT ?, 0
                UNION ALL
                SELECT CASE WHEN v.kind = 'revert' THEN v.source ELSE v.parent END, lineage.depth + 1
                FROM versions v JOIN lineage ON v.version = lineage.version
                WHERE (CASE WHEN v.kind = 'revert' THEN v.source ELSE v.parent END) IS NOT NULL)
            SELECT e.prompt, e.{column} FROM lineage JOIN edits e ON e.version = lineage.version
            ORDER BY lineage.depth DESC, e.position""", (v,)).fetchall()

    def scope(self, v: int) -> list[routing.Edit]:
        """What version v's adapter was trained to answer, for routing: each fact's prompt and subject, the
        latest request of a prompt winning as in `facts`."""
        self.version(v)
        latest = {prompt: json.loads(request) for prompt, request in self.lineage_edits(v, "request")}
        return [routing.Edit(prompt, r.get("subject"), r["target_new"]) for prompt, r in latest.items()]

    def answers(self, v: int) -> dict[str, str]:
        return dict(self.db.execute("SELECT prompt, answer FROM answers WHERE version = ?", (v,)).fetchall())

    def answers_to(self, prompt: str) -> dict[int, str]:
        """version -> the answer recorded for `prompt` there."""
        return dict(self.db.execute("SELECT version, answer FROM answers WHERE prompt = ?", (prompt,)).fetchall())

    def recorded_folders(self) -> set[str]:
        """The folders (relative to the store) that committed versions name."""
        query = "SELECT adapter FROM versions WHERE adapter IS NOT NULL"
        if "folder" in self.columns:
            query += " UNION SELECT folder FROM versions WHERE folder IS NOT NULL"
        return {row[0] for row in self.db.execute(query)}

    def version_in(self, folder: str) -> int | None:
        """The version whose own folder is `folder` (relative to the store), if one is committed."""
        query = "SELECT version FROM versions WHERE (kind = 'update' AND adapter = ?)"
        if "folder" in self.columns:
            query += " OR folder = ?"
        row = self.db.execute(query + " ORDER BY version LIMIT 1",
                              (folder,) * (2 if "folder" in self.columns else 1)).fetchone()
        return None if row is None else int(row[0])

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
        """The base model with version v's adapter (default: the head), its checksum verified."""
        v = self.head if v is None else v
        folder = self.adapter_dir(v)
        base, tok, _ = models.load_model(self.meta("model"))
        formatter = Formatter(tok, self.meta("prompt_style", "auto"))  # type: ignore[arg-type]
        return (base if folder is None else attach_adapter(base, folder, trainable=trainable)), formatter

    # --- writing (only under the lock, on a store opened with write=True) ------------------------------------------
    @property
    def id(self) -> str:
        return self.meta("id") or ""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def upgrade(self) -> None:
        """Bring a store made by an older corsa up to date: the rollback journal (readers of a read-only folder
        need no -shm file), the `folder` column, an id, and store.json."""
        with contextlib.suppress(sqlite3.OperationalError):  # another connection is open: the next writer does it
            self.db.execute("PRAGMA journal_mode=DELETE")
        with self.transaction():
            if "folder" not in self.columns:
                self.db.execute("ALTER TABLE versions ADD COLUMN folder TEXT")
                self.db.execute("UPDATE versions SET folder = adapter WHERE kind = 'update'")
                self.columns.add("folder")
            if self.meta("id") is None:
                self.db.execute("INSERT INTO store VALUES ('id', ?)", (str(uuid.uuid4()),))
        if not (self.root / STORE_FILE).exists():
            self.write_store_file()
            return
        try:
            ours = read_store_file(self.root)["id"] == self.id
        except InputError:
            ours = False
        if not ours:  # not rewritten: corsa cannot prove it wrote what is there now
            print(f"corsa: warning: {self.root / STORE_FILE} is damaged or another store's, and a rebuild needs it; "
                  "move it aside and the next update writes it again from store.db", file=sys.stderr)

    def write_store_file(self) -> None:
        recorded = self.meta("routing")
        artifacts.write_json(self.root / STORE_FILE, {
            "format": FORMAT, "id": self.id, "model": self.meta("model"),
            "prompt_style": self.meta("prompt_style", "auto"), "created": self.meta("created"),
            **({} if recorded is None else {"routing": json.loads(recorded)})})

    def adopt(self, model: str, prompt_style: str, route: routing.RouterConfig | None = None) -> None:
        """Make sure the store is one of `model` asked in `prompt_style`, routed as `route` says (None: as it
        records). Once an update is committed they are fixed; before that (a new store, or one whose first update
        failed) they are simply set, and the answers recorded with the old setting are dropped, as they no longer
        describe the store."""
        recorded = (self.meta("model") or "", self.meta("prompt_style", "auto") or "auto")
        same_route = route is None or route == self.routing()
        if recorded == (model, prompt_style) and same_route:
            return
        if self.has_updates:
            check_same_model(self, model, prompt_style)
            check_same_routing(self, route)
            return
        with self.transaction():
            self.db.execute("UPDATE store SET value = ? WHERE key = 'model'", (model,))
            self.db.execute("UPDATE store SET value = ? WHERE key = 'prompt_style'", (prompt_style,))
            if route is not None:
                self.db.execute("INSERT OR REPLACE INTO store VALUES ('routing', ?)",
                                (json.dumps(routing.record(route)),))
            self.db.execute("DELETE FROM answers")
        self.write_store_file()

    def tidy_versions(self) -> list[Path]:
        """Remove what a crashed writer provably left under versions/, and name (on stderr) and return every other
        folder there that no committed version records: those are left alone."""
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        artifacts.clean_orphans(folder)
        recorded, last = self.recorded_folders(), self.last
        unknown = []
        for entry in sorted(folder.iterdir()):
            if f"versions/{entry.name}" in recorded:
                continue
            if self.uncommitted(entry, last):
                shutil.rmtree(entry)
                continue
            print(f"corsa: warning: {entry} is not a version recorded in {self.root / DB}; left alone",
                  file=sys.stderr)
            unknown.append(entry)
        return unknown

    def uncommitted(self, entry: Path, last: int) -> bool:
        """The proof that `entry` is a version this store's writer finished but never committed: its record carries
        this store's id and a number above every committed version. Only the next number, made on the current
        head, is taken as proof: a writer killed between the rename and the commit leaves exactly that (the next
        writer removes it before making its own), whereas folders further ahead can only come from a store.db
        put back from an older copy, and those versions are someone's work."""
        if entry.is_symlink() or not entry.is_dir():
            return False
        try:
            record = json.loads((entry / VERSION_FILE).read_text())
            return (record.get("store") == self.id != "" and record.get("version") == last + 1
                    and record.get("parent") == self.head)
        except (OSError, ValueError, AttributeError):
            return False

    def new_folder(self, v: int) -> str:
        """A folder name for version v: v0007, or v0007-2, ... where something already holds that name."""
        taken = self.recorded_folders()
        name, k = f"v{v:04d}", 2
        while os.path.lexists(self.root / "versions" / name) or f"versions/{name}" in taken:
            name, k = f"v{v:04d}-{k}", k + 1
        return f"versions/{name}"

    def write_version(self, record: dict[str, Any], fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Write a version's folder atomically: `fill(tmp)` writes what the version holds there and returns the
        fields only known then (the adapter's sha256), version.json is written last, and the folder is flushed to
        disk before the caller commits the record. Returns the complete record."""
        out = self.root / record["folder"]
        with artifacts.atomic_dir(out) as tmp:
            record = {**record, **fill(tmp)}
            artifacts.write_json(tmp / VERSION_FILE, record)
        sync_folder(out)
        return record


def check_same_routing(store: Store, route: routing.RouterConfig | None) -> None:
    """A store holding updates answers with the routing it was created with; another one asked for is refused."""
    if route is not None and route != store.routing():
        raise InputError(f"{store.root} answers with the routing it was created with "
                         f"({routing.record(store.routing())}); leave out the routing flags, or start another store",
                         field="routing")


def check_same_model(store: Store, model: str, prompt_style: str) -> None:
    """Refuse another model or prompt style for a store that holds updates: its adapter belongs to one model."""
    recorded = store.meta("model") or ""
    if not same_model(model, recorded):
        raise InputError(f"{store.root} holds updates of model '{recorded}', not '{model}'", field="--model")
    style = store.meta("prompt_style", "auto")
    if prompt_style != style:
        raise InputError(f"{store.root} holds updates asked in the '{style}' prompt style, not '{prompt_style}'",
                         field="--prompt-style")


def same_model(model: str, recorded: str) -> bool:
    """Whether a canonical model name is the recorded one (a store made by an older corsa may record an alias or a
    relative folder)."""
    if model == recorded:
        return True
    try:
        return models.canonical(recorded) == model
    except InputError:
        return False


def sync_folder(folder: Path) -> None:
    """Flush a finished version folder (its files, itself and versions/) to disk: the commit that names it is
    durable (synchronous=FULL), so what it points at must be too."""
    for path in [*(p for p in folder.iterdir() if p.is_file()), folder, folder.parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def insert_version(db: sqlite3.Connection, record: dict[str, Any]) -> None:
    """Commit-side of a version record (a version.json): its row, edits and answers, and the head moved to it.
    Used by update, revert and rebuild alike, so a rebuilt database holds what the original did."""
    v = record["version"]
    db.execute("INSERT INTO versions (version, parent, kind, source, created, method, config, command, adapter, "
               "sha256, metrics, folder) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (v, record["parent"], record["kind"], record["source"], record["created"], record["method"],
                None if record["config"] is None else json.dumps(record["config"]), record["command"],
                record["adapter"], record["sha256"], json.dumps(record["metrics"]), record["folder"]))
    db.executemany("INSERT INTO edits VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(v, k, e["prompt"], e["target_new"], e["target_old"], e["old_source"], json.dumps(e["request"]))
                    for k, e in enumerate(record["edits"])])
    # What the parent answered, asked by this update: recorded at the parent.
    db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                   [(record["parent"], p, a) for p, a in record["parent_answers"].items()])
    db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                   [(v, p, a) for p, a in record["answers"].items()])
    db.execute("UPDATE store SET value = ? WHERE key = 'head'", (str(v),))


def build_database(root: Path, identity: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """A complete store.db (schema, identity, version 0, then `records` in order) in a temporary file in the store
    folder, ready to be renamed into place. Only under the lock."""
    fd, name = tempfile.mkstemp(prefix=DB_TMP_PREFIX, dir=root)
    os.close(fd)
    tmp = Path(name)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO store VALUES (?, ?)",
                           [("format", FORMAT), ("id", identity["id"]), ("model", identity["model"]),
                            ("prompt_style", identity["prompt_style"]), ("created", identity["created"]),
                            ("head", "0")]
                           + ([("routing", json.dumps(identity["routing"]))] if "routing" in identity else []))
            db.execute("INSERT INTO versions (version, kind, created) VALUES (0, 'base', ?)", (identity["created"],))
            for record in records:
                insert_version(db, record)
            db.execute("COMMIT")
        finally:
            db.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def create_store(root: Path, model: str, prompt_style: str, route: routing.RouterConfig = routing.DEFAULT) -> None:
    """A new store in an empty folder: store.db renamed into place complete, then store.json (which a writer
    would write again from the database, should a crash come between)."""
    identity = {"id": str(uuid.uuid4()), "model": model, "prompt_style": prompt_style, "created": artifacts.now(),
                "routing": routing.record(route)}
    os.replace(build_database(root, identity, []), root / DB)
    artifacts.write_json(root / STORE_FILE, {"format": FORMAT, **identity})


@contextlib.contextmanager
def hold_lock(root: Path) -> Iterator[None]:
    """The store's lock, held exclusively: a second writer is refused at once rather than queued or interleaved."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # no permission, a read-only file system, ...
        raise InputError(f"cannot change {root}: {exc.strerror}", field="STORE") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{root} is being changed by another corsa process (pid {holder}); "
                             "run again when it has finished", field="STORE") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        # Databases are only built under this lock, so one found now was left by a writer that died.
        for leftover in root.glob(f"{DB_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process is killed


@contextlib.contextmanager
def locked(root: str | Path, *, create: bool = False, model: str | None = None,
           prompt_style: str = "auto", route: routing.RouterConfig | None = None) -> Iterator[Store]:
    """The store, held exclusively and opened for writing. With `create`, a missing or empty folder becomes a new
    store of `model` (a canonical name) asked in `prompt_style`; any other folder that is not a store is refused."""
    root = Path(root)
    if not check_store_folder(root):
        if not create:
            raise InputError(f"{root} is not a corsa store (no {DB})", field="STORE")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {root}: {exc.strerror}", field="STORE") from None
    with hold_lock(root):
        if not check_store_folder(root):  # looked at again: another process may have made it meanwhile
            if not create:
                raise InputError(f"{root} is not a corsa store (no {DB})", field="STORE")
            assert model is not None, "a new store needs its model"
            create_store(root, model, prompt_style, route or routing.DEFAULT)
        store = Store(root, write=True)
        try:
            store.upgrade()
            store.tidy_versions()
            yield store
        finally:
            store.close()


def _answer_all(model: torch.nn.Module, formatter: Formatter, prompts: list[str]) -> dict[str, str]:
    prompts = list(dict.fromkeys(prompts))
    return dict(zip(prompts, generate(model, formatter, prompts))) if prompts else {}


def check_distinct(requests: list[EditRequest]) -> None:
    """One update holds each prompt once: two answers to one prompt in one update would contradict each other."""
    seen: set[str] = set()
    for r in requests:
        if r.prompt in seen:
            raise InputError("the same prompt twice in one update; put the later answer in a later update",
                             path=r.source, field="prompt")
        seen.add(r.prompt)


def plan_update(store: Store, requests: list[EditRequest]) -> tuple[list[EditRequest], list[str]]:
    """Revisions take the store's current answer as their old answer (the thing to push down); the rest keep
    the user's old answer, or have it mined from the current model later. Returns the requests and, per request,
    where its old answer comes from. The prompts must be distinct (check_distinct)."""
    held = store.facts(store.head)
    out, sources = [], []
    for r in requests:
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


@dataclass(frozen=True)
class StoreModel:
    """The model an update of a store trains, and how it is asked."""

    model: str  # as recorded: models.canonical
    prompt_style: str
    fixed: bool  # the store holds updates, so these are its own and cannot change


def settle_model(root: Path, model: str | None, prompt_style: str,
                 route: routing.RouterConfig | None = None) -> StoreModel:
    """The model and prompt style an update of `root` uses. Once the store holds an update they are its own
    (another model is refused now; another prompt style later, when the tokenizer can tell whether it differs), as
    is its routing (another `route` is refused now).
    Before that (a new store, or one whose first update never committed) the ones asked for, else the ones it
    records; the model is checked now either way."""
    if check_store_folder(root):
        with Store(root) as store:
            recorded = (store.meta("model") or models.DEFAULT_MODEL, store.meta("prompt_style", "auto") or "auto")
            if store.has_updates:
                if model is not None and not same_model(models.canonical(model), recorded[0]):
                    raise InputError(f"{root} holds updates of model '{recorded[0]}', not '{model}'",
                                     field="--model")
                check_same_routing(store, route)  # before any work; `adopt` checks again under the lock
                return StoreModel(*recorded, fixed=True)
        return StoreModel(models.canonical(model or recorded[0]),
                          recorded[1] if prompt_style == "auto" else prompt_style, fixed=False)
    return StoreModel(models.canonical(model), prompt_style, fixed=False)


def update(root: str | Path, requests: list[EditRequest], *, method: str = "corsa", model: str | None = None,
           prompt_style: PromptStyle = "auto", progress: bool = True, command: str | None = None,
           preset: str = "auto", on_stage: Callable[[str], None] | None = None,
           route: routing.RouterConfig | None = None, **overrides: Any) -> Version:
    """Continue the store's head adapter on `requests` (creating the store on first use) and record the result
    as a new version. The DPO reference is the model as it was before this update (base + head adapter). A new
    store records `route` (default: routing's default) as how its versions are asked; a store holding updates
    keeps its own, and refuses another.

    Everything that can be checked is checked before the store folder or its database is created or changed:
    the method and its config, the prompts (distinct, within the model's context), the model (resolved and
    loaded). Settings: the method's defaults, then the model's `update` preset (or `preset="paper"`), then
    `overrides`. `on_stage(name)` is called as the update passes each of STAGES."""
    root = Path(root)
    spec = get(method)
    if not spec.continues:
        continuing = [m.name for m in REGISTRY.values() if m.continues]
        raise InputError(f"a store keeps one adapter that every update continues; {method} does not produce "
                         f"one (use {' or '.join(continuing)})", field="--method")
    stage = on_stage or (lambda name: None)
    check_distinct(requests)
    requests = subjects.filled(requests)  # routing and the subject-swap anchors need each fact's subject
    settled = settle_model(root, model, prompt_style, route)
    chosen = presets.choose(preset, settled.model, "update")
    editor = presets.editor(chosen, method, overrides)  # a bad config fails here
    t_start = time.perf_counter()
    base, tok, _ = models.load_model(settled.model)
    formatter = Formatter(tok, settled.prompt_style)  # type: ignore[arg-type]
    if settled.fixed and prompt_style != "auto" and Formatter(tok, prompt_style).style != formatter.style:
        raise InputError(f"{root} holds updates asked in the '{formatter.style}' prompt style, not "
                         f"'{prompt_style}'", field="--prompt-style")
    check_lengths(requests, formatter.prompt_length, models.context_length(base, tok),
                  count_answer=formatter.answer_length)
    style = settled.prompt_style if settled.fixed else formatter.style  # a new store records the resolved style

    with locked(root, create=True, model=settled.model, prompt_style=style, route=route) as store:
        stage("locked")
        store.adopt(settled.model, style, route)
        asks = store.routing()
        parent = store.head
        requests, sources = plan_update(store, requests)
        held_before = store.facts(parent)

        folder = store.adapter_dir(parent)
        edited = base if folder is None else attach_adapter(base, folder, trainable=True)
        start = None if folder is None else adapter_state(edited)
        bf16 = bool(getattr(editor.config, "bf16", False))
        # What the store answers is what `corsa ask` answers: each version's adapter routed to its facts' scope.
        scope = {e.prompt: e for e in store.scope(parent)}
        keys = routing.KeyCache()  # the stored facts' keys, computed once for the answers before and after
        asked, asked_formatter = routing.answering(edited, formatter, list(scope.values()), asks, cache=keys)
        requests = mine_old_answers(asked, asked_formatter, requests, autocast=bf16)
        # What the store answered before: recorded at the parent version, or asked now for prompts never asked.
        # The requests' neighbourhood prompts too, so the update's locality can be measured (update_metrics).
        neighbors = [n.prompt for r in requests for n in r.neighborhood]
        before = store.answers(parent)
        missing = [p for p in [*held_before, *(r.prompt for r in requests), *neighbors] if p not in before]
        before.update(_answer_all(asked, asked_formatter, missing))

        result = editor.edit(edited, formatter, requests, progress=progress)
        stage("trained")
        checks = check_result(spec, result, start)  # a diverged or unchanged adapter is refused; nothing written
        held_after = {**held_before, **{r.prompt: r.target_new for r in requests}}
        scope.update({e.prompt: e for e in routing.edits_of(requests)})
        after = _answer_all(*routing.answering(result.model, formatter, list(scope.values()), asks, cache=keys),
                            [*held_after, *neighbors])
        metrics = update_metrics(requests, held_before, before, after)
        metrics["timings"] = {**result.info.get("timings", {}), "wall_s": time.perf_counter() - t_start}
        metrics["steps"] = result.info.get("steps")

        v = store.last + 1
        rel = store.new_folder(v)
        record = {
            "format": VERSION_FORMAT, "store": store.id, "version": v, "parent": parent, "kind": "update",
            "source": None, "created": artifacts.now(), "method": editor.name,
            "config": dataclasses.asdict(editor.config), "command": command, "folder": rel, "adapter": rel,
            "metrics": metrics, "checks": checks,
            "edits": [{"prompt": r.prompt, "target_new": r.target_new, "target_old": r.target_old, "old_source": s,
                       "request": r.to_dict()} for r, s in zip(requests, sources)],
            "answers": after, "parent_answers": before,
        }

        def fill(tmp: Path) -> dict[str, Any]:
            save_result(spec, result, tmp)
            sha = adapter_sha256(tmp)
            write_manifest(tmp, editor=editor, result=result, preset=chosen, command=command,
                           model={"name": settled.model}, style=formatter.style,
                           timings=metrics["timings"], wall_time_s=time.perf_counter() - t_start,
                           store_version=v, parent_version=parent, metrics=metrics, checks=checks,
                           adapter_sha256=sha, routing=routing.record(asks, result.model, list(scope.values())),
                           # every fact the version holds, so that its folder taken out of the store is
                           # routed as the store routes it (corsa.loading.load_edited)
                           scope=[dataclasses.asdict(e) for e in scope.values()])
            return {"sha256": sha}

        record = store.write_version(record, fill)
        stage("adapter-written")
        with store.transaction():
            insert_version(store.db, record)
        stage("committed")
        return store.version(v)


def update_metrics(requests: list[EditRequest], held_before: dict[str, str], before: dict[str, str],
                   after: dict[str, str]) -> dict[str, Any]:
    """Efficacy on this update's edits, forgetting of what the store held before it, and locality on the
    neighbourhood prompts the requests carry (docs/METRICS.md).

    Forgetting: of the facts stored before this update and not revised by it, the share the model answered
    correctly before the update and wrongly after it (correct = the answer contains the stored target).
    Locality (None without neighbourhood prompts): the shares of those prompts answered with their true answer,
    with the very answer given before the update, and with one of this update's new targets (as
    gen.neighbor_edit_target: not one that is the true answer or was in the answer before).
    """
    # Each neighbourhood prompt once, with its true answer: two requests may name the same neighbour.
    neighbors = list(dict.fromkeys((n.prompt, n.answer) for r in requests for n in r.neighborhood))
    targets = sorted({normalize(r.target_new) for r in requests})

    def share(hits: list[bool]) -> float | None:
        return sum(hits) / len(hits) if hits else None

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
        "n_neighbors": len(neighbors),
        "locality": share([contains(after[p], truth) for p, truth in neighbors]),
        "locality_agreement": share([after[p] == before[p] for p, _ in neighbors]),
        "neighbor_edit_target": share([neighbor_edit_target(after[p], before[p], truth, targets)
                                       for p, truth in neighbors]),
    }


def revert(root: str | Path, version: int, *, command: str | None = None) -> Version:
    """Make `version`'s adapter the head again, as a new version (nothing in the history is lost). The new
    version's folder holds only its record; its adapter is the restored version's folder."""
    with locked(root) as store:
        target = store.version(version)
        store.adapter_dir(version)  # checksum verified before the head moves
        v = store.last + 1
        record = {
            "format": VERSION_FORMAT, "store": store.id, "version": v, "parent": store.head, "kind": "revert",
            "source": target.source if target.kind == "revert" else version, "created": artifacts.now(),
            "method": None, "config": None, "command": command, "folder": store.new_folder(v),
            "adapter": target.adapter, "sha256": target.sha256, "metrics": {"reverted_to": version},
            "edits": [], "answers": store.answers(version), "parent_answers": {},
        }
        record = store.write_version(record, lambda tmp: {})
        with store.transaction():
            insert_version(store.db, record)
        return store.version(v)


def open_recorder(root: Path) -> sqlite3.Connection | None:
    """A connection `history` records answers through, or None where the store cannot be written (then it
    answers without recording)."""
    if not (os.access(root, os.W_OK) and os.access(root / DB, os.W_OK)):
        return None
    return connect(root, write=True)


def history(root: str | Path, prompt: str) -> list[tuple[Version, str]]:
    """Every version's answer to `prompt`: the recorded one, else asked now (and recorded where the store can be
    written)."""
    root = Path(root)
    with Store(root) as store:
        out: list[tuple[Version, str]] = []
        recorded_at = store.answers_to(prompt)
        cache: dict[str | None, str] = {}  # by adapter: a revert answers exactly as the version it restores
        model = formatter = recorder = None
        keys = routing.KeyCache()  # every version's facts keyed once
        try:
            for ver in store.versions():
                answer = recorded_at.get(ver.version, cache.get(ver.adapter))
                if answer is None:
                    if model is None:
                        model, formatter = store.load(0)
                        recorder = open_recorder(root)
                    folder = store.adapter_dir(ver.version)
                    asked = model if folder is None else attach_adapter(model, folder)
                    # As `corsa ask` answers at that version: its adapter routed to its facts' scope.
                    answer = generate(*routing.answering(asked, formatter, store.scope(ver.version),
                                                         store.routing(), cache=keys), [prompt])[0]
                    if folder is not None:
                        model = asked.unload()  # back to the plain base model for the next version
                    if recorder is not None:
                        try:
                            recorder.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                                             (ver.version, prompt, answer))
                        except sqlite3.OperationalError:  # read-only after all, or held too long by a writer
                            recorder.close()
                            recorder = None
                cache[ver.adapter] = answer
                out.append((ver, answer))
        finally:
            if recorder is not None:
                recorder.close()
        return out


def read_records(root: Path, store_id: str) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The version records under versions/ that carry this store's id, and the folders that hold none."""
    folder = root / "versions"
    records, unrecognised = [], []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            record = json.loads((entry / VERSION_FILE).read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("store") == store_id and not entry.is_symlink():
            records.append((entry, record))
        else:
            unrecognised.append(entry)
    return records, unrecognised


RECORD_KEYS = ("version", "parent", "kind", "source", "created", "method", "config", "command", "sha256", "metrics",
               "edits", "answers", "parent_answers")


def check_records(root: Path, found: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records in version order, refused (never guessed at) unless they form a complete history whose
    adapters match their checksums. Folder fields are taken from where the records lie."""
    by_version: dict[int, tuple[Path, dict[str, Any]]] = {}
    for entry, record in found:
        lacking = [k for k in RECORD_KEYS if k not in record]
        if lacking or not isinstance(record["version"], int) or record["version"] < 1:
            raise InputError(f"not a complete version record (lacking {', '.join(lacking) or 'a version number'})",
                             path=str(entry / VERSION_FILE))
        if record["version"] in by_version:
            raise InputError(f"version {record['version']} is recorded twice, in {by_version[record['version']][0]} "
                             f"and {entry}; move the wrong one out of versions/ and rebuild again", field="STORE")
        by_version[record["version"]] = (entry, record)
    out: list[dict[str, Any]] = []
    adapters: dict[int, str | None] = {0: None}
    for v in range(1, len(by_version) + 1):
        if v not in by_version:
            raise InputError(f"version {v} has no record under {root / 'versions'} (versions up to "
                             f"{max(by_version)} do); a history with a gap is not rebuilt", field="STORE")
        entry, record = by_version[v]
        rel = f"versions/{entry.name}"
        if record["parent"] not in adapters or (record["kind"] == "revert" and record["source"] not in adapters):
            raise InputError(f"version {v}'s parent or source is not an earlier version", path=str(entry / VERSION_FILE))
        if record["kind"] == "update":
            if not all((entry / f).exists() for f in ADAPTER_FILES):
                raise InputError(f"version {v}'s adapter is missing from {entry}; not rebuilt", field="STORE")
            if adapter_sha256(entry) != record["sha256"]:
                raise InputError(f"version {v}'s adapter in {entry} does not match its recorded sha256; not rebuilt",
                                 field="STORE")
            adapter = rel
        elif record["kind"] == "revert":
            adapter = adapters[record["source"]]
        else:
            raise InputError(f"unknown kind '{record['kind']}'", path=str(entry / VERSION_FILE))
        adapters[v] = adapter
        out.append({**record, "folder": rel, "adapter": adapter})
    return out


def rebuild(root: str | Path) -> RebuildReport:
    """Make store.db again from store.json and every versions/*/version.json, each update's adapter verified
    against its recorded sha256. Refused where a readable store.db exists; a damaged one is kept beside as
    store.db.damaged-<time> (with its journal), never deleted. Nothing is guessed: a missing, duplicated or
    malformed record, or an adapter that does not match its checksum, refuses the rebuild and changes nothing.
    A version whose folder was finished but never committed (a crash between the rename and the commit) is
    restored like any other, its adapter being complete and verified. Answers asked only by `history` are not in
    the records and are asked again when next needed."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder", field="STORE")
    identity = read_store_file(root)
    with hold_lock(root):
        if (root / DB).exists():
            try:
                Store(root).close()
            except InputError:
                pass  # damaged: rebuilt below
            else:
                raise InputError(f"{root / DB} is readable, so there is nothing to rebuild", field="STORE")
        artifacts.clean_orphans(root / "versions")
        found, unrecognised = read_records(root, identity["id"])
        records = check_records(root, found)
        tmp = build_database(root, identity, records)
        aside = root / f"{DB}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        # The old database's journals go with it, also when the database itself is lost: SQLite would replay a
        # journal left beside store.db onto the new one.
        for suffix in ("-journal", "-wal", "-shm"):
            if (root / f"{DB}{suffix}").exists():
                os.replace(root / f"{DB}{suffix}", root / f"{aside.name}{suffix}")
        damaged = None
        if (root / DB).exists():
            os.replace(root / DB, aside)
            damaged = aside
        os.replace(tmp, root / DB)
    return RebuildReport(root, tuple(r["version"] for r in records), records[-1]["version"] if records else 0,
                         damaged, tuple(unrecognised))
