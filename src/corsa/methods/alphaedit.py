"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge.

Everything up to the per-layer update is MEMIT's (corsa.methods.memit: the same keys K at the subject's last
token, target hidden states z, residuals R and key statistics C = E[k k^T] over a corpus). The update differs:

    P     = U0 U0^T, U0 the eigenvectors of C whose eigenvalues are below `nullspace_threshold`: the directions
            the preserved keys (almost) never take, so P k0 ~ 0 for a preserved key k0 and W + dW P answers it
            as W does
    dW^T  = (P (K_p K_p^T + K K^T) + l2 I)^-1 P K R^T

K_p holds the keys of every edit this editor made before (AlphaEdit's accumulation over sequential batches),
so a later batch does not undo an earlier one. dW = B A with B = R (n columns) and A = ((...)^-1 P K)^T: a LoRA
of rank n on the edited down projections, like MEMIT's. The rank of P is logged per layer: on a 135M model whose
MLP keys fill most of their 1536 dimensions the null space may be small, and that is a result, not a bug.

Defaults: AlphaEdit's released hyperparameters for Llama-3-8B (nullspace_threshold 2e-2, L2 10), MEMIT's for
everything else. The accumulated keys live on the editor object: one editor continued over several updates (a
lifelong run) accumulates; a new editor starts empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from corsa.methods.base import EditResult
from corsa.methods.memit import STATS_OPTION, MemitConfig, MemitEditor, layer_range
from corsa.methods.registry import MethodSpec, Option, Sweep, register
from corsa.prompts import Formatter
from corsa.requests import EditRequest


@dataclass(frozen=True)
class AlphaEditConfig(MemitConfig):
    nullspace_threshold: float = 2e-2  # AlphaEdit's hparams (Llama3-8B.json)
    l2: float = 10.0  # the same file's "L2": the identity term that keeps the solve well posed

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.nullspace_threshold > 0 and self.l2 > 0):
            raise ValueError("nullspace_threshold and l2 must be > 0")


def alphaedit_config(**overrides: Any) -> AlphaEditConfig:
    """Training settings of the gradient methods (epochs, lr, ...) do not apply and are ignored."""
    names = {f.name for f in dataclasses.fields(AlphaEditConfig)}
    return AlphaEditConfig(**{k: v for k, v in overrides.items() if k in names})


def null_space_projector(c: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, rank of P): the projector onto the eigenvectors of the symmetric C with eigenvalues below `threshold`."""
    values, vectors = torch.linalg.eigh(c.double())
    small = vectors[:, values < threshold]
    return (small @ small.T).to(c.dtype), int(small.shape[1])


def projected_update(k: torch.Tensor, resid: torch.Tensor, p: torch.Tensor, prior: torch.Tensor, l2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update as LoRA factors (B [d, n], A [n, d_ff]) for keys k [n, d_ff], residuals resid [n, d],
    projector p and earlier edits' K_p K_p^T `prior` ([d_ff, d_ff])."""
    kt = k.T  # [d_ff, n]
    lhs = p @ (prior + kt @ kt.T) + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    a = torch.linalg.solve(lhs, p @ kt)  # [d_ff, n]
    return resid.T.contiguous(), a.T.contiguous()


class AlphaEditEditor(MemitEditor):
    name = "alphaedit"
    config: AlphaEditConfig

    def __init__(self, config: AlphaEditConfig | None = None):
        super().__init__(config or AlphaEditConfig())
        self.prior: dict[int, torch.Tensor] = {}  # layer -> sum of K K^T over every earlier edit's keys
        self.projectors: dict[int, tuple[torch.Tensor, int]] = {}
        self.pending: dict[int, torch.Tensor] = {}

    def state(self) -> dict[str, torch.Tensor]:
        """The keys accumulated so far, to carry this editor over a restart (corsa bench lifelong)."""
        return {f"prior.{layer}": kk for layer, kk in self.prior.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prior = {int(k.split(".", 1)[1]): v for k, v in state.items() if k.startswith("prior.")}

    def layer_update(self, layer: int, k: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, weight: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.projectors:  # C is the same corpus statistic for every update of this editor
            self.projectors[layer] = null_space_projector(c, self.config.nullspace_threshold)
        p, _ = self.projectors[layer]
        prior = self.prior.get(layer, torch.zeros_like(p)).to(p.device)
        self.pending[layer] = k.T @ k
        return projected_update(k, resid, p, prior, self.config.l2)

    def edit(self, model: torch.nn.Module, formatter: Formatter, requests: list[EditRequest], *,
             progress: bool = True) -> EditResult:
        self.pending = {}
        result = super().edit(model, formatter, requests, progress=progress)
        for layer, kk in self.pending.items():  # only an update that finished adds its keys
            self.prior[layer] = self.prior.get(layer, torch.zeros_like(kk)) + kk
        ranks = {str(layer): rank for layer, (_, rank) in self.projectors.items()}
        result.info.update(variant="alphaedit", null_space_rank=ranks,
                           key_dimensions={str(layer): int(p.shape[0]) for layer, (p, _) in self.projectors.items()})
        return result


register(MethodSpec(
    "alphaedit", alphaedit_config, AlphaEditEditor,
    help="alphaedit: MEMIT projected onto the null space of preserved keys (Fang et al. 2025)",
    options=(STATS_OPTION,
             Option("--alphaedit-threshold", "nullspace_threshold", "alphaedit: eigenvalue below which a key "
                    "direction counts as unused by preserved knowledge (default 2e-2)", type=float)),
    sweeps=(Sweep("threshold", "nullspace_threshold"), Sweep("l2", "l2"),
            Sweep("layers", "layers", layer_range, "<first>-<last>")),
    data_field="stats_data",
    diagnostics=("null_space_rank",),
))
