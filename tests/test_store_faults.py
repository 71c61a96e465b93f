"""Store faults: nothing lost, nothing silently wrong.

A lost or damaged store.db is refused (never started again) and `rebuild` restores it from the version records;
folders under versions/ that the store did not write are left alone; a tampered or foreign adapter is refused
when loaded; a read-only store can be read; a failed first update leaves no store behind; 10,000 versions stay
fast. Cheap tests copy one store built once per module (two real updates and a revert of the tiny model).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tokenizer

from corsa import artifacts, models, store
from corsa.cli import main
from corsa.errors import InputError
from corsa.loading import load_edited
from corsa.requests import EditRequest

FAST = {"lr": 2e-2, "epochs": 2, "lora_r": 8, "lora_alpha": 16, "stop_when_learned": False}
FIRST = [EditRequest("sky?", "green", "blue"), EditRequest("2+2?", "five", "four")]


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_dir):
    """A store of the tiny model: v1 and v2 updates, v3 a revert to v1."""
    root = tmp_path_factory.mktemp("template") / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    store.update(root, [EditRequest("sky?", "red"), EditRequest("cat?", "dog", "mouse")], progress=False, **FAST)
    store.revert(root, 1)
    return root


@pytest.fixture
def kb(template, tmp_path):
    """A fresh copy of the template store."""
    return shutil.copytree(template, tmp_path / "kb")


def snapshot(root):
    """Everything a rebuild must bring back: versions, head, edits, answers, metadata."""
    with store.Store(root) as s:
        return {"versions": s.versions(), "head": s.head,
                "edits": {v.version: s.edits(v.version) for v in s.versions()},
                "answers": {v.version: s.answers(v.version) for v in s.versions()},
                "meta": {k: s.meta(k) for k in ("format", "id", "model", "prompt_style", "created", "routing")}}


def files(root):
    """Every file under root with its bytes' size and modification time (proof that nothing was touched)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def facts_file(tmp_path, *rows):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def damage(root, how):
    db = root / store.DB
    if how == "lost":
        db.unlink()
    elif how == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3])
    elif how == "emptied":
        db.write_bytes(b"")
    elif how == "garbage":
        db.write_bytes(os.urandom(8192))
    elif how == "wrong schema":
        db.unlink()
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE notes (text TEXT)")
        con.commit()
        con.close()


# --- a lost or damaged database --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["lost", "truncated", "emptied", "garbage", "wrong schema"])
def test_a_lost_or_damaged_database_is_refused_then_rebuilt(kb, tmp_path, capsys, how):
    before = snapshot(kb)
    damage(kb, how)
    untouched = {k: v for k, v in files(kb).items() if k.startswith("versions/")}

    err = one_error_line(capsys, main(["log", str(kb)]))
    assert f"corsa rebuild {kb}" in err and "store.db" in err
    facts = facts_file(tmp_path, {"prompt": "owl?", "target_new": "hoot"})
    err = one_error_line(capsys, main(["update", str(kb), str(facts), "--quiet"]))
    assert f"corsa rebuild {kb}" in err
    one_error_line(capsys, main(["revert", str(kb), "1"]))
    one_error_line(capsys, main(["ask", "sky?", "--adapter", str(kb)]))
    # Nothing under versions/ was deleted or touched, and no new database was started.
    assert {k: v for k, v in files(kb).items() if k.startswith("versions/")} == untouched
    assert (kb / store.DB).exists() == (how != "lost")

    assert main(["rebuild", str(kb)]) == 0  # the command the error named
    out = capsys.readouterr().out
    assert f"{kb}: store.db rebuilt from 3 version records; head = version 3" in out
    assert snapshot(kb) == before
    assert main(["log", str(kb)]) == 0
    capsys.readouterr()

    damage(kb, how)  # again, through the library, to read the report
    report = store.rebuild(kb)
    assert report.versions == (1, 2, 3) and report.head == 3 and report.unrecognised == ()
    if how == "lost":
        assert report.damaged is None
    else:  # the damaged file is kept, renamed
        assert report.damaged is not None and report.damaged.exists() and report.damaged.name.startswith("store.db.")
    assert "head = version 3" in report.summary()[0]
    assert snapshot(kb) == before  # versions, heads, checksums, edits and the answers recorded by updates
    with store.Store(kb) as s:
        assert all(artifacts.adapter_sha256(s.adapter_dir(v)) == s.version(v).sha256 for v in (1, 2, 3))

    with pytest.raises(InputError, match="readable, so there is nothing to rebuild"):
        store.rebuild(kb)
    v = store.update(kb, [EditRequest("owl?", "hoot", "hiss")], progress=False, **FAST)
    assert v.version == 4 and v.parent == 3


