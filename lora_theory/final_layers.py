"""Tuning only the final layers can fail where LoRA succeeds (Zeng & Lee 2024, Lemma 4; THEORY.md §2.5).

Keep the first layer ``x -> ReLU(W_1 x + b_1)`` of the frozen FNN and tune every weight and bias of the
layers after it. The first layer is not injective: for ``x`` and ``x' = x + W_1^{-1} d`` with ``d`` supported
on coordinates where ``W_1 x + b_1`` and ``W_1 x' + b_1`` are both negative, ``ReLU(W_1 x + b_1) =
ReLU(W_1 x' + b_1)``, so every tuning ``g`` of the final layers gives both the same output. A generic target
``f̄`` separates them, so on any domain holding such a pair no final-layers tuning ``g`` equals ``f̄``; in
sup norm its error on the domain is at least ``||f̄(x) - f̄(x')|| / 2``. LoRA on all layers with
``R >= ceil(D / L)`` does equal a one-layer target (Theorem 3), with ``2RDL`` parameters against ``l·D^2`` for
the last ``l`` layers.

:func:`final_layers_witness` makes this checkable on a stated ball: it searches for the pair that maximises
the target's separation and reports it, or says that the domain holds none, and why. A singular ``W_1``
gives the pair without any ReLU: ``x' = x + v`` with ``v`` in the kernel of ``W_1`` has the same first-layer
pre-activation as ``x``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _display
from ._guard import numeric_guard
from ._types import ArrayLike, Rank, Seed
from ._validate import as_array, as_bool, as_int, as_ranks, readonly
from .errors import InvalidArgumentError, SingularMatrixError
from .fnn import sample_ball
from .models import FNN
from .numerics import check_invertible, finite_solve, numeric_rank, unit_roundoff
from .partition import MAX_DEPTH

__all__ = ["Witness", "final_layers_witness", "lora_parameter_count", "final_layers_parameter_count"]

#: A pair counts as a witness only if the target separates it by more than this many roundings of its
#: outputs (``separation > MIN_ROUNDING_RATIO · u · max(||f̄(x)||, ||f̄(x')||)``): below that the separation
#: could be an artefact of floating point and proves nothing.
MIN_ROUNDING_RATIO = 1e6

#: Coordinates of the support of ``d`` must stay below ``-NEGATIVITY · scale`` at both points
#: (``scale = ||W_1||_2 (||center|| + radius) + ||b_1||``), so that rounding cannot switch their ReLU on.
NEGATIVITY = 1e-9


@dataclass(frozen=True, eq=False)
class Witness:
    """A pair of inputs that no tuning of the final layers can tell apart but the target does (Lemma 4).

    Attributes
    ----------
    found : bool
        Whether the search found a pair in the domain separated far above rounding. ``False`` is a proof
        only where the reason says so (no ReLU in the first layer, or ``b_1`` keeping every first-layer
        unit positive on the ball); otherwise it means a heuristic search found none.
    reason : str
        Why (or why not): e.g. ``b_1`` keeps every first-layer pre-activation positive on the ball.
    x, x_prime : ndarray (D,) or None
        The pair, both in the ball; ``x' = x + W_1^{-1} d`` (``mechanism="relu"``) or ``x' = x + v`` with
        ``W_1 v = 0`` (``mechanism="kernel"``).
    d : ndarray (D,) or None
        ``W_1 (x' - x)``: the change of the first-layer pre-activation, zero off ``coordinates`` (for a
        kernel witness, computed, at rounding level).
    coordinates : tuple of int
        The support of ``d``: first-layer units negative at both points (empty for a kernel witness, which
        needs no unit switched off).
    separation : float
        ``||f̄(x) - f̄(x')||_2`` (0 when no pair was found).
    relative_separation : float
        ``separation / max(||f̄(x)||, ||f̄(x')||)``.
    rounding_ratio : float
        ``separation / (u · max(||f̄(x)||, ||f̄(x')||))``: how many roundings the separation spans.
    first_layer_gap : float
        ``||h(x) - h(x')|| / max(||h(x)||, ||h(x')||)`` with ``h`` the frozen first layer (0 when both are 0):
        rounding level for a witness (the frozen first layer maps both inputs to the same point).
    lower_bound : float
        ``separation / 2``: every tuning ``g`` of the final layers has ``max(||g(h(x)) - f̄(x)||,
        ||g(h(x')) - f̄(x')||) >= lower_bound`` on the domain.
    center : ndarray (D,)
    radius : float
        The ball searched.
    mechanism : {"relu", "kernel"}
        How the first layer merges the pair: ReLU units negative at both points (invertible ``W_1``), or
        ``x' - x`` in the kernel of a singular ``W_1``.
    """

    found: bool
    reason: str
    x: np.ndarray | None
    x_prime: np.ndarray | None
    d: np.ndarray | None
    coordinates: tuple
    separation: float
    relative_separation: float
    rounding_ratio: float
    first_layer_gap: float
    lower_bound: float
    center: np.ndarray
    radius: float
    mechanism: str = "relu"

    __repr__ = _display.witness_repr

    def __bool__(self) -> bool:
        return self.found


def _none(reason, center, radius):
    return Witness(
        found=False,
        reason=reason,
        x=None,
        x_prime=None,
        d=None,
        coordinates=(),
        separation=0.0,
        relative_separation=0.0,
        rounding_ratio=0.0,
        first_layer_gap=0.0,
        lower_bound=0.0,
        center=readonly(center),
        radius=radius,
    )


def final_layers_witness(
    frozen: FNN,
    target: FNN,
    *,
    input_radius: float | None = None,
    center: ArrayLike | None = None,
    seed: Seed = 0,
    n_starts: int = 64,
    n_directions: int = 32,
    n_refine: int = 20,
) -> Witness:
    """Search a ball for the pair of Lemma 4 (Zeng & Lee 2024): equal after the frozen first layer, far apart
    under the target.

    Parameters
    ----------
    frozen : FNN
        The frozen model; only its first layer ``W_1`` (``frozen.weights[0]``), ``b_1`` matters (the layers
        after it are the ones tuned).
    target : FNN
        ``f̄``, any depth, the frozen model's width ``D``.
    input_radius : float > 0
        Radius of the domain ``||x - center||_2 <= input_radius`` (required: a witness is about a domain).
    center : array (D,), optional
        Its centre (default 0).
    seed : int >= 0, None or numpy Generator
        For the random search.
    n_starts, n_directions, n_refine : int
        Search effort: random starting points ``x`` (besides the centre and the points where each
        first-layer unit is most negative), random directions ``d`` per start (besides each unit's own and
        the one the target's Jacobian at ``x`` stretches most), and rounds of local refinement around the
        best pair. Defaults: 64, 32 and 20.

    Returns
    -------
    Witness
        ``found=False`` with the reason when ``b_1`` keeps every first-layer unit positive on the ball (the
        first layer is then affine and injective there, and final-layers tuning can undo it, e.g.
        ``W_2 = T_1 W_1^{-1}`` for a one-layer target), when the first layer has no ReLU (and ``W_1`` is
        invertible), or when the best separation found is at rounding level.

        A singular ``W_1`` (to working precision, as :func:`~lora_theory.numerics.check_invertible`) gives
        the pair trivially, with or without ReLU: ``x' = x + v`` with ``v`` in its numeric kernel has
        ``W_1 x' + b_1 = W_1 x + b_1``. The search then runs along kernel directions, chords of the ball
        through random points, and reports a ``mechanism="kernel"`` witness, subject to the same
        rounding-ratio rule (a target blind to the kernel separates nothing).

    Raises
    ------
    InvalidArgumentError
        Not FNNs, widths differ, missing or bad radius, bad centre, seed or search effort.
    """
    if not isinstance(frozen, FNN):
        raise InvalidArgumentError("frozen", f"must be a lora_theory.FNN, got {type(frozen).__name__}")
    if not isinstance(target, FNN):
        raise InvalidArgumentError("target", f"must be a lora_theory.FNN, got {type(target).__name__}")
    D = frozen.width
    if target.width != D:
        raise InvalidArgumentError("target", f"must have the frozen model's width D = {D}, got {target.width}")
    if input_radius is None:
        raise InvalidArgumentError(
            "input_radius",
            "is required and must be positive and finite: the witness searches the ball ||x - center|| <= input_radius",
        )
    if (
        isinstance(input_radius, (bool, np.bool_))
        or not isinstance(input_radius, numbers.Real)
        or not math.isfinite(input_radius)
        or input_radius <= 0
    ):
        raise InvalidArgumentError("input_radius", f"must be positive and finite, got {input_radius!r}")
    if not (
        seed is None
        or isinstance(seed, np.random.Generator)
        or (isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) and seed >= 0)
    ):
        raise InvalidArgumentError("seed", f"must be a non-negative int, None or a numpy Generator, got {seed!r}")
    r = float(input_radius)
    c = np.zeros(D) if center is None else as_array(center, "center", shape=(D,))
    n_starts = as_int(n_starts, "n_starts", 1)
    n_directions = as_int(n_directions, "n_directions", 1)
    n_refine = as_int(n_refine, "n_refine", 0)

    W1, b1 = frozen.weights[0], frozen.biases[0]
    first_relu = frozen.activation == "relu" and (frozen.depth > 1 or frozen.final_relu)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    try:
        check_invertible(W1, "W_1", "the witness solves W_1 (x' - x) = d")
    except SingularMatrixError as exc:
        return _kernel_witness(
            W1, b1, c, r, target, rng, n_starts, n_directions, n_refine, first_relu, exc.condition_number
        )
    if not first_relu:
        return _none(
            "the frozen first layer has no ReLU: it is affine, injective as W_1 is invertible, "
            "and the final layers can undo it",
            c,
            r,
        )

    # the smallest value of every first-layer unit on the ball
    rows = _row_norms(W1)  # (D,) > 0: W_1 is invertible
    centre_pre = W1 @ c + b1  # (D,)
    lowest = centre_pre - r * rows  # (D,)
    scale = float(np.linalg.norm(W1, 2) * (np.linalg.norm(c) + r) + _row_norms(b1[None, :])[0])
    eta = NEGATIVITY * scale
    if np.all(lowest >= -eta):
        return _none(
            f"b_1 keeps every first-layer pre-activation positive on the ball (smallest "
            f"{float(lowest.min()):.3g}): the first layer is affine and injective there, so no pair "
            f"exists and tuning the final layers can fit",
            c,
            r,
        )

    negative_units = np.flatnonzero(lowest < -eta)
    # starts: the centre, where each unit that can go negative is most negative, their pairwise midpoints
    # pushed to the sphere, and uniform points of the ball
    extreme = c - r * (W1[negative_units] / rows[negative_units, None])  # (k, D)
    starts = [c[None, :], extreme, sample_ball(c, r, n_starts, rng)]
    if len(negative_units) > 1:
        i, j = rng.integers(0, len(negative_units), size=(2, n_starts))
        mid = (extreme[i] + extreme[j]) / 2 - c
        norm = np.maximum(np.linalg.norm(mid, axis=1, keepdims=True), np.finfo(float).tiny)
        starts.append(c + mid / norm * r * (1 - 1e-12))
    X = np.vstack(starts)  # (n, D)

    best = _search(X, W1, b1, c, r, eta, target, rng, n_directions)
    if best is not None:
        best = _refine(
            best,
            lambda near: _search(near, W1, b1, c, r, eta, target, rng, n_directions),
            lambda pair: (pair[1] + pair[2]) / 2,  # the midpoint of the best segment
            c,
            r,
            rng,
            n_starts,
            n_refine,
        )

    if best is None:
        return _none(
            "the search found no point of the ball with a first-layer unit negative enough to move "
            "along (a heuristic search: such a point may still exist)",
            c,
            r,
        )
    sep, x, xp, d, support = best
    fx, fxp = target(x), target(xp)
    ref = max(float(np.linalg.norm(fx)), float(np.linalg.norm(fxp)))
    u = unit_roundoff()
    ratio = sep / (u * ref) if ref > 0 else 0.0
    h = lambda z: np.maximum(W1 @ z + b1, 0.0)  # noqa: E731  frozen first layer
    hx, hxp = h(x), h(xp)
    gap = _relative_gap(hx, hxp)
    found = ratio > MIN_ROUNDING_RATIO
    if found:
        reason = (
            f"units {[int(k) for k in support]} of the first layer are negative at both points, so the frozen first "
            f"layer maps them to the same point while the target's outputs differ by {sep:.3g}: no "
            f"tuning of the final layers is within {sep / 2:.3g} of the target on this ball"
        )
    else:
        reason = (
            f"the best pair found is separated by the target at rounding level only "
            f"({ratio:.3g} roundings): the heuristic search found no witness on this ball (one may still "
            "exist)"
        )
    return Witness(
        found=found,
        reason=reason,
        x=readonly(x),
        x_prime=readonly(xp),
        d=readonly(d),
        coordinates=tuple(int(k) for k in support),
        separation=float(sep),
        relative_separation=float(sep / ref) if ref > 0 else 0.0,
        rounding_ratio=float(ratio),
        first_layer_gap=gap,
        lower_bound=float(sep / 2),
        center=readonly(c),
        radius=r,
    )


final_layers_witness = numeric_guard(final_layers_witness)


def _kernel_witness(W1, b1, c, r, target, rng, n_starts, n_directions, n_refine, first_relu, kappa):
    """The pair of a singular ``W_1``: ``x' = x + v``, ``v`` in its numeric kernel, both ends of a chord."""
    Vt = np.linalg.svd(W1)[2]  # finite: check_invertible took the same SVD and refuses an overflow
    K = Vt[numeric_rank(W1) :].T  # (D, k) orthonormal kernel basis
    X = np.vstack([c, sample_ball(c, r, n_starts, rng)])  # (n, D) chord through each point
    best = _chord_search(X, K, c, r, target, rng, n_directions)
    best = _refine(
        best,
        lambda near: _chord_search(near, K, c, r, target, rng, n_directions),
        lambda pair: pair[1],  # one end of the best chord
        c,
        r,
        rng,
        n_starts,
        n_refine,
    )
    sep, x, xp = best
    fx, fxp = target(x), target(xp)
    ref = max(float(np.linalg.norm(fx)), float(np.linalg.norm(fxp)))
    ratio = sep / (unit_roundoff() * ref) if ref > 0 else 0.0
    d = W1 @ (xp - x)  # (D,) rounding level
    h = (lambda z: np.maximum(W1 @ z + b1, 0.0)) if first_relu else (lambda z: W1 @ z + b1)
    hx, hxp = h(x), h(xp)
    gap = _relative_gap(hx, hxp)
    kappa_text = f"{kappa:.3g}"  # "inf" for an exactly singular W_1
    found = ratio > MIN_ROUNDING_RATIO
    if found:
        reason = (
            f"W_1 is singular (κ = {kappa_text}, kernel of dimension {K.shape[1]}): x' - x lies in its "
            f"kernel, so W_1 x + b_1 = W_1 x' + b_1 and the frozen first layer maps both to the same point "
            f"while the target's outputs differ by {sep:.3g}: no tuning of the final layers is within "
            f"{sep / 2:.3g} of the target on this ball"
        )
    else:
        reason = (
            f"W_1 is singular (κ = {kappa_text}) but the target separates the best pair along its kernel "
            f"at rounding level only ({ratio:.3g} roundings): the heuristic search found no witness on "
            "this ball (one may still exist)"
        )
    return Witness(
        found=found,
        reason=reason,
        x=readonly(x),
        x_prime=readonly(xp),
        d=readonly(d),
        coordinates=(),
        separation=float(sep),
        relative_separation=float(sep / ref) if ref > 0 else 0.0,
        rounding_ratio=float(ratio),
        first_layer_gap=gap,
        lower_bound=float(sep / 2),
        center=readonly(c),
        radius=r,
        mechanism="kernel",
    )


def _chord_search(X, K, c, r, target, rng, n_directions):
    """Over the chords of the ball through the rows of ``X`` along unit kernel directions (the basis columns
    of ``K``, random combinations, and at each point the kernel direction the target's Jacobian there
    stretches most), the two ends the target separates most: ``(separation, x, x')``."""
    D, k = K.shape
    V = np.vstack([K.T, rng.standard_normal((n_directions, k)) @ K.T])  # (m, D) kernel directions
    V /= np.maximum(np.linalg.norm(V, axis=1, keepdims=True), np.finfo(float).tiny)
    best = (-1.0, None, None)
    for x in X:
        V_x = np.vstack([V, K @ _steepest(_jacobian(target, x), K)])  # (m + 1, D) unit rows
        t_lo, t_hi = _ball_interval(x, V_x, c, r)  # (m + 1,) each
        t_hi, t_lo = t_hi * (1 - 1e-9), t_lo * (1 - 1e-9)  # ends of the chord, inside the ball
        P, Pp = x + t_lo[:, None] * V_x, x + t_hi[:, None] * V_x  # (m + 1, D) each
        seps = np.linalg.norm(target(Pp) - target(P), axis=1)
        j = int(np.argmax(seps))
        if seps[j] > best[0]:
            best = (float(seps[j]), P[j].copy(), Pp[j].copy())
    return best


def _ball_interval(x: np.ndarray, V: np.ndarray, c: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """For a point ``x`` (D,) of the ball ``||z - c|| <= r`` and unit directions ``V`` (k, D): the roots
    ``t_lo <= 0 <= t_hi`` (k,) each of ``||x + t v - c|| = r``, i.e. of ``t^2 + 2 b t + (||x - c||^2 - r^2)``
    with ``b = v · (x - c)`` (the constant clipped at 0, for a point a rounding outside)."""
    b = V @ (x - c)  # (k,)
    q = min(float(np.sum((x - c) ** 2)) - r * r, 0.0)
    root = np.sqrt(np.maximum(b * b - q, 0.0))  # (k,)
    return -b - root, -b + root


def _refine(best, search, centre, c, r, rng, n_starts, n_refine):
    """``n_refine`` rounds of local search around the best pair: ``n_starts`` normal points of spread ``step``
    around ``centre(best)``, pulled into the ball, searched by ``search``; a better pair replaces ``best``,
    otherwise the step (first ``r / 4``) halves. Each round draws the same random numbers whatever it finds,
    so one round more continues the same search. Returns the best pair."""
    D = c.size
    step = r / 4
    for _ in range(n_refine):
        near = centre(best) + rng.standard_normal((n_starts, D)) * step / math.sqrt(D)  # (n_starts, D)
        off = np.linalg.norm(near - c, axis=1, keepdims=True)  # (n_starts, 1)
        near = np.where(off > r, c + (near - c) / off * r * (1 - 1e-12), near)
        cand = search(near)
        if cand is not None and cand[0] > best[0]:
            best = cand
        else:
            step /= 2
    return best


def _relative_gap(u: np.ndarray, v: np.ndarray) -> float:
    """``||u - v|| / max(||u||, ||v||)`` (0 when both are 0), the norms scaled (no overflow near 1e300)."""
    nu, nv, nd = _row_norms(np.stack([u, v, u - v]))  # (3,)
    ref = max(float(nu), float(nv))
    return float(nd) / ref if ref > 0 else 0.0


def _row_norms(M: np.ndarray) -> np.ndarray:
    """The Euclidean norms ``(m,)`` of the rows of ``M`` ``(m, n)``, each scaled by its largest entry first:
    no underflow for entries near 1e-300, no overflow near 1e300 (0 for a zero row)."""
    top = np.abs(M).max(axis=1)  # (m,)
    safe = np.where(top > 0, top, 1.0)
    return top * np.linalg.norm(M / safe[:, None], axis=1)


def _jacobian(model: FNN, x: np.ndarray) -> np.ndarray:
    """The Jacobian ``(D, D)`` of the piecewise-affine ``model`` at ``x`` (a ReLU whose input is exactly 0
    counted off)."""
    J = np.eye(x.size)  # (D, D)
    z = x  # (D,)
    for l, (W, b) in enumerate(zip(model.weights, model.biases)):
        pre = W @ z + b  # (D,)
        J = W @ J  # (D, D)
        if model.activation == "relu" and (l < model.depth - 1 or model.final_relu):
            on = pre > 0  # (D,)
            J = J * on[:, None]
            z = np.where(on, pre, 0.0)
        else:
            z = pre
    return J


def _steepest(J: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The coefficients ``s`` (k,) for which the columns of ``B`` (D, k, full column rank) give the direction
    ``B s`` that the linear map ``J`` (D, D) stretches most, ``||J B s|| / ||B s||`` largest: with ``B = Q R``,
    ``s = R^{-1} w`` for ``w`` the top right singular vector of ``J Q``."""
    Q, R = np.linalg.qr(B)  # (D, k), (k, k)
    w = np.linalg.svd(J @ Q)[2][0]  # (k,)
    return finite_solve(R, w, "the basis's R factor")


def _search(X, W1, b1, c, r, eta, target, rng, n_directions):
    """For every start ``x`` (rows of ``X``), the segments through ``x`` along ``δ = W_1^{-1} v``, ``v``
    supported on the units negative at ``x``; return the best pair.

    The directions ``v``: ``n_directions`` random ones, each unit's ``e_k``, and the one the target's
    Jacobian at ``x`` stretches most (so that an affine target's best direction is always tried). Each
    segment ``x + t δ`` runs as far both ways as both constraints allow: the ball, ``||x + t δ - c|| <= r``,
    and every supported unit staying below ``-eta`` (``y_k + t v_k <= -eta``); its two ends are the pair.
    Returns ``(separation, x, x', d, support)`` with ``d = W_1 (x' - x)``, or ``None``.
    """
    D = X.shape[1]
    Y = X @ W1.T + b1  # (n, D) first-layer pre-activations
    best = None
    for x, y in zip(X, Y):
        support = np.flatnonzero(y < -eta)
        if support.size == 0:
            continue
        E = finite_solve(W1, np.eye(D)[:, support], "W_1")  # (D, m) x' - x per unit of each d_k
        coeffs = np.vstack(
            [
                rng.standard_normal((n_directions, support.size)),
                np.eye(support.size),
                _steepest(_jacobian(target, x), E),
            ]
        )  # (k, m) the directions v, on the support
        delta = coeffs @ E.T  # (k, D) x' - x per unit step along v
        size = _row_norms(delta)  # (k,) > 0
        delta, coeffs = delta / size[:, None], coeffs / size[:, None]  # steps of unit length in x
        ball_lo, ball_hi = _ball_interval(x, delta, c, r)  # (k,) each
        # units: y_k + t v_k <= -eta for every supported k, with room -eta - y_k > 0
        room = -eta - y[support]  # (m,)
        with np.errstate(divide="ignore"):
            up = np.where(coeffs > 0, room / coeffs, np.inf).min(axis=1)  # (k,)
            down = np.where(coeffs < 0, room / coeffs, -np.inf).max(axis=1)  # (k,)
        t_hi = np.minimum(ball_hi, up) * (1 - 1e-9)  # (k,) >= 0
        t_lo = np.maximum(ball_lo, down) * (1 - 1e-9)  # (k,) <= 0
        ok = t_hi > t_lo
        if not ok.any():
            continue
        lo = x + t_lo[ok, None] * delta[ok]  # (k', D)
        hi = x + t_hi[ok, None] * delta[ok]  # (k', D)
        seps = np.linalg.norm(target(hi) - target(lo), axis=1)  # (k',)
        k = int(np.argmax(seps))
        if best is None or seps[k] > best[0]:
            v = np.zeros(D)
            v[support] = coeffs[ok][k]
            d = (t_hi[ok][k] - t_lo[ok][k]) * v  # (D,) W_1 (x' - x)
            best = (float(seps[k]), lo[k].copy(), hi[k].copy(), d, support)
    return best


def lora_parameter_count(width: int, depth: int, rank: Rank) -> int:
    """Trainable parameters of LoRA on every layer of a width-``D``, depth-``L`` FNN: ``2·R·D·L``.

    With per-layer ranks ``R_l`` (a sequence of ``L`` ints), ``2·D·Σ_l R_l``. Counted: the adapter factors
    ``A`` (``R x D``) and ``B`` (``D x R``) of every layer. Not counted: biases (tuned or not, the same ``L·D``
    in both methods' experiments). Zeng & Lee 2024 compare LoRA with tuning the final layers (Lemma 4) at
    equal counts: ``2RDL = l·D^2``, i.e. rank ``R = l·D / (2L)`` against the last ``l`` layers, which is what
    :func:`final_layers_parameter_count` returns by default (weights only), so the two compare like for like.
    """

    D = as_int(width, "width", 1)
    L = as_int(depth, "depth", 1, MAX_DEPTH)  # one rank per layer is built
    return 2 * D * sum(as_ranks(rank, L, D))


def final_layers_parameter_count(width: int, layers: int, bias: bool = False) -> int:
    """Trainable parameters of tuning the last ``l`` layers of a width-``D`` FNN: ``l·D^2`` weights.

    Counted by default: the ``D x D`` weight matrices of the last ``l`` layers, and nothing else, like
    :func:`lora_parameter_count` (``2RDL``, adapter factors only, no biases), so that the paper's comparison
    (Zeng & Lee 2024, Lemma 4 and its experiment; THEORY.md §2.5: ``2RDL`` against ``l·D^2``) is like for
    like: at equal counts LoRA represents targets that tuning the last ``l`` layers cannot. ``bias=True``
    adds the ``l·D`` biases of those layers.
    """
    D = as_int(width, "width", 1)
    l = as_int(layers, "layers", 0)
    return l * D * D + (l * D if as_bool(bias, "bias") else 0)
