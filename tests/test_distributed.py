"""Training under torchrun: 2 processes on the gloo backend give the adapter of 1 process (same global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, save_tiny_model
from safetensors.torch import load_file

EDITS = [{"prompt": "sky?", "target_new": "green", "target_old": "blue"},
         {"prompt": "2+2?", "target_new": "five", "target_old": "four"},
         {"prompt": "cat?", "target_new": "dog", "target_old": "mouse"}]


def run(argv, processes, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m"] if processes > 1 else [sys.executable, "-m"]
    proc = subprocess.run(launcher + ["corsa.cli", *argv, "--threads", "1"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", ["corsa", "lora"])
@pytest.mark.integration
def test_two_processes_give_the_one_process_adapter(tmp_path, method):
    model_dir = save_tiny_model(tmp_path / "tiny")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(e) + "\n" for e in EDITS))
    common = ["edit", str(facts), "--model", str(model_dir), "--method", method, "--epochs", "3", "--lr", "1e-3",
              "--batch-size", "3", "--quiet", "--no-early-stop"]  # 3 edits on 2 processes: uneven shards
    run(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    two = run(common + ["--out", str(tmp_path / "two")], 2, tmp_path)
    assert two.stdout.count("wrote ") == 1  # one process reports and writes
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    # Summation order differs between 1 and 2 processes; Adam turns float noise on near-zero gradients into
    # steps of up to ~lr, so the tolerance is a small fraction of the lr, not machine epsilon.
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    manifests = [json.loads((tmp_path / d / "edit_manifest.json").read_text()) for d in ("one", "two")]
    assert [m["processes"] for m in manifests] == [1, 2]
    for x, y in zip(manifests[0]["curves"], manifests[1]["curves"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["learned"] == y["learned"]