def test_rebuild_refuses_what_it_would_have_to_guess(kb):
    (kb / store.DB).unlink()
    # A tampered adapter: refused by version, and nothing is written.
    adapter = kb / "versions" / "v0002" / "adapter_model.safetensors"
    original = adapter.read_bytes()
    adapter.write_bytes(original[:-4] + b"\0\0\0\0")
    with pytest.raises(InputError, match="version 2's adapter .* does not match its recorded sha256"):
        store.rebuild(kb)
    assert not (kb / store.DB).exists() and not list(kb.glob(".store.db*"))
    adapter.write_bytes(original)
    # A version whose record is gone: a gap in the history is not papered over.
    shutil.move(kb / "versions" / "v0002", kb / "elsewhere")
    with pytest.raises(InputError, match="version 2 has no record"):
        store.rebuild(kb)
    shutil.move(kb / "elsewhere", kb / "versions" / "v0002")
    # Without store.json there is no identity to rebuild from.
    shutil.move(kb / "store.json", kb / "store.json.away")
    with pytest.raises(InputError, match="no store.json"):
        store.rebuild(kb)
    shutil.move(kb / "store.json.away", kb / "store.json")
    assert store.rebuild(kb).versions == (1, 2, 3)


def test_a_journal_beside_a_lost_database_is_kept_aside(kb):
    (kb / store.DB).unlink()
    (kb / "store.db-journal").write_bytes(b"a journal of the database that was lost")
    report = store.rebuild(kb)
    assert report.damaged is None and not (kb / "store.db-journal").exists()
    assert [p.read_bytes() for p in kb.glob("store.db.damaged-*-journal")] == [
        b"a journal of the database that was lost"]
    with store.Store(kb) as s:
        assert s.head == 3


INTERRUPTED_WRITE = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # the transaction spills to the file, so the journal is needed to undo it
db.execute("BEGIN IMMEDIATE")
db.executemany("INSERT INTO answers VALUES (0, ?, ?)", ((f"q{i}", "x" * 200) for i in range(5000)))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_reader_after_an_interrupted_write_sees_the_last_commit(kb, capsys):
    before = snapshot(kb)
    subprocess.run([sys.executable, "-c", INTERRUPTED_WRITE, str(kb / store.DB)], check=False)
    assert (kb / "store.db-journal").stat().st_size > 0  # a hot journal: the transaction must be rolled back
    capsys.readouterr()
    assert main(["log", str(kb)]) == 0 and "* v3" in capsys.readouterr().out
    assert snapshot(kb) == before


def test_every_version_keeps_a_record_beside_its_adapter(kb):
    identity = json.loads((kb / "store.json").read_text())
    assert identity["format"] == store.FORMAT and set(identity) >= {"id", "model", "prompt_style", "created"}
    with store.Store(kb) as s:
        assert identity["id"] == s.meta("id")
        for v in (1, 2, 3):
            record = json.loads((kb / "versions" / f"v{v:04d}" / "version.json").read_text())
            ver = s.version(v)
            assert record["store"] == identity["id"] and record["version"] == v and record["kind"] == ver.kind
            assert (record["sha256"], record["adapter"], record["parent"]) == (ver.sha256, ver.adapter, ver.parent)
            # the answers recorded at v when it was made (a later update adds the ones it asked v)
            assert record["answers"].items() <= s.answers(v).items() and len(record["edits"]) == ver.n_edits
        # A revert's folder holds only its record; its adapter is the restored version's folder.
        assert os.listdir(kb / "versions" / "v0003") == ["version.json"]
        assert s.version(3).adapter == "versions/v0001"
        manifest = json.loads((kb / "versions" / "v0002" / "edit_manifest.json").read_text())
        assert manifest["adapter_sha256"] == s.version(2).sha256 and manifest["checks"]["finite"] is True


# --- what a store folder may be ----------------------------------------------------------------------------------


