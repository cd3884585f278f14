"""Zeng & Lee 2024, Theorem 7 (transformers) at raised precision: :func:`lora_tfn_mp`, the walk of
:func:`lora_theory.lora_tfn` over mpmath arithmetic, evaluated at that precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _display
from .._guard import numeric_guard
from .._types import ArrayLike
from .._validate import as_array, as_int
from ..adapter import Adapter
from ..errors import InvalidArgumentError
from ..models import TFN
from ..numerics import (
    _LargestConditionNumber,
)
from ..tfn import CHECK_INPUTS, CHECK_TOKENS, _Carried, _check_pair, _walk, _WalkArithmetic, lora_tfn
from .arithmetic import _LU, _eye, _mp, _mpm, _nested_np, _nested_objects, _np, _object_arrays
from .linear import _chain_mp
from .precision import _at_precision, _check_digits, _working_tolerance


def _tfn_forward_objects(p, X, exp):
    """The TFN of :class:`lora_theory.TFN` on object arrays: ``p`` its parameters, ``X`` ``(n, D, N)``."""
    L, H = p["wq"].shape[:2]
    Z = X  # (n, D, N)
    for l in range(L):
        A = np.zeros_like(Z)
        for h in range(H):
            K = p["wk"][l, h] @ Z  # (n, D, N)
            Q = p["wq"][l, h] @ Z  # (n, D, N)
            S = np.swapaxes(K, -1, -2) @ Q  # (n, N, N) scores, keys on axis -2
            S = exp(S - S.max(axis=-2, keepdims=True))
            S = S / S.sum(axis=-2, keepdims=True)  # columns sum to 1
            A = A + p["wo"][l, h] @ (p["wv"][l, h] @ Z) @ S  # (n, D, N)
        H1 = p["w1"][l] @ A + p["b1"][l][:, None]  # (n, D, N)
        H1 = np.where(H1 > 0, H1, 0)
        Z = p["w2"][l] @ H1 + p["b2"][l][:, None]  # (n, D, N)
    return p["w_out"] @ Z  # (n, D, N)


@dataclass(frozen=True, eq=False)
class HighPrecisionTFNFit(_LargestConditionNumber):
    """Theorem 7's adapters and biases computed at ``digits`` significant digits.

    Attributes
    ----------
    params_mp : dict
        The adapted network's parameters under :class:`lora_theory.TFN`'s names, as nested lists of mpmath
        matrices: ``params_mp["wq"][l][h]`` ``(D, D)`` (likewise ``wk``, ``wv``, ``wo``), ``w1[l]``,
        ``w2[l]`` ``(D, D)``, ``b1[l]``, ``b2[l]`` ``(D, 1)``, ``w_out`` ``(D, D)``.
    adapters_mp : dict
        ``(name, block, head) -> (A, B)`` mpmath matrices (``A`` ``(r, D)``, ``B`` ``(D, r)``), keyed as
        :attr:`lora_theory.tfn.TFNFit.adapters`; :attr:`adapters` rounds them to float64.
    rank, digits : int
    digits_reason : str
    matched_ranks : tuple of int
        ``G_l`` per block at working precision; ``required_rank = max_l ceil(G_l / 2)``.
    exact : bool
        ``rank >= required_rank`` (:attr:`rank_sufficient`) *and* the working precision kept it, as
        :attr:`lora_theory.TFNFit.exact`: :attr:`measured_error` at most :attr:`tolerance`, itself at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT`.
    condition_numbers : dict of str -> float
        As :attr:`lora_theory.tfn.TFNFit.condition_numbers`.
    rank_sufficient : bool
        ``rank >= required_rank``: the adapted network equals the target for every input in exact arithmetic.
    measured_error : float
        :meth:`relative_error` on the check inputs of :func:`lora_theory.lora_tfn` (``CHECK_INPUTS`` standard
        normal sequences of ``CHECK_TOKENS`` tokens, seed 0), both networks at working precision.
    tolerance : float
        ``c·u_d·κ``: :func:`lora_theory.numerics.tolerance`'s rule at ``digits`` digits.
    """

    params_mp: dict
    adapters_mp: dict
    frozen: object
    target: object
    rank: int
    digits: int
    digits_reason: str
    matched_ranks: tuple
    required_rank: int
    exact: bool
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")
    tolerance: float = float("nan")

    __repr__ = _display.high_precision_repr

    @property
    def gamma(self) -> float:
        """0: the transformer construction adds no linearising biases (the ``γ`` of the FNN path)."""
        return 0.0

    @property
    def adapters(self) -> dict:
        """The adapters rounded to float64, keyed as :attr:`lora_theory.tfn.TFNFit.adapters`."""
        D = self.frozen.embed_dim
        return {
            k: Adapter(_np(A) if A.rows else np.zeros((0, D)), _np(B) if B.cols else np.zeros((D, 0)))
            for k, (A, B) in self.adapters_mp.items()
        }

    @property
    def num_parameters(self) -> int:
        """Number of adapter parameters used, ``Σ r (in + out)``."""
        return sum(a.num_parameters for a in self.adapters.values())

    @property
    def model(self) -> TFN:
        """The adapted network rounded to float64 (:class:`lora_theory.TFN`; a float64 forward pass
        through it loses digits again: evaluate with :meth:`predict`)."""

        p = self.params_mp
        return TFN(**{k: np.array(_nested_np(v, k in _TFN_VECTORS)) if k != "w_out" else _np(v) for k, v in p.items()})

    def _inputs(self, X):
        X = as_array(X, "X")
        D = self.frozen.embed_dim
        if X.ndim not in (2, 3) or X.shape[-2] != D:
            raise InvalidArgumentError("X", f"must have shape (D, N) or (n, D, N) with D = {D}, got {X.shape}")
        return X

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The adapted network on ``X`` (``(D, N)`` or ``(n, D, N)``), evaluated at working precision, rounded
        to float64, shaped like ``X``."""
        X = self._inputs(X)
        from_float, from_mpf, exp, ctx = _object_arrays(self.digits)
        with ctx:
            p = {
                k: from_mpf(np.array(_nested_objects(v, k in _TFN_VECTORS), dtype=object))
                for k, v in self.params_mp.items()
            }
            Y = _tfn_forward_objects(p, from_float(X if X.ndim == 3 else X[None]), exp)  # (n, D, N)
            Y = np.vectorize(float, otypes=[np.float64])(Y)
        return Y if X.ndim == 3 else Y[0]

    def relative_error(self, X: ArrayLike) -> float:
        """``||f(X) - f̄(X)||_F / ||f̄(X)||_F``, adapted network and target both at working precision."""
        X = self._inputs(X)
        X3 = X if X.ndim == 3 else X[None]
        from_float, from_mpf, exp, ctx = _object_arrays(self.digits)
        with ctx:
            p = {
                k: from_mpf(np.array(_nested_objects(v, k in _TFN_VECTORS), dtype=object))
                for k, v in self.params_mp.items()
            }
            t = {k: from_float(v) for k, v in self.target.parameters().items()}
            Xo = from_float(X3)
            f, fbar = _tfn_forward_objects(p, Xo, exp), _tfn_forward_objects(t, Xo, exp)
            num, den = np.sum((f - fbar) ** 2), np.sum(fbar**2)
            return float((num / den) ** 0.5) if den > 0 else float(num**0.5)


#: The parameters of :class:`lora_theory.TFN` that are vectors (stored as ``(D, 1)`` mpmath matrices): told
#: apart by name, since at width ``D = 1`` a ``(1, 1)`` weight has the shape of a bias.
_TFN_VECTORS = ("b1", "b2")


@numeric_guard
def lora_tfn_mp(frozen: TFN, target: TFN, rank: int, digits: int | None = None) -> HighPrecisionTFNFit:
    """Theorem 7's construction (Zeng & Lee 2024, Theorem 7 (transformers)) at raised precision.

    The steps of :func:`lora_theory.tfn.lora_tfn` (``C_l = T2_l W2_l^{-1}``, Lemma 1 on the score products
    ``(W_Q, W_K^T)``, the value products ``(W_V, W_O)`` and the output product ``(W2_L, W_out)``, ``b1 = c1``,
    ``b2_l = W2_l T2_l^{-1} c2_l``, ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``) in mpmath. The float64
    construction is as accurate as float64 weights can be (perturbing its adapted weights by one rounding
    unit moves the output as much as its error), but for two blocks that is a relative output error up to
    1e-10: the adapted second block reads the first block's output through ``C_1``, which amplifies the
    rounding of every first-block weight. At raised precision and evaluated there (:meth:`predict`) the
    adapted network equals the target to the working precision less ``log10 κ``.

    Parameters
    ----------
    frozen, target : TFN
        As :func:`lora_theory.lora_tfn`.
    rank : int in 0..D
    digits : int in 16..MAX_DIGITS (1000), or None
        ``None``: :func:`choose_digits` of the float64 construction's ``κ`` (and at least 30), raised when
        the ``κ`` found at that precision asks for more.

    Raises
    ------
    InvalidArgumentError, SingularMatrixError
        As :func:`lora_theory.lora_tfn` (a singular matrix at the working precision).

    Warns
    -----
    IllConditionedWarning
        ``digits`` given and ``u·κ > 1e-8`` at that precision (as :func:`lora_linear_mp`).
    """

    _check_pair(frozen, target)
    R = as_int(rank, "rank", 0, frozen.embed_dim)
    return _at_precision(
        lambda d, reason: _tfn_mp(frozen, target, R, d, reason),
        lambda: lora_tfn(frozen, target, R),
        _check_digits(digits),
        "high-precision transformer construction (Theorem 7)",
        least=MIN_TFN_DIGITS,
    )


#: The least precision :func:`lora_tfn_mp` chooses by itself.
MIN_TFN_DIGITS = 30


def _tfn_mp(frozen, target, R, digits, reason) -> HighPrecisionTFNFit:
    L, H, D = frozen.depth, frozen.heads, frozen.embed_dim
    kappas: dict = {}
    adapters: dict = {}
    G = [0] * L
    with _mp.workdps(digits):
        f, t = frozen.parameters(), target.parameters()
        out = {name: [[None] * H for _ in range(L)] for name in ("wq", "wk", "wv", "wo")}
        out.update(
            w1=[_mpm(f["w1"][l]) for l in range(L)],
            b1=[_mpm(t["b1"][l]) for l in range(L)],
            w2=[_mpm(f["w2"][l]) for l in range(L)],
            b2=[None] * L,
        )

        def param(params, name, l, h):
            value = params[name]
            return _mpm(value if name == "w_out" else value[l, h] if h is not None else value[l])

        def inverse(M, name, context):
            lu = _LU(M, name, context)
            return lu.kappa, lu.solve

        def right_inverse(M, name, context):
            lu = _LU(M.T, name, context)
            return lu.kappa, lambda X: lu.solve(X.T).T

        arith = _WalkArithmetic(
            frozen=lambda name, l, h: param(f, name, l, h),
            target=lambda name, l, h: param(t, name, l, h),
            mul=lambda A, B: A * B,
            T=lambda A: A.T,
            eye=_eye(D),
            inverse=inverse,
            right_inverse=right_inverse,
        )
        for step in _walk(arith, L, H, kappas):
            if isinstance(step, _Carried):
                out["b2"][step.block] = step.b2  # (D, 1) W2 T2^-1 c2
                continue
            l, h = step.block, step.head
            (a1, a2), (m1, m2), _, rank_E, chain_kappas = _chain_mp(
                list(step.factors), step.matched, (R, R), list(step.names), None, step.kappa_solved
            )
            G[l] = max(G[l], rank_E)
            label = f"{step.kind}[{l},{h}]" if h is not None else step.kind
            kappas.update({f"{label} {k}": v for k, v in chain_kappas.items()})
            if step.kind == "qk":
                out["wq"][l][h], out["wk"][l][h] = m1, m2.T
                # W_K^T + B2 A2 = (W_K + A2^T B2^T)^T: the adapter of W_K is (A = B2^T, B = A2^T)
                adapters[("wq", l, h)], adapters[("wk", l, h)] = a1, (a2[1].T, a2[0].T)
            elif step.kind == "ov":
                out["wv"][l][h], out["wo"][l][h] = m1, m2
                adapters[("wv", l, h)], adapters[("wo", l, h)] = a1, a2
            else:
                out["w2"][L - 1], w_out = m1, m2
                adapters[("w2", L - 1, None)], adapters[("w_out", L - 1, None)] = a1, a2
        T_out = _mpm(t["w_out"])
        lu_out = _LU(w_out, "W_out + Δ_out", "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2")
        kappas["W_out + Δ_out"] = lu_out.kappa
        out["b2"][L - 1] = lu_out.solve(T_out * _mpm(t["b2"][L - 1]))
        out["w_out"] = w_out

    required = max((g + 1) // 2 for g in G)
    fit = HighPrecisionTFNFit(
        params_mp=out,
        adapters_mp=adapters,
        frozen=frozen,
        target=target,
        rank=R,
        digits=digits,
        digits_reason=reason,
        matched_ranks=tuple(G),
        required_rank=required,
        exact=R >= required,
        condition_numbers=kappas,
        rank_sufficient=R >= required,
        tolerance=_working_tolerance(digits, max(kappas.values(), default=1.0), 0.0),
    )
    # check the claim on the inputs the float64 construction checks, at working precision
    X = np.random.default_rng(0).standard_normal((CHECK_INPUTS, D, CHECK_TOKENS))  # (n, D, N)
    object.__setattr__(fit, "measured_error", fit.relative_error(X))
    return fit
