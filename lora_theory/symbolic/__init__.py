"""Exact certificates and symbolic rank thresholds (THEORY.md §3).

Floating-point checks say "equal to 1e-12"; a theorem says "equal". For an instance with rational entries
(floats are converted *exactly*, as the binary fractions they are) this module runs the constructions of
Zeng & Lee (2024) in exact rational arithmetic and proves, with no tolerance, that the adapted model equals
the target:

* :func:`certify_linear` — Lemma 1 (linear models): ``Π(W_l + Δ_l) == T`` and ``rank(Δ_l) <= R_l``;
* :func:`certify_fnn` — Theorem 3 (uniform partition) / Theorem 6 (general partition): every block's affine
  map equals its target layer's, and every linearising bias keeps its ReLUs active on a stated ball,
  checked with squared comparisons (no square root is ever taken);
* :func:`certify_tfn` — Theorem 7 (transformers): every matched product equals its target, the biases too.

The construction needs only *some* rank decomposition ``E = C F`` of the discrepancy, in place of the SVD
(which is irrational): layer ``l`` receives the next ``R_l`` columns ``C_l`` of ``C`` and rows ``F_l`` of
``F``, and with ``Q_l = W_L ... W_{l+1}`` and ``P_l = (W_{l-1} + Δ_{l-1}) ... (W_1 + Δ_1)``::

    Δ_l = Q_l^{-1} C_l F_l P_l^{-1},    B_l = Q_l^{-1} C_l,    A_l = F_l P_l^{-1}     (exact solves)

By induction ``Q_l P_{l+1} = Π W + Σ_{k<=l} C_k F_k``: the matrices that must be invertible are ``Q_l`` and
``P_l`` (equivalently ``Π W + Σ_{k<l} C_k F_k`` once ``Q_{l-1}`` is), not the ``Π W + LR_r(E)`` of the SVD
construction. All exact linear algebra runs on sympy's ``DomainMatrix`` over ``QQ`` (fraction-free
where it matters), which is orders of magnitude faster than ``Matrix`` on rationals.

A :class:`Certificate` ends in one of three outcomes:

* ``"exact"`` — every exact check holds: the adapted model equals the target (on the ball, for FNNs);
* ``"sufficient condition not met"`` — a matrix the construction must invert is singular (named, and kept
  in :attr:`Certificate.singular_matrix`), or a matched rank exceeds the budget; this proves nothing about
  other constructions;
* ``"impossible at this rank"`` — linear models only, where rank counting proves it:
  ``rank(Π(W + Δ) - Π W) <= Σ R_l < rank(E)``. FNN and TFN certificates never claim impossibility (the paper
  proves none below their thresholds).

A singular matrix never raises out of a certificate: it becomes the outcome. Bad *arguments* (shapes,
non-rational entries, ranks out of range) raise :class:`~lora_theory.errors.InvalidArgumentError`.

Symbolic thresholds: :func:`linear_rank_threshold_expr`, :func:`fnn_rank_threshold_expr`,
:func:`tfn_rank_threshold_expr` are sympy expressions in the symbols :data:`D`, :data:`L`, :data:`Lbar`.

One module per result: :mod:`.linear`, :mod:`.fnn`, :mod:`.tfn`; the exact arithmetic in :mod:`.rational`,
what a certificate records in :mod:`.certificate`, the thresholds as expressions in :mod:`.expressions`,
random rational instances in :mod:`.instances`. Imports run one way:
``rational → certificate → linear → fnn, tfn → instances``.
"""

from .certificate import EXACT, IMPOSSIBLE, NOT_MET, Certificate, Check
from .expressions import D, L, Lbar, fnn_rank_threshold_expr, linear_rank_threshold_expr, tfn_rank_threshold_expr
from .fnn import RationalFNN, certify_fnn
from .instances import random_rational_fnn, random_rational_linear, random_rational_tfn
from .linear import certify_linear
from .rational import rational_matrix
from .tfn import RationalTFN, certify_tfn

__all__ = [
    "D",
    "L",
    "Lbar",
    "linear_rank_threshold_expr",
    "fnn_rank_threshold_expr",
    "tfn_rank_threshold_expr",
    "EXACT",
    "NOT_MET",
    "IMPOSSIBLE",
    "Check",
    "Certificate",
    "RationalFNN",
    "RationalTFN",
    "rational_matrix",
    "certify_linear",
    "certify_fnn",
    "certify_tfn",
    "random_rational_linear",
    "random_rational_fnn",
    "random_rational_tfn",
]
