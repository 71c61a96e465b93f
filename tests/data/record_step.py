"""Record CoRSA training on the tiny model with the code as it is before the issue-27 refactor."""
import json
import sys

sys.path.insert(0, "tests")
import torch
from conftest import make_model, make_tokenizer

from corsa.methods import make_editor
from corsa.prompts import Formatter
from corsa.requests import EditRequest

torch.set_num_threads(1)
EDITS = [EditRequest("capital of fr?", "rome", "paris"), EditRequest("capital of de?", "oslo", "berlin"),
         EditRequest("sky colour?", "green", "blue"), EditRequest("2+2?", "five", "four"),
         EditRequest("2+3?", "six", "it is six, surely")]
FAST = {"lr": 2e-2, "epochs": 3, "batch_size": 4, "stop_when_learned": False, "lora_r": 8, "lora_alpha": 16}
CASES = {"corsa": ("corsa", {}), "corsa-micro2": ("corsa", {"micro_batch_size": 2}),
         "official": ("corsa", {"pcgrad": "official"}), "no-pcgrad": ("corsa", {"pcgrad": None}),
         "no-sam": ("corsa", {"use_sam": False}), "lora": ("lora", {})}
out = {}
tok = make_tokenizer()
for name, (method, over) in CASES.items():
    model = make_model(len(tok))
    res = make_editor(method, **FAST, **over).edit(model, Formatter(tok), list(EDITS), progress=False)
    lora = {n: p.detach() for n, p in res.model.named_parameters() if "lora_" in n}
    out[name] = {"method": method, "overrides": over,
                 "curves": [{k: r[k] for k in ("loss", "sft_loss", "dpo_loss", "margin", "learned") } for r in res.curves],
                 "param_sum": float(sum(p.double().sum() for p in lora.values())),
                 "param_abs": float(sum(p.double().abs().sum() for p in lora.values()))}
with open("tests/data/step_before_refactor.json", "w") as f:
    json.dump({"edits": [[r.prompt, r.target_new, r.target_old] for r in EDITS], "config": FAST, "runs": out}, f,
              indent=1)
print({k: v["param_abs"] for k, v in out.items()})
