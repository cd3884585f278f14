"""LoRA adapters and biases for ReLU feed-forward networks (Zeng & Lee 2024, Theorem 3 (uniform partition)
and Theorem 6 (general partition); THEORY.md §2.2–2.3).

Symbols: the frozen FNN ``f0`` has width ``D``, depth ``L``, weights ``W_1 .. W_L`` (``frozen``); the target
``f̄`` has depth ``L̄ <= L``, weights ``T_1 .. T_L̄`` and biases ``c_1 .. c_L̄`` (``target``). A partition
(``partition``: block sizes, e.g. ``(3, 1)``) assigns consecutive frozen layers ``P_i`` to target layer
``i``; the block discrepancy is ``E_i = T_i - Π_{l ∈ P_i} W_l``. ``R`` (``rank``) is the LoRA-rank, one
int or per-layer ints ``R_l``.

Construction, block by block (the block input ``u`` lies in a ball ``||u - u_0|| <= r``, or is given by
samples):

1. Weights: Lemma 1 (:func:`lora_theory.linear._chain_adapters`) on the block's frozen factors toward
   ``T_i``; adapted factors ``M_j = W_j + Δ_j``, partial products ``P_j = M_j ... M_1``; the block realises
   ``W̃_i = P_m = Π W_l + LR_{k_i}(E_i)`` with ``k_i = Σ_{l ∈ P_i} R_l``.
2. Compensating linearising biases, ``j < m``: ``b_j = β_j·1 - M_j (β_{j-1}·1)`` (``β_0 = 0``), so the
   pre-activation of layer ``j`` is exactly ``P_j u + β_j·1``; ``β_j`` is the smallest level that keeps it
   positive on the domain, plus a small safety term (see :data:`SAFETY`).
3. Calibration: ``b_m = c_i - M_m (β_{m-1}·1)``, so the last pre-activation is ``W̃_i u + c_i``, the
   target's own when ``W̃_i = T_i``, and the same ReLU (or none, for the output layer with
   ``final_relu=False``) follows.

The next block's domain is the image of this one through the *adapted* block, last bias and ReLU included
(the authors' code sized the next block from activations that had not been through the last bias and
ReLU; that is not copied here): for a ball, centre 0 and radius ``||W̃_i||_2 r + ||W̃_i u_0 + c_i||_2``
(``||ReLU(y)|| <= ||y||``); for samples, the samples pushed through the adapted block.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _display
from ._guard import numeric_guard
from ._types import ArrayLike, Partition, Rank, Seed
from ._validate import as_array, as_positive, as_ranks, as_tolerance, ceil_div, readonly, rng_from
from .errors import InvalidArgumentError, SingularMatrixError
from .linear import _chain_checked, discrepancy_rank, product
from .models import FNN, relu
from .numerics import check_norm_finite, tolerance, verified_exact, warn_if_ill_conditioned
from .partition import best_partition, check_partition, partition_blocks, uniform_partition

__all__ = [
    "Domain",
    "BlockFit",
    "FNNFit",
    "lora_fnn",
    "block_discrepancies",
    "fnn_rank_requirement",
    "fnn_best_partition",
    "sample_ball",
    "SAFETY",
]

#: Relative safety term added to every linearising level ``β_j``: ``SAFETY · s_j`` with ``s_j`` the size of
#: the pre-activation ``P_j u`` on the domain (``r·||P_j||_2 + ||P_j u_0||_2`` on a ball, ``max |P_j u|`` on
#: samples). The forward pass computes the pre-activations with a rounding error near ``u·γ·s_j``; 1e-6
#: keeps every ReLU of the ball on its active side unless ``γ`` exceeds ~1e9 (where the fit warns anyway),
#: while it enlarges the biases, hence ``γ``, by one part in a million only.
SAFETY = 1e-6


# ----------------------------------------------------------------------------------------------- checks


def _check_models(frozen, target) -> tuple[int, int, int]:
    """Validate the frozen/target pair; return ``(L, L̄, D)``."""
    if not isinstance(frozen, FNN):
        raise InvalidArgumentError("frozen", f"must be a lora_theory.FNN, got {type(frozen).__name__}")
    if not isinstance(target, FNN):
        raise InvalidArgumentError("target", f"must be a lora_theory.FNN, got {type(target).__name__}")
    if target.width != frozen.width:
        raise InvalidArgumentError(
            "target", f"must have the frozen model's width D = {frozen.width}, got {target.width}"
        )
    if target.depth > frozen.depth:
        raise InvalidArgumentError(
            "target", f"the target depth L̄ = {target.depth} exceeds the frozen depth L = {frozen.depth}"
        )
    if target.activation != frozen.activation:
        raise InvalidArgumentError(
            "target", f"must use the frozen model's activation {frozen.activation!r}, got {target.activation!r}"
        )
    if target.final_relu != frozen.final_relu:
        raise InvalidArgumentError(
            "target",
            f"must use the frozen model's output convention final_relu={frozen.final_relu}, "
            f"got final_relu={target.final_relu}",
        )
    return frozen.depth, target.depth, frozen.width


def _partition(partition, L, Lbar) -> tuple[int, ...]:
    return uniform_partition(L, Lbar) if partition is None else check_partition(partition, L, Lbar)


def block_discrepancies(frozen: FNN, target: FNN, partition: Partition = None) -> tuple[np.ndarray, ...]:
    """The block discrepancies ``E_i = T_i - Π_{l ∈ P_i} W_l``, one ``(D, D)`` array per target layer.

    ``partition`` defaults to the uniform one (THEORY.md §2.2).
    """
    L, Lbar, _ = _check_models(frozen, target)
    sizes = _partition(partition, L, Lbar)
    return tuple(
        target.weights[i] - product(frozen.weights[b.start : b.stop]) for i, b in enumerate(partition_blocks(sizes))
    )


block_discrepancies = numeric_guard(block_discrepancies)


def _block_ranks(frozen, target, sizes) -> tuple[int, ...]:
    return tuple(
        discrepancy_rank(frozen.weights[b.start : b.stop], target.weights[i])
        for i, b in enumerate(partition_blocks(sizes))
    )


def fnn_rank_requirement(frozen: FNN, target: FNN, partition: Partition = None) -> int:
    """``max_i ceil(rank(E_i) / |P_i|)``: the smallest uniform LoRA-rank for which the construction is exact.

    The project's instance-level requirement: Zeng & Lee 2024, Theorem 6's sufficient condition
    (``Σ_{l ∈ P_i} R_l >= rank(E_i)`` for every block) with one rank for every layer, on the uniform
    partition (the default) or any consecutive ``partition``. ``rank(E_i)`` is the numeric rank of the block
    discrepancy (:func:`lora_theory.discrepancy_rank`). It is a sufficient condition: a smaller rank may still
    be exact with other adapters. On the uniform partition it is at most Theorem 3's formula
    ``ceil(max_i rank(E_i) / M)``, ``M = floor(L / L̄)``, which divides by ``M`` for every block, and smaller
    when the last, longer block carries the largest rank (``L = 3``, ``L̄ = 2``, ranks 1 and 4: 2 against 4).
    For generic weights (every ``rank(E_i) = D``) both are ``ceil(D / floor(L / L̄))``.
    """
    L, Lbar, _ = _check_models(frozen, target)
    sizes = _partition(partition, L, Lbar)
    return max(ceil_div(r, s) for r, s in zip(_block_ranks(frozen, target, sizes), sizes))


fnn_rank_requirement = numeric_guard(fnn_rank_requirement)


def fnn_best_partition(frozen: FNN, target: FNN) -> tuple[tuple[int, ...], int]:
    """The consecutive partition minimising ``max_i ceil(rank(E_i) / |P_i|)``, and that rank.

    Zeng & Lee 2024, Theorem 6 (general partition), by dynamic programming
    (:func:`lora_theory.best_partition`); never worse than the uniform partition. Ties go to the
    lexicographically smallest block sizes.
    """
    L, Lbar, _ = _check_models(frozen, target)
    return best_partition(
        lambda i, start, stop: discrepancy_rank(frozen.weights[start:stop], target.weights[i]), L, Lbar
    )


fnn_best_partition = numeric_guard(fnn_best_partition)


def sample_ball(center: ArrayLike, radius: float, n: int, seed: Seed = None) -> np.ndarray:
    """``n`` points drawn uniformly from the ball ``||x - center||_2 <= radius``, shape ``(n, D)``.

    ``center`` is an array ``(D,)``. Uniform in volume: a Gaussian direction times ``radius·U^{1/D}``
    (in high dimension most points lie near the sphere, where the certified biases are tightest).
    ``seed``: None, an integer ``>= 0`` or a numpy Generator. Raises
    :class:`~lora_theory.errors.InvalidArgumentError` for an empty or non-finite centre, a radius that is not
    positive and finite, a bad ``n`` or ``seed``.
    """
    center = as_array(center, "center", ndim=1)
    if center.size == 0:
        raise InvalidArgumentError("center", "must have at least one coordinate (D >= 1), got an empty array")
    radius = as_positive(radius, "radius")
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 0:
        raise InvalidArgumentError("n", f"must be a non-negative integer, got {n!r}")
    rng = rng_from(seed)
    D = center.shape[0]
    g = rng.standard_normal((int(n), D))  # (n, D)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), np.finfo(float).tiny)
    scale = radius * rng.uniform(size=(int(n), 1)) ** (1.0 / D)  # (n, 1)
    # shrink by one part in 1e12 so that the rounding of the direction's norm never puts a point outside the
    # ball about 0 (adding a centre rounds each point by up to about u·||center|| more)
    return center + g * scale * (1.0 - 1e-12)


sample_ball = numeric_guard(sample_ball)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class Domain:
    """The input domain the linearising biases were sized for.

    Attributes
    ----------
    kind : {"ball", "samples"}
        ``"ball"``: certified for every ``x`` with ``||x - center||_2 <= radius``. ``"samples"``: empirical,
        sized on ``n_samples`` inputs with the multiplicative ``margin``; other inputs may break it.
    center : ndarray (D,) or None
        Centre of the ball (``None`` for samples).
    radius : float or None
        Radius of the ball (``None`` for samples).
    margin : float or None
        The multiplicative margin of the sample mode (``None`` for a ball).
    n_samples : int or None
        How many samples the biases were sized on (``None`` for a ball).
    block_input_radii : tuple of float
        For every block, the radius of the ball its input was certified in (centre ``center`` for block 1,
        0 after), or for samples the largest norm of the sampled block inputs.
    """

    kind: str
    center: np.ndarray | None
    radius: float | None
    margin: float | None
    n_samples: int | None
    block_input_radii: tuple = ()

    __repr__ = _display.domain_repr

    def contains(self, x: ArrayLike, rtol: float = 1e-12) -> np.ndarray | bool:
        """Whether ``x`` (``(D,)`` or ``(n, D)``) lies in the certified ball (always ``False`` for samples).

        ``rtol`` (finite, ``>= 0``; None for the default 1e-12) widens the radius by that fraction, for the
        rounding of points built on the sphere.
        """
        rtol = as_tolerance(rtol, "rtol")
        rtol = 1e-12 if rtol is None else rtol
        x = np.asarray(x, dtype=np.float64)
        if self.kind != "ball":
            return np.zeros(x.shape[:-1], dtype=bool) if x.ndim > 1 else False
        inside = np.linalg.norm(x - self.center, axis=-1) <= self.radius * (1 + rtol)
        return inside if x.ndim > 1 else bool(inside)


@dataclass(frozen=True, eq=False)
class BlockFit:
    """What the construction did in one block (target layer ``i``, frozen layers ``P_i``).

    Attributes
    ----------
    layers : range
        0-based indices of the frozen layers in the block.
    adapters : tuple of Adapter
        One per layer of the block.
    discrepancy : ndarray (D, D)
        ``E_i = T_i - Π_{l ∈ P_i} W_l``.
    singular_values : ndarray (D,)
        ``σ(E_i)``, descending.
    discrepancy_rank : int
        Numeric ``rank(E_i)``.
    budget : int
        ``Σ_{l ∈ P_i} R_l``.
    directions : int
        ``k_i``: singular directions the block received, ``min(budget, rank(E_i))``.
    error : float
        ``ε_i = ||W̃_i - T_i||_2 = σ_{k_i+1}(E_i)`` (0 when ``k_i = rank(E_i)``).
    realised : ndarray (D, D)
        ``W̃_i = Π_{l ∈ P_i}(W_l + Δ_l)``.
    levels : tuple of float
        The linearising levels ``β_1 .. β_{m-1}`` (empty for a one-layer block).
    condition_numbers : dict of str -> float
        ``κ`` of what Lemma 1 solved with in this block (block-local names ``Q_j``, ``P_j``).
    input_radius, output_radius : float
        Size of the block's input and output on the domain (ball radii, or largest sampled norms).
    gamma : float
        This block's amplification ``γ_i`` (see :class:`FNNFit`).
    """

    layers: range
    adapters: tuple
    discrepancy: np.ndarray
    singular_values: np.ndarray
    discrepancy_rank: int
    budget: int
    directions: int
    error: float
    realised: np.ndarray
    levels: tuple
    condition_numbers: dict
    input_radius: float
    output_radius: float
    gamma: float

    __repr__ = _display.block_fit_repr

    @property
    def exact(self) -> bool:
        """``Σ_{l ∈ P_i} R_l >= rank(E_i)``."""
        return self.budget >= self.discrepancy_rank


@dataclass(frozen=True, eq=False)
class FNNFit:
    """Adapters and biases of Zeng & Lee 2024, Theorem 3 / Theorem 6, and what they predict.

    Attributes
    ----------
    adapters : tuple of Adapter
        One per frozen layer (``adapters[l].rank <= ranks[l]``).
    model : FNN
        The adapted network: weights ``W_l + Δ_l``, the new biases, the frozen model's activation convention.
    ranks : tuple of int
        The per-layer budgets ``R_l``.
    partition : tuple of int
        Block sizes ``|P_i|``.
    block_fits : tuple of BlockFit
        Per-block details.
    exact : bool
        The rank suffices (:attr:`rank_sufficient`: then ``f = f̄`` on the domain in exact arithmetic) *and*
        float64 kept it: on the check points of the domain (:attr:`measured_error`) the adapted network is
        within :attr:`tolerance` of the target relative to ``s_out``, and ``tolerance ·``
        :attr:`radius_amplification` is at most :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT` (1: the
        bound keeps at least the order of magnitude of outputs within distance 1 of the centre).
    condition_numbers : dict of str -> float
        ``κ`` of every matrix inverted, named ``"block i: Q_j"`` / ``"block i: P_j"`` (1-based, ``j`` local
        to the block).
    kappa : float
        The largest of them (1 when nothing was inverted).
    gamma : float
        The bias amplification ``γ = Σ_i γ_i``, with
        ``γ_i = (Σ_{j=1..m_i} ||M_{m_i} ... M_{j+1}||_2 ((||W_j||_2 + ||Δ_j||_2) s_{j-1} + ||b_j||_2)
        + (||T_i||_2 + ||Π_{l ∈ P_i} W_l||_2) s_0) / s_out`` (the adapted factor ``M_j = W_j + Δ_j`` rounds
        relative to the magnitudes added, and the block product inherits the rounding of
        ``E_i = T_i - Π W_l``, relative to both terms of the difference): ``s_{j-1}``
        bounds the norm of the input to layer ``j`` of block ``i`` on the domain (ball:
        ``||P_{j-1} u_0|| + r·||P_{j-1}||_2 + β_{j-1}√D``; samples: the largest sampled norm), ``s_out`` the
        norm of the block's output (ball: the next radius; samples: the largest sampled pre-activation).
        Layer ``j`` adds terms of size ``||M_j|| s_{j-1}`` and ``||b_j||``, so it rounds with an absolute
        error near ``u`` times that, which the layers after it carry to the block output (ReLUs active):
        ``u·γ_i`` is the first-order relative rounding of block ``i``. It is about ``m_i`` when the biases
        and the partial products are small, and large when the linearising levels dwarf the signal.
    domain : Domain
        What the biases were sized for.
    tolerance : float
        ``numerics.tolerance(kappa, gamma)``, a bound on the rounding error *relative to the size of the
        outputs on the whole domain*: when ``exact``, ``||f(x) - f̄(x)||_2 <= tolerance · s_out`` for every
        ``x`` of the domain, ``s_out`` (:attr:`output_radius`) the bound on the output norm over the domain
        (ball: the last block's output radius). Read as a relative error ``||f(x) - f̄(x)|| / ||f̄(x)||`` it
        covers only inputs whose outputs have norm near ``s_out`` (inputs near the sphere of a ball, or a
        batch of them). It does *not* cover inputs far inside a large ball: the linearising biases are sized
        for the radius, so the rounding is an absolute ``u·(κ + γ)·s_out`` wherever ``x`` lies, and an input
        with ``||f̄(x)|| << s_out`` sees it magnified by ``s_out / ||f̄(x)||`` (N(0, I) inputs in a ball of
        radius 1e5 have relative errors near 7e-10 where ``tolerance`` is 3e-10). Use
        :attr:`absolute_tolerance` or :meth:`tolerance_at` there.
    frozen, target : FNN
        The inputs.
    rank_sufficient : bool
        ``Σ_{l ∈ P_i} R_l >= rank(E_i)`` for every block (Theorems 3 / 6: exact in exact arithmetic).
    measured_error : float
        ``max ||f(x) - f̄(x)||_2 / s_out`` over the check points, computed in float64 after the construction:
        for a ball, its centre, the points of the sphere where each linearised ReLU of the first block is
        closest to switching (``u_0 - r·p_k / ||p_k||``, ``p_k`` row ``k`` of ``P_j``), 64 points drawn
        uniformly in the ball and 16 within distance 1 of the centre; for samples, the samples (at most
        1024 of them, evenly spaced).
    """

    adapters: tuple
    model: FNN
    ranks: tuple
    partition: tuple
    block_fits: tuple
    exact: bool
    condition_numbers: dict
    kappa: float
    gamma: float
    domain: Domain
    tolerance: float
    frozen: FNN = field(repr=False, default=None)
    target: FNN = field(repr=False, default=None)
    rank_sufficient: bool = False
    measured_error: float = float("nan")

    __repr__ = _display.fnn_fit_repr
    _repr_markdown_ = _display.fnn_fit_markdown

    @property
    def output_radius(self) -> float:
        """``s_out``: bound on ``||f̄(x)||_2`` (and ``||f(x)||_2``) over the domain, the last block's output size.

        Ball: ``||W̃_L̄||_2 r_L̄ + ||W̃_L̄ u_0 + c_L̄||_2`` (ReLU never increases a norm); samples: the largest
        sampled output pre-activation norm.
        """
        return float(self.block_fits[-1].output_radius)

    @property
    def absolute_tolerance(self) -> float:
        """``tolerance · s_out``: when ``exact``, ``||f(x) - f̄(x)||_2`` is at most this for every ``x`` of the domain.

        Why: block ``i`` rounds with an absolute error near ``u·γ_i·s_i`` at its output (``s_i`` its output
        size; :attr:`gamma`), and its weights with ``u·κ`` times ``s_i``; the blocks after it carry that
        error at most as far as they carry their input, ``s_{i+1} >= ||W̃_{i+1}||_2 s_i``, so at the network's
        output every term is at most ``u·(κ + γ_i)·s_out``, and their sum ``u·(κ + γ)·s_out``. ``tolerance``
        holds the constant ``c`` and the 1e-10 floor on top. A statement of size, not of place: it holds as
        well at an input of norm 1e-3 as on the sphere of the ball.
        """
        return float(self.tolerance * self.output_radius)

    @property
    def radius_amplification(self) -> float:
        """``a = s_out / s_1``: how much the domain's size magnifies the rounding seen by unit-size inputs.

        ``s_1`` is the output bound of the ball of radius ``min(r, 1)`` around the same centre, propagated
        through the realised blocks as :attr:`output_radius` is (``s_i = ||W̃_i||_2 r_{i-1} + ||W̃_i u_0 + c_i||``).
        An input within distance 1 of the centre has outputs of size at most ``s_1`` and an absolute rounding
        error of size ``u·(κ + γ)·s_out`` (:attr:`absolute_tolerance`), so its relative error can reach
        ``u·(κ + γ)·a``: the :class:`~lora_theory.errors.IllConditionedWarning` of :func:`lora_fnn` is raised
        on that value. 1 for radii ``<= 1`` and for sample domains (the biases are sized on the data).
        """
        if self.domain.kind != "ball":
            return 1.0
        return _radius_amplification(
            [bf.realised for bf in self.block_fits],
            self.target.biases,
            self.domain.center,
            self.domain.radius,
            self.output_radius,
        )

    def tolerance_at(self, x: ArrayLike) -> np.ndarray | float:
        """Per-sample relative tolerance ``tolerance · s_out / ||f̄(x)||_2`` (Zeng & Lee 2024, Theorem 3 in float64).

        :attr:`absolute_tolerance` divided by the target's output norm at ``x``: when ``exact``,
        ``||f(x) - f̄(x)||_2 / ||f̄(x)||_2 <= tolerance_at(x)`` for every ``x`` of the domain. It equals
        :attr:`tolerance` for inputs whose outputs have the domain's full size ``s_out``, and grows as
        ``s_out / ||f̄(x)||`` for inputs far inside a large ball.

        Parameters
        ----------
        x : array (D,) or (n, D)

        Returns
        -------
        float or ndarray (n,)
            ``inf`` where ``f̄(x) = 0`` (only the absolute bound applies) and, for a ball domain, at inputs
            outside the certified ball (no guarantee there: a ReLU may switch). For a sample domain the
            value is as empirical as the domain.
        """
        x = as_array(x, "x")
        X = np.atleast_2d(x)
        if x.ndim > 2 or X.shape[1] != self.target.width:
            raise InvalidArgumentError(
                "x", f"must have shape (D,) or (n, D) with D = {self.target.width}, got {x.shape}"
            )
        ref = np.linalg.norm(self.target(X), axis=1)  # (n,) ||f̄(x)||
        tol = np.full(ref.shape, np.inf)
        np.divide(self.absolute_tolerance, ref, out=tol, where=ref > 0)
        if self.domain.kind == "ball":
            tol[~np.asarray(self.domain.contains(X))] = np.inf
        return float(tol[0]) if x.ndim == 1 else tol

    @property
    def block_discrepancy_ranks(self) -> tuple:
        """``rank(E_i)`` for every block."""
        return tuple(b.discrepancy_rank for b in self.block_fits)

    @property
    def block_directions(self) -> tuple:
        """``k_i``: singular directions each block received."""
        return tuple(b.directions for b in self.block_fits)

    @property
    def block_errors(self) -> tuple:
        """``ε_i = σ_{k_i+1}(E_i)``."""
        return tuple(b.error for b in self.block_fits)

    @property
    def ranks_used(self) -> tuple:
        return tuple(a.rank for a in self.adapters)

    @property
    def weights(self) -> tuple:
        return self.model.weights

    @property
    def biases(self) -> tuple:
        return self.model.biases


# ------------------------------------------------------------------------------------------ construction


def _radius_amplification(realised, target_biases, center, radius, s_out) -> float:
    """``s_out / s_1`` of :attr:`FNNFit.radius_amplification` (also of the raised-precision fit): ``s_1`` is the
    output bound of the ball of radius ``min(r, 1)`` about ``center``, propagated through the realised block
    products ``W̃_i`` ``(D, D)`` and the target biases ``c_i`` as ``s_i = ||W̃_i||_2 s_{i-1} + ||W̃_i u_0 + c_i||``
    (``u_0`` the centre for the first block, 0 after)."""
    s, u0 = min(float(radius), 1.0), np.asarray(center, dtype=np.float64)
    for W_tilde, c in zip(realised, target_biases):
        s = float(np.linalg.norm(W_tilde, 2) * s + np.linalg.norm(W_tilde @ u0 + c))
        u0 = np.zeros_like(u0)
    return max(s_out / s, 1.0) if s > 0 else 1.0


def _block_error(s: np.ndarray, k: int, rank_E: int) -> float:
    """``σ_{k+1}`` of a discrepancy, 0 once ``k`` covers its numeric rank."""
    return float(s[k]) if k < rank_E else 0.0


def _domain_args(input_radius, center, inputs, margin, D):
    if input_radius is None and center is not None:
        raise InvalidArgumentError("center", "a centre needs input_radius (it defines a ball); samples have none")
    if input_radius is None and inputs is None:
        raise InvalidArgumentError(
            "input_radius", "no domain given: pass input_radius (a certified ball) or inputs (samples)"
        )
    if input_radius is not None and inputs is not None:
        raise InvalidArgumentError(
            "inputs", "two domains given: pass either input_radius (a ball) or inputs (samples), not both"
        )
    if (
        isinstance(margin, (bool, np.bool_))
        or not isinstance(margin, numbers.Real)
        or not math.isfinite(margin)
        or margin < 1
    ):
        raise InvalidArgumentError("margin", f"must be a finite real number >= 1 (multiplicative), got {margin!r}")
    if input_radius is not None:
        if isinstance(input_radius, (bool, np.bool_)) or not isinstance(input_radius, numbers.Real):
            raise InvalidArgumentError("input_radius", f"must be a real number, got {input_radius!r}")
        radius = float(input_radius)
        if not math.isfinite(radius) or radius <= 0:
            raise InvalidArgumentError("input_radius", f"must be positive and finite, got {input_radius!r}")
        c = np.zeros(D) if center is None else as_array(center, "center", shape=(D,))
        return "ball", c, radius, None
    X = as_array(inputs, "inputs", ndim=2, shape=(None, D))
    if X.shape[0] == 0:
        raise InvalidArgumentError("inputs", "must hold at least one sample")
    return "samples", None, None, X


def _ball_level_size(pu0_norm: float, r: float, p_norm: float, beta: float, D: int) -> float:
    """``s_j = ||P_j u_0|| + r·||P_j||_2 + β_j·√D``: a bound on the input ``P_j u + β_j·1`` of layer ``j + 1`` over
    the ball ``||u - u_0|| <= r`` (the ReLUs active); shared by the float64 and mpmath constructions."""
    return float(pu0_norm) + float(r) * float(p_norm) + float(beta) * math.sqrt(D)


def _block_gamma(added, bias_norms, level_sizes, after, target_norm, frozen_norm, in_size, out_size) -> float:
    """``γ_i``, the rounding of block ``i`` relative to its output size (THEORY.md §2.3); shared by the float64
    construction and :func:`lora_theory.highprec.lora_fnn_mp`, which count it alike.

    Layer ``j`` of the block (``m`` layers) applied to an input of size ``s_{j-1}`` sums magnitudes
    ``rounding[j] = (||W_j||_2 + ||Δ_j||_2) s_{j-1} + ||b_j||_2``, from ``added[j] = ||W_j||_2 + ||Δ_j||_2``,
    ``bias_norms[j] = ||b_j||_2`` and the sizes ``s_0 = in_size``, ``s_j = level_sizes[j-1]`` (``m - 1`` of
    them); ``after[j]``: ``||M_m ... M_{j+1}||_2``, the adapted layers after ``j`` that carry its rounding to
    the block output (1 for the last). ``E_i = T_i - Π W_l`` is itself a float64 difference, so the realised
    ``W̃_i`` inherits its rounding, relative to both terms: ``(||T_i||_2 + ||Π W_l||_2)·in_size``. Returns
    ``Σ_j after[j]·rounding[j] + that``, over ``out_size`` (0 when the output size is 0).
    """
    sizes = (in_size, *level_sizes)  # s_0 ... s_{m-1}
    rounding = [a * s + nb for a, s, nb in zip(added, sizes, bias_norms)]
    amplified = sum(a * t for a, t in zip(after, rounding))
    amplified += (target_norm + frozen_norm) * in_size
    return float(amplified / out_size) if out_size > 0 else 0.0


def lora_fnn(
    frozen: FNN,
    target: FNN,
    rank: Rank,
    *,
    partition: Partition = None,
    input_radius: float | None = None,
    center: ArrayLike | None = None,
    inputs: ArrayLike | None = None,
    margin: float = 2.0,
) -> FNNFit:
    """LoRA adapters and biases that make a frozen ReLU FNN equal a shallower target on a domain.

    Zeng & Lee 2024, Theorem 3 (uniform partition) and Theorem 6 (general partition, per-layer ranks);
    THEORY.md §2.3. Exact when ``Σ_{l ∈ P_i} R_l >= rank(E_i)`` for every block (generic weights:
    ``R >= ceil(D / floor(L / L̄))``); below that every block realises ``Π W_l + LR_{k_i}(E_i)`` and the error
    obeys the bound of :func:`lora_theory.bounds.fnn_error_bound`.

    Parameters
    ----------
    frozen : FNN
        ``f0``: depth ``L``, weights ``W_l`` (its biases are replaced).
    target : FNN
        ``f̄``: depth ``L̄ <= L``, weights ``T_i``, biases ``c_i``; same width ``D``, activation and
        ``final_relu`` as ``frozen``.
    rank : int in 0..D, or sequence of L such ints
        ``R`` for every layer or the per-layer ``R_l`` (0: no adapter, biases only).
    partition : sequence of L̄ positive ints summing to L, optional
        Block sizes ``|P_i|``; default the uniform partition.
    input_radius : float, optional
        Certify the ball ``||x - center||_2 <= input_radius``.
    center : array (D,), optional
        Centre of that ball (default 0); only with ``input_radius``.
    inputs : array (n, D), optional
        Size the biases on these samples instead (empirical): ``β_j = margin · max(0, -min P_j u)`` over the
        sampled block inputs ``u``, plus the safety term.
    margin : float >= 1
        Multiplicative margin of the sample mode (the authors used 2).

    Returns
    -------
    FNNFit

    Raises
    ------
    InvalidArgumentError
        Not FNNs, widths or activation conventions differ, ``L̄ > L`` (argument ``target``); bad ``rank``,
        ``partition``, ``center``, ``inputs`` or ``margin``; no domain or two domains; a non-positive radius.
    SingularMatrixError
        A matrix Lemma 1 must invert inside a block is singular (names the block, the matrix and ``κ``).

    Warns
    -----
    IllConditionedWarning
        When ``u·(κ + γ)·a`` exceeds 1e-8, ``a`` = :attr:`FNNFit.radius_amplification` (1 for radii ``<= 1``
        and for samples): the relative error to expect on inputs within distance 1 of the ball's centre,
        since the biases, sized for the radius, make the rounding absolute (:attr:`FNNFit.absolute_tolerance`).
        A ball much larger than the inputs to be evaluated costs digits; certify the ball the inputs need.
    """
    L, Lbar, D = _check_models(frozen, target)
    ranks = as_ranks(rank, L, D)
    sizes = _partition(partition, L, Lbar)
    kind, u0, r, X = _domain_args(input_radius, center, inputs, margin, D)
    center0 = u0
    linearise = frozen.activation == "relu"

    adapters, weights, biases, block_fits, kappas, input_radii = [], [], [], [], {}, []
    first_block_partials = []  # P_j of block 1, for the check
    U = X  # (n, D) sampled block inputs
    for i, block in enumerate(partition_blocks(sizes)):
        factors = frozen.weights[block.start : block.stop]
        T, c = target.weights[i], target.biases[i]
        names = [f"W_{l + 1}" for l in block]
        check_norm_finite(T - product(factors), f"E_{i + 1}")
        try:
            block_adapters, E, s, rank_E, block_kappas = _chain_checked(
                factors, T, ranks[block.start : block.stop], names=names
            )
        except SingularMatrixError as exc:
            raise SingularMatrixError(
                f"block {i + 1}: {exc.matrix}",
                exc.condition_number,
                f"block {i + 1} holds layers {block.start + 1}..{block.stop}",
            ) from None
        for name, k in block_kappas.items():
            kappas[f"block {i + 1}: {name}"] = k
        M = [W + a.delta for W, a in zip(factors, block_adapters)]  # adapted factors, each (D, D)
        m = len(M)

        # sizes on the domain: input norm bound, then one level per inner layer
        if kind == "ball":
            in_size = float(np.linalg.norm(u0)) + r
        else:
            in_size = float(np.max(np.linalg.norm(U, axis=1)))
        input_radii.append(r if kind == "ball" else in_size)
        levels, block_biases = [], []
        beta_prev, P = 0.0, np.eye(D)
        level_sizes = []  # s_j, the size of layer j + 1's input (the rounding bookkeeping, _block_gamma)
        added = [
            float(np.linalg.norm(W, 2) + np.linalg.norm(a.delta, 2))  # magnitudes summed in M_j
            for W, a in zip(factors, block_adapters)
        ]
        for j in range(m - 1):
            P = M[j] @ P  # (D, D) P_j
            if i == 0:
                first_block_partials.append(P)
            if kind == "samples":
                pre = U @ P.T  # (n, D) P_j u (its size: s_j below)
            if not linearise:
                beta = 0.0
            elif kind == "ball":
                Pu0 = P @ u0  # (D,)
                rows = np.linalg.norm(P, axis=1)  # (D,)
                need = float(np.max(r * rows - Pu0))
                beta = max(need, 0.0) + SAFETY * (r * np.linalg.norm(P, 2) + np.linalg.norm(Pu0))
            else:
                beta = margin * max(-float(pre.min()), 0.0) + SAFETY * float(np.abs(pre).max())
            b = beta * np.ones(D) - M[j] @ (beta_prev * np.ones(D))  # (D,)
            block_biases.append(b)
            levels.append(beta)
            # s_j: the input to layer j + 1 is P_j u + β_j·1 (ReLU active)
            if kind == "ball":
                level_sizes.append(_ball_level_size(np.linalg.norm(P @ u0), r, np.linalg.norm(P, 2), beta, D))
            else:
                level_sizes.append(float(np.max(np.linalg.norm(pre + beta, axis=1))))
            beta_prev = beta
        b_last = c - M[-1] @ (beta_prev * np.ones(D))  # (D,) calibrating bias
        block_biases.append(b_last)
        W_tilde = product(M)  # (D, D) realised block product

        # the block's output on the domain: through the last bias and ReLU, as the next block sees it
        if kind == "ball":
            out_size = float(np.linalg.norm(W_tilde, 2) * r + np.linalg.norm(W_tilde @ u0 + c))
        else:
            Z = U
            for j, (Mj, bj) in enumerate(zip(M, block_biases)):
                Z = Z @ Mj.T + bj  # (n, D) pre-activation
                if j == m - 1:
                    out_size = float(np.max(np.linalg.norm(Z, axis=1)))
                if linearise and (block.start + j < L - 1 or frozen.final_relu):
                    Z = relu(Z)
        bias_norms = [float(np.linalg.norm(b)) for b in block_biases]
        after = [float(np.linalg.norm(product(M[j + 1 :]), 2)) for j in range(m - 1)] + [1.0]
        norms = (float(np.linalg.norm(T, 2)), float(np.linalg.norm(product(factors), 2)))
        gamma_i = _block_gamma(added, bias_norms, level_sizes, after, *norms, in_size, out_size)

        k_i = sum(a.rank for a in block_adapters)
        block_fits.append(
            BlockFit(
                layers=block,
                adapters=block_adapters,
                discrepancy=readonly(E),
                singular_values=readonly(s),
                discrepancy_rank=rank_E,
                budget=sum(ranks[block.start : block.stop]),
                directions=k_i,
                error=_block_error(s, k_i, rank_E),
                realised=readonly(W_tilde),
                levels=tuple(levels),
                condition_numbers=dict(block_kappas),
                input_radius=input_radii[-1],
                output_radius=out_size,
                gamma=gamma_i,
            )
        )
        adapters.extend(block_adapters)
        weights.extend(M)
        biases.extend(block_biases)

        # the next block's domain
        if kind == "ball":
            u0, r = np.zeros(D), out_size
        else:
            U = Z

    model = FNN(weights, biases, activation=frozen.activation, final_relu=frozen.final_relu)
    kappa = max(kappas.values(), default=1.0)
    gamma = float(sum(b.gamma for b in block_fits))
    domain = Domain(
        kind=kind,
        center=readonly(center0) if kind == "ball" else None,
        radius=float(input_radius) if kind == "ball" else None,
        margin=float(margin) if kind == "samples" else None,
        n_samples=int(X.shape[0]) if kind == "samples" else None,
        block_input_radii=tuple(float(v) for v in input_radii),
    )
    sufficient = all(b.exact for b in block_fits)
    fit = FNNFit(
        adapters=tuple(adapters),
        model=model,
        ranks=ranks,
        partition=sizes,
        block_fits=tuple(block_fits),
        exact=sufficient,
        condition_numbers=kappas,
        kappa=kappa,
        gamma=gamma,
        domain=domain,
        tolerance=tolerance(kappa, gamma),
        frozen=frozen,
        target=target,
        rank_sufficient=sufficient,
    )
    a = fit.radius_amplification
    reason = (
        ""
        if a <= 1
        else (
            f"on inputs within distance 1 of the centre, whose outputs can be a = {a:.3g} times smaller than the "
            f"output size {fit.output_radius:.3g} the biases for radius {domain.radius:g} are sized for; certify "
            "a smaller ball if the inputs are smaller"
        )
    )
    warn_if_ill_conditioned(
        kappa, gamma, what="FNN construction (Theorem 3)", amplification=a, amplification_reason=reason
    )
    # check the claim on what float64 built, on the fit's own domain
    points = _check_points(domain, X, first_block_partials)
    s_out = fit.output_radius
    miss = float(np.max(np.linalg.norm(model(points) - target(points), axis=1)))
    measured = miss / s_out if s_out > 0 else miss
    exact = verified_exact(sufficient, measured, fit.tolerance, a, what="FNN construction (Theorem 3)")
    object.__setattr__(fit, "exact", exact)
    object.__setattr__(fit, "measured_error", measured)
    return fit


lora_fnn = numeric_guard(lora_fnn)


#: How many sampled points :func:`lora_fnn` checks its fit on, beside the points where ReLUs switch first.
CHECK_SAMPLES = 64


def _check_points(domain: Domain, X, partials) -> np.ndarray:
    """The inputs :func:`lora_fnn` checks its result on (see :attr:`FNNFit.measured_error`), shape ``(n, D)``.

    ``X``: the samples of a sample domain; ``partials``: the partial products ``P_j`` of the first block.
    """
    if domain.kind == "samples":
        if X.shape[0] > 1024:
            X = X[np.linspace(0, X.shape[0] - 1, 1024).astype(int)]
        return X
    u0, r = domain.center, float(domain.radius)
    points = [u0[None, :]]
    for P in partials:  # P_j of the first block, (D, D)
        rows = np.linalg.norm(P, axis=1)  # (D,)
        keep = rows > 0
        # where row k of P_j u + β_j is smallest on the ball: u_0 - r p_k / ||p_k||
        points.append(u0 - r * (P[keep] / rows[keep, None]) * (1.0 - 1e-12))
    rng = np.random.default_rng(0)
    points.append(sample_ball(u0, r, CHECK_SAMPLES, seed=rng))
    points.append(sample_ball(u0, min(r, 1.0), 16, seed=rng))
    return np.concatenate(points, axis=0)
