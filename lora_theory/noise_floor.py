"""The storage-rounding noise floor of a fine-tuning change read from two stored checkpoints (THEORY.md §5).

A checkpoint stores ``fl_b(W_base)`` and ``fl_t(W_tuned)``, each entry rounded to nearest in its storage dtype
(bfloat16, float16, float32, float64). The change read back,

    ΔW_stored = fl_t(W_tuned) - fl_b(W_base) = ΔW + N,

carries a rounding matrix ``N`` bounded entrywise by the *stored* values:

    |N_ij| <= B_ij = u_b |fl_b(W_base)_ij| + u_t |fl_t(W_tuned)_ij| + η_b + η_t,

``u`` the unit roundoff of each storage dtype (:func:`storage_roundoff`) and ``η`` its smallest positive
subnormal (the absolute error of gradual underflow is at most ``η / 2``; the whole ``η`` keeps the term
representable in float64). A singular value of ``ΔW_stored`` is a direction of the fine-tuning change, and not
rounding, when it exceeds ``||N||_2``. Two bounds on it are published (:func:`noise_floor`):

* ``rigorous = ||B||_F``: always holds (``||N||_2 <= ||N||_F <= ||B||_F``), whatever the weights, but is about
  ``sqrt(min(m, n))`` times too large for weights whose rounding errors look independent.
* ``independent = safety · (max_i ||B_i,:||_2 + max_j ||B_:,j||_2 + max_ij B_ij · sqrt(2 ln(m + n)))``: the form
  of the Bandeira–van Handel / Latała bound on the norm of a matrix with independent centred entries, with the
  project's constant ``safety`` (:data:`FLOOR_SAFETY`); it assumes that the rounding errors of distinct entries
  behave as independent centred variables. Structured weights (constant or repeated values) break the
  assumption: a constant matrix re-saved in a lower precision has identical rounding errors, a rank-one ``N``
  with ``||N||_2`` up to ``||B||_F``.

Only the sufficient statistics of ``B`` enter (:class:`RoundingBounds`), so a caller holding the tensors on a
GPU computes them there and builds the dataclass itself.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._types import ArrayLike, DTypeLike
from .errors import InvalidArgumentError

__all__ = [
    "FLOOR_SAFETY",
    "FLOOR_MODELS",
    "storage_roundoff",
    "smallest_subnormal",
    "RoundingBounds",
    "rounding_bounds",
    "NoiseFloor",
    "noise_floor",
    "entries_beyond_rounding",
]

#: The constant in front of the independent-rounding floor (THEORY.md §5.2). The rounding error of one entry
#: is uniform within half a spacing, so its standard deviation is at most ``B_ij / sqrt(3)``: the floor's
#: leading term ``2 (R + C)`` is at least ``2 sqrt(3) ≈ 3.5`` times the Gaussian-model leading term
#: ``(R + C) / sqrt(3)`` of Bandeira & van Handel. The measured margin is in THEORY.md §5.2.
FLOOR_SAFETY = 2.0

#: The two floors a caller can choose: ``"independent"`` (sharp, assumes independent-looking rounding errors)
#: and ``"rigorous"`` (``||B||_F``, no assumption).
FLOOR_MODELS = ("independent", "rigorous")

_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_SUBNORMAL = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}

_ASSUMPTIONS = {
    "independent": (
        "rounding errors of distinct entries behave as independent centred variables bounded by "
        "u_b|W_base| + u_t|W_tuned| (weights spread over many rounding spacings); constant or repeated weights "
        "break it, and then only the rigorous floor ||B||_F holds"
    ),
    "rigorous": "none: ||N||_2 <= ||N||_F <= ||B||_F holds for every rounding pattern",
}


def _dtype_name(dtype, argument: str) -> str:
    """The storage dtype's name (``"bfloat16"``...) from a string, a numpy dtype or type, or a torch dtype."""
    if dtype is None or isinstance(dtype, bool):
        name = ""  # np.dtype(None) would be float64
    elif isinstance(dtype, str):
        name = dtype.strip()
    elif type(dtype).__module__ == "torch":  # torch.dtype, read without importing torch
        name = str(dtype)
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise InvalidArgumentError(
                argument, f"must be a floating storage dtype (float64, float32, float16, bfloat16), got {dtype!r}"
            ) from None
    if name.startswith("torch."):
        name = name[len("torch.") :]
    if name not in _ROUNDOFF:
        raise InvalidArgumentError(
            argument, f"must be a floating storage dtype (float64, float32, float16, bfloat16), got {dtype!r}"
        )
    return name


