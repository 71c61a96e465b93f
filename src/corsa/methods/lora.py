"""The paper's LoRA baseline: the same adapter (r 32, alpha 64, every projection) trained with SFT alone.

It is CoRSA with DPO, SAM and PCGrad switched off, run by the same trainer, so the two differ in exactly the
parts the paper adds and in nothing else (batching, schedule, stopping rule, prompt format).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from corsa.methods.corsa import EXTRA_OPTIONS, EXTRA_SWEEPS, CorsaConfig, CorsaEditor
from corsa.methods.registry import MethodSpec, register


def lora_config(**overrides: Any) -> CorsaConfig:
    return replace(CorsaConfig(use_dpo=False, use_sam=False, pcgrad=None), **overrides)


class LoraEditor(CorsaEditor):
    name = "lora"

    def __init__(self, config: CorsaConfig | None = None):
        super().__init__(config or lora_config())


register(MethodSpec("lora", lora_config, LoraEditor,
                    help="lora: the paper's LoRA-SFT baseline (the same adapter, SFT alone)", options=EXTRA_OPTIONS,
                    sweeps=EXTRA_SWEEPS,
                    continues=True, diagnostics=("bf16_used",)))
