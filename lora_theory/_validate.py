"""Argument checks shared by the constructions. Each failure raises InvalidArgumentError naming the argument."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgumentError


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers, without floating point."""
    return -(-a // b)


def readonly(array) -> np.ndarray:
    """A float64 copy of ``array`` that cannot be written to."""
    out = np.array(array, dtype=np.float64, copy=True)
    out.setflags(write=False)
    return out


def as_array(value, name: str, ndim: int | None = None, shape: tuple | None = None) -> np.ndarray:
    """``value`` as a finite float64 array of the given ``ndim``/``shape`` (``None`` entries are free)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidArgumentError(name, f"could not be read as an array ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InvalidArgumentError(name, f"must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InvalidArgumentError(name, "must be real, got a complex array")
    arr = arr.astype(np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise InvalidArgumentError(name, f"must have {ndim} dimensions, got shape {arr.shape}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise InvalidArgumentError(name, f"must have shape {want}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(name, "contains NaN or infinite entries")
    return arr


def as_square(value, name: str, size: int | None = None) -> np.ndarray:
    """A finite float64 square matrix, of side ``size`` when given."""
    arr = as_array(value, name, ndim=2)
    if arr.shape[0] != arr.shape[1]:
        raise InvalidArgumentError(name, f"must be a square matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidArgumentError(name, "must not be empty")
    if size is not None and arr.shape[0] != size:
        raise InvalidArgumentError(name, f"must be {size} x {size} like the other matrices, got {arr.shape}")
    return arr


def as_square_sequence(values, name: str, size: int | None = None) -> tuple[np.ndarray, ...]:
    """A non-empty sequence of square matrices of one common side."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        raise InvalidArgumentError(name, "must be a sequence of matrices (one per layer), got one matrix")
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise InvalidArgumentError(name, f"must be a sequence of matrices, got {type(values).__name__}")
    if len(values) == 0:
        raise InvalidArgumentError(name, "must hold at least one matrix")
    out = []
    for i, v in enumerate(values):
        m = as_square(v, f"{name}[{i}]", size)
        size = m.shape[0]
        out.append(m)
    return tuple(out)


def as_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool, not a float) in ``[low, high]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise InvalidArgumentError(name, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise InvalidArgumentError(name, f"must be at most {high}, got {value}")
    return value


def as_ranks(rank, count: int, width: int, name: str = "rank") -> tuple[int, ...]:
    """One rank for every layer: an int in ``0..width`` repeated ``count`` times, or ``count`` such ints."""
    if isinstance(rank, np.ndarray) and rank.ndim == 0:
        rank = rank.item()  # a 0-d array is one rank (list() of it raised TypeError)
    if isinstance(rank, (Sequence, np.ndarray)) and not isinstance(rank, (str, bytes)):
        ranks = list(rank)
        if len(ranks) != count:
            raise InvalidArgumentError(
                name, f"per-layer ranks must give one rank for each of the {count} layers, got {len(ranks)}"
            )
        return tuple(as_int(r, f"{name}[{i}]", 0, width) for i, r in enumerate(ranks))
    return (as_int(rank, name, 0, width),) * count


def as_positive(value, name: str) -> float:
    """A finite, strictly positive real number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(name, f"must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise InvalidArgumentError(name, f"must be positive and finite, got {value}")
    return value


def as_tolerance(value, name: str = "tol"):
    """``None`` (the caller's default), or a finite real number ``>= 0`` returned unchanged.

    A NaN tolerance compares false with every singular value, so a numeric rank taken with it is 0 and a
    fit would call itself exact while wrong; a negative or infinite one is just as meaningless. The value
    is returned as given (not through ``float``) so that an ``mpmath.mpf`` keeps its precision.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(name, f"must be a real number (or None for the default), got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise InvalidArgumentError(name, f"must be finite and >= 0, got {value!r}")
    return value


def as_bool(value, name: str) -> bool:
    """A real boolean (``True``/``False`` or a numpy bool): never the truthiness of a string or a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(name, f"must be True or False, got {value!r}")
    return bool(value)


def as_nonnegative(value, name: str) -> float:
    """A finite real number ``>= 0``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(name, f"must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise InvalidArgumentError(name, f"must be finite and >= 0, got {value}")
    return value


def as_seed(seed, name: str = "seed"):
    """``None``, an integer ``>= 0``, a :class:`numpy.random.SeedSequence` or a :class:`numpy.random.Generator`."""
    if seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence)):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise InvalidArgumentError(
            name, f"must be None, an integer >= 0 or a numpy Generator, got {type(seed).__name__} {seed!r}"
        )
    if seed < 0:
        raise InvalidArgumentError(name, f"must be >= 0, got {seed}")
    return int(seed)


def rng_from(seed, name: str = "seed") -> np.random.Generator:
    """The generator a ``seed`` argument stands for (checked by :func:`as_seed`)."""
    seed = as_seed(seed, name)
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def as_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """A numpy floating dtype (``float16``/``float32``/``float64``...); integers and other kinds refused."""
    try:
        dt = np.dtype(dtype)
    except Exception:
        raise InvalidArgumentError(name, f"must be a numpy floating dtype, got {dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise InvalidArgumentError(name, f"must be a floating dtype (unit roundoff is defined for those), got {dt}")
    return dt


def as_sequence(values, name: str, what: str = "a sequence"):
    """``values`` as a list, refusing strings, generators, scalars and 2-D+ arrays passed where a sequence of
    items is expected (a generator would be consumed by the first look at it)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise InvalidArgumentError(name, f"must be {what}, got {type(values).__name__}")
    return list(values)