def test_only_a_missing_or_empty_folder_becomes_a_store(tmp_path, tiny_dir, capsys):
    facts = facts_file(tmp_path, {"prompt": "owl?", "target_new": "hoot"})
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    err = one_error_line(capsys, main(["update", str(a_file), str(facts), "--model", tiny_dir, "--quiet"]))
    assert "is a file" in err and a_file.read_text() == "mine"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    err = one_error_line(capsys, main(["update", str(foreign), str(facts), "--model", tiny_dir, "--quiet"]))
    assert "not a corsa store" in err and os.listdir(foreign) == ["cat.jpg"]
    one_error_line(capsys, main(["log", str(foreign)]))

    empty = tmp_path / "empty"
    empty.mkdir()
    with store.locked(empty, create=True, model=models.canonical(tiny_dir)) as s:
        assert s.head == 0 and s.meta("model") == models.canonical(tiny_dir)
    assert (empty / "store.json").exists() and (empty / store.DB).exists()


def test_foreign_folders_under_versions_are_left_alone_and_named(kb, capsys):
    versions = kb / "versions"
    identity = json.loads((kb / "store.json").read_text())
    (versions / "v0004").mkdir()  # someone's own folder, where the next version would go
    (versions / "v0004" / "mine.txt").write_text("keep me")
    (versions / "notes.txt").write_text("a file")
    other = shutil.copytree(versions / "v0002", versions / "from-another-store")  # another store's record
    record = json.loads((other / "version.json").read_text())
    (other / "version.json").write_text(json.dumps({**record, "store": "another", "version": 99}))
    old = shutil.copytree(versions / "v0001", versions / "v0001-copy")  # this store's record, a committed number
    # What a writer killed between the rename and the commit leaves: this store's record of the next version, made
    # on the head. Versions further ahead could only come from an older store.db put back: left alone.
    crashed = shutil.copytree(versions / "v0002", versions / "v0009")
    record = json.loads((crashed / "version.json").read_text())
    (crashed / "version.json").write_text(json.dumps({**record, "version": 4, "parent": 3, "store": identity["id"]}))
    ahead = shutil.copytree(versions / "v0002", versions / "v0010")
    (ahead / "version.json").write_text(json.dumps({**record, "version": 5, "parent": 4, "store": identity["id"]}))
    capsys.readouterr()

    v = store.revert(kb, 2)
    err = capsys.readouterr().err
    assert v.version == 4 and not crashed.exists()  # proven ours and never committed: removed
    for name in ("v0004", "notes.txt", "from-another-store", "v0001-copy", "v0010"):
        assert (versions / name).exists() and f"{versions / name} is not a version recorded" in err
    assert len(err.strip().splitlines()) == 5 and (versions / "v0004" / "mine.txt").read_text() == "keep me"
    assert old.exists() and other.exists()
    # The new version took a free name beside the foreign folder, and the database records it.
    assert os.listdir(versions / "v0004-2") == ["version.json"]
    with store.Store(kb) as s:
        assert s.version_in("versions/v0004-2") == 4 and s.version_in("versions/v0004") is None
        assert s.head == 4 and s.facts(4) == s.facts(2)
    # A rebuild reports them too, and restores the version from its free-named folder.
    (kb / store.DB).unlink()
    with pytest.raises(InputError, match="version 1 is recorded twice"):
        store.rebuild(kb)
    shutil.move(old, kb / "v0001-copy")
    shutil.move(ahead, kb / "v0010")  # a complete record of version 5: rebuild would restore it as one
    report = store.rebuild(kb)
    assert report.versions == (1, 2, 3, 4)
    assert {p.name for p in report.unrecognised} == {"v0004", "notes.txt", "from-another-store"}
    assert any("v0004" in line for line in report.summary()[1:])


# --- loading one version: verified, and damage reported in one line ------------------------------------------------


