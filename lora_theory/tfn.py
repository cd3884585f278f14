"""LoRA adapters that turn a frozen transformer network into a target one (Zeng & Lee 2024, Theorem 7).

Symbols (THEORY.md §1, §2.7): ``L`` blocks, ``H`` heads, embedding size ``D``; frozen per-head matrices
``W_Q, W_K, W_V, W_O`` and feed-forward ``W1_l, b1_l, W2_l, b2_l``, output layer ``W_out``; the target's are
``T_Q, T_K, T_V, T_O, T1_l, c1_l, T2_l, c2_l, T_out``. ``R`` is the LoRA-rank.

The construction keeps, block by block, the target's block output equal to ``C_l`` times the adapted one,
with ``C_0 = I`` and ``C_l = T2_l W2_l^{-1}`` (``l < L``). For block ``l`` (1-based here, 0-based in code)
and head ``h`` it matches two products of two matrices with the linear construction of Lemma 1
(:func:`lora_theory.linear._chain_adapters`); :func:`_walk` is this walk, written once for the float64, mpmath
and exact paths:

1. scores:  ``(W_K + Δ_K)^T (W_Q + Δ_Q) = C_{l-1}^T T_K^T T_Q C_{l-1}``   (factors ``W_Q``, ``W_K^T``);
2. values:  ``(W_O + Δ_O)(W_V + Δ_V) = W1_l^{-1} T1_l T_O T_V C_{l-1}``   (factors ``W_V``, ``W_O``);

then ``b1_l = c1_l`` makes the hidden ReLU activations equal to the target's; for ``l < L``
``b2_l = W2_l T2_l^{-1} c2_l``; in the last block the output ``(W_out + Δ_out)(W2_L + Δ_2) = T_out T2_L``
(factors ``W2_L``, ``W_out``) and ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``. Every matched product has two
factors, so ``R >= ceil(G_l / 2)`` makes it exact, ``G_l`` the largest rank of block ``l``'s matched
discrepancies (``D`` for generic weights, hence the threshold ``ceil(D / 2)``). The adapted network then
equals the target for every input: no bounded domain is needed.

Below that rank each chain realises its frozen product plus the best rank-``2R`` approximation of its
discrepancy (Lemma 1), but no bound on the network's error is known: none is claimed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import _display
from ._guard import numeric_guard
from ._validate import as_int
from .adapter import Adapter
from .errors import InvalidArgumentError
from .linear import _chain_checked
from .models import TFN
from .numerics import (
    _LargestConditionNumber,
    check_invertible,
    check_norm_finite,
    finite_solve,
    relative_error,
    svd_values,
    tolerance,
    verified_exact,
    warn_if_ill_conditioned,
)
from .thresholds import ceil_div

__all__ = ["TFNFit", "lora_tfn", "tfn_rank_requirement", "tfn_matched_discrepancies", "tfn_matched_discrepancy_ranks"]

#: How many inputs, of how many tokens, :func:`lora_tfn` checks its result on.
CHECK_INPUTS, CHECK_TOKENS = 4, 3

#: Names of the per-head adapted matrices, as keys of :attr:`TFNFit.adapters`.
HEAD_MATRICES = ("wq", "wk", "wv", "wo")


@dataclass(frozen=True, eq=False)
class TFNFit(_LargestConditionNumber):
    """The adapters and biases of Theorem 7 and what the construction found.

    Attributes
    ----------
    adapters : dict
        ``(name, block, head) -> Adapter``, ``block`` 0-based. Per head: ``name`` in
        ``{"wq", "wk", "wv", "wo"}`` with ``head`` an int in ``0..H-1``. Last block only:
        ``("w2", L-1, None)`` for ``W2_L`` and ``("w_out", L-1, None)`` for the output layer ``W_out``
        (it follows the last block, so it carries that block's index). Each ``Adapter`` acts as
        ``W + B @ A`` on the matrix as the model stores it (``A`` of shape ``(r, D)``, ``B`` ``(D, r)``),
        with ``r <= rank`` (fewer where the matched discrepancy has lower rank).
    model : TFN
        The adapted network: every parameter under the constructor's names (``wq`` ... ``w_out``);
        ``b1 = c1`` and ``b2`` re-chosen in every block, ``w1`` and the first ``L-1`` ``w2`` frozen.
    rank : int
        ``R``.
    matched_ranks : tuple of int
        ``G_l`` for every block: the largest numeric rank among its matched discrepancies (score and value
        products of every head, and in the last block the output product).
    required_rank : int
        ``max_l ceil(G_l / 2)``, the rank at which this construction is exact for this instance.
    exact : bool
        ``rank >= required_rank`` (:attr:`rank_sufficient`: the adapted network equals the target for every
        input in exact arithmetic) *and* float64 kept it: on the check inputs (:attr:`measured_error`) the
        relative error is within ``tolerance(kappa)``, which is at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT` (1).
    matched_errors : dict
        ``(kind, block, head) -> σ_{2R+1}`` of that matched discrepancy, with ``kind`` in
        ``{"qk", "ov", "out"}`` (``head`` ``None`` for ``"out"``): the spectral error the chain leaves on
        its product (Lemma 1). It is not a bound on the network's error.
    condition_numbers : dict of str -> float
        ``κ`` of every matrix solved with: ``"W1[l]"``, ``"W2[l]"``, ``"T2[l]"`` (``l < L-1``, 0-based),
        ``"W_out + Δ_out"``, and the chains' ``Q``/``P`` matrices as ``"qk[l,h] Q_1"``, ``"ov[l,h] P_2"``,
        ``"out Q_1"``...
    rank_sufficient : bool
        ``rank >= required_rank`` (Theorem 7's condition).
    measured_error : float
        ``||f(X) - f̄(X)|| / ||f̄(X)||`` (Frobenius, over the batch) on :data:`CHECK_INPUTS` inputs of
        :data:`CHECK_TOKENS` tokens with ``N(0, 1)`` entries (seed 0), computed in float64 after the
        construction.
    """

    adapters: dict
    model: TFN
    frozen: TFN
    target: TFN
    rank: int
    matched_ranks: tuple
    required_rank: int
    exact: bool
    matched_errors: dict = field(default_factory=dict)
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")

    __repr__ = _display.tfn_fit_repr

    @property
    def num_parameters(self) -> int:
        """Number of adapter parameters actually used, ``Σ r (in + out)``."""
        return sum(a.num_parameters for a in self.adapters.values())


def _check_pair(frozen, target):
    if not isinstance(frozen, TFN):
        raise InvalidArgumentError("frozen", f"must be a lora_theory.TFN, got {type(frozen).__name__}")
    if not isinstance(target, TFN):
        raise InvalidArgumentError("target", f"must be a lora_theory.TFN, got {type(target).__name__}")
    want = (frozen.depth, frozen.heads, frozen.embed_dim)
    got = (target.depth, target.heads, target.embed_dim)
    if want != got:
        raise InvalidArgumentError(
            "target", f"must have the frozen network's depth, heads and embedding size (L, H, D) = {want}, got {got}"
        )


def _rank_tol(frozen_factors, matched, kappa_solved):
    """Numeric-rank tolerance of a matched discrepancy ``E = matched - Π frozen``.

    ``D · eps · max(||matched||_2, ||Π W||_2, σ_1(E)) · (1 + κ)``, with ``κ`` the sum of the condition
    numbers of the matrices solved with to form ``matched``: ``E`` inherits the rounding of those solves,
    so singular values below this are noise (the construction then leaves them, at rounding level).
    """
    D = matched.shape[0]
    prod = frozen_factors[1] @ frozen_factors[0]
    E = matched - prod
    scale = max(np.linalg.norm(matched, 2), np.linalg.norm(prod, 2), np.linalg.norm(E, 2))
    return D * np.finfo(np.float64).eps * scale * (1.0 + kappa_solved)


@dataclass(frozen=True)
class _Matched:
    """One product Theorem 7's walk matches: ``second @ first`` plus a rank-``2R`` change must equal ``matched``.

    ``factors = (first, second)``, each ``(D, D)``; ``names`` label them in errors; ``kappa_solved``: the
    condition numbers of the solves that formed ``matched`` (it carries their rounding); ``hidden``: for
    ``"ov"``, ``T1 T_O T_V C`` before the solve with ``W1`` (else ``None``).
    """

    kind: str  # "qk", "ov" or "out"
    block: int
    head: int | None
    factors: tuple
    names: tuple
    matched: object  # (D, D)
    kappa_solved: float
    hidden: object = None


@dataclass(frozen=True)
class _Carried:
    """Block ``l < L-1`` hands on ``C_l = T2_l W2_l^{-1}`` (``(D, D)``) and its bias ``b2_l = W2_l T2_l^{-1} c2_l``."""

    block: int
    C: object
    b2: object
    W2: object
    T2: object
    c2: object


@dataclass(frozen=True)
class _WalkArithmetic:
    """What Theorem 7's walk (:func:`_walk`) needs of an arithmetic: float64 (:func:`_float64_walk`), mpmath
    (:func:`lora_theory.highprec.tfn._tfn_mp`) or exact rationals (:func:`lora_theory.symbolic.certify_tfn`).

    ``frozen(name, l, h)`` / ``target(name, l, h)``: a parameter (``"wq"``... per head, ``"w1"``, ``"w2"``,
    ``"b2"`` per block, ``"w_out"``) as the arithmetic's matrix; ``mul(A, B) = A B``; ``T(A) = A^T``; ``eye``:
    ``I_D``. ``inverse(M, name, context) -> (κ, solve)`` with ``solve(X) = M^{-1} X`` and
    ``right_inverse(M, name, context) -> (κ, solve)`` with ``solve(X) = X M^{-1}``: both check ``M`` and raise
    naming it when it is singular.
    """

    frozen: Callable
    target: Callable
    mul: Callable
    T: Callable
    eye: object
    inverse: Callable
    right_inverse: Callable


def _walk(ar: _WalkArithmetic, L: int, H: int, kappas: dict):
    """Zeng & Lee 2024, Theorem 7: the products the construction matches, block by block, in any arithmetic.

    Yields a :class:`_Matched` for the scores ``C^T T_K^T T_Q C`` (factors ``W_Q``, ``W_K^T``) and the values
    ``W1^{-1} T1 T_O T_V C`` (factors ``W_V``, ``W_O``) of every head, a :class:`_Carried` after every block
    ``l < L-1`` (``C_l = T2_l W2_l^{-1}``, ``b2_l = W2_l T2_l^{-1} c2_l``), then the output ``T_out T2_L``
    (factors ``W2_L``, ``W_out``). Records ``κ`` of ``W1_l``, ``W2_l``, ``T2_l`` in ``kappas``. The matched
    products depend on the frozen and target weights only, not on the adapters.
    """
    C, kappa_C = ar.eye, 0.0  # (D, D) C_0 = I; κ solved to form C_{l-1}
    for l in range(L):
        W1 = ar.frozen("w1", l, None)
        kappas[f"W1[{l}]"], w1_solve = ar.inverse(
            W1, f"W1[{l}]", f"block {l}: the value products are matched to W1^-1 T1 T_O T_V C"
        )
        for h in range(H):
            TQ, TK, TV, TO = (ar.target(k, l, h) for k in HEAD_MATRICES)
            qk = ar.mul(ar.mul(ar.mul(ar.T(C), ar.T(TK)), TQ), C)  # (D, D) C^T T_K^T T_Q C
            factors = (ar.frozen("wq", l, h), ar.T(ar.frozen("wk", l, h)))
            yield _Matched("qk", l, h, factors, (f"W_Q[{l},{h}]", f"W_K[{l},{h}]^T"), qk, kappa_C)
            ov = ar.mul(ar.mul(ar.mul(ar.target("w1", l, None), TO), TV), C)  # (D, D) T1 T_O T_V C
            factors = (ar.frozen("wv", l, h), ar.frozen("wo", l, h))
            names = (f"W_V[{l},{h}]", f"W_O[{l},{h}]")
            yield _Matched("ov", l, h, factors, names, w1_solve(ov), kappa_C + kappas[f"W1[{l}]"], ov)
        if l < L - 1:
            W2, T2, c2 = ar.frozen("w2", l, None), ar.target("w2", l, None), ar.target("b2", l, None)
            kappas[f"W2[{l}]"], w2_right = ar.right_inverse(
                W2, f"W2[{l}]", f"block {l} < L-1: C = T2 W2^-1 carries the target to the next block"
            )
            kappas[f"T2[{l}]"], t2_solve = ar.inverse(T2, f"T2[{l}] (target)", f"block {l} < L-1: b2 = W2 T2^-1 c2")
            C, kappa_C = w2_right(T2), kappas[f"W2[{l}]"]  # (D, D) C_l = T2_l W2_l^-1
            yield _Carried(l, C, ar.mul(W2, t2_solve(c2)), W2, T2, c2)  # b2_l = W2 T2^-1 c2
    out = ar.mul(ar.target("w_out", L - 1, None), ar.target("w2", L - 1, None))  # (D, D) T_out T2_L
    factors = (ar.frozen("w2", L - 1, None), ar.frozen("w_out", L - 1, None))
    yield _Matched("out", L - 1, None, factors, ("W2[L-1]", "W_out"), out, 0.0)


def _tfn_param(model, name, l, h):
    """A parameter of a float64 :class:`TFN`, as :class:`_WalkArithmetic` reads it."""
    value = getattr(model, name)
    if name == "w_out":
        return value
    return value[l, h] if h is not None else value[l]


def _float64_walk(frozen, target) -> _WalkArithmetic:
    def inverse(M, name, context):
        symbol = name.split(" ")[0]  # "T2[0] (target)" -> "T2[0]": the solve's errors name the matrix alone
        return check_invertible(M, name, context), lambda X: finite_solve(M, X, symbol)

    def right_inverse(M, name, context):
        kappa = check_invertible(M, name, context)
        return kappa, lambda X: finite_solve(M.T, X.T, f"the transpose of a frozen {name[:2]}").T

    return _WalkArithmetic(
        frozen=lambda name, l, h: _tfn_param(frozen, name, l, h),
        target=lambda name, l, h: _tfn_param(target, name, l, h),
        mul=np.matmul,
        T=np.transpose,
        eye=np.eye(frozen.embed_dim),
        inverse=inverse,
        right_inverse=right_inverse,
    )


def _matched_problems(frozen, target, kappas):
    """Yield ``(kind, block, head, factors, names, matched, rank_tol)`` for every matched product of the
    float64 walk (:func:`_walk`), with the numeric-rank tolerance of :func:`_rank_tol`.

    Checks (recording ``κ`` in ``kappas``) ``W1_l``, and ``W2_l``, ``T2_l`` for ``l < L``, raising
    :class:`SingularMatrixError` naming the matrix.
    """
    for step in _walk(_float64_walk(frozen, target), frozen.depth, frozen.heads, kappas):
        if isinstance(step, _Matched):
            tol = _rank_tol(step.factors, step.matched, step.kappa_solved)
            yield step.kind, step.block, step.head, step.factors, step.names, step.matched, tol


def tfn_matched_discrepancies(frozen: TFN, target: TFN) -> dict:
    """The discrepancies the construction of Zeng & Lee 2024, Theorem 7 (transformers) matches,
    ``matched - second factor @ first factor``.

    Returns ``{(kind, block, head): E}``, each ``E`` a ``(D, D)`` array, ``block`` 0-based, in the
    construction's order: per block and head ``("qk", l, h)``: ``C_{l-1}^T T_K^T T_Q C_{l-1} - W_K^T W_Q``
    and ``("ov", l, h)``: ``W1_l^{-1} T1_l T_O T_V C_{l-1} - W_O W_V``; then ``("out", L-1, None)``:
    ``T_out T2_L - W_out W2_L``. The counterpart of :func:`lora_theory.block_discrepancies` for the TFN:
    ``σ_{2R+1}`` of each is what rank ``R`` leaves on that product (:attr:`TFNFit.matched_errors`), its
    numeric ranks give ``G_l`` (the largest in block ``l``) and the instance's threshold
    ``max_l ceil(G_l / 2)`` (:func:`tfn_rank_requirement`).

    Raises
    ------
    InvalidArgumentError
        ``target`` of another depth, number of heads or embedding size.
    SingularMatrixError
        ``W1_l``, or ``W2_l`` or ``T2_l`` for ``l < L``, singular (named, with ``κ``).
    """
    _check_pair(frozen, target)
    return {
        (kind, l, h): matched - factors[1] @ factors[0]
        for kind, l, h, factors, names, matched, tol in _matched_problems(frozen, target, {})
    }


tfn_matched_discrepancies = numeric_guard(tfn_matched_discrepancies)


def tfn_matched_discrepancy_ranks(frozen: TFN, target: TFN) -> tuple:
    """``G_l`` for every block: the largest numeric rank of its matched discrepancies (Theorem 7).

    The matched products (module docstring) depend only on the frozen and target weights, not on the
    adapters, so this needs no construction. Numeric rank as in :func:`_rank_tol`. Raises what
    :func:`tfn_matched_discrepancies` raises.
    """
    _check_pair(frozen, target)
    ranks = [0] * frozen.depth
    for _kind, l, _h, factors, _names, matched, tol in _matched_problems(frozen, target, {}):
        E = matched - factors[1] @ factors[0]
        s = svd_values(E)
        ranks[l] = max(ranks[l], int(np.sum(s > tol)))
    return tuple(ranks)


tfn_matched_discrepancy_ranks = numeric_guard(tfn_matched_discrepancy_ranks)


def tfn_rank_requirement(frozen: TFN, target: TFN) -> int:
    """``max_l ceil(G_l / 2)``: the LoRA-rank at which Theorem 7's construction is exact for this instance.

    ``ceil(D / 2)`` for generic weights (:func:`lora_theory.tfn_rank_threshold`); lower when frozen and
    target differ by low-rank products. Zeng & Lee 2024, Theorem 7 (transformers).
    """
    return max(ceil_div(g, 2) for g in tfn_matched_discrepancy_ranks(frozen, target))


tfn_rank_requirement = numeric_guard(tfn_rank_requirement)


def lora_tfn(frozen: TFN, target: TFN, rank: int) -> TFNFit:
    """LoRA adapters and biases that make a frozen TFN equal a target TFN (Zeng & Lee 2024, Theorem 7).

    Parameters
    ----------
    frozen : TFN
        The frozen network (``W_Q, W_K, W_V, W_O`` per head, ``W1_l, b1_l, W2_l, b2_l``, ``W_out``).
    target : TFN
        The target (``T_Q ...``, ``c1_l, c2_l``, ``T_out``), with the same ``L``, ``H``, ``D``.
    rank : int in 0..D
        ``R``, the rank budget of every adapter. ``0`` re-chooses the biases only.

    Returns
    -------
    TFNFit
        Adapters on ``W_Q, W_K, W_V, W_O`` of every head and block, on ``W2`` of the last block and on
        ``W_out``; biases ``b1, b2`` of every block. With ``rank >= fit.required_rank`` (at most
        ``ceil(D / 2)``) the adapted network equals the target for every input ``X``.

    Raises
    ------
    InvalidArgumentError
        ``frozen``/``target`` not TFNs, or ``target`` of another ``(L, H, D)``; ``rank`` not an int in ``0..D``.
    SingularMatrixError
        A matrix the construction solves with is singular: ``W1_l``; ``W2_l`` or ``T2_l`` for ``l < L``;
        ``Q_1 = W_K^T``, ``W_O`` or ``W_out`` (second factors that receive singular directions);
        ``P_2 = W_Q + Δ_Q``, ``W_V + Δ_V``, ``W2_L + Δ_2``; ``W_out + Δ_out``. The message names it
        (block and head in brackets, 0-based) and gives ``κ``.

    Warns
    -----
    IllConditionedWarning
        When ``u·κ`` exceeds 1e-8, ``κ`` the largest condition number solved with.
    """
    _check_pair(frozen, target)
    L, H, D = frozen.depth, frozen.heads, frozen.embed_dim
    R = as_int(rank, "rank", 0, D)
    kappas: dict = {}
    adapters: dict = {}
    matched_errors: dict = {}
    G = [0] * L
    b2 = np.empty((L, D))
    for step in _walk(_float64_walk(frozen, target), L, H, kappas):
        if isinstance(step, _Carried):
            b2[step.block] = step.b2  # (D,) W2 T2^-1 c2
            continue
        kind, l, h, factors, names, matched = step.kind, step.block, step.head, step.factors, step.names, step.matched
        tol = _rank_tol(factors, matched, step.kappa_solved)
        check_norm_finite(matched - factors[1] @ factors[0], f"the {kind} discrepancy of block {l}")
        (first, second), E, s, rank_E, chain_kappas = _chain_checked(
            factors, matched, (R, R), names=list(names), rank_tol=tol
        )
        label = f"{kind}[{l},{h}]" if h is not None else kind
        for key, kappa in chain_kappas.items():
            kappas[f"{label} {key}"] = kappa
        G[l] = max(G[l], rank_E)
        matched_errors[(kind, l, h)] = float(s[2 * R]) if 2 * R < s.size and 2 * R < rank_E else 0.0
        if kind == "qk":
            adapters[("wq", l, h)] = first
            # the second factor is W_K^T: W_K^T + B2 A2 = (W_K + A2^T B2^T)^T, so A_K = B2^T, B_K = A2^T
            adapters[("wk", l, h)] = Adapter(second.B.T, second.A.T)
        elif kind == "ov":
            adapters[("wv", l, h)] = first
            adapters[("wo", l, h)] = second
        else:
            adapters[("w2", l, None)] = first
            adapters[("w_out", l, None)] = second

    def adapted(name, stack):
        out = np.array(stack)  # (L, H, D, D)
        for l in range(L):
            for h in range(H):
                out[l, h] += adapters[(name, l, h)].delta
        return out

    w2 = np.array(frozen.w2)  # (L, D, D)
    w2[L - 1] += adapters[("w2", L - 1, None)].delta
    w_out = frozen.w_out + adapters[("w_out", L - 1, None)].delta  # (D, D)
    kappas["W_out + Δ_out"] = check_invertible(
        w_out, "W_out + Δ_out", "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2"
    )
    b2[L - 1] = finite_solve(w_out, target.w_out @ target.b2[L - 1], "W_out + Δ_out")
    model = TFN(
        adapted("wq", frozen.wq),
        adapted("wk", frozen.wk),
        adapted("wv", frozen.wv),
        adapted("wo", frozen.wo),
        w1=frozen.w1,
        b1=target.b1,
        w2=w2,
        b2=b2,
        w_out=w_out,
    )
    kappa = max(kappas.values())
    warn_if_ill_conditioned(kappa, what="transformer construction (Theorem 7)")
    required = max(ceil_div(g, 2) for g in G)
    # check the claim on what float64 built
    X = np.random.default_rng(0).standard_normal((CHECK_INPUTS, D, CHECK_TOKENS))  # (n, D, N)
    measured = relative_error(model(X), target(X))
    exact = verified_exact(R >= required, measured, tolerance(kappa), what="transformer construction (Theorem 7)")
    return TFNFit(
        adapters=adapters,
        model=model,
        frozen=frozen,
        target=target,
        rank=R,
        matched_ranks=tuple(G),
        required_rank=required,
        exact=exact,
        matched_errors=matched_errors,
        condition_numbers=kappas,
        rank_sufficient=R >= required,
        measured_error=measured,
    )


lora_tfn = numeric_guard(lora_tfn)
