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


def orthogonal_part(g_sam: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """LookSAM (Liu et al. 2022): the part of the SAM gradient that the plain gradient lacks,
    g_v = g_sam - (<g_sam, g> / ||g||^2) g. It changes slowly from step to step, so it can be reused."""
    gg = sum((x.float() ** 2).sum() for x in g)
    if not torch.isfinite(gg) or gg == 0:  # type: ignore[arg-type]
        return [torch.zeros_like(x) for x in g_sam]
    coef = sum((x.float() * y.float()).sum() for x, y in zip(g_sam, g)) / gg
    return [x - coef * y for x, y in zip(g_sam, g)]


def reuse_direction(g: list[torch.Tensor], g_v: list[torch.Tensor], alpha: float = 0.7,
                    eps: float = 1e-12) -> list[torch.Tensor]:
    """LookSAM's step between two SAM steps: g + alpha * (||g|| / ||g_v||) g_v, with g_v from the last SAM step
    (`orthogonal_part`); the plain gradient where g_v is zero."""
    norm_g = torch.sqrt(sum((x.float() ** 2).sum() for x in g))  # type: ignore[arg-type]
    norm_v = torch.sqrt(sum((x.float() ** 2).sum() for x in g_v))  # type: ignore[arg-type]
    if not torch.isfinite(norm_v) or norm_v == 0:
        return list(g)
    scale = alpha * norm_g / (norm_v + eps)
    return [x + scale * v for x, v in zip(g, g_v)]
