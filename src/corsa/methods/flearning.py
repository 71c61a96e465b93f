"""F-Learning, "forgetting before learning" (Ni et al., ACL 2024; reference doc section 4).

1. Fine-tune a LoRA on the OLD facts (prompt -> target_old): delta_old = s * B_old A_old.
2. Forget: theta' = theta - lam * delta_old.
3. Learn: fine-tune a fresh LoRA on the NEW facts from theta': delta_new = s * B_new A_new.

The result theta - lam * delta_old + delta_new is itself a LoRA of rank 2r on the *unchanged* base model:
A = [A_new; A_old], B = [B_new, -lam * B_old], with alpha doubled so the scaling s stays alpha / r. So the output is a
standard PEFT adapter like every other method's, loadable on the original base weights.

No code was released; lam (the forgetting coefficient) is not given in what we could read, so it is a setting
to sweep on CounterFact `val` (the reference doc suggests {0.1, 0.3, 0.5, 1.0}); on SmolLM2 0.5 was the best of
0.1, 0.5 and 1.0 (the journal, docs/log/). Both phases use the LoRA-SFT
baseline's configuration (paper A.2 values).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from corsa.methods.base import EditResult
from corsa.methods.corsa import CorsaConfig, attach_lora, build_trainer, lora_layers
from corsa.methods.registry import MethodSpec, Option, Sweep, register
from corsa.prompts import Formatter
from corsa.requests import EditRequest


@dataclass(frozen=True)
class FLearningConfig:
    lam: float = 0.5  # not reported by the paper; the best of 0.1/0.5/1.0 on CounterFact val (the journal, docs/log/)
    # Each phase is the LoRA-SFT baseline (r 32, alpha 64, lr 2e-4, batch 16; paper A.2).
    sft: CorsaConfig = field(default_factory=lambda: CorsaConfig(use_dpo=False, use_sam=False, pcgrad=None))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError("lam (the forgetting coefficient) must be >= 0")


def flearning_config(lam: float = 0.5, **sft_overrides: Any) -> FLearningConfig:
    """Overrides other than lam go to both SFT phases (the CLI's --lr, --epochs, ...)."""
    base = CorsaConfig(use_dpo=False, use_sam=False, pcgrad=None)
    sft = dataclasses.replace(base, **sft_overrides)
    return FLearningConfig(lam=lam, sft=sft, seed=sft.seed)


Deltas = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A, B, scaling)


@torch.no_grad()
def lora_deltas(model: torch.nn.Module) -> Deltas:
    return {name: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                   float(m.scaling["default"])) for name, m in lora_layers(model).items()}


@torch.no_grad()
def shift_base(plain: torch.nn.Module, deltas: Deltas, scale: float) -> None:
    """weight += scale * s * B A in a model without LoRA layers."""
    for name, (a, b, s) in deltas.items():
        w = plain.get_submodule(name).weight
        w.add_((b @ a).to(w.dtype), alpha=scale * s)


class FLearningEditor:
    """Editor protocol implementation: forget the old answers by weight arithmetic, then learn the new ones."""

    name = "flearning"

    def __init__(self, config: FLearningConfig | None = None):
        self.config = config or FLearningConfig()

    def edit(self, model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             progress: bool = True) -> EditResult:
        cfg = self.config
        if hasattr(model, "peft_config"):
            raise ValueError("F-Learning changes base weights before learning; it cannot continue an adapter")
        missing = [r for r in requests if r.target_old is None]
        if missing:
            raise ValueError(f"F-Learning needs the old answer of every edit ({missing[0].prompt!r} has none)")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        # Both phases are LoRA-SFT (no y-): phase 1 on the old answers, phase 2 on the new ones.
        trainer = build_trainer(model, formatter, [EditRequest(r.prompt, r.target_old or "") for r in requests],
                                cfg.sft)
        old_curves = trainer.train(progress)
        peft_model = trainer.model
        old = lora_deltas(peft_model)
        timings["learn_old_s"] = time.perf_counter() - t

        t = time.perf_counter()
        base = peft_model.unload()  # the plain model again, base weights untouched so far
        shift_base(base, old, -cfg.lam)  # forget: theta' = theta - lam * delta_old
        trainer = build_trainer(base, formatter, [EditRequest(r.prompt, r.target_new) for r in requests], cfg.sft)
        new_curves = trainer.train(progress)
        peft_model = trainer.model
        new = lora_deltas(peft_model)
        timings["forget_and_learn_s"] = time.perf_counter() - t

        combined = self._as_one_adapter(peft_model, old, new)
        info = {"timings": timings, "steps": len(old_curves) + len(new_curves), "steps_old": len(old_curves),
                "epochs_run": (new_curves[-1]["epoch"] + 1) if new_curves else 0, "variant": f"flearning-{cfg.lam}",
                "config": dataclasses.asdict(cfg)}
        return EditResult(model=combined, requests=requests, curves=new_curves, info=info)

    def _as_one_adapter(self, peft_model: torch.nn.Module, old: Deltas, new: Deltas) -> torch.nn.Module:
        """theta - lam * delta_old + delta_new as one rank-2r LoRA on the original base weights."""
        cfg = self.config
        base = peft_model.unload()
        shift_base(base, old, +cfg.lam)  # the original base weights back (to float rounding; a saved adapter is
        # applied to the base weights as loaded, so this only matters for evaluating this process's model)
        wide = dataclasses.replace(cfg.sft, lora_r=2 * cfg.sft.lora_r, lora_alpha=2 * cfg.sft.lora_alpha)
        combined = attach_lora(base, wide)
        with torch.no_grad():
            for name, m in lora_layers(combined).items():
                (a_new, b_new, _), (a_old, b_old, _) = new[name], old[name]
                m.lora_A["default"].weight.copy_(torch.cat([a_new, a_old], dim=0))
                m.lora_B["default"].weight.copy_(torch.cat([b_new, -cfg.lam * b_old], dim=1))
        combined.eval()
        return combined


register(MethodSpec(
    "flearning", flearning_config, FLearningEditor,
    help="flearning: forget the old answers, then learn the new ones (Ni et al. 2024)",
    options=(Option("--lambda", "lam", "corsa: weight of the DPO term (paper: 1.0); flearning: the forgetting "
                    "coefficient", type=float),),
    sweeps=(Sweep("lambda", "lam"),),  # tuned on CounterFact val
    diagnostics=("bf16_used", "steps_old"),
))