def test_a_version_folder_is_verified_when_loaded_directly(kb, tmp_path, capsys):
    v1 = kb / "versions" / "v0001"
    with store.Store(kb) as s:
        stored = s.answers(1)["sky?"].strip()
    capsys.readouterr()
    assert main(["ask", "sky?", "--adapter", str(v1), "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.strip() == stored
    # A revert's folder answers as the version it restores.
    assert main(["ask", "sky?", "--adapter", str(kb / "versions" / "v0003"), "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.strip() == stored

    outside = shutil.copytree(v1, tmp_path / "copied-v1")  # a version taken out of its store: its own record
    assert main(["ask", "sky?", "--adapter", str(outside), "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.strip() == stored

    for folder in (v1, outside):
        with open(folder / "adapter_model.safetensors", "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\0\0\0\0")
        err = one_error_line(capsys, main(["ask", "sky?", "--adapter", str(folder)]))
        assert "sha256" in err and str(folder.name) in err

    stray = shutil.copytree(kb / "versions" / "v0002", kb / "versions" / "v0007")  # in the store, not recorded
    err = one_error_line(capsys, main(["ask", "sky?", "--adapter", str(stray)]))
    assert "not one of its committed versions" in err


def other_shape_model(path):
    """A tiny Llama with another hidden size: an adapter of the usual tiny model does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_damaged_or_mismatched_adapter_is_one_line_naming_its_folder(kb, tmp_path, capsys):
    plain = tmp_path / "plain"  # a bare PEFT folder: no record to check it against
    plain.mkdir()
    for name in artifacts.ADAPTER_FILES:
        shutil.copy(kb / "versions" / "v0001" / name, plain / name)
    other = other_shape_model(tmp_path / "wide")

    with pytest.raises(InputError, match="model of another shape") as info:
        load_edited(plain, model=other)
    assert str(plain) in str(info.value)
    (plain / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    err = one_error_line(capsys, main(["ask", "sky?", "--adapter", str(plain), "--model", other]))
    assert "damaged or not a safetensors file" in err and str(plain) in err

    # The same through a store: a model of another shape recorded, then a damaged file whose record matches it.
    con = sqlite3.connect(kb / store.DB)
    con.execute("UPDATE store SET value = ? WHERE key = 'model'", (other,))
    con.commit()
    with store.Store(kb) as s, pytest.raises(InputError, match="model of another shape"):
        s.load(1)
    shutil.copy(plain / "adapter_model.safetensors", kb / "versions" / "v0001" / "adapter_model.safetensors")
    con.execute("UPDATE versions SET sha256 = ? WHERE version = 1",
                (artifacts.adapter_sha256(kb / "versions" / "v0001"),))
    con.commit()
    con.close()
    with store.Store(kb) as s, pytest.raises(InputError, match="damaged or not a safetensors file"):
        s.load(1)


# --- read-only ---------------------------------------------------------------------------------------------------


def permissions_bind(tmp_path):
    """Whether this process is refused writing a read-only file: not so for root (uid 0 with its usual
    capabilities), for whom a read-only store cannot be made."""
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        with open(probe, "a"):
            return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o644)


def test_a_read_only_store_can_be_read(kb, tmp_path, capsys):
    if os.geteuid() == 0 and not permissions_bind(tmp_path):
        # Root may write anywhere; the same test runs again in a child that has lost that capability.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root may write anywhere and setpriv is missing, so a read-only folder cannot be made")
        proc = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                               "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test_a_read_only_store_can_be_read.__name__}"],
                              capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
        return
    before = files(kb)
    for path in [kb, *kb.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        capsys.readouterr()
        assert main(["log", str(kb)]) == 0
        assert "* v3" in capsys.readouterr().out
        assert main(["ask", "sky?", "--adapter", str(kb), "--max-new-tokens", "8"]) == 0
        assert main(["ask", "sky?", "--adapter", str(kb / "versions" / "v0002"), "--max-new-tokens", "8"]) == 0
        assert main(["history", str(kb), "sky?"]) == 0
        assert main(["history", str(kb), "a prompt never asked?"]) == 0  # asked now, and not recorded
        assert len(capsys.readouterr().out.strip().splitlines()) >= 4
        one_error_line(capsys, main(["revert", str(kb), "1"]))
        assert files(kb) == before
    finally:
        for path in [kb, *kb.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    with store.Store(kb) as s:
        assert s.answers_to("a prompt never asked?") == {}
    assert store.history(kb, "a prompt never asked?")  # writable again: now it records
    with store.Store(kb) as s:
        assert set(s.answers_to("a prompt never asked?")) == {0, 1, 2}  # v3 answers as v1, which it restores


# --- a failed first update leaves nothing; the model is recorded so it can be found again ---------------------------


@pytest.mark.parametrize("case", ["unknown model", "prompt too long", "prompt twice", "bad setting"])
def test_a_failed_first_update_leaves_no_store(tmp_path, tiny_dir, capsys, case):
    root = tmp_path / "new" / "kb"
    model, rows = tiny_dir, [{"prompt": "owl?", "target_new": "hoot"}]
    if case == "unknown model":
        model = str(tmp_path / "no-such-model")
    elif case == "prompt too long":
        rows = [{"prompt": "x" * 400, "target_new": "y"}]  # the tiny model's context is 256
    elif case == "prompt twice":
        rows = [rows[0], {"prompt": "owl?", "target_new": "twit"}]
    if case == "bad setting":  # the CLI refuses it while parsing; the library's config refuses it too
        with pytest.raises(ValueError, match="lora_r"):
            store.update(root, FIRST, model=tiny_dir, progress=False, lora_r=0)
    else:
        facts = facts_file(tmp_path, *rows)
        one_error_line(capsys, main(["update", str(root), str(facts), "--model", model, "--quiet"]))
    assert not (tmp_path / "new").exists()


def test_a_store_without_updates_takes_the_next_updates_model(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    other = other_shape_model(tmp_path / "wide")
    with store.locked(root, create=True, model=other):  # a first update that failed after creating the store
        pass
    with store.Store(root) as s:
        assert s.meta("model") == other
    v = store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    tiny = models.canonical(tiny_dir)
    with store.Store(root) as s:
        assert v.version == 1 and s.meta("model") == tiny
    assert json.loads((root / "store.json").read_text())["model"] == tiny
    facts = facts_file(tmp_path, {"prompt": "owl?", "target_new": "hoot"})
    err = one_error_line(capsys, main(["update", str(root), str(facts), "--model", other, "--quiet"]))
    assert "holds updates of model" in err


def test_a_relative_model_path_works_from_another_folder(tmp_path, tiny_dir, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(tiny_dir, work / "tiny")
    monkeypatch.chdir(work)
    store.update("kb", FIRST, model="./tiny", progress=False, **FAST)
    with store.Store("kb") as s:
        assert s.meta("model") == str((work / "tiny").resolve())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["ask", "sky?", "--adapter", "../work/kb", "--max-new-tokens", "8"]) == 0
    v = store.update("../work/kb", [EditRequest("cat?", "dog", "mouse")], model="../work/tiny", progress=False,
                     **FAST)
    assert v.version == 2


def test_an_update_that_learns_nothing_writes_nothing(kb, monkeypatch):
    from corsa import editing

    before = {k: v for k, v in files(kb).items() if k != ".lock"}  # the lock file notes its holder's pid

    def refuse(spec, result, start=None):
        assert start is not None  # a continued adapter is judged against the adapter it started from
        raise InputError("training learned nothing (test)", field="--lr")

    monkeypatch.setattr(store, "check_result", refuse)
    assert editing.check_result is not refuse
    with pytest.raises(InputError, match="learned nothing"):
        store.update(kb, [EditRequest("owl?", "hoot", "hiss")], progress=False, **FAST)
    assert {k: v for k, v in files(kb).items() if k != ".lock"} == before


# --- an existing store made before records were kept ---------------------------------------------------------------


def test_a_store_made_before_records_keeps_working(kb, capsys):
    """Strip what this version adds (store.json, version.json, the folder column, the id) and use the WAL journal,
    as stores made before it had."""
    (kb / "store.json").unlink()
    for record in kb.glob("versions/*/version.json"):
        record.unlink()
    shutil.rmtree(kb / "versions" / "v0003")
    con = sqlite3.connect(kb / store.DB)
    con.execute("ALTER TABLE versions DROP COLUMN folder")
    con.execute("DELETE FROM store WHERE key = 'id'")
    con.execute("PRAGMA journal_mode=WAL")
    con.commit()
    con.close()

    capsys.readouterr()
    assert main(["log", str(kb)]) == 0 and "* v3" in capsys.readouterr().out
    assert main(["history", str(kb), "sky?"]) == 0
    v = store.revert(kb, 2)
    assert v.version == 4 and (kb / "store.json").exists()
    identity = json.loads((kb / "store.json").read_text())
    with store.Store(kb) as s:
        assert identity["id"] == s.meta("id") and s.version_in("versions/v0002") == 2
    v = store.update(kb, [EditRequest("owl?", "hoot", "hiss")], progress=False, **FAST)
    assert v.version == 5 and json.loads((kb / "versions" / "v0005" / "version.json").read_text())["parent"] == 4


# --- scale -------------------------------------------------------------------------------------------------------

N = 10_000


def grow(root, n):
    """Versions 2..n written straight into the database, each reusing version 1's adapter folder: revisions that
    cycle over two prompts, the one at N/2 a revert to version 1 (so the lineage of the head is N/2 long), with their answers recorded (nothing to ask)."""
    con = sqlite3.connect(root / store.DB)
    sha = con.execute("SELECT sha256 FROM versions WHERE version = 1").fetchone()[0]
    rows, edits, answers = [], [], []
    held = {"sky?": "green", "2+2?": "five"}
    for v in range(2, n + 1):
        if v == N // 2:
            rows.append((v, v - 1, "revert", 1, "2026-01-01T00:00:00+00:00", None, None, None, "versions/v0001", sha,
                         json.dumps({"reverted_to": 1}), None))
            held = {"sky?": "green", "2+2?": "five"}
        else:
            prompt = ("sky?", "2+2?")[v % 2]
            request = {"prompt": prompt, "target_new": f"a{v}"}
            rows.append((v, v - 1, "update", None, "2026-01-01T00:00:00+00:00", "corsa", "{}", None,
                         "versions/v0001", sha, json.dumps({"efficacy": 1.0, "forgetting": None}), None))
            edits.append((v, 0, prompt, f"a{v}", held[prompt], "store", json.dumps(request)))
            held[prompt] = f"a{v}"
        answers += [(v, "sky?", held["sky?"]), (v, "2+2?", held["2+2?"])]
    con.executemany("INSERT INTO versions (version, parent, kind, source, created, method, config, command, adapter, "
                    "sha256, metrics, folder) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO edits VALUES (?, ?, ?, ?, ?, ?, ?)", edits)
    con.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", answers)
    con.execute("UPDATE store SET value = ? WHERE key = 'head'", (str(n),))
    con.commit()
    con.close()
    return held


def timed(f, *args, **kwargs):
    t = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t


def test_ten_thousand_versions(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    held = grow(root, N)

    with store.Store(root) as s:
        versions, took = timed(s.versions)
        assert len(versions) == N + 1 and took < 3
        assert versions[-1].n_edits == 1 and versions[N // 2].kind == "revert"
        facts, took = timed(s.facts, N)
        assert facts == held and took < 3
        assert s.facts(N // 2) == {"sky?": "green", "2+2?": "five"}
        # a lineage of N/2 updates (sky? revised at even versions, 2+2? at odd ones)
        assert s.facts(N // 2 - 1) == {"sky?": f"a{N // 2 - 2}", "2+2?": f"a{N // 2 - 1}"}
    _, took = timed(main, ["log", str(root)])
    assert len(capsys.readouterr().out.splitlines()) == N + 2 and took < 5

    history, took = timed(store.history, root, "sky?")
    assert len(history) == N + 1 and history[-1][1] == held["sky?"] and took < 5

    v, took = timed(store.revert, root, N - 1)
    assert v.version == N + 1 and took < 5
    with store.Store(root) as s:
        assert s.facts(N + 1) == s.facts(N - 1)
        expected = {**s.facts(N + 1), "sky?": "blue-green"}

    v, took = timed(store.update, root, [EditRequest("sky?", "blue-green")], progress=False, **FAST)
    assert v.version == N + 2 and v.parent == N + 1 and took < 30
    with store.Store(root) as s:
        assert s.facts(N + 2) == expected and s.edits(N + 2)[0]["old_source"] == "store"
    assert (root / "versions" / f"v{N + 2}" / "version.json").exists()


def test_a_store_asked_with_another_model_is_refused_not_ignored(kb, tmp_path, capsys):
    other = str(tmp_path / "other-model")
    shutil.copytree(json.loads((kb / "store.json").read_text())["model"], other)  # same weights, another name
    for adapter in (kb, kb / "versions" / "v0001"):
        err = one_error_line(capsys, main(["ask", "sky?", "--adapter", str(adapter), "--model", other]))
        assert "holds updates of model" in err


def test_a_damaged_store_json_is_reported_and_left_as_it_is(kb, tmp_path, capsys):
    (kb / "store.json").write_text("garbage")
    facts = facts_file(tmp_path, {"prompt": "owl?", "target_new": "hoot"})
    assert main(["update", str(kb), str(facts), "--quiet", "--epochs", "2", "--lr", "2e-2"]) == 0
    err = capsys.readouterr().err
    assert "store.json is damaged" in err and (kb / "store.json").read_text() == "garbage"
    (kb / "store.json").unlink()  # moved aside: the next writer writes it again from store.db
    assert main(["revert", str(kb), "1"]) == 0
    assert json.loads((kb / "store.json").read_text())["format"] == store.FORMAT