def storage_roundoff(dtype: DTypeLike) -> float:
    """Unit roundoff ``u`` of a storage dtype: ``|fl(x) - x| <= u |fl(x)|`` for round-to-nearest in its normal range.

    bfloat16 ``2^-8``, float16 ``2^-11``, float32 ``2^-24``, float64 ``2^-53``.

    Parameters
    ----------
    dtype : str, numpy dtype or type, or torch dtype
        ``"float64"``, ``"float32"``, ``"float16"``, ``"bfloat16"``, a numpy dtype (``np.float32``), or a torch
        dtype or its ``str()`` (``"torch.bfloat16"``); torch is never imported.

    Raises
    ------
    InvalidArgumentError
        Integer, bool, complex, float8 or unknown dtypes (argument ``dtype``).
    """
    return _ROUNDOFF[_dtype_name(dtype, "dtype")]


def smallest_subnormal(dtype: DTypeLike) -> float:
    """``η``: the smallest positive subnormal of a storage dtype (float64 ``2^-1074`` ... bfloat16 ``2^-133``).

    Gradual underflow rounds with an absolute error of at most ``η / 2``; accepts the dtypes of
    :func:`storage_roundoff` and raises as it does.
    """
    return _SUBNORMAL[_dtype_name(dtype, "dtype")]


def _nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(name, f"must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RoundingBounds:
    """Sufficient statistics of the entrywise rounding bound ``B`` of a stored change (THEORY.md §5.1).

    ``B_ij = u_b |W_base_ij| + u_t |W_tuned_ij| + η_b + η_t`` over the stored ``(out, in)`` matrices.

    Attributes
    ----------
    shape : tuple (out, in)
        ``(m, n)``.
    row_max : float
        ``R = max_i ||B_i,:||_2``.
    col_max : float
        ``C = max_j ||B_:,j||_2``.
    entry_max : float
        ``max_ij B_ij``.
    frobenius : float
        ``||B||_F``: a bound on ``||N||_2`` that needs no assumption.

    Raises
    ------
    InvalidArgumentError
        A shape that is not two positive integers, or statistics that are negative, not finite or
        inconsistent with one another (``entry_max <= row_max, col_max <= frobenius``).
    """

    shape: tuple
    row_max: float
    col_max: float
    entry_max: float
    frobenius: float

    def __post_init__(self):
        shape = self.shape
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape)
        ):
            raise InvalidArgumentError("shape", f"must be (out, in) with positive integers, got {shape!r}")
        object.__setattr__(self, "shape", (int(shape[0]), int(shape[1])))
        for name in ("row_max", "col_max", "entry_max", "frobenius"):
            object.__setattr__(self, name, _nonnegative(getattr(self, name), name))
        slack = 1 + 1e-6  # float32 sums on a device round
        if not (
            self.entry_max <= max(self.row_max, self.col_max) * slack
            and max(self.row_max, self.col_max) <= self.frobenius * slack
        ):
            raise InvalidArgumentError(
                "frobenius",
                "the statistics are inconsistent: need entry_max <= row_max, col_max <= frobenius, "
                f"got {self.entry_max!r}, {self.row_max!r}, {self.col_max!r}, {self.frobenius!r}",
            )


