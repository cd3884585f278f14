"""The LoRA adapter in the project's (and PEFT's) convention: ``Δ = B @ A`` with no hidden scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._guard import numeric_guard
from ._types import ArrayLike
from ._validate import as_array, as_int, readonly
from .errors import InvalidArgumentError
from .numerics import numeric_rank

__all__ = ["Adapter"]


@dataclass(frozen=True, eq=False)
class Adapter:
    """A low-rank update ``Δ = B A`` of an ``(out, in)`` weight matrix.

    Zeng & Lee (2024) write the adapted weight as ``W + Δ`` with ``rank(Δ) <= R``; PEFT stores the same
    update as ``lora_B.weight @ lora_A.weight`` (with ``lora_alpha = r`` the scale is 1).

    Attributes
    ----------
    A : ndarray, shape (r, in)
        The down-projection (PEFT ``lora_A.weight``). Read-only float64.
    B : ndarray, shape (out, r)
        The up-projection (PEFT ``lora_B.weight``). Read-only float64.

    ``r = 0`` is allowed: an empty adapter whose ``delta`` is the zero matrix.
    """

    A: np.ndarray
    B: np.ndarray

    def __post_init__(self):
        A = as_array(self.A, "A", ndim=2)
        B = as_array(self.B, "B", ndim=2)
        if A.shape[0] != B.shape[1]:
            raise InvalidArgumentError(
                "B", f"must have as many columns as A has rows (the rank), got A {A.shape} and B {B.shape}"
            )
        object.__setattr__(self, "A", readonly(A))
        object.__setattr__(self, "B", readonly(B))

    @classmethod
    def zeros(cls, rank: int, in_features: int, out_features: int) -> Adapter:
        """An adapter of the given rank whose factors are all zero (``Δ = 0``)."""
        return cls(np.zeros((rank, in_features)), np.zeros((out_features, rank)))

    @classmethod
    @numeric_guard
    def from_delta(cls, delta: ArrayLike, rank: int | None = None) -> Adapter:
        """Factor ``delta`` as ``B A`` through its SVD, keeping ``rank`` directions (all numeric ones by default).

        ``B = U_r diag(s_r)``, ``A = V_r^T``; with ``rank`` below ``rank(delta)`` this is ``LR_r(delta)``.
        ``rank`` must be an integer in ``0..min(delta.shape)`` (:class:`~lora_theory.errors.InvalidArgumentError`
        otherwise: a negative one sliced from the end, a float was truncated).
        """

        delta = as_array(delta, "delta", ndim=2)
        r = numeric_rank(delta) if rank is None else as_int(rank, "rank", 0, min(delta.shape))
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        if not np.all(np.isfinite(s)):
            raise FloatingPointError("overflow in the singular values: the 2-norm of delta exceeds the float64 range")
        return cls(vt[:r], u[:, :r] * s[:r])

    @property
    def rank(self) -> int:
        """The number of columns of ``B`` (rows of ``A``): an upper bound on ``rank(Δ)``."""
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def delta(self) -> np.ndarray:
        """``Δ = B @ A``, shape ``(out, in)``."""
        return self.B @ self.A

    @property
    def num_parameters(self) -> int:
        """``r·(in + out)``: ``2rD`` for a ``D x D`` layer."""
        return self.rank * (self.in_features + self.out_features)

    def padded(self, rank: int) -> Adapter:
        """The same update stored at a larger rank, the extra rows of ``A`` and columns of ``B`` zero."""
        if rank < self.rank:
            raise InvalidArgumentError("rank", f"cannot pad a rank-{self.rank} adapter down to {rank}")
        A = np.zeros((rank, self.in_features))
        B = np.zeros((self.out_features, rank))
        A[: self.rank] = self.A
        B[:, : self.rank] = self.B
        return Adapter(A, B)

    def __repr__(self) -> str:
        return f"Adapter(rank={self.rank}, in={self.in_features}, out={self.out_features})"
