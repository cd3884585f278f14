"""Zeng & Lee 2024, Theorem 3 / Theorem 6 (ReLU FNNs) at raised precision on a certified ball: :func:`lora_fnn_mp`,
with the compensating biases and rounding bookkeeping of :func:`lora_theory.fnn.lora_fnn`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import mpmath
import numpy as np

from .. import _display
from .._guard import numeric_guard
from .._types import ArrayLike, Partition, Rank
from .._validate import as_array, as_ranks, as_tolerance
from ..errors import InvalidArgumentError, SingularMatrixError
from ..fnn import (
    SAFETY,
    Domain,
    _ball_level_size,
    _block_gamma,
    _check_models,
    _check_points,
    _radius_amplification,
    lora_fnn,
)
from ..models import FNN
from ..partition import check_partition, partition_blocks, uniform_partition
from .arithmetic import _eye, _float_product, _fro, _mp, _mpm, _nested_objects, _np, _object_arrays, _prod
from .linear import _chain_mp
from .precision import _at_precision, _check_digits, _working_tolerance


def _forward(weights, biases, Z, relu):
    """``z_l = σ(W_l z_{l-1} + b_l)`` on the columns of ``Z`` (mpmath), ``relu[l]`` selecting ``σ``."""
    for l, (W, b) in enumerate(zip(weights, biases)):
        Z = W * Z
        for i in range(Z.rows):
            for j in range(Z.cols):
                v = Z[i, j] + b[i]
                Z[i, j] = v if (v > 0 or not relu[l]) else _mp.zero
    return Z


@dataclass(frozen=True, eq=False)
class HighPrecisionFNNFit:
    """Theorem 3 / Theorem 6's adapters and biases computed at ``digits`` significant digits.

    Attributes
    ----------
    weights_mp, biases_mp : tuple of mpmath.matrix
        ``W_l + Δ_l`` ``(D, D)`` and the new biases ``(D, 1)``.
    ranks, partition : tuple of int
    digits : int
    digits_reason : str
    kappa, gamma : float
        Largest condition number inverted and the bias amplification ``γ``
        (defined as in :class:`lora_theory.fnn.FNNFit`, from float64 roundings of the adapted weights).
    exact : bool
        ``Σ_{l ∈ P_i} R_l >= rank(E_i)`` for every block (:attr:`rank_sufficient`) *and* the working precision
        kept it, as :attr:`lora_theory.FNNFit.exact`: :attr:`measured_error` is at most :attr:`tolerance`,
        and that tolerance times :attr:`radius_amplification` is at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT`.
    block_errors : tuple of mpmath.mpf
        For each block, ``max(||W̃_i - T_i||_F / ||T_i||_F, ||o_i - c_i|| / ||c_i||)`` at working precision:
        how far the block's affine map (on its ball) is from the target layer's.
    levels : tuple of tuple of mpmath.mpf
        The linearising levels ``β_j`` of every block.
    center : ndarray (D,); radius : float
        The certified input ball.
    rank_sufficient : bool
        Every block's budget covers ``rank(E_i)``: ``f = f̄`` on the ball in exact arithmetic.
    measured_error : float
        ``max_x ||f(x) - f̄(x)||_2 / s_out`` over the check points of :func:`lora_theory.fnn.lora_fnn` (the
        centre, the points of the ball where each first-block pre-activation is smallest, and samples),
        both networks evaluated at working precision; ``s_out`` bounds the outputs on the ball.
    tolerance : float
        ``c·u_d·(κ + γ)``: :func:`lora_theory.numerics.tolerance`'s rule at ``digits`` digits.
    radius_amplification : float
        As :attr:`lora_theory.FNNFit.radius_amplification`, from the realised block products.
    """

    weights_mp: tuple
    biases_mp: tuple
    frozen: FNN
    target: FNN
    ranks: tuple
    partition: tuple
    digits: int
    digits_reason: str
    kappa: float
    gamma: float
    exact: bool
    block_errors: tuple
    levels: tuple
    center: np.ndarray
    radius: float
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")
    tolerance: float = float("nan")
    radius_amplification: float = 1.0

    __repr__ = _display.high_precision_repr

    def _inputs(self, x):
        x = as_array(x, "x")
        X = np.atleast_2d(x)
        if X.ndim != 2 or X.shape[1] != self.frozen.width:
            raise InvalidArgumentError(
                "x", f"must have shape (D,) or (n, D) with D = {self.frozen.width}, got {x.shape}"
            )
        return x, X

    def _outputs(self, X):
        """``(f(X), f̄(X))`` as mpmath matrices ``(D, n)`` at working precision (call inside workdps)."""
        t = self.target
        Xm = _mpm(X.T)  # (D, n)
        relu_f = [
            self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
            for l in range(len(self.weights_mp))
        ]
        relu_t = [t.activation == "relu" and (l < t.depth - 1 or t.final_relu) for l in range(t.depth)]
        f = _forward(self.weights_mp, self.biases_mp, Xm, relu_f)
        fbar = _forward([_mpm(T) for T in t.weights], [_mpm(c) for c in t.biases], Xm, relu_t)
        return f, fbar

    def predict(self, x: ArrayLike) -> np.ndarray:
        """The adapted FNN on ``x`` (``(D,)`` or ``(n, D)``), evaluated at working precision, rounded."""
        x, X = self._inputs(x)
        with _mp.workdps(self.digits):
            Xm = _mpm(X.T)
            relu = [
                self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
                for l in range(len(self.weights_mp))
            ]
            Y = _np(_forward(self.weights_mp, self.biases_mp, Xm, relu)).T
        return Y[0] if x.ndim == 1 else Y

    def relative_error(self, x: ArrayLike) -> mpmath.mpf:
        """``||f(X) - f̄(X)||_F / ||f̄(X)||_F`` over the rows of ``x``, computed at working precision (mpf)."""
        _, X = self._inputs(x)
        with _mp.workdps(self.digits):
            f, fbar = self._outputs(X)
            den = _fro(fbar)
            return _fro(f - fbar) / den if den > 0 else _fro(f - fbar)

    def max_row_error(self, x: ArrayLike) -> float:
        """``max_x ||f(x) - f̄(x)||_2`` over the rows of ``x`` (``(n, D)``), both networks at working precision."""
        _, X = self._inputs(x)
        from_float, from_mpf, _, ctx = _object_arrays(self.digits)
        t = self.target
        relu_f = [
            self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
            for l in range(len(self.weights_mp))
        ]
        relu_t = [t.activation == "relu" and (l < t.depth - 1 or t.final_relu) for l in range(t.depth)]
        with ctx:
            Xo = from_float(X)  # (n, D)
            f = _fnn_forward_objects(
                [from_mpf(np.array(_nested_objects(W), dtype=object)) for W in self.weights_mp],
                [from_mpf(np.array(_nested_objects(b, vector=True), dtype=object)) for b in self.biases_mp],
                Xo,
                relu_f,
            )  # (n, D)
            fbar = _fnn_forward_objects(
                [from_float(T) for T in t.weights], [from_float(c) for c in t.biases], Xo, relu_t
            )  # (n, D)
            worst = max(np.sum((f - fbar) ** 2, axis=1), default=0)
            return float(worst**0.5) if worst else 0.0

    @property
    def max_block_error(self) -> mpmath.mpf:
        """The largest of :attr:`block_errors` (mpf)."""
        return max(self.block_errors)


@numeric_guard
def lora_fnn_mp(
    frozen: FNN,
    target: FNN,
    rank: Rank,
    *,
    partition: Partition = None,
    input_radius: object,
    center: ArrayLike | None = None,
    digits: int | None = None,
    rank_tol: object = None,
) -> HighPrecisionFNNFit:
    """Theorem 3 (uniform partition) / Theorem 6 (general partition) of Zeng & Lee 2024 at raised precision.

    The construction of :func:`lora_theory.fnn.lora_fnn` on a certified ball, step for step: Lemma 1 in
    every block (:func:`lora_linear_mp`'s SVD split), compensating linearising biases
    ``b_j = β_j·1 - M_j β_{j-1}·1`` with ``β_j = max_k (r ||row_k(P_j)|| - (P_j u_0)_k)^+`` plus the same
    safety term (:data:`lora_theory.fnn.SAFETY`), the calibrating bias ``b_m = c_i - M_m β_{m-1}·1``, and the
    next ball (centre 0, radius ``||W̃_i||_2 r + ||W̃_i u_0 + c_i||``). The biases reach about ``γ`` times the
    signal, so the block needs about ``log10 γ`` digits more than the linear chain.

    Parameters
    ----------
    frozen, target : FNN
        As :func:`lora_theory.fnn.lora_fnn`.
    rank : int or sequence of L ints
    partition : block sizes, optional
    input_radius : float
        Radius of the certified input ball (ball domain only).
    center : array (D,), optional
    digits : int in 16..MAX_DIGITS (1000), or None
        ``None``: :func:`choose_digits` ``(κ, γ)`` of the float64 construction, raised when the values found
        at that precision ask for more.
    rank_tol : float, optional
        As in :func:`lora_linear_mp`.

    Returns
    -------
    HighPrecisionFNNFit

    Raises
    ------
    InvalidArgumentError, SingularMatrixError
        As :func:`lora_theory.fnn.lora_fnn` (a singular matrix at the working precision).

    Warns
    -----
    IllConditionedWarning
        As :func:`lora_linear_mp`: ``digits`` given and ``u·(κ + γ) > 1e-8`` at that precision.
    """

    L_, Lbar_, n = _check_models(frozen, target)
    ranks = as_ranks(rank, L_, n)
    sizes = uniform_partition(L_, Lbar_) if partition is None else check_partition(partition, L_, Lbar_)
    if (
        input_radius is None
        or isinstance(input_radius, (bool, np.bool_))
        or not isinstance(input_radius, numbers.Real)
        or not math.isfinite(input_radius)
        or input_radius <= 0
    ):
        raise InvalidArgumentError("input_radius", f"must be a positive finite real number, got {input_radius!r}")
    c0 = np.zeros(n) if center is None else as_array(center, "center", shape=(n,))
    rank_tol = as_tolerance(rank_tol, "rank_tol")
    r = float(input_radius)
    return _at_precision(
        lambda d, reason: _fnn_mp(frozen, target, ranks, sizes, r, c0, d, reason, rank_tol),
        lambda: lora_fnn(frozen, target, ranks, partition=sizes, input_radius=r, center=c0),
        _check_digits(digits),
        "high-precision FNN construction (Theorem 3)",
    )


def _fnn_mp(frozen, target, ranks, sizes, radius, center, digits, reason, rank_tol):

    n = frozen.width
    linearise = frozen.activation == "relu"
    weights, biases, kappas, block_errors, all_levels = [], [], {}, [], []
    first_partials, realised = [], []  # float64 P_j of block 1; W̃_i
    exact = True
    gamma = 0.0
    with _mp.workdps(digits):
        tol = None if rank_tol is None else _mp.mpf(rank_tol)
        u0 = _mpm(center)  # (n, 1)
        r = _mp.mpf(radius)
        one = _mp.matrix([[1] for _ in range(n)])
        for i, block in enumerate(partition_blocks(sizes)):
            factors = [_mpm(frozen.weights[l]) for l in block]
            T = _mpm(target.weights[i])
            c = _mpm(target.biases[i])
            names = [f"W_{l + 1}" for l in block]
            try:
                _, M, s, rank_E, block_kappas = _chain_mp(factors, T, ranks[block.start : block.stop], names, tol)
            except SingularMatrixError as exc:
                raise SingularMatrixError(
                    f"block {i + 1}: {exc.matrix}",
                    exc.condition_number,
                    f"block {i + 1} holds layers {block.start + 1}..{block.stop}",
                ) from None
            for key, k in block_kappas.items():
                kappas[f"block {i + 1}: {key}"] = k
            exact = exact and sum(ranks[block.start : block.stop]) >= rank_E
            m = len(M)
            in_size = float(_mp.norm(u0)) + float(r)
            level_sizes = []  # s_j, the size of layer j + 1's input (the rounding bookkeeping, _block_gamma)
            # magnitudes summed in M_j = W_j + Δ_j, as the float64 path counts them (FNNFit.gamma)
            added = [
                float(np.linalg.norm(frozen.weights[l], 2)) + float(np.linalg.norm(_np(Mj) - frozen.weights[l], 2))
                for l, Mj in zip(block, M)
            ]
            beta_prev = _mp.mpf(0)
            P = _eye(n)
            levels, block_biases = [], []
            for j in range(m - 1):
                P = M[j] * P  # (n, n) P_j
                Pu0 = P * u0  # (n, 1)
                if i == 0:
                    first_partials.append(_np(P))
                if linearise:
                    need = max(r * _mp.sqrt(_mp.fsum(P[k, q] ** 2 for q in range(n))) - Pu0[k] for k in range(n))
                    Pf = _np(P)
                    safety = SAFETY * (float(r) * float(np.linalg.norm(Pf, 2)) + float(_mp.norm(Pu0)))
                    beta = max(need, _mp.mpf(0)) + safety
                else:
                    beta = _mp.mpf(0)
                b = one * beta - M[j] * (one * beta_prev)  # (n, 1)
                block_biases.append(b)
                levels.append(beta)
                level_sizes.append(_ball_level_size(_mp.norm(Pu0), r, np.linalg.norm(_np(P), 2), beta, n))
                beta_prev = beta
            b_last = c - M[-1] * (one * beta_prev)
            block_biases.append(b_last)
            W_tilde = _prod(M, n)
            realised.append(_np(W_tilde))
            # the block's affine map on its ball: u -> W̃ u + o, o by propagating the biases
            o = _mp.zeros(n, 1)
            for Mj, bj in zip(M, block_biases):
                o = Mj * o + bj
            weight_err = _fro(W_tilde - T) / _fro(T)
            bias_err = _mp.norm(o - c) / _mp.norm(c) if _mp.norm(c) > 0 else _mp.norm(o - c)
            block_errors.append(max(weight_err, bias_err))
            all_levels.append(tuple(levels))
            norm_Wt = float(np.linalg.norm(_np(W_tilde), 2)) * (1 + 1e-12)
            out_size = norm_Wt * float(r) + float(_mp.norm(W_tilde * u0 + c))
            bias_norms = [float(_mp.norm(b)) for b in block_biases]
            # each layer's rounding reaches the block output through the adapted layers after it
            Mf = [_np(Mj) for Mj in M]
            after = [float(np.linalg.norm(_float_product(Mf[j + 1 :], n), 2)) for j in range(m - 1)] + [1.0]
            norms = (
                float(np.linalg.norm(target.weights[i], 2)),
                float(np.linalg.norm(_float_product([frozen.weights[l] for l in block], n), 2)),
            )
            # as the float64 path counts it
            gamma += _block_gamma(added, bias_norms, level_sizes, after, *norms, in_size, out_size)
            weights.extend(M)
            biases.extend(block_biases)
            u0, r = _mp.zeros(n, 1), _mp.mpf(out_size)
    kappa = max(kappas.values(), default=1.0)
    fit = HighPrecisionFNNFit(
        weights_mp=tuple(weights),
        biases_mp=tuple(biases),
        frozen=frozen,
        target=target,
        ranks=ranks,
        partition=sizes,
        digits=digits,
        digits_reason=reason,
        kappa=kappa,
        gamma=gamma,
        exact=exact,
        block_errors=tuple(block_errors),
        levels=tuple(all_levels),
        center=center,
        radius=radius,
        condition_numbers=kappas,
        rank_sufficient=exact,
        tolerance=_working_tolerance(digits, kappa, gamma),
        radius_amplification=_radius_amplification(realised, target.biases, center, radius, float(r)),
    )
    # check the claim on the fit's own ball, at working precision
    domain = Domain(kind="ball", center=center, radius=radius, margin=None, n_samples=None)
    points = _check_points(domain, None, first_partials)  # (p, n)
    s_out = float(r)
    miss = fit.max_row_error(points)
    object.__setattr__(fit, "measured_error", miss / s_out if s_out > 0 else miss)
    return fit


def _fnn_forward_objects(weights, biases, X, relu):
    """An FNN on object arrays: ``weights[l]`` ``(D, D)``, ``biases[l]`` ``(D,)``, ``X`` ``(n, D)``; ``relu[l]``
    whether layer ``l`` is followed by a ReLU."""
    Z = X  # (n, D)
    for W, b, act in zip(weights, biases, relu):
        Z = Z @ W.T + b  # (n, D)
        if act:
            Z = np.where(Z > 0, Z, 0)
    return Z
