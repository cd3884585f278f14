"""Random rational instances for the certificates: small-denominator frozen and target models of each kind
(:func:`random_rational_linear`, :func:`random_rational_fnn`, :func:`random_rational_tfn`).
"""

from __future__ import annotations

import numpy as np
import sympy

from .._types import Seed
from .._validate import as_int, rng_from
from ..errors import InvalidArgumentError
from ..models import MAX_RANDOM_WIDTH
from ..partition import MAX_DEPTH
from .fnn import RationalFNN
from .tfn import RationalTFN


def _rng(seed):
    return rng_from(seed, "seed")


def _rand(rng, shape, bound, denominator):
    """Entries ``k / denominator`` with integer ``k`` uniform in ``[-bound, bound]``, as a sympy matrix."""
    k = rng.integers(-bound, bound + 1, size=shape)
    return sympy.ImmutableMatrix(shape[0], shape[1], [sympy.Rational(int(v), denominator) for v in k.reshape(-1)])


def _instance_args(denominator, bound):
    den = as_int(denominator, "denominator", 1)
    b = as_int(bound, "bound", 1)
    return den, b


def random_rational_linear(
    width: int, depth: int, *, seed: Seed = None, error_rank: int | None = None, denominator: int = 4, bound: int = 4
) -> tuple[list[sympy.ImmutableMatrix], sympy.ImmutableMatrix]:
    """A random rational linear instance ``(frozen, target)`` for :func:`certify_linear`.

    Entries ``k / denominator`` with ``k`` uniform in ``-bound..bound`` (default multiples of 1/4 in
    ``[-1, 1]``). ``error_rank`` (default: generic, full) makes ``E = C F`` with ``C`` ``(D, r)`` and ``F``
    ``(r, D)`` random, so ``rank(E) <= r`` (equal for almost every draw; the certificate computes it exactly).

    Returns
    -------
    frozen : list of L sympy.ImmutableMatrix (D, D)
    target : sympy.ImmutableMatrix (D, D)
    """
    n = as_int(width, "width", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    den, b = _instance_args(denominator, bound)
    rng = _rng(seed)
    frozen = [_rand(rng, (n, n), b, den) for _ in range(depth_)]
    if error_rank is None:
        target = _rand(rng, (n, n), b, den)
    else:
        r = as_int(error_rank, "error_rank", 0, n)
        prod = sympy.eye(n)
        for W in frozen:
            prod = W * prod
        E = _rand(rng, (n, r), b, den) * _rand(rng, (r, n), b, den) if r else sympy.zeros(n, n)
        target = sympy.ImmutableMatrix(prod + E)
    return frozen, target


def random_rational_fnn(
    width: int,
    depth: int,
    target_depth: int,
    *,
    seed: Seed = None,
    final_relu: bool = True,
    denominator: int = 4,
    bound: int = 4,
) -> tuple[RationalFNN, RationalFNN]:
    """A random rational ReLU FNN pair ``(frozen, target)`` (:class:`RationalFNN`) for :func:`certify_fnn`.

    Weights and biases ``k / denominator``, ``k`` uniform in ``-bound..bound``.
    """
    n = as_int(width, "width", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    tdepth = as_int(target_depth, "target_depth", 1, MAX_DEPTH)
    if tdepth > depth_:
        raise InvalidArgumentError(
            "target_depth", f"the target depth L̄ = {tdepth} exceeds the frozen depth L = {depth_}"
        )
    den, b = _instance_args(denominator, bound)
    rng = _rng(seed)

    def model(m):
        return RationalFNN(
            tuple(_rand(rng, (n, n), b, den) for _ in range(m)),
            tuple(_rand(rng, (n, 1), b, den) for _ in range(m)),
            "relu",
            final_relu,
        )

    return model(depth_), model(tdepth)


def _rand_nonsingular(rng, n, bound, denominator):
    """As :func:`_rand` for an ``n x n`` matrix, redrawn until its determinant is non-zero (exactly)."""
    while True:
        M = _rand(rng, (n, n), bound, denominator)
        if M.det() != 0:
            return M


def random_rational_tfn(
    embed_dim: int,
    depth: int,
    heads: int,
    *,
    seed: Seed = None,
    denominator: int = 4,
    bound: int = 4,
    nonsingular: bool = False,
) -> tuple[RationalTFN, RationalTFN]:
    """A random rational transformer pair ``(frozen, target)`` (:class:`RationalTFN`) for :func:`certify_tfn`.

    Every parameter ``k / denominator``, ``k`` uniform in ``-bound..bound``. Small entries make singular
    matrices common (one ``2 x 2`` draw in ten or so); ``nonsingular=True`` redraws every ``D x D`` matrix
    until its determinant is non-zero, so the matrices Theorem 7 inverts as given (``W_K^T``, ``W_O``,
    ``W1_l``, ``W2_l``, ``T2_l``, ``W_out``) are invertible. (Matrices built by the construction, such as
    ``W_Q + Δ_Q``, can still be singular.)
    """
    n = as_int(embed_dim, "embed_dim", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    H = as_int(heads, "heads", 1, MAX_RANDOM_WIDTH)
    den, b = _instance_args(denominator, bound)
    if not isinstance(nonsingular, (bool, np.bool_)):
        raise InvalidArgumentError("nonsingular", f"must be a bool, got {nonsingular!r}")
    rng = _rng(seed)

    def square():
        return _rand_nonsingular(rng, n, b, den) if nonsingular else _rand(rng, (n, n), b, den)

    def model():
        att = [[[square() for _ in range(H)] for _ in range(depth_)] for _ in range(4)]
        return RationalTFN(
            *att,
            w1=[square() for _ in range(depth_)],
            b1=[_rand(rng, (n, 1), b, den) for _ in range(depth_)],
            w2=[square() for _ in range(depth_)],
            b2=[_rand(rng, (n, 1), b, den) for _ in range(depth_)],
            w_out=square(),
        )

    return model(), model()
