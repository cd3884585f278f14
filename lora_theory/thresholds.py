"""Rank thresholds of Zeng & Lee (2024) for generic weights, as integer formulas.

Instance-level requirements (which use the actual ranks of the discrepancies) live beside their
constructions: :func:`lora_theory.linear_rank_requirement`, :func:`lora_theory.fnn_rank_requirement`,
:func:`lora_theory.tfn_rank_requirement`.
"""

from __future__ import annotations

from ._validate import as_int, ceil_div
from .errors import InvalidArgumentError
from .linear import as_chain
from .models import FNN

__all__ = ["linear_rank_threshold", "fnn_rank_threshold", "tfn_rank_threshold", "ceil_div"]


def linear_rank_threshold(width: int | FNN, depth: int | None = None) -> int:
    """``ceil(D / L)``: the LoRA-rank that makes a generic depth-``L`` linear model exact.

    Zeng & Lee 2024, Lemma 1 (linear models) with generic weights (``rank(E) = D``). ``width`` is ``D`` and
    ``depth`` is ``L``; or ``width`` is the linear bias-free model itself (:func:`~lora_theory.random_linear`'s,
    ``depth`` left out), whose width and depth are used.
    """
    if isinstance(width, FNN):
        if depth is not None:
            raise InvalidArgumentError("depth", "must be left out when a model is given: its depth is the model's")
        layers = as_chain(width, "width")
        return ceil_div(layers[0].shape[0], len(layers))
    if depth is None:
        raise InvalidArgumentError("depth", "must be given with a width (or pass the linear model alone)")
    D = as_int(width, "width", 1)
    L = as_int(depth, "depth", 1)
    return ceil_div(D, L)


def fnn_rank_threshold(width: int, depth: int, target_depth: int) -> int:
    """``ceil(D / floor(L / L̄))``: the LoRA-rank for a generic ReLU FNN (Zeng & Lee 2024, Theorem 3).

    Parameters
    ----------
    width : int
        ``D``.
    depth : int
        ``L``, depth of the frozen model.
    target_depth : int
        ``L̄ <= L``, depth of the target model.
    """
    D = as_int(width, "width", 1)
    L = as_int(depth, "depth", 1)
    Lbar = as_int(target_depth, "target_depth", 1)
    if Lbar > L:
        raise InvalidArgumentError("target_depth", f"the target depth L̄ = {Lbar} exceeds the frozen depth L = {L}")
    return ceil_div(D, L // Lbar)


def tfn_rank_threshold(embed_dim: int) -> int:
    """``ceil(D / 2)``: the LoRA-rank for a generic transformer network (Zeng & Lee 2024, Theorem 7)."""
    D = as_int(embed_dim, "embed_dim", 1)
    return ceil_div(D, 2)
