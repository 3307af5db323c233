"""The maths of `lorafit analyze`: what one LoRA update ``ΔW = scaling · B A`` holds, in float32.

Each function takes plain tensors (no model, no files) and says which paper its formula is from.
Shapes: ``A: (r, in)``, ``B: (out, r)``, ``W: (out, in)`` (the frozen base weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DeltaSVD:
    """The thin SVD of ``ΔW = scaling · B A = U diag(S) Vᵀ``.

    Attributes:
        U: Left singular vectors ``(out, r)``, columns, largest singular value first.
        S: Singular values ``(r,)``, descending, >= 0.
        V: Right singular vectors ``(in, r)``, columns.
    """

    U: Tensor
    S: Tensor
    V: Tensor


def delta_svd(lora_A: Tensor, lora_B: Tensor, scaling: float) -> DeltaSVD:
    """SVD of ``scaling · B A`` without forming the ``(out, in)`` matrix.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), ``ΔW = Q_B (scaling R_B R_Aᵀ) Q_Aᵀ``;
    the SVD of the ``(r, r)`` core ``M = U_M S V_Mᵀ`` gives ``U = Q_B U_M``, ``V = Q_A V_M``
    (``torch.linalg.svd``). Exact up to float32 rounding, and cheap for any layer size.

    Args:
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).

    Raises:
        ValueError: The shapes do not chain (``B``'s columns != ``A``'s rows).
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} @ lora_A {tuple(lora_A.shape)}: expected (out, r) and "
            "(r, in) with the same r."
        )
    q_b, r_b = torch.linalg.qr(lora_B.float())  # (out, r), (r, r)
    q_a, r_a = torch.linalg.qr(lora_A.float().T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(scaling * r_b @ r_a.T)  # core (r, r)
    return DeltaSVD(U=q_b @ u, S=s, V=q_a @ vh.T)


def energy_rank(s: Tensor, energy: float = 0.9) -> int:
    """Effective rank at ``energy``: the fewest top singular values whose squares hold
    ``energy`` of ``Σ s_i²`` (the squared Frobenius norm). 0 for a zero update.

    Raises:
        ValueError: ``energy`` is not in (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r} (--energy 0.9: 90 %).")
    sq = s.double() ** 2
    total = sq.sum()
    if total == 0:
        return 0
    share = torch.cumsum(sq, 0) / total  # cumulative energy share, descending s
    # a share equal to `energy` up to rounding counts as reaching it
    return int((share < energy - 1e-9).sum().item()) + 1


def entropy_rank(s: Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007), "The effective rank: a measure of effective
    dimensionality": ``exp(H(p))`` with ``p_i = s_i / Σ s_j`` and ``H`` the Shannon entropy in
    nats. Between 1 (one direction) and the number of nonzero ``s_i`` (all equal). 0 for a zero
    update."""
    s = s.double()
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(s: Tensor) -> float:
    """Stable rank ``‖ΔW‖_F² / ‖ΔW‖_2² = Σ s_i² / s_1²`` (Rudelson & Vershynin 2007); 0 for a
    zero update."""
    s = s.double()
    return float((s**2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def amplification_factor(delta: DeltaSVD, weight: Tensor, rank: int | None = None) -> float | None:
    """The LoRA paper's amplification factor (Hu et al. 2021, §7.3, Table 7):
    ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` with ``U (out, k)``, ``V (in, k)`` the top-``k`` left/right singular
    vectors of ``ΔW`` (the paper writes ``UᵀWVᵀ`` with ``Vᵀ`` its right-singular matrix) and
    ``k = rank`` (default: all ``r`` of them). How much ``ΔW`` amplifies the directions of ``W``
    it shares: the paper finds ~21.5 for GPT-3's ``W_q`` at r=4.

    Args:
        delta: :func:`delta_svd` of the update.
        weight: The base weight ``W`` ``(out, in)``, float32.
        rank: How many top directions to project on.

    Returns:
        The factor, or None for a zero update (no directions) or a zero projection.
    """
    k = delta.S.numel() if rank is None else rank
    norm = float(delta.S.double().norm())
    if norm == 0:
        return None
    proj = delta.U[:, :k].T @ weight.float() @ delta.V[:, :k]  # (k, k)
    denom = float(proj.double().norm())
    return norm / denom if denom > 0 else None


def right_singular_vectors(lora_A: Tensor) -> Tensor:
    """The right singular vectors of ``A (r, in)`` as columns ``(in, r)``, largest first: the
    ``U_A`` of the LoRA paper's §7.2 ("the right-singular unitary matrices")."""
    return torch.linalg.svd(lora_A.float(), full_matrices=False).Vh.T


def subspace_similarity(v_a: Tensor, v_b: Tensor) -> Tensor:
    """The LoRA paper's normalised subspace similarity (Hu et al. 2021, §7.2, Figure 3):
    ``φ(i, j) = ‖U_Aⁱᵀ U_Bʲ‖_F² / min(i, j)`` for every ``i <= r_A``, ``j <= r_B``, where
    ``U_Aⁱ`` is the top-``i`` columns of ``v_a``. 1: one subspace contains the other; 0: they
    are orthogonal; random subspaces of ``R^d`` give ``max(i, j) / d`` on average.

    Args:
        v_a: ``(d, r_A)`` orthonormal columns, e.g. :func:`right_singular_vectors` of run A's
            ``lora_A``.
        v_b: ``(d, r_B)`` the same for run B.

    Returns:
        ``φ`` as ``(r_A, r_B)``; entry ``[i - 1, j - 1]`` is ``φ(i, j)``.

    Raises:
        ValueError: The two live in spaces of different size (``d`` differs).
    """
    if v_a.shape[0] != v_b.shape[0]:
        raise ValueError(
            f"subspace_similarity: vectors of size {v_a.shape[0]} and {v_b.shape[0]}: the two "
            "adapters were not trained on the same layer shapes (another base model?)."
        )
    sq = (v_a.double().T @ v_b.double()) ** 2  # (r_A, r_B) squared cosines
    cum = sq.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ‖U_Aⁱᵀ U_Bʲ‖_F²
    i = torch.arange(1, sq.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, sq.shape[1] + 1, dtype=torch.float64)[None, :]
    return (cum / torch.minimum(i, j)).float()


def intruder_dimensions(
    weight: Tensor, tuned: Tensor, top_k: int = 10, threshold: float = 0.5
) -> tuple[int, list[float]]:
    """Intruder dimensions of Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of
    Equivalence", Algorithm 1): among the top-``top_k`` left singular vectors of the tuned weight
    ``W + ΔW``, those whose largest ``|cos|`` with any left singular vector of the base ``W`` (all
    of them, as Algorithm 1) is below ``threshold``. The absolute cosine because a singular
    vector's sign is arbitrary.

    Args:
        weight: Base ``W (out, in)``.
        tuned: ``W + ΔW``, same shape.
        top_k: How many of the tuned weight's top singular vectors to examine.
        threshold: Cosine similarity below which a vector is an intruder (paper: 0.5 and others).

    Returns:
        ``(count, max_cos)``: the number of intruders and, per examined vector, its largest
        ``|cos|`` with the base's singular vectors.
    """
    u0 = torch.linalg.svd(weight.float(), full_matrices=False).U  # (out, n)
    ut = torch.linalg.svd(tuned.float(), full_matrices=False).U[:, :top_k]  # (out, k)
    best = (ut.T @ u0).abs().amax(dim=1)  # (k,) unit vectors: the dot product is the cosine
    return int((best < threshold).sum()), [round(float(c), 4) for c in best]
