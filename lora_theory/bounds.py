"""The error of the FNN construction below the rank threshold: the project's own per-instance bound
(THEORY.md §2.4). It follows the argument of Zeng & Lee 2024, Theorem 5 (error below the threshold) but is
not that theorem's statement, which bounds another quantity with other norms and constants (THEORY.md §2.4,
"Relation to the paper's Theorem 5").

Below the threshold, block ``i`` of the construction of :func:`lora_theory.fnn.lora_fnn` realises
``W̃_i = Π_{l ∈ P_i} W_l + LR_{k_i}(E_i)`` with ``ε_i = ||W̃_i - T_i||_2 = σ_{k_i+1}(E_i)``. While the
linearising biases keep the ReLUs inside every block active on the *adapted* block inputs (certify the
domain: :func:`lora_fnn` sizes each block for the image of the adapted model), the adapted network is
``z_i = σ(W̃_i z_{i-1} + c_i)`` and ReLU is 1-Lipschitz, so for every input ``x``::

    ||f(x) - f̄(x)||_2 <= Σ_i K_i ε_i ||z̄_{i-1}(x)||_2,     K_i = Π_{k>i} (||T_k||_2 + ε_k),

with ``z̄_i`` the target's activations (``z̄_0 = x``). Taking root-mean-squares (Minkowski)::

    sqrt(E ||f(x) - f̄(x)||^2) <= Σ_i K_i ε_i a_{i-1},   a_0 = sqrt(tr Σ),   a_i = ||T_i||_2 a_{i-1} + ||c_i||_2,

``Σ = E[x x^T]``. The per-coordinate MSE bound is that value squared over ``D``. It is attained on some
instances (orthogonal discrepancies, ReLUs that stay active: ``tests/test_error_bound_tight.py``) and loose on
others: the ratio bound / measured RMS error is given with its measured ranges in THEORY.md §2.4. The exact
optimum is known only for linear models (:func:`lora_theory.linear_gaussian_mse`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _display
from ._guard import finite_or_raise, numeric_guard
from ._types import ArrayLike, Partition, Rank
from ._validate import as_array, as_ranks, as_square
from .errors import InvalidArgumentError
from .fnn import _block_error, _check_models, _partition
from .linear import discrepancy_rank, product
from .models import FNN
from .numerics import svd_values
from .partition import partition_blocks

__all__ = ["ErrorBound", "fnn_error_bound", "fnn_error_bound_at"]


@dataclass(frozen=True, eq=False)
class ErrorBound:
    """The project's per-instance bound on the FNN construction's error below the threshold, for one
    instance (THEORY.md §2.4; derived along Zeng & Lee 2024, Theorem 5, not that theorem's statement).

    Attributes
    ----------
    rms : float
        Bound on ``sqrt(E||f(x) - f̄(x)||_2^2)`` for inputs with second moment ``Σ``.
    mse : float
        Bound on the per-coordinate mean squared error, ``rms^2 / D``.
    block_errors : tuple of float
        ``ε_i = σ_{k_i+1}(E_i)``.
    block_directions : tuple of int
        ``k_i = min(Σ_{l ∈ P_i} R_l, rank(E_i))``.
    growth_factors : tuple of float
        ``K_i = Π_{k>i} (||T_k||_2 + ε_k)``.
    activation_bounds : tuple of float
        ``a_0 .. a_{L̄-1}``: RMS bounds on the target's block inputs.
    partition, ranks : tuple of int
    target : FNN
    """

    rms: float
    mse: float
    block_errors: tuple
    block_directions: tuple
    growth_factors: tuple
    activation_bounds: tuple
    partition: tuple
    ranks: tuple
    target: FNN

    __repr__ = _display.error_bound_repr

    def at(self, x: ArrayLike) -> np.ndarray | float:
        """The per-sample bound ``Σ_i K_i ε_i ||z̄_{i-1}(x)||_2`` for ``x`` of shape ``(D,)`` or ``(n, D)``.

        Uses the target's actual activation norms; returns a float for one input, an array ``(n,)`` for
        a batch.
        """
        acts = self.target.activations(x)  # [z̄_0 .. z̄_L̄], each (n, D) or (D,)
        total = 0.0
        for i, (K, eps) in enumerate(zip(self.growth_factors, self.block_errors)):
            if eps:
                total = total + K * eps * np.linalg.norm(acts[i], axis=-1)
        if np.ndim(total) == 0:
            out = float(total)
            return out if np.ndim(acts[0]) == 1 else np.full(acts[0].shape[0], out)
        return total


def _second_moment_trace(second_moment, D) -> float:
    if second_moment is None:
        return float(D)
    S = as_square(second_moment, "second_moment", D)
    scale = max(float(np.abs(S).max()), np.finfo(float).tiny)
    if not np.allclose(S, S.T, rtol=0, atol=1e-12 * scale):
        raise InvalidArgumentError("second_moment", "must be symmetric (it is E[x x^T])")
    if float(np.linalg.eigvalsh((S + S.T) / 2).min()) < -1e-12 * scale * D:
        raise InvalidArgumentError("second_moment", "must be positive semi-definite (it is E[x x^T])")
    return float(np.trace(S))


def fnn_error_bound(
    frozen: FNN, target: FNN, rank: Rank, *, partition: Partition = None, second_moment: ArrayLike | None = None
) -> ErrorBound:
    """The project's per-instance bound on the error of the FNN construction at any rank (THEORY.md §2.4).

    Derived with the argument of Zeng & Lee 2024, Theorem 5 (ReLU is 1-Lipschitz, block errors carried by
    the later blocks), but it bounds the root-mean-square error with spectral norms and per-block factors;
    the paper's statement bounds another quantity with other norms and constants (THEORY.md §2.4).

    Parameters
    ----------
    frozen : FNN
        ``f0`` (depth ``L``, weights ``W_l``).
    target : FNN
        ``f̄`` (depth ``L̄ <= L``, weights ``T_i``, biases ``c_i``).
    rank : int in 0..D, or sequence of L such ints
        ``R`` or per-layer ``R_l``.
    partition : sequence of L̄ positive ints summing to L, optional
        Default the uniform partition.
    second_moment : array (D, D), optional
        ``Σ = E[x x^T]`` of the inputs (symmetric positive semi-definite); default ``I`` (``x ~ N(0, I_D)``).
        Pass ``X.T @ X / n`` to bound the RMS error on the samples ``X`` themselves.

    Returns
    -------
    ErrorBound
        ``rms`` and ``mse = rms^2 / D``; ``ErrorBound.at(x)`` gives the per-sample bound. Zero at and above
        the threshold (every ``ε_i = 0``).

    Notes
    -----
    Holds for :func:`lora_theory.fnn.lora_fnn` fits whose domain covers the inputs (the linearising biases
    must keep the ReLUs active on the adapted block inputs). Attained on some instances, loose on others
    (THEORY.md §2.4 gives the measured ratios).
    """
    L, Lbar, D = _check_models(frozen, target)
    ranks = as_ranks(rank, L, D)
    sizes = _partition(partition, L, Lbar)
    trace = _second_moment_trace(second_moment, D)
    eps, dirs = [], []
    for i, block in enumerate(partition_blocks(sizes)):
        factors = frozen.weights[block.start : block.stop]
        T = target.weights[i]
        E = T - product(factors)  # (D, D)
        s = svd_values(E)
        rank_E = discrepancy_rank(factors, T)  # the construction's tolerance
        k = min(sum(ranks[block.start : block.stop]), rank_E)
        dirs.append(k)
        eps.append(_block_error(s, k, rank_E))
    norms = [float(np.linalg.norm(T, 2)) for T in target.weights]
    K = [float(np.prod([norms[k] + eps[k] for k in range(i + 1, Lbar)])) for i in range(Lbar)]
    a = [float(np.sqrt(trace))]
    for i in range(Lbar - 1):
        a.append(norms[i] * a[-1] + float(np.linalg.norm(target.biases[i])))
    # Python floats overflow to inf without a word (a target weight of 1e308 gave K = inf and rms = NaN)
    finite_or_raise("fnn_error_bound", growth_factors=K, activation_bounds=a, block_errors=eps)
    rms = float(sum(K[i] * eps[i] * a[i] for i in range(Lbar)))
    finite_or_raise("fnn_error_bound", rms=rms, mse=rms * (rms / D))
    return ErrorBound(
        rms=rms,
        mse=rms**2 / D,
        block_errors=tuple(eps),
        block_directions=tuple(dirs),
        growth_factors=tuple(K),
        activation_bounds=tuple(a),
        partition=sizes,
        ranks=ranks,
        target=target,
    )


fnn_error_bound = numeric_guard(fnn_error_bound)


def fnn_error_bound_at(
    frozen: FNN, target: FNN, rank: Rank, x: ArrayLike, *, partition: Partition = None
) -> np.ndarray | float:
    """The per-sample form ``Σ_i K_i ε_i ||z̄_{i-1}(x)||_2`` of the project's bound (see :func:`fnn_error_bound`).

    ``x`` of shape ``(D,)`` (returns a float) or ``(n, D)`` (returns an array ``(n,)``).
    """
    bound = fnn_error_bound(frozen, target, rank, partition=partition)
    x = as_array(x, "x")
    if x.ndim not in (1, 2) or x.shape[-1] != target.width:
        raise InvalidArgumentError("x", f"must have shape (D,) or (n, D) with D = {target.width}, got {x.shape}")
    return bound.at(x)


fnn_error_bound_at = numeric_guard(fnn_error_bound_at)
