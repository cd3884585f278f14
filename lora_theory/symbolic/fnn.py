"""Zeng & Lee 2024, Theorem 3 / Theorem 6 (ReLU FNNs) in exact rational arithmetic: :func:`certify_fnn`, every
block's affine map equal to its target layer's and every linearising bias keeping its ReLUs active on the ball,
by squared comparisons (no square root).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sympy
from sympy import QQ
from sympy.polys.matrices import DomainMatrix

from .._types import Partition, Rank
from .._validate import as_bool, as_ranks
from ..errors import InvalidArgumentError
from ..fnn import SAFETY
from ..models import FNN
from ..partition import check_partition, partition_blocks, uniform_partition
from ..thresholds import ceil_div
from .certificate import NOT_MET, Certificate, _finish, _Recorder, _short, _Stop, _store
from .linear import _exact_chain
from .rational import _dm, _eye, _fraction_upper, _prod, _q, _square_list, _sym, _vec, _zeros


@dataclass(frozen=True, eq=False)
class RationalFNN:
    """A feed-forward network with exact rational weights (the exact twin of :class:`~lora_theory.FNN`).

    Attributes
    ----------
    weights : tuple of sympy.ImmutableMatrix (D, D)
        ``W_1 .. W_L`` (``T_i`` for a target).
    biases : tuple of sympy.ImmutableMatrix (D, 1)
        ``b_1 .. b_L`` (``c_i``).
    activation : {"relu", "linear"}
    final_relu : bool
    """

    weights: tuple
    biases: tuple
    activation: str = "relu"
    final_relu: bool = True

    def __post_init__(self):
        W = _square_list(self.weights, "weights")
        n = W[0].shape[0]
        if (
            isinstance(self.biases, (str, bytes))
            or not isinstance(self.biases, (Sequence, np.ndarray))
            or len(self.biases) != len(W)
        ):
            raise InvalidArgumentError("biases", f"must give one bias vector per layer ({len(W)})")
        b = [_vec(v, f"biases[{i}]", n) for i, v in enumerate(self.biases)]
        if not isinstance(self.activation, str) or self.activation not in ("relu", "linear"):
            raise InvalidArgumentError("activation", f"must be 'relu' or 'linear', got {self.activation!r}")
        object.__setattr__(self, "weights", tuple(_sym(M) for M in W))
        object.__setattr__(self, "biases", tuple(_sym(v) for v in b))
        object.__setattr__(self, "final_relu", as_bool(self.final_relu, "final_relu"))

    @property
    def width(self) -> int:
        """``D``."""
        return int(self.weights[0].shape[0])

    @property
    def depth(self) -> int:
        """``L`` (``L̄`` for a target)."""
        return len(self.weights)

    @classmethod
    def from_fnn(cls, model: FNN) -> RationalFNN:
        """The exact rational values of a float64 :class:`~lora_theory.FNN`."""
        return cls(model.weights, model.biases, model.activation, model.final_relu)

    def to_float(self) -> FNN:
        """The nearest float64 :class:`~lora_theory.FNN`."""
        return FNN(
            [np.array(W.tolist(), dtype=float) for W in self.weights],
            [np.array(b.tolist(), dtype=float).reshape(-1) for b in self.biases],
            activation=self.activation,
            final_relu=self.final_relu,
        )


def _as_rational_fnn(model, name) -> RationalFNN:
    if isinstance(model, RationalFNN):
        return model
    if isinstance(model, FNN):
        return RationalFNN.from_fnn(model)
    raise InvalidArgumentError(name, f"must be a lora_theory.FNN or a RationalFNN, got {type(model).__name__}")


def _positive_definite(S: DomainMatrix) -> bool:
    """Exact test of positive definiteness of a symmetric rational matrix (all LDL^T pivots > 0)."""
    a = [row[:] for row in S.to_list()]
    n = len(a)
    for k in range(n):
        if a[k][k] <= 0:
            return False
        for i in range(k + 1, n):
            f = a[i][k] / a[k][k]
            if f:
                for j in range(k + 1, n):
                    a[i][j] -= f * a[k][j]
    return True


def _float_spectral_sq(M: DomainMatrix) -> float | None:
    """``||M||_2^2`` in float64, a guess for :func:`_spectral_sq_upper` to certify; ``None`` when it is not
    finite in float64 (entries or their norm beyond its range)."""
    try:
        Mf = np.array([[float(v) for v in row] for row in M.to_list()])  # (m, n)
    except OverflowError:
        return None
    if not np.all(np.isfinite(Mf)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        s = float(np.linalg.norm(Mf, 2))
    return s * s if math.isfinite(s * s) else None


def _spectral_sq_upper(M: DomainMatrix):
    """A rational ``ρ >= ||M||_2^2``, certified: ``ρ I - M^T M`` positive definite (else ``||M||_F^2``)."""
    G = M.transpose() * M  # (n, n) symmetric
    n = G.shape[0]
    frob = sum((G.to_list()[i][i] for i in range(n)), QQ(0))
    s = _float_spectral_sq(M)
    if s is None:  # beyond float64: the Frobenius bound, exact, is the answer
        return frob
    for slack in (1e-9, 1e-6, 1e-3):
        guess = s * (1 + slack) + 1e-300
        if not math.isfinite(guess):
            break
        f = _fraction_upper(guess)
        rho = QQ(f.numerator, f.denominator)
        if rho < frob and _positive_definite(_eye(n).scalarmul(rho) - G):
            return rho
    return frob


def _relu_vec(v: DomainMatrix) -> DomainMatrix:
    return DomainMatrix([[x if x > 0 else QQ(0)] for x in (row[0] for row in v.to_list())], v.shape, QQ)


def _ones(n):
    return DomainMatrix([[QQ(1)] for _ in range(n)], (n, 1), QQ)


def certify_fnn(
    frozen: FNN | RationalFNN,
    target: FNN | RationalFNN,
    rank: Rank,
    *,
    partition: Partition = None,
    input_radius: object,
    center: Sequence | None = None,
) -> Certificate:
    """Exact certificate for Zeng & Lee 2024, Theorem 3 (uniform partition) / Theorem 6 (general partition).

    Runs the construction of :func:`lora_theory.fnn.lora_fnn` in exact arithmetic, block by block: Lemma 1
    with a rank decomposition toward ``T_i``; compensating linearising biases ``b_j = β_j·1 - M_j β_{j-1}·1``
    (rational ``β_j``: the float level of ``lora_fnn``, safety term included, rounded up to a short
    rational, and raised if the exact check disagrees); the calibrating bias ``b_m = c_i - M_m β_{m-1}·1``.

    Checks, exactly: every block's affine map ``u -> P_m u + o_m`` equals ``u -> T_i u + c_i``; every inner
    pre-activation ``P_j u + β_j·1`` is positive on the block's input ball ``||u - u_0||^2 <= r^2``, i.e. for
    every row ``k``: ``β_j + (P_j u_0)_k > 0`` and ``(β_j + (P_j u_0)_k)^2 > r^2 ||row_k(P_j)||^2``.

    The next block's ball: centre ``ReLU(T_i u_0 + c_i)`` (the target's own activation; no ReLU after an
    affine output layer), squared radius ``ρ_i r^2`` with ``ρ_i >= ||T_i||_2^2`` a certified rational bound
    (``ρ I - T^T T`` positive definite) — valid because ReLU is 1-Lipschitz, and needing no square root
    (``lora_fnn`` uses the looser centre 0, radius ``||W̃_i|| r + ||W̃_i u_0 + c_i||``).

    Parameters
    ----------
    frozen, target : FNN or RationalFNN
        ``f0`` (depth ``L``, weights ``W_l``) and ``f̄`` (depth ``L̄ <= L``, ``T_i``, ``c_i``); same width,
        activation and ``final_relu``.
    rank : int in 0..D, or sequence of L such ints
        ``R`` or per-layer ``R_l``.
    partition : sequence of L̄ positive ints summing to L, optional
        Block sizes; default the uniform partition.
    input_radius : positive rational (int, float, Fraction, sympy Rational)
        Radius ``r`` of the certified input ball.
    center : rational vector (D,), optional
        Its centre ``x_0`` (default 0).

    Returns
    -------
    Certificate
        ``"exact"``: ``f(x) = f̄(x)`` for every ``||x - x_0|| <= r``. Otherwise ``"sufficient condition not
        met"`` (a block's ``rank(E_i)`` over its budget, or a singular ``Q_j`` / ``P_j``), never
        ``"impossible"``.

    Raises
    ------
    InvalidArgumentError
        Bad models, ranks, partition, radius or centre.
    """
    f0 = _as_rational_fnn(frozen, "frozen")
    fbar = _as_rational_fnn(target, "target")
    n, L_, Lbar_ = f0.width, f0.depth, fbar.depth
    if fbar.width != n:
        raise InvalidArgumentError("target", f"must have the frozen model's width D = {n}, got {fbar.width}")
    if Lbar_ > L_:
        raise InvalidArgumentError("target", f"the target depth L̄ = {Lbar_} exceeds the frozen depth L = {L_}")
    if fbar.activation != f0.activation or fbar.final_relu != f0.final_relu:
        raise InvalidArgumentError(
            "target",
            f"must use the frozen model's activation and final_relu ({f0.activation!r}, "
            f"final_relu={f0.final_relu}), got ({fbar.activation!r}, final_relu={fbar.final_relu})",
        )
    ranks = as_ranks(rank, L_, n)
    rank_out = rank if isinstance(rank, numbers.Integral) else ranks
    sizes_part = uniform_partition(L_, Lbar_) if partition is None else check_partition(partition, L_, Lbar_)
    if isinstance(input_radius, (str, bytes)) or input_radius is None:
        raise InvalidArgumentError("input_radius", f"must be a positive rational number, got {input_radius!r}")
    r = _q(input_radius, "input_radius")
    if not r > 0:
        raise InvalidArgumentError("input_radius", f"must be positive, got {input_radius!r}")
    u0 = _zeros(n, 1) if center is None else _vec(center, "center", n)
    r2 = r * r
    linearise = f0.activation == "relu"
    Wf = [_dm(W, "frozen") for W in f0.weights]
    Tt = [_dm(T, "target") for T in fbar.weights]
    cs = [_dm(c, "target") for c in fbar.biases]
    blocks = partition_blocks(sizes_part)
    sizes = {"D": n, "L": L_, "Lbar": Lbar_, "partition": sizes_part}
    block_ranks = [(Tt[i] - _prod(Wf[b.start : b.stop], n)).rank() for i, b in enumerate(blocks)]
    required = max(ceil_div(rk, len(b)) for rk, b in zip(block_ranks, blocks))
    rec = _Recorder(f0, fbar)
    domain = {
        "center": _sym(u0),
        "radius_squared": sympy.Rational(int(r2.numerator), int(r2.denominator)),
        "blocks": [],
    }
    weights, biases = [], []
    try:
        for i, block in enumerate(blocks):
            label = f"block {i + 1}: "
            domain["blocks"].append((_sym(u0), sympy.Rational(int(r2.numerator), int(r2.denominator))))
            layer_names = [f"W_{l + 1}" for l in block]

            def not_met(rank_E, k, i=i, block=block):
                return (
                    f"matched rank rank(E_{i + 1}) = {rank_E} exceeds the budget Σ R_l = {k} of block "
                    f"{i + 1} (layers {block.start + 1}..{block.stop}); Theorem 3 needs no more, but this "
                    "does not prove impossibility"
                )

            adapters, M, _ = _exact_chain(
                rec,
                Wf[block.start : block.stop],
                Tt[i],
                ranks[block.start : block.stop],
                layer_names,
                label,
                NOT_MET,
                not_met,
            )
            for l, (A, B) in zip(block, adapters):
                _store(rec, f"W_{l + 1}", A, B)
            m = len(M)
            one = _ones(n)
            beta_prev = QQ(0)
            P = _eye(n)
            offset = _zeros(n, 1)  # o_j: pre-activation = P_j u + o_j
            block_biases = []
            for j in range(m - 1):
                P = M[j] * P  # (n, n) P_j
                Pu0 = P * u0  # (n, 1)
                row_sq = [sum((x * x for x in row), QQ(0)) for row in P.to_list()]
                pu = [row[0] for row in Pu0.to_list()]
                beta = QQ(0)
                if linearise:
                    beta = _choose_level(P, pu, row_sq, r2)
                b = one.scalarmul(beta) - M[j] * one.scalarmul(beta_prev)
                block_biases.append(b)
                offset = M[j] * offset + b
                rec.equal(
                    f"{label}layer {block.start + j + 1} pre-activation offset == β_{j + 1}·1",
                    offset,
                    one.scalarmul(beta),
                )
                if linearise:
                    active = all(beta + p > 0 and (beta + p) ** 2 > r2 * s for p, s in zip(pu, row_sq))
                    rec.check(
                        f"{label}layer {block.start + j + 1} ReLUs active on the ball",
                        active,
                        f"β_{j + 1} = {_short(beta)}, r^2 = {_short(r2)}; "
                        "(β + (P_j u0)_k)^2 > r^2 ||row_k(P_j)||^2 and β + (P_j u0)_k > 0 for all k",
                    )
                    if not active:  # cannot happen: _choose_level verifies it; kept as a guard
                        raise _Stop(NOT_MET, f"{label}no linearising level found for layer {block.start + j + 1}")
                beta_prev = beta
            b_last = cs[i] - M[-1] * one.scalarmul(beta_prev)
            block_biases.append(b_last)
            offset = M[-1] * offset + b_last
            rec.equal(f"{label}affine map: weight == T_{i + 1}", _prod(M, n), Tt[i])
            rec.equal(f"{label}affine map: offset == c_{i + 1}", offset, cs[i])
            weights.extend(M)
            biases.extend(block_biases)
            # the next block's input ball: the target's activations z̄_i over the current ball
            y0 = Tt[i] * u0 + cs[i]
            last = block.stop == L_
            u0 = y0 if (not linearise or (last and not f0.final_relu)) else _relu_vec(y0)
            r2 = r2 * _spectral_sq_upper(Tt[i])
    except _Stop as stop:
        return _finish(rec, "fnn", sizes, rank_out, required, domain=domain, stop=stop)
    adapted = RationalFNN(tuple(_sym(W) for W in weights), tuple(_sym(b) for b in biases), f0.activation, f0.final_relu)
    return _finish(
        rec,
        "fnn",
        sizes,
        rank_out,
        required,
        adapted=adapted,
        domain=domain,
        theorem="every block's affine map equals its target layer's and every linearising ReLU "
        "is active on its ball, so f(x) = f̄(x) for ||x - x0|| <= r "
        "(Zeng & Lee 2024, Theorem 3 / Theorem 6)",
    )


def _choose_level(P, pu, row_sq, r2):
    """A short rational ``β`` with ``β + p_k > 0`` and ``(β + p_k)^2 > r^2 s_k`` for every row ``k``.

    Starts from the float level of :func:`lora_theory.fnn.lora_fnn` (``max_k (r ||row_k|| - p_k)^+`` plus
    its safety term) and doubles the safety term until the exact squared comparison holds.
    """

    r = math.sqrt(float(r2))
    pf = np.array([float(p) for p in pu])
    rows = np.sqrt(np.array([float(s) for s in row_sq]))
    Pf = np.array([[float(v) for v in row] for row in P.to_list()])
    need = float(np.max(r * rows - pf))
    safety = SAFETY * (r * float(np.linalg.norm(Pf, 2)) + float(np.linalg.norm(pf)))
    safety = max(safety, 1e-12 * (1 + abs(need)))
    for _ in range(200):
        f = _fraction_upper(max(need, 0.0) + safety)
        beta = QQ(f.numerator, f.denominator)
        if all(beta + p > 0 and (beta + p) ** 2 > r2 * s for p, s in zip(pu, row_sq)):
            return beta
        safety *= 2
    raise _Stop(NOT_MET, "no rational linearising level found")  # pragma: no cover
