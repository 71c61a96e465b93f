"""PCGrad (Yu et al. 2020) for the two CoRSA gradients, in the two forms that exist.

A gradient is a list of tensors (one per trainable parameter); dot products and norms are global over the list,
in fp32, as in both the paper and the released code.

* `paper`: Algorithm 1, lines 4-8, verbatim. dp = g1.g2 is computed once. If dp < 0, g1 (SFT) is projected off
  g2 (DPO), then g2 is moved along the *already projected* g1 with the *same* dp. Direction: g1 + lambda * g2.
  Reusing dp is what the algorithm says; recomputing g2.g1' would give ~0 (g1' is orthogonal to g2), so g2 would
  never change. We keep the algorithm as written.
* `official`: what the released code (PCSAMTrainer._pcgrad_merge) computes. The order is [DPO, SFT]; each is
  projected against the already-projected others when their dot product is negative, and the result is the
  mean, not the sum. For two gradients this means DPO is projected off SFT, SFT is (up to float noise) never
  projected, and the update is half as long: (g_dpo_perp + g_sft) / 2. The released code weights SFT, the paper
  weights DPO; here lambda scales g_dpo before merging, so both variants put lambda where the paper does.
"""

from __future__ import annotations

from typing import Literal

import torch

Grads = list[torch.Tensor]
PCGradMode = Literal["paper", "official"]


def dot(a: Grads, b: Grads) -> torch.Tensor:
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def add(a: Grads, b: Grads, scale: float | torch.Tensor = 1.0) -> Grads:
    """a + scale * b."""
    return [x + scale * y for x, y in zip(a, b)]


def project_paper(g_sft: Grads, g_dpo: Grads, lam: float = 1.0, eps: float = 1e-12) -> tuple[Grads, bool]:
    """Algorithm 1 lines 4-8. Returns (g1 + lam * g2, whether the gradients conflicted)."""
    g1, g2 = g_sft, g_dpo
    dp = dot(g1, g2)
    conflict = bool(dp < 0)
    if conflict:
        g1 = add(g1, g2, -dp / (dot(g2, g2) + eps))
        g2 = add(g2, g1, -dp / (dot(g1, g1) + eps))
    return add(g1, g2, lam), conflict


def project_official(g_sft: Grads, g_dpo: Grads, lam: float = 1.0, eps: float = 1e-12) -> tuple[Grads, bool]:
    """The released code's sequential, mean-reduced PCGrad over [lam * g_dpo, g_sft]."""
    proj = [[lam * t for t in g_dpo], list(g_sft)]
    conflict = False
    for i in range(2):
        for j in range(2):
            if i == j:
                continue
            d = dot(proj[i], proj[j])
            if d < 0:
                conflict = True
                proj[i] = add(proj[i], proj[j], -d / (dot(proj[j], proj[j]) + eps))
    return [(a + b) / 2 for a, b in zip(*proj)], conflict


def combine(g_sft: Grads, g_dpo: Grads, lam: float, mode: PCGradMode | None, eps: float = 1e-12) -> tuple[Grads, bool]:
    """The update direction for L_SFT + lam * L_DPO: PCGrad-merged, or the plain weighted sum when mode is None."""
    if mode is None:
        return add(g_sft, g_dpo, lam), bool(dot(g_sft, g_dpo) < 0)
    if mode == "paper":
        return project_paper(g_sft, g_dpo, lam, eps)
    if mode == "official":
        return project_official(g_sft, g_dpo, lam, eps)
    raise ValueError(f"unknown PCGrad mode {mode!r}; expected 'paper' or 'official'")


def project_pair(g1: Grads, g2: Grads, weight: float = 1.0, eps: float = 1e-12) -> tuple[Grads, bool]:
    """PCGrad between two objectives as Yu et al. (2020) define it: when g1 . g2 < 0, each is projected off the
    other's *original* gradient; the direction is g1' + weight * g2'. Used for a third objective beside
    Algorithm 1's two (the anchors' retention term, `anchor_side="pcgrad"`): g1 is Algorithm 1's merged
    SFT/DPO direction, g2 the anchors' gradient, so neither the edit nor the retention term is pushed backwards."""
    dp = dot(g1, g2)
    if not dp < 0:
        return add(g1, g2, weight), False
    p1 = add(g1, g2, -dp / (dot(g2, g2) + eps))
    p2 = add(g2, g1, -dp / (dot(g1, g1) + eps))
    return add(p1, p2, weight), True
