"""The versioned store on a tiny local model: updates continue one adapter, history, revert, locking, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from corsa import artifacts, store
from corsa.cli import main
from corsa.errors import InputError
from corsa.requests import EditRequest, Neighbor

FAST = {"lr": 2e-2, "epochs": 2, "lora_r": 8, "lora_alpha": 16, "stop_when_learned": False}
FIRST = [EditRequest("sky?", "green", "blue"), EditRequest("2+2?", "five", "four")]


def lora_norm(model):
    return sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)


def test_updates_continue_one_adapter_and_revisions_push_down_the_stored_answer(tmp_path, tiny_dir, monkeypatch):
    root = tmp_path / "kb"
    v1 = store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    assert (v1.version, v1.parent, v1.kind) == (1, 0, "update")
    assert set(v1.metrics) >= {"efficacy", "forgetting", "n_edits", "retained_accuracy"}
    assert v1.metrics["n_stored_before"] == 0 and v1.metrics["forgetting"] is None

    # The DPO reference of update 2 is the model as update 1 left it: base + the v1 adapter, not a fresh one.
    from corsa.methods import corsa as corsa_method

    seen = {}
    real = corsa_method.cache_reference

    def spy(model, *a, **k):
        seen["lora_b"] = lora_norm(model)
        return real(model, *a, **k)

    monkeypatch.setattr(corsa_method, "cache_reference", spy)
    v2 = store.update(root, [EditRequest("sky?", "red"), EditRequest("cat?", "dog", "mouse")], progress=False,
                      **FAST)
    assert seen["lora_b"] > 0
    s = store.Store(root)
    edits = s.edits(2)
    assert edits[0] == {"prompt": "sky?", "target_new": "red", "target_old": "green", "old_source": "store"}
    assert edits[1]["old_source"] == "user"
    assert s.facts(2) == {"sky?": "red", "2+2?": "five", "cat?": "dog"}
    assert v2.metrics["n_revisions"] == 1 and v2.metrics["n_stored_before"] == 1  # 2+2 was held and not revised
    assert s.head == 2 and s.version(2).parent == 1
    # Both adapters stay on disk, unchanged, and differ: v2 continued v1's parameters.
    assert artifacts.adapter_sha256(s.adapter_dir(1)) == s.version(1).sha256
    assert s.version(1).sha256 != s.version(2).sha256
    s.close()


def test_log_revert_and_history(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    store.update(root, [EditRequest("sky?", "red")], progress=False, **FAST)

    assert main(["revert", str(root), "1"]) == 0
    s = store.Store(root)
    assert s.head == 3 and s.version(3).kind == "revert" and s.version(3).source == 1
    assert s.version(3).sha256 == s.version(1).sha256 and s.facts(3) == s.facts(1)
    model, _ = s.load()
    v1_model, _ = s.load(1)
    sa = {n: p for n, p in model.named_parameters() if "lora_" in n}
    sb = {n: p for n, p in v1_model.named_parameters() if "lora_" in n}
    assert sa and all(torch.equal(sa[n], sb[n]) for n in sa)  # exactly version 1's adapter
    s.close()

    capsys.readouterr()
    assert main(["log", str(root)]) == 0
    out = capsys.readouterr().out
    assert "* v3" in out and "revert to v1" in out and "v0" in out and "base model" in out
    assert "1 edit, efficacy" in out  # version 2 holds one edit, and says so in the singular
    assert main(["log", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head"] == 3 and [v["version"] for v in data["versions"]] == [0, 1, 2, 3]
    assert data["versions"][2]["edits"][0]["target_old"] == "green"

    assert main(["history", str(root), "sky?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["v0", "v1", "v2", "v3"]
    answers = [json.loads(ln.split(maxsplit=2)[2]) for ln in lines]
    assert answers[3] == answers[1] == store.Store(root).answers(1)["sky?"]  # the revert answers as v1
    history = store.history(root, "a prompt never edited?")  # asked now, then recorded
    assert len(history) == 4
    assert store.Store(root).answers(0)["a prompt never edited?"] == history[0][1]

    assert main(["revert", str(root), "9"]) == 2
    assert "no version 9" in capsys.readouterr().err


def test_update_metrics_measure_locality_on_the_neighbourhood_prompts():
    near = (Neighbor("n1?", "Berlin"), Neighbor("n2?", "Rome"))
    requests = [EditRequest("a?", "Lyon", "Paris", neighborhood=near),
                EditRequest("b?", "Oslo", "Bern", neighborhood=(Neighbor("n1?", "Berlin"), Neighbor("n3?", "Oslo")))]
    before = {"a?": "Paris", "b?": "Bern", "n1?": "Berlin", "n2?": "Rome or Lyon", "n3?": "Bergen"}
    after = {"a?": "Lyon", "b?": "Oslo", "n1?": "Oslo", "n2?": "Lyon", "n3?": "Oslo"}
    m = store.update_metrics(requests, {}, before, after)
    # n1 (named twice, counted once) gets another edit's target; n2 its own, which it gave before; n3 Oslo, its
    # true answer and an edit's target.
    assert m["n_neighbors"] == 3 and m["neighbor_edit_target"] == pytest.approx(1 / 3)
    assert m["locality"] == pytest.approx(1 / 3) and m["locality_agreement"] == 0.0
    bare = store.update_metrics([EditRequest("a?", "Lyon", "Paris")], {}, before, after)
    assert bare["n_neighbors"] == 0 and bare["locality"] is bare["locality_agreement"] is None
    assert bare["neighbor_edit_target"] is None


def test_an_update_with_neighbours_records_their_answers_and_log_shows_its_locality(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    near = (Neighbor("moon?", "grey"), Neighbor("sun?", "yellow"))
    v2 = store.update(root, [EditRequest("cat?", "dog", "mouse", neighborhood=near)], progress=False, **FAST)
    s = store.Store(root)
    before, after = s.answers(1), s.answers(2)  # asked of version 1 before the update, of version 2 after
    s.close()
    assert {"moon?", "sun?"} <= set(before) & set(after)
    m = v2.metrics
    assert m["n_neighbors"] == 2
    assert m["locality_agreement"] == sum(after[p] == before[p] for p in ("moon?", "sun?")) / 2
    assert m["locality"] == sum(t in after[p].lower() for p, t in (("moon?", "grey"), ("sun?", "yellow"))) / 2
    assert m["neighbor_edit_target"] == sum("dog" in after[p].lower() and "dog" not in before[p].lower()
                                            for p in ("moon?", "sun?")) / 2
    capsys.readouterr()
    assert main(["log", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    v1_line = next(line for line in lines if line.lstrip("* ").startswith("v1 "))
    v2_line = next(line for line in lines if line.lstrip("* ").startswith("v2 "))
    assert v1_line.endswith("neighbours n/a")  # the first update had no neighbourhood prompts
    assert (f"neighbours (2): as before {m['locality_agreement']:.0%}, correct {m['locality']:.0%}, given an "
            f"edit's new answer {m['neighbor_edit_target']:.0%}") in v2_line


def test_tampered_adapter_is_refused(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    store.update(root, [EditRequest("cat?", "dog", "mouse")], progress=False, **FAST)
    with open(root / "versions" / "v0001" / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    assert main(["revert", str(root), "1"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert store.Store(root).head == 2


def test_bad_updates_are_refused_before_training(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "Green"}\n')
    assert main(["update", str(root), str(facts), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "facts.jsonl:1: field 'target_new'" in err and "already the store's answer" in err
    facts.write_text('{"prompt": "q?", "target_new": "a"}\n{"prompt": "q?", "target_new": "b"}\n')
    assert main(["update", str(root), str(facts), "--quiet"]) == 2
    assert "facts.jsonl:2: field 'prompt'" in capsys.readouterr().err
    assert main(["log", str(tmp_path / "nothing")]) == 2
    assert "not a corsa store" in capsys.readouterr().err
    assert store.Store(root).head == 1


def test_a_second_writer_is_refused(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "cat?", "target_new": "dog"}\n')
    with store.locked(root):  # another process holds the store (flock conflicts across open files)
        assert main(["update", str(root), str(facts), "--quiet"]) == 2
        assert main(["revert", str(root), "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("being changed by another corsa process") == 2 and str(os.getpid()) in err
    assert store.Store(root).head == 1


# A child process that runs a real update and stops at `point`, told through update's on_stage callback (no hook
# in the library): it reports the point on stderr and sleeps there until it is killed.
STOPPING_UPDATE = """
import sys, time
import torch
from corsa import store
from corsa.requests import read_edits
root, facts, model, point = sys.argv[1:5]
torch.set_num_threads(1)