def _finite_float_array(value, name: str, what: str = "array") -> np.ndarray:
    """``value`` as a floating-point array of finite entries (its own dtype kept: it is the storage dtype)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InvalidArgumentError(name, f"could not be read as an array ({exc})") from None
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidArgumentError(name, f"must be a floating-point {what}, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(name, "contains NaN or infinite entries")
    return arr


def _finite_matrix(value, name: str) -> np.ndarray:
    arr = _finite_float_array(value, name, "matrix")
    if arr.ndim != 2 or arr.size == 0:
        raise InvalidArgumentError(name, f"must be a non-empty (out, in) matrix, got shape {arr.shape}")
    return arr


def _power_of_two_scale(*arrays) -> int:
    """``e`` with ``max |a| · 2^-e`` in ``[0.5, 1)`` over all arrays (0 for all-zero input): an exact rescaling."""
    top = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    return math.frexp(top)[1] if top > 0 else 0


def _scaled_bound(base, tuned, u_b, u_t, eta, e) -> np.ndarray:
    """``B · 2^-e`` in float64 (``(out, in)``), from stored arrays ``base``, ``tuned``."""
    with np.errstate(under="ignore"):
        Wb = np.ldexp(np.asarray(base, dtype=np.float64), -e)  # (out, in), exact unless subnormal
        Wt = np.ldexp(np.asarray(tuned, dtype=np.float64), -e)  # (out, in)
        return u_b * np.abs(Wb) + u_t * np.abs(Wt) + math.ldexp(eta, -e)


def _unscale(value: float, e: int, name: str, argument: str) -> float:
    try:
        out = math.ldexp(value, e)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise InvalidArgumentError(
            argument, f"{name} overflows float64 (the entries are too large): rescale the weights"
        )
    return out


def rounding_bounds(
    base: ArrayLike, tuned: ArrayLike, base_dtype: DTypeLike | None = None, tuned_dtype: DTypeLike | None = None
) -> RoundingBounds:
    """The statistics of ``B``, the entrywise bound on the storage rounding of ``ΔW = tuned - base`` (THEORY.md §5.1).

    Parameters
    ----------
    base, tuned : array (out, in)
        The stored matrices (any float dtype; a float64 copy of a bfloat16 tensor is fine when
        ``base_dtype`` / ``tuned_dtype`` say so).
    base_dtype, tuned_dtype : dtype, optional
        The *storage* dtypes (as :func:`storage_roundoff` accepts). Default: each array's own dtype.

    Returns
    -------
    RoundingBounds

    Raises
    ------
    InvalidArgumentError
        Not non-empty 2-D float matrices, different shapes, NaN or infinite entries, unknown dtypes, or
        statistics that overflow float64.
    """
    Wb = _finite_matrix(base, "base")
    Wt = _finite_matrix(tuned, "tuned")
    if Wb.shape != Wt.shape:
        raise InvalidArgumentError("tuned", f"has shape {Wt.shape} but base has {Wb.shape}")
    nb = _dtype_name(Wb.dtype if base_dtype is None else base_dtype, "base_dtype")
    nt = _dtype_name(Wt.dtype if tuned_dtype is None else tuned_dtype, "tuned_dtype")
    e = _power_of_two_scale(Wb, Wt)
    B = _scaled_bound(Wb, Wt, _ROUNDOFF[nb], _ROUNDOFF[nt], _SUBNORMAL[nb] + _SUBNORMAL[nt], e)  # (out, in)
    return _bounds_of_scaled(B, e, "base")


def _bounds_of_scaled(B: np.ndarray, e: int, argument: str) -> RoundingBounds:
    """:class:`RoundingBounds` of ``B = B_scaled · 2^e`` (norms taken on the scaled matrix, then unscaled)."""
    top = float(np.max(B))
    if top > 0:  # largest entry in [0.5, 1): norms
        shift = math.frexp(top)[1]  # neither underflow nor overflow
        B = np.ldexp(B, -shift)
        e += shift
    return RoundingBounds(
        shape=B.shape,
        row_max=_unscale(float(np.max(np.linalg.norm(B, axis=1))), e, "the rounding bound's row norm", argument),
        col_max=_unscale(float(np.max(np.linalg.norm(B, axis=0))), e, "the rounding bound's column norm", argument),
        entry_max=_unscale(float(np.max(B)), e, "the rounding bound", argument),
        frobenius=_unscale(float(np.linalg.norm(B)), e, "the rounding bound's Frobenius norm", argument),
    )


def entries_beyond_rounding(
    base: ArrayLike, tuned: ArrayLike, base_dtype: DTypeLike | None = None, tuned_dtype: DTypeLike | None = None
) -> int:
    """How many entries of ``tuned - base`` exceed their rounding bound ``B_ij`` (any shape, THEORY.md §5.1).

    An entry beyond its bound proves that the two stored values come from different true values, whatever
    the rounding (no assumption); ``0`` means the stored change could be rounding alone. Used for biases and
    other vectors ("changed" iff the count is positive) and reported for weight matrices.

    Parameters
    ----------
    base, tuned : array of one shape
        The stored tensors (float dtypes; float64 copies with ``base_dtype`` / ``tuned_dtype`` given are fine).
    base_dtype, tuned_dtype : dtype, optional
        Storage dtypes as :func:`storage_roundoff` accepts; default each array's own dtype.

    Raises
    ------
    InvalidArgumentError
        Non-float or non-finite arrays, different shapes, unknown dtypes.
    """
    b0, b1 = _finite_float_array(base, "base"), _finite_float_array(tuned, "tuned")
    if b0.shape != b1.shape:
        raise InvalidArgumentError("tuned", f"has shape {b1.shape} but base has {b0.shape}")
    nb = _dtype_name(b0.dtype if base_dtype is None else base_dtype, "base_dtype")
    nt = _dtype_name(b1.dtype if tuned_dtype is None else tuned_dtype, "tuned_dtype")
    e = _power_of_two_scale(b0, b1)
    bound = _scaled_bound(b0, b1, _ROUNDOFF[nb], _ROUNDOFF[nt], _SUBNORMAL[nb] + _SUBNORMAL[nt], e)
    with np.errstate(under="ignore"):
        change = np.ldexp(b1.astype(np.float64), -e) - np.ldexp(b0.astype(np.float64), -e)
    return int(np.count_nonzero(np.abs(change) > bound))


@dataclass(frozen=True)
class NoiseFloor:
    """The threshold a singular value of a stored change must exceed to count as a direction of the change.

    Attributes
    ----------
    shape : tuple (out, in)
    spectral : float
        The threshold used: ``independent`` or ``rigorous`` according to ``model``.
    independent : float
        ``min(rigorous, safety · (R + C + max B · sqrt(2 ln(m + n))))``: a bound on ``||N||_2`` when the
        rounding errors behave as independent centred variables (THEORY.md §5.2).
    rigorous : float
        ``||B||_F``: a bound on ``||N||_2`` that always holds.
    detection_limit : float
        ``2 · spectral``: a change whose ``r``-th singular value exceeds it is counted at rank ``>= r``
        (Weyl: ``σ_r(ΔW + N) >= σ_r(ΔW) - ||N||_2``), and directions below ``spectral - ||N||_2`` never are.
    model : str
        ``"independent"`` or ``"rigorous"``.
    safety : float
        The constant in ``independent``.
    assumption : str
        What ``spectral`` assumes, in words.
    bounds : RoundingBounds
        The statistics it was computed from.
    """

    shape: tuple
    spectral: float
    independent: float
    rigorous: float
    detection_limit: float
    model: str
    safety: float
    assumption: str
    bounds: RoundingBounds

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        b = self.bounds
        return {
            "model": self.model,
            "spectral": self.spectral,
            "independent": self.independent,
            "rigorous": self.rigorous,
            "detection_limit": self.detection_limit,
            "safety": self.safety,
            "assumption": self.assumption,
            "shape": list(self.shape),
            "bounds": {"row_max": b.row_max, "col_max": b.col_max, "entry_max": b.entry_max, "frobenius": b.frobenius},
        }


def noise_floor(bounds: RoundingBounds, *, model: str = "independent", safety: float = FLOOR_SAFETY) -> NoiseFloor:
    """The storage-rounding noise floor of a stored change, from its rounding bounds (THEORY.md §5).

    ``rigorous = ||B||_F`` (always a bound on ``||N||_2``); ``independent = min(rigorous, safety · (R + C +
    max B · sqrt(2 ln(m + n))))`` with ``R``, ``C`` the largest row and column norms of ``B`` (the form of the
    Bandeira–van Handel bound for independent centred entries, the project's constant ``safety``).

    Parameters
    ----------
    bounds : RoundingBounds
    model : {"independent", "rigorous"}
        Which one becomes ``spectral``, the threshold.
    safety : float > 0
        The constant of the independent floor (default :data:`FLOOR_SAFETY`).

    Raises
    ------
    InvalidArgumentError
        ``bounds`` not a :class:`RoundingBounds`, an unknown ``model``, ``safety`` not finite and positive.
    """
    if not isinstance(bounds, RoundingBounds):
        raise InvalidArgumentError("bounds", f"must be a RoundingBounds, got {type(bounds).__name__}")
    if not isinstance(model, str) or model not in FLOOR_MODELS:
        raise InvalidArgumentError("model", f"must be one of {FLOOR_MODELS}, got {model!r}")
    if _nonnegative(safety, "safety") <= 0:
        raise InvalidArgumentError("safety", f"must be positive, got {safety!r}")
    m, n = bounds.shape
    rigorous = bounds.frobenius
    sharp = float(safety) * (bounds.row_max + bounds.col_max + bounds.entry_max * math.sqrt(2.0 * math.log(m + n)))
    independent = min(rigorous, sharp)
    spectral = independent if model == "independent" else rigorous
    return NoiseFloor(
        shape=bounds.shape,
        spectral=spectral,
        independent=independent,
        rigorous=rigorous,
        detection_limit=2.0 * spectral,
        model=model,
        safety=float(safety),
        assumption=_ASSUMPTIONS[model],
        bounds=bounds,
    )
