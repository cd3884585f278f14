"""The rank thresholds of Zeng & Lee 2024 as sympy expressions in the symbols ``D`` (width), ``L`` (frozen depth)
and ``Lbar`` (target depth ``L̄``).
"""

from __future__ import annotations

import sympy

#: Width ``D``, frozen depth ``L`` and target depth ``L̄`` as positive-integer sympy symbols.
D, L, Lbar = sympy.symbols("D L Lbar", integer=True, positive=True)


def linear_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / L)``: Zeng & Lee 2024, Lemma 1 (linear models) with generic weights."""
    return sympy.ceiling(D / L)


def fnn_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / floor(L / Lbar))``: Zeng & Lee 2024, Theorem 3 (ReLU FNN, uniform partition)."""
    return sympy.ceiling(D / sympy.floor(L / Lbar))


def tfn_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / 2)``: Zeng & Lee 2024, Theorem 7 (transformer networks; any ``L``, any ``H``)."""
    return sympy.ceiling(D / 2)