def stop_at(stage):
    if stage == point:
        print(f"corsa-store-paused:{stage}", file=sys.stderr, flush=True)
        time.sleep(3600)

store.update(root, read_edits(facts), model=model, progress=False, on_stage=stop_at, epochs=1, lr=1e-2)
"""


def _update_killed_at(point, root, facts, tiny_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-c", STOPPING_UPDATE, str(root), str(facts), tiny_dir, point]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # wait until the process stands exactly at the point
            if line.startswith(f"corsa-store-paused:{point}"):
                break
        else:
            pytest.fail(f"update ended before reaching {point}: exit {proc.wait()}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point,committed", [("locked", False), ("trained", False), ("adapter-written", False),
                                             ("committed", True)])
@pytest.mark.integration
def test_sigkill_during_an_update_loses_nothing(tmp_path, tiny_dir, point, committed):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "sky?", "target_new": "red"}\n')
    _update_killed_at(point, root, facts, tiny_dir)

    con = sqlite3.connect(root / store.DB)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    s = store.Store(root)
    assert s.head == (2 if committed else 1)
    assert [v.version for v in s.versions()] == ([0, 1, 2] if committed else [0, 1])
    s.load()  # the head loads, checksum verified
    assert artifacts.adapter_sha256(s.adapter_dir(1)) == s.version(1).sha256  # the last good version is intact
    s.close()
    if point == "adapter-written":  # finished but never committed: its record proves it is this store's
        record = json.loads((root / "versions" / "v0002" / "version.json").read_text())
        assert record["version"] == 2 and record["store"] == json.loads((root / "store.json").read_text())["id"]
    (root / "versions" / "mine").mkdir()  # not the store's: the next writer must leave it alone
    # The next writer removes what the killed one provably left and carries on with the next version number.
    v = store.update(root, [EditRequest("cat?", "dog", "mouse")], progress=False, **FAST)
    assert v.version == (3 if committed else 2)
    assert sorted(os.listdir(root / "versions")) == ["mine", *(f"v{i:04d}" for i in range(1, v.version + 1))]


def test_ask_reads_a_store(tmp_path, tiny_dir, capsys):
    root = tmp_path / "kb"
    store.update(root, FIRST, model=tiny_dir, progress=False, **FAST)
    with pytest.raises(InputError):
        store.Store(tmp_path / "missing")
    capsys.readouterr()
    assert main(["ask", "sky?", "--adapter", str(root), "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out.strip() == store.Store(root).answers(1)["sky?"].strip()


def test_a_store_keeps_the_routing_it_was_created_with(tmp_path, tiny_dir, capsys):
    from corsa import routing
    from corsa.loading import load_version

    root = tmp_path / "kb"
    ungated = routing.RouterConfig(relations=False)
    store.update(root, FIRST, model=tiny_dir, progress=False, route=ungated, **FAST)
    with store.Store(root) as s:
        assert s.routing() == ungated
    assert json.loads((root / "store.json").read_text())["routing"]["relations"] is False
    assert load_version(root)[0].router.config == ungated  # what `corsa ask` answers with
    store.update(root, [EditRequest("sea?", "red", "blue")], model=tiny_dir, progress=False, **FAST)  # kept as is
    facts = tmp_path / "more.jsonl"
    facts.write_text(json.dumps({"prompt": "grass?", "target_new": "blue"}) + "\n")
    capsys.readouterr()
    assert main(["update", str(root), str(facts), "--model", tiny_dir, "--no-route-names", "--quiet"]) == 2
    assert "routing it was created with" in capsys.readouterr().err
    with store.Store(root) as s:
        assert s.head == 2
    # a store made before routing was recorded answers with today's default
    with sqlite3.connect(root / "store.db") as db:
        db.execute("DELETE FROM store WHERE key = 'routing'")
    db.close()
    with store.Store(root) as s:
        assert s.routing() == routing.DEFAULT
