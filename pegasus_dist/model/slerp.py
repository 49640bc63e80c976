"""Spherical linear interpolation, the paper's Equation (3) (White, arXiv:1609.04468):
slerp(q1, q2; mu) = sin((1 - mu) theta) / sin(theta) * q1 + sin(mu theta) / sin(theta) * q2;
sin(theta) vanishes for parallel or antiparallel vectors: both are handled explicitly."""

from __future__ import annotations

import torch

_EPS = 1e-6  # below this |sin(theta)| the formula loses precision: the limits are used instead


def slerp(q1: torch.Tensor, q2: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """Interpolate rows of ``q1`` and ``q2`` (..., D) at ``mu`` in [0, 1] (broadcast on leading dimensions);
    mu = 0 and 1 give q1 and q2 exactly. Parallel vectors interpolate linearly (the formula's limit);
    antiparallel ones rotate through a direction orthogonal to q1, so the path stays on the sphere."""
    mu = torch.as_tensor(mu, dtype=q1.dtype, device=q1.device)
    n1, n2 = q1.norm(dim=-1, keepdim=True), q2.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(q1.dtype).tiny
    u1, u2 = q1 / n1.clamp_min(tiny), q2 / n2.clamp_min(tiny)
    cos = (u1 * u2).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    antiparallel = cos < -1 + _EPS
    # For antiparallel pairs, aim at a vector orthogonal to q1 (with q2's norm) and walk twice the
    # angle: theta = pi is reached at mu = 1.
    target = torch.where(antiparallel, _orthogonal_to(u1) * n2, q2)
    theta = torch.arccos(cos.masked_fill(antiparallel, 0.0))
    sin = torch.sin(theta)
    mu_eff = torch.where(antiparallel, 2 * mu, mu)
    parallel = sin.abs() < _EPS
    safe_sin = sin.masked_fill(parallel, 1.0)
    w1 = torch.where(parallel, 1 - mu_eff, torch.sin((1 - mu_eff) * theta) / safe_sin)
    w2 = torch.where(parallel, mu_eff, torch.sin(mu_eff * theta) / safe_sin)
    out = w1 * q1 + w2 * target
    # Exact endpoints whatever the floating-point path above.
    out = torch.where(mu == 0, q1.expand_as(out), out)
    return torch.where(mu == 1, q2.expand_as(out), out)


def _orthogonal_to(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to each unit row of ``u``: Gram-Schmidt on the basis vector least
    aligned with it, so that the projection cannot vanish."""
    basis = torch.zeros_like(u)
    basis.scatter_(-1, u.abs().argmin(dim=-1, keepdim=True), 1.0)
    v = basis - (basis * u).sum(dim=-1, keepdim=True) * u
    return v / v.norm(dim=-1, keepdim=True)
