"""Fault injection: a table of bad inputs and settings, each of which must exit with code 2, say what is wrong in
exactly one line on stderr (no traceback, no usage block) and leave nothing behind in the working folder.

Store faults (lost or damaged databases, foreign folders, tampered versions) are in test_store_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, save_tiny_model

from corsa.cli import main

GOOD = {"prompt": "Where is the tower?", "target_new": "Rome"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny local model with a 64-token context (so an over-long prompt can be tried)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-faults"), max_length=64)


def lines(*objs: object) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


# name -> (argv, files to create first). In argv, {model} is the tiny model folder; "facts.jsonl" holds GOOD
# unless the case writes it itself. Every case runs in an empty folder of its own.
EDIT = ["edit", "facts.jsonl", "--out", "run", "--model", "{model}", "--quiet"]
CASES: dict[str, tuple[list[str], dict[str, str | bytes]]] = {
    # settings: not finite, out of range, not a number
    "lr nan": ([*EDIT, "--lr", "nan"], {}),
    "lr inf": ([*EDIT, "--lr", "inf"], {}),
    "lr -inf": ([*EDIT, "--lr", "-inf"], {}),
    "lr negative, exponent form": ([*EDIT, "--lr", "-1e-3"], {}),
    "lr zero": ([*EDIT, "--lr", "0"], {}),
    "lr text": ([*EDIT, "--lr", "fast"], {}),
    "rho nan": ([*EDIT, "--rho", "nan"], {}),
    "rho inf": ([*EDIT, "--rho", "inf"], {}),
    "rho negative": ([*EDIT, "--rho", "-0.5"], {}),
    "beta nan": ([*EDIT, "--beta", "nan"], {}),
    "beta zero": ([*EDIT, "--beta", "0"], {}),
    "lambda nan": ([*EDIT, "--lambda", "nan"], {}),
    "lambda inf": ([*EDIT, "--lambda", "inf"], {}),
    "lambda negative": ([*EDIT, "--lambda", "-1"], {}),
    "stop-share zero": ([*EDIT, "--stop-share", "0"], {}),
    "stop-share above 1": ([*EDIT, "--stop-share", "1.5"], {}),
    "stop-share nan": ([*EDIT, "--stop-share", "nan"], {}),
    "patience zero": ([*EDIT, "--patience", "0"], {}),
    "epochs zero": ([*EDIT, "--epochs", "0"], {}),
    "epochs negative": ([*EDIT, "--epochs", "-3"], {}),
    "epochs fraction": ([*EDIT, "--epochs", "2.5"], {}),
    "batch size zero": ([*EDIT, "--batch-size", "0"], {}),
    "micro-batch zero": ([*EDIT, "--micro-batch-size", "0"], {}),
    "warmup negative": ([*EDIT, "--warmup-steps", "-1"], {}),
    "seed negative": ([*EDIT, "--seed", "-1"], {}),
    "threads negative": ([*EDIT, "--threads", "-1"], {}),
    "threads zero": ([*EDIT, "--threads", "0"], {}),
    "threads beyond the machine": ([*EDIT, "--threads", "100000"], {}),
    "seed beyond the generators": ([*EDIT, "--seed", str(2**70)], {}),
    "train seed beyond the generators": (["bench", "single", "--bench", "zsre", "--data", "z.json", "--out", "b",
                                          "--train-seeds", str(2**70)], {"z.json": "[]"}),
    "limit zero": ([*EDIT, "--limit", "0"], {}),
    "limit negative": ([*EDIT, "--limit", "-1"], {}),
    "limit text": ([*EDIT, "--limit", "all"], {}),
    "unknown method": ([*EDIT, "--method", "rome"], {}),
    "rho given to lora": ([*EDIT, "--method", "lora", "--rho", "0.1"], {}),
    "merge scale nan": ([*EDIT, "--method", "merge", "--merge-scale", "nan"], {}),
    "merge density zero": ([*EDIT, "--method", "merge", "--merge-density", "0"], {}),
    "merge density above 1": ([*EDIT, "--method", "merge", "--merge-density", "1.5"], {}),
    "memit weight nan": ([*EDIT, "--method", "memit", "--memit-weight", "nan"], {}),
    "memit weight zero": ([*EDIT, "--method", "memit", "--memit-weight", "0"], {}),
    "flearning lambda negative": ([*EDIT, "--method", "flearning", "--lambda", "-1"], {}),
    "unknown format": ([*EDIT, "--format", "csv"], {}),
    "unknown prompt style": ([*EDIT, "--prompt-style", "poem"], {}),
    "unknown preset": ([*EDIT, "--preset", "fast"], {}),
    "unknown flag": ([*EDIT, "--learning-rate", "1e-3"], {}),
    "missing --out": (["edit", "facts.jsonl"], {}),
    "no subcommand": ([], {}),
    # the input file
    "no such file": (["edit", "missing.jsonl", "--out", "run", "--model", "{model}"], {"facts.jsonl": ""}),
    "input is a device": (["edit", "/dev/zero", "--out", "run", "--model", "{model}"], {}),
    "target too long for the context": (EDIT, {"facts.jsonl": lines({"prompt": "q?", "target_new": "ab " * 30})}),
    "old answer too long for the context": (EDIT, {"facts.jsonl": lines({**GOOD, "target_old": "ab " * 30})}),
    "input is a folder": (["edit", "folder", "--out", "run", "--model", "{model}"], {"folder/x": "1"}),
    "empty file": (EDIT, {"facts.jsonl": "\n\n"}),
    "invalid JSON": (EDIT, {"facts.jsonl": '{"prompt": "q?", "target_new": \n'}),
    "deeply nested JSON": (EDIT, {"facts.jsonl": "[" * 100_000 + "]" * 100_000 + "\n"}),
    "lone surrogate in a prompt": (EDIT, {"facts.jsonl": '{"prompt": "q\\ud800?", "target_new": "a"}\n'}),
    "not UTF-8": (EDIT, {"facts.jsonl": b'{"prompt": "caf\xe9?", "target_new": "a"}\n'}),
    "a list, not an object": (EDIT, {"facts.jsonl": "[1, 2]\n"}),
    "unknown field": (EDIT, {"facts.jsonl": lines({**GOOD, "weight": 2})}),
    "missing target_new": (EDIT, {"facts.jsonl": lines({"prompt": "q?"})}),
    "new equals old": (EDIT, {"facts.jsonl": lines({**GOOD, "target_old": "rome"})}),
    "one prompt, two answers": (EDIT, {"facts.jsonl": lines(GOOD, {**GOOD, "target_new": "Paris"})}),
    "repeated id": (EDIT, {"facts.jsonl": lines({**GOOD, "id": 1}, {"prompt": "b?", "target_new": "c", "id": 1})}),
    "float id": (EDIT, {"facts.jsonl": lines({**GOOD, "id": 1.5})}),
    "prompt not text": (EDIT, {"facts.jsonl": lines({"prompt": 3, "target_new": "a"})}),
    "blank prompt": (EDIT, {"facts.jsonl": lines({"prompt": "  ", "target_new": "a"})}),
    "paraphrases not a list": (EDIT, {"facts.jsonl": lines({**GOOD, "paraphrases": "Where?"})}),
    "neighbour without answer": (EDIT, {"facts.jsonl": lines({**GOOD, "neighborhood": [{"prompt": "x?"}]})}),
    "a chain in an edit": (EDIT, {"facts.jsonl": lines({**GOOD, "chain": ["Oslo"]})}),
    "prompt longer than the context": (EDIT, {"facts.jsonl": lines({"prompt": "why " * 40, "target_new": "a"})}),
    # the output
    "out is a file": (EDIT, {"run": "a user's file"}),
    "out inside a file": (["edit", "facts.jsonl", "--out", "notes/run", "--model", "{model}"], {"notes": "text"}),
    "out exists": (EDIT, {"run/notes.txt": "keep me"}),
    "out is not corsa's, --overwrite": ([*EDIT, "--overwrite"], {"run/notes.txt": "keep me"}),
    "out name too long": (["edit", "facts.jsonl", "--out", "r" * 300, "--model", "{model}"], {}),
    # the model
    "unknown model name": (["edit", "facts.jsonl", "--out", "run", "--model", "no-such-model-anywhere"], {}),
    "model path that does not exist": (["edit", "facts.jsonl", "--out", "run", "--model", "./models/none"], {}),
    "model is a file": (["edit", "facts.jsonl", "--out", "run", "--model", "weights.bin"], {"weights.bin": "x"}),
    "model folder without config": (["edit", "facts.jsonl", "--out", "run", "--model", "m"], {"m/x.txt": "x"}),
    # training that cannot succeed
    "lr so large training diverges": ([*EDIT, "--lr", "1e6", "--epochs", "3"], {}),
    # other commands
    "ask: empty prompt": (["ask", " ", "--model", "{model}"], {}),
    "ask: prompt longer than the context": (["ask", "why " * 40, "--model", "{model}", "--max-new-tokens", "4"], {}),
    "ask: answer longer than the context": (["ask", "q?", "--model", "{model}", "--max-new-tokens", "100000"], {}),
    "ask: max-new-tokens zero": (["ask", "q?", "--model", "{model}", "--max-new-tokens", "0"], {}),
    "ask: adapter folder missing": (["ask", "q?", "--adapter", "nowhere"], {}),
    "ask: folder without adapter": (["ask", "q?", "--adapter", "empty"], {"empty/readme.txt": "x"}),
    "ask: corrupt manifest": (["ask", "q?", "--adapter", "run"], {"run/edit_manifest.json": "{not json"}),
    "log: not a store": (["log", "plain"], {"plain/x.txt": "x"}),
    "log: store is a file": (["log", "store"], {"store": "x"}),
    "revert: not a store": (["revert", "nowhere", "1"], {}),
    "revert: negative version": (["revert", "nowhere", "-1"], {}),
    "history: not a store": (["history", "nowhere", "q?"], {}),
    "update: a method that keeps no adapter": (["update", "store", "facts.jsonl", "--method", "prepend",
                                                "--model", "{model}"], {}),
    "update: store path is a file": (["update", "store", "facts.jsonl", "--model", "{model}"], {"store": "x"}),
    "update: store over a user's folder": (["update", "mine", "facts.jsonl", "--model", "{model}"],
                                           {"mine/data.csv": "1,2"}),
    "update: repeated prompt": (["update", "store", "facts.jsonl", "--model", "{model}", "--quiet"],
                                {"facts.jsonl": lines(GOOD, GOOD)}),
    "update: prompt longer than the context": (["update", "store", "facts.jsonl", "--model", "{model}"],
                                               {"facts.jsonl": lines({"prompt": "why " * 40, "target_new": "a"})}),
    "update: bad model": (["update", "store", "facts.jsonl", "--model", "./none"], {}),
    "update: lr nan": (["update", "store", "facts.jsonl", "--model", "{model}", "--lr", "nan"], {}),
    "update: routing threshold out of range": (["update", "store", "facts.jsonl", "--model", "{model}",
                                                "--route-threshold", "2"], {}),
    "bench: n zero": (["bench", "single", "--bench", "counterfact", "--data", "data", "--out", "b", "--n", "0"], {}),
    "bench: no data": (["bench", "single", "--bench", "counterfact", "--data", "data", "--out", "b"], {}),
    "bench: unknown method": (["bench", "single", "--bench", "zsre", "--data", "z.json", "--out", "b", "--methods",
                               "zzz"], {"z.json": "[]"}),
    "bench: train seeds not numbers": (["bench", "single", "--bench", "zsre", "--data", "z.json", "--out", "b",
                                        "--train-seeds", "1,x"], {"z.json": "[]"}),
    "bench: lambda sweep nan": (["bench", "ablation", "--bench", "zsre", "--data", "z.json", "--out", "b",
                                 "--lambda", "1,nan"], {"z.json": "[]"}),
    "bench: fractions inf": (["bench", "revise", "--data", "data", "--out", "b", "--fractions", "inf"], {}),
    "bench: speed steps zero": (["bench", "speed", "--data", "data", "--out", "b", "--steps", "0"], {}),
    "demo: out is a file": (["demo", "--out", "demo"], {"demo": "x"}),
    "demo: a user's folder where a run goes": (["demo", "--out", "d"], {"d/lora/notes.txt": "x"}),
    "demo: edits file missing": (["demo", "--out", "d", "--edits", "none.jsonl"], {}),
    "demo: edits file with a bad line": (["demo", "--out", "d", "--edits", "mine.jsonl"],
                                         {"mine.jsonl": lines(GOOD, {"prompt": "x"})}),
}


def tree(root) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for base, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), root) + "/"] = None
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                out[os.path.relpath(os.path.join(base, f), root)] = fh.read()
    return out


def test_the_table_is_wide():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(name, tmp_path, tiny, capsys, monkeypatch):
    argv, files = CASES[name]
    if "facts.jsonl" not in files:
        files = {**files, "facts.jsonl": lines(GOOD)}
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "never-created"))  # a crash report would be written there
    before = tree(tmp_path)
    code = main([a.replace("{model}", tiny) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (name, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), (name, err)
    assert "Traceback" not in err and "usage:" not in err
    assert tree(tmp_path) == before, name


def test_a_bug_is_reported_in_one_line_with_where_its_traceback_went(tmp_path):
    """An unexpected exception is not a user's mistake: exit 1, one line, the traceback kept in a file."""
    script = ("import sys\nimport corsa.cli, corsa.store\n"
              "def boom(*args, **kwargs): raise KeyError('planted')\n"
              "corsa.store.Store = boom\n"
              "sys.exit(corsa.cli.main(['log', 'x']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "this is a bug" in proc.stderr
    (report,) = tmp_path.glob("corsa-crash-*.txt")
    assert "KeyError: 'planted'" in report.read_text() and "Traceback" in report.read_text()


def test_an_edit_killed_while_saving_leaves_a_marked_folder_that_the_next_edit_removes(tmp_path, tiny):
    """SIGKILL in the middle of writing the adapter: `--out` never appears half-written, the temporary folder
    carries corsa's marker, and the next edit beside it removes it; a hidden folder of the same shape that is not
    corsa's is left alone."""
    (tmp_path / "facts.jsonl").write_text(lines(GOOD))
    script = ("import os, signal, sys\nimport corsa.editing\nfrom corsa.cli import main\n"
              "real = corsa.editing.save_result\n"
              "def save_then_die(spec, result, folder):\n"
              "    real(spec, result, folder)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "corsa.editing.save_result = save_then_die\n"
              f"sys.exit(main(['edit', 'facts.jsonl', '--out', 'run', '--model', {tiny!r}, '--quiet', "
              "'--epochs', '2', '--lr', '1e-2']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "run").exists()
    (left,) = tmp_path.glob(".run.tmp-*")
    assert (left / "adapter_model.safetensors").exists() and (left / ".corsa-partial").exists()
    foreign = tmp_path / ".run.tmp-users"
    foreign.mkdir()
    (foreign / "data.txt").write_text("not corsa's")

    code = subprocess.run([sys.executable, "-m", "corsa.cli", "edit", "facts.jsonl", "--out", "run", "--model", tiny,
                           "--quiet", "--epochs", "2", "--lr", "1e-2"], cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert code.returncode == 0, code.stderr
    assert not left.exists() and (foreign / "data.txt").exists()
    assert (tmp_path / "run" / "edit_manifest.json").exists()


def test_a_relative_model_path_is_recorded_absolute(tmp_path, tiny, capsys, monkeypatch):
    """`--model ./tiny` must still find the model when the run is used from another folder."""
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny, work / "tiny")
    (work / "facts.jsonl").write_text(lines(GOOD))
    monkeypatch.chdir(work)
    assert main(["edit", "facts.jsonl", "--out", "run", "--model", "./tiny", "--quiet", "--epochs", "2",
                 "--lr", "1e-2"]) == 0
    manifest = json.loads((work / "run" / "edit_manifest.json").read_text())
    assert manifest["model"]["name"] == os.path.realpath(work / "tiny")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["ask", GOOD["prompt"], "--adapter", "work/run", "--max-new-tokens", "4"]) == 0


def test_hub_ids_load_from_the_cache_and_fail_fast_when_neither_cached_nor_reachable(tmp_path, tiny):
    """No hub here: a cached id loads from its cached folder without the client's minute of retries, and an id
    that is not cached fails at once in one line that lists the packaged models."""
    import shutil
    import time

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    cli = [sys.executable, "-m", "corsa.cli"]
    t = time.perf_counter()
    ok = subprocess.run([*cli, "ask", "q?", "--model", "org/tiny", "--max-new-tokens", "2"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cli, "ask", "q?", "--model", "org/absent"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "smollm2-135m" in bad.stderr, bad.stderr
    assert time.perf_counter() - t < 30  # the client's retries alone take about 50 s


def test_a_run_folder_whose_adapter_changed_after_it_was_written_is_refused(tmp_path, tiny, capsys, monkeypatch):
    (tmp_path / "facts.jsonl").write_text(lines(GOOD))
    monkeypatch.chdir(tmp_path)
    assert main(["edit", "facts.jsonl", "--out", "run", "--model", tiny, "--quiet", "--epochs", "2",
                 "--lr", "1e-2"]) == 0
    capsys.readouterr()
    assert main(["ask", "q?", "--adapter", "run", "--max-new-tokens", "2"]) == 0
    weights = tmp_path / "run" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte inside a weight: still a valid file, silently different answers
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["ask", "q?", "--adapter", "run", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err
