"""The SAM ascent step (Foret et al. 2021) over a list of parameters, and its exact undo.

CoRSA perturbs only the LoRA parameters, along the PCGrad-merged direction (paper eq. 7 with g_PC):
eps = rho * g / (||g||_2 + eps_const). We keep a copy of the weights and copy it back instead of subtracting eps,
because w + e - e is not always w in floating point, and the next update must start from exactly the old point.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def perturb(params: list[torch.Tensor], direction: list[torch.Tensor], rho: float = 0.05,
            eps: float = 1e-12) -> list[torch.Tensor] | None:
    """Move params by rho * direction / (||direction|| + eps) in place; return the saved originals.

    Returns None and leaves the weights alone when the direction's norm is zero or not finite, as the released
    code does: there is no meaningful ascent direction then.
    """
    norm = torch.sqrt(sum((d.float() ** 2).sum() for d in direction))  # type: ignore[arg-type]
    if not torch.isfinite(norm) or norm == 0:
        return None
    saved = [p.detach().clone() for p in params]
    scale = rho / (norm + eps)
    for p, d in zip(params, direction):
        p.add_(d.to(p.dtype), alpha=float(scale))
    return saved


@torch.no_grad()
def restore(params: list[torch.Tensor], saved: list[torch.Tensor] | None) -> None:
    if saved is None:
        return
    for p, s in zip(params, saved):
        p.copy_(s)
