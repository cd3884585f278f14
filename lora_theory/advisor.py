"""Rank advisor: which LoRA rank represents a fine-tuning change, layer by layer, and what a smaller one costs.

Two modes.

* :func:`advise_layers` (any two checkpoints of one architecture). For every weight matrix ``W`` (shape
  ``(out, in)``, rectangular allowed) the change ``ΔW = W_tuned - W_base`` is represented exactly by a LoRA
  adapter ``B A`` of rank ``r`` iff ``r >= rank(ΔW)``, and the best rank-``r`` adapter leaves
  ``||ΔW - B A||_2 = σ_{r+1}(ΔW)`` and ``||ΔW - B A||_F = sqrt(Σ_{j>r} σ_j(ΔW)^2)`` (Eckart–Young; Zeng & Lee
  2024, Lemma 1 with ``L = 1``). This per-layer answer is all the theory supports for a real checkpoint: the
  depth-aware savings of Theorems 3 and 6 need the tuned model to be a shallower network of the same kind,
  which a fine-tuned checkpoint is not (:data:`PER_LAYER_NOTE`).
* :func:`advise_fnn` (a plain ReLU MLP base and a separately given shallower target MLP): the requirement
  ``max_i ceil(rank(E_i) / |P_i|)`` of Zeng & Lee 2024, Theorem 3 (uniform partition) and Theorem 6 (best
  consecutive partition), which can be far below the per-layer ranks.

Numeric rank (THEORY.md §1, STYLE.md "Numerics"): a singular value of ``ΔW`` counts when it exceeds
``tol_abs = rtol · max(||W_base||_2, ||W_tuned||_2, σ_1(ΔW))``. ``ΔW`` is a difference of two stored matrices
and inherits their rounding (entrywise ``u·|W|`` in the storage precision), whose spectral norm is far below
that scale; the default ``rtol = max(out, in) · eps`` (numpy's ``matrix_rank`` convention) uses the ``eps``
of the *storage* dtype (float32: 1.2e-7, bfloat16: 7.8e-3), not of the float64 copy the SVD runs on.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter
from .errors import InvalidArgumentError

__all__ = [
    "PER_LAYER_NOTE",
    "LayerAdvice",
    "RankReport",
    "FNNAdvice",
    "advise_layers",
    "advise_fnn",
    "energy_rank",
    "tail_curves",
]

#: What the per-layer report can and cannot claim; written into every report.
PER_LAYER_NOTE = (
    "Per-layer answer (Eckart-Young): a LoRA adapter of rank r reproduces a layer's change dW exactly iff "
    "r >= rank(dW), and the best rank-r adapter leaves sigma_{r+1}(dW) (spectral) and "
    "sqrt(sum_{j>r} sigma_j^2) (Frobenius). For real checkpoints this is all the theory supports: the "
    "depth-aware requirement of Zeng & Lee 2024 (Theorems 3 and 6), where adapting several layers lowers the "
    "rank each needs, holds for a plain ReLU MLP base and a shallower target MLP (advise_fnn), not for the "
    "layer-wise changes of a fine-tuned checkpoint."
)


def _spectral_norm(matrix: np.ndarray) -> float:
    """``||M||_2``: exact for matrices up to 512 on their short side, 50 power iterations above (a tolerance
    scale needs a few correct digits, not sixteen)."""
    if matrix.size == 0:
        return 0.0
    if min(matrix.shape) <= 512:
        return float(np.linalg.norm(matrix, 2))
    v = np.random.default_rng(0).standard_normal(matrix.shape[1])
    est = 0.0
    for _ in range(50):
        w = matrix.T @ (matrix @ v)                                     # (in,)
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        est = math.sqrt(norm)
    return est


def energy_rank(singular_values, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{j<=r} σ_j^2 >= energy · Σ_j σ_j^2`` (0 for an all-zero spectrum)."""
    s = np.asarray(singular_values, dtype=np.float64)
    sq = np.cumsum(s ** 2)
    if sq.size == 0 or sq[-1] == 0.0:
        return 0
    share = sq / sq[-1]
    # the last entry is exactly 1; a share equal to `energy` up to rounding counts as reaching it
    return int(np.argmax(share >= energy * (1.0 - 1e-12))) + 1


def tail_curves(singular_values) -> tuple[np.ndarray, np.ndarray]:
    """``(σ_{r+1}, sqrt(Σ_{j>r} σ_j^2))`` for ``r = 0 .. k`` (``k`` singular values, both ``0`` at ``r = k``):
    the spectral and Frobenius error of the best rank-``r`` approximation (Eckart–Young)."""
    s = np.asarray(singular_values, dtype=np.float64)
    spectral = np.concatenate([s, [0.0]])                               # (k + 1,)
    tail_sq = np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]])  # (k + 1,)
    return spectral, np.sqrt(tail_sq)


@dataclass(frozen=True, eq=False)
class LayerAdvice:
    """The rank analysis of one weight matrix's change ``ΔW = W_tuned - W_base``.

    Attributes
    ----------
    name : str
        The layer (module path): the checkpoint key without ``.weight``; PEFT's ``target_modules`` name.
    weight_key, bias_key : str, str or None
        The checkpoint keys of the weight and of its bias (``None`` when the layer has none).
    shape : tuple (out, in)
    singular_values : ndarray (min(out, in),)
        ``σ(ΔW)``, descending.
    rtol, tolerance : float
        The relative tolerance and the absolute threshold ``rtol · max(||W_base||_2, ||W_tuned||_2, σ_1)``.
    exact_rank : int
        Numeric ``rank(ΔW)``: the smallest LoRA rank that represents the change exactly (to the tolerance).
    energy, energy_rank : float, int
        The smallest rank keeping the share ``energy`` of ``Σ σ_j^2`` over the numeric singular values.
    spectral_tail, frobenius_tail : ndarray (min(out, in) + 1,)
        ``σ_{r+1}(ΔW)`` and ``sqrt(Σ_{j>r} σ_j^2)`` against ``r = 0 ..``: the error of the best rank-``r`` adapter.
    base_norm, delta_norm : float
        ``||W_base||_F`` and ``||ΔW||_F``.
    bias_change : ndarray (out,) or None
        ``b_tuned - b_base``.
    bias_changed : bool
        Whether ``||Δb||_2`` exceeds the same relative tolerance times ``max(||b_base||_2, ||b_tuned||_2)``.
    delta : ndarray (out, in)
        ``ΔW`` itself (not written to JSON), for :meth:`adapter`.
    """

    name: str
    weight_key: str
    shape: tuple
    singular_values: np.ndarray
    rtol: float
    tolerance: float
    exact_rank: int
    energy: float
    energy_rank: int
    spectral_tail: np.ndarray
    frobenius_tail: np.ndarray
    base_norm: float
    delta_norm: float
    storage_dtype: str
    bias_key: str | None = None
    bias_change: np.ndarray | None = None
    bias_change_norm: float = 0.0
    bias_changed: bool = False
    delta: np.ndarray = field(default=None, repr=False)

    @property
    def max_rank(self) -> int:
        """``min(out, in)``: the rank of a full update."""
        return int(min(self.shape))

    @property
    def relative_change(self) -> float:
        """``||ΔW||_F / ||W_base||_F`` (the absolute change when the base matrix is zero)."""
        return self.delta_norm / self.base_norm if self.base_norm > 0 else self.delta_norm

    def parameters(self, rank: int) -> int:
        """``r · (out + in)``: the parameters of a rank-``r`` adapter on this layer."""
        return int(rank) * (int(self.shape[0]) + int(self.shape[1]))

    def rank(self, choice: str = "exact") -> int:
        """``exact_rank`` (``choice="exact"``) or ``energy_rank`` (``"energy"``)."""
        if choice == "exact":
            return self.exact_rank
        if choice == "energy":
            return self.energy_rank
        raise InvalidArgumentError("choice", f"must be 'exact' or 'energy', got {choice!r}")

    def adapter(self, rank: int | None = None) -> Adapter:
        """The best rank-``rank`` adapter of ``ΔW`` (truncated SVD; default ``exact_rank``)."""
        r = self.exact_rank if rank is None else int(rank)
        if not 0 <= r <= self.max_rank:
            raise InvalidArgumentError("rank", f"must be in 0..{self.max_rank} for layer {self.name}, got {r}")
        return Adapter.from_delta(self.delta, r)

    def to_dict(self) -> dict:
        """A JSON-ready record (lists of floats, no arrays)."""
        return {
            "name": self.name,
            "weight_key": self.weight_key,
            "shape": [int(n) for n in self.shape],
            "storage_dtype": self.storage_dtype,
            "exact_rank": int(self.exact_rank),
            "max_rank": self.max_rank,
            "energy": float(self.energy),
            "energy_rank": int(self.energy_rank),
            "rtol": float(self.rtol),
            "tolerance": float(self.tolerance),
            "singular_values": [float(v) for v in self.singular_values],
            "spectral_tail": [float(v) for v in self.spectral_tail],
            "frobenius_tail": [float(v) for v in self.frobenius_tail],
            "base_norm": float(self.base_norm),
            "delta_norm": float(self.delta_norm),
            "relative_change": float(self.relative_change),
            "exact_parameters": self.parameters(self.exact_rank),
            "bias_key": self.bias_key,
            "bias_changed": bool(self.bias_changed),
            "bias_change_norm": float(self.bias_change_norm),
            "bias_change": None if self.bias_change is None else [float(v) for v in self.bias_change],
        }


@dataclass(frozen=True, eq=False)
class RankReport:
    """The result of :func:`advise_layers`.

    Attributes
    ----------
    layers : tuple of LayerAdvice
        One per weight matrix, in the base checkpoint's order.
    vectors : tuple of dict
        Changes of other 1-D float tensors (norm scales, biases without a matrix): ``name``, ``shape``,
        ``change_norm``, ``relative_change``. LoRA does not adapt them (PEFT: ``modules_to_save``).
    skipped : tuple of dict
        Tensors not analysed (integer buffers, scalars, tensors of 3 or more dimensions), with the reason.
    energy : float
        The energy share used for ``energy_rank``.
    note : str
        :data:`PER_LAYER_NOTE`.
    """

    layers: tuple
    vectors: tuple
    skipped: tuple
    energy: float
    rtol: float | None
    note: str = PER_LAYER_NOTE

    def layer(self, name: str) -> LayerAdvice:
        """The advice for layer ``name`` (with or without the ``.weight`` suffix)."""
        for advice in self.layers:
            if name in (advice.name, advice.weight_key):
                return advice
        raise InvalidArgumentError("name", f"no layer {name!r}; layers: {[a.name for a in self.layers]}")

    @property
    def exact_ranks(self) -> dict:
        """``{name: exact_rank}``."""
        return {a.name: a.exact_rank for a in self.layers}

    @property
    def energy_ranks(self) -> dict:
        """``{name: energy_rank}``."""
        return {a.name: a.energy_rank for a in self.layers}

    def peft_proposal(self, choice: str = "exact") -> dict:
        """A PEFT ``LoraConfig`` proposal with one rank per layer and scale 1.

        Layers whose weight changed get their ``exact_rank`` (or ``energy_rank``); a layer whose weight is
        unchanged but whose bias changed gets rank 1 with zero factors and carries the bias change through
        ``lora_B.bias`` (PEFT refuses ``r = 0``; ``lora_bias`` needs PEFT 0.14 or newer); unchanged layers are
        not targeted. ``r = lora_alpha`` is the largest rank and ``alpha_pattern`` equals ``rank_pattern``, so
        PEFT's scale ``lora_alpha / r`` is 1 on every layer.

        Returns
        -------
        dict
            ``{"lora_config": <LoraConfig keyword arguments>, "choice", "energy", "ranks", "bias_only",
            "untargeted", "parameters", "note"}``; ``LoraConfig(**proposal["lora_config"])`` builds the config.
        """
        ranks, bias_only, untargeted = {}, [], []
        for a in self.layers:
            r = a.rank(choice)
            if r > 0:
                ranks[a.name] = r
            elif a.bias_changed:
                ranks[a.name] = 1
                bias_only.append(a.name)
            else:
                untargeted.append(a.name)
        top = max(ranks.values(), default=0)
        lora_bias = any(a.bias_changed for a in self.layers if a.name in ranks)
        config = {
            "peft_type": "LORA",
            "r": top,
            "lora_alpha": top,
            "target_modules": list(ranks),
            "rank_pattern": dict(ranks),
            "alpha_pattern": dict(ranks),
            "bias": "none",
            "lora_bias": lora_bias,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "lora_dropout": 0.0,
        }
        params = sum(a.parameters(ranks[a.name]) + (a.shape[0] if lora_bias else 0)
                     for a in self.layers if a.name in ranks)
        return {
            "lora_config": config,
            "choice": choice,
            "energy": self.energy,
            "ranks": dict(ranks),
            "bias_only": bias_only,
            "untargeted": untargeted,
            "parameters": int(params),
            "note": self.note if ranks else "no layer changed: nothing to adapt",
        }

    def to_dict(self) -> dict:
        return {
            "note": self.note,
            "energy": self.energy,
            "rtol": self.rtol,
            "layers": [a.to_dict() for a in self.layers],
            "vectors": [dict(v) for v in self.vectors],
            "skipped": [dict(s) for s in self.skipped],
            "total_exact_parameters": int(sum(a.parameters(a.exact_rank) for a in self.layers)),
            "total_energy_parameters": int(sum(a.parameters(a.energy_rank) for a in self.layers)),
        }

    def to_json(self, **kwargs) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)


# ------------------------------------------------------------------------------------------ per layer


def _storage_eps(name, array, eps) -> float:
    if isinstance(eps, Mapping):
        if name in eps:
            return float(eps[name])
    elif eps is not None:
        return float(eps)
    if np.issubdtype(array.dtype, np.floating):
        return float(np.finfo(array.dtype).eps)
    return float(np.finfo(np.float64).eps)


def _as_tensor(value, side: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InvalidArgumentError(f"{side}[{key!r}]", f"could not be read as an array ({exc})") from None
    if arr.dtype == object:
        raise InvalidArgumentError(f"{side}[{key!r}]", "is not a numeric tensor (dtype object)")
    if np.iscomplexobj(arr):
        raise InvalidArgumentError(f"{side}[{key!r}]", f"is complex ({arr.dtype}); LoRA adapts real weights")
    return arr


def _is_parameter_key(key: str) -> bool:
    return key.endswith(".weight") or key.endswith(".bias") or key in ("weight", "bias")


def advise_layers(base, tuned, *, tol: float | None = None, energy: float = 0.99, eps=None,
                  dtypes=None) -> RankReport:
    """The LoRA rank each layer's change needs, from two checkpoints of one architecture.

    Zeng & Lee 2024, Lemma 1 (linear models) with ``L = 1``, i.e. Eckart–Young, layer by layer (see
    :data:`PER_LAYER_NOTE` for why that is all a real checkpoint allows).

    Parameters
    ----------
    base, tuned : mapping of str -> array
        State dicts (``name -> tensor``) of the frozen and of the fine-tuned model. Every 2-D float tensor is a
        weight matrix ``W`` of shape ``(out, in)`` (rectangular allowed); ``<layer>.bias`` (1-D, length
        ``out``) next to ``<layer>.weight`` is that layer's bias.
    tol : float, optional
        Relative tolerance ``rtol``: a singular value of ``ΔW`` counts when it exceeds
        ``rtol · max(||W_base||_2, ||W_tuned||_2, σ_1(ΔW))``. Default ``max(out, in) · eps``.
    energy : float in (0, 1]
        Spectrum share kept by ``energy_rank``.
    eps : float or mapping of str -> float, optional
        Machine epsilon of the storage dtype of each tensor (the checkpoint readers pass it when they hand
        over float64 copies of float32 / bfloat16 tensors). Default: the ``eps`` of each array's own dtype.
    dtypes : mapping of str -> str, optional
        The storage dtype names to record in the report (default: each array's own dtype).

    Returns
    -------
    RankReport

    Raises
    ------
    InvalidArgumentError
        Not mappings, or empty (``base`` / ``tuned``); tensors present in one checkpoint only (argument
        ``tuned``, listing them); shapes that differ; integer or bool ``.weight`` / ``.bias`` tensors
        (quantised weights: dequantise first) or integer buffers that differ; complex or non-numeric tensors;
        NaN or infinite entries; ``tol`` not positive; ``energy`` outside ``(0, 1]``.
    """
    for side, value in (("base", base), ("tuned", tuned)):
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(side, f"must be a mapping name -> tensor (a state dict), got {type(value).__name__}")
        if len(value) == 0:
            raise InvalidArgumentError(side, "holds no tensors")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0
                            or not math.isfinite(tol)):
        raise InvalidArgumentError("tol", f"must be a positive relative tolerance, got {tol!r}")
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0 < energy <= 1:
        raise InvalidArgumentError("energy", f"must be a share in (0, 1], got {energy!r}")

    missing = [k for k in base if k not in tuned]
    extra = [k for k in tuned if k not in base]
    if missing or extra:
        def short(names):
            return repr(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing from tuned: {short(missing)}")
        if extra:
            parts.append(f"only in tuned: {short(extra)}")
        raise InvalidArgumentError(
            "tuned", "the checkpoints do not have the same architecture (" + "; ".join(parts) + ")")

    arrays, skipped = {}, []
    for key in base:
        a = _as_tensor(base[key], "base", key)
        b = _as_tensor(tuned[key], "tuned", key)
        if a.shape != b.shape:
            raise InvalidArgumentError(
                f"tuned[{key!r}]", f"has shape {b.shape} but base has {a.shape}: the architectures differ")
        floating = np.issubdtype(a.dtype, np.floating), np.issubdtype(b.dtype, np.floating)
        if not all(floating):
            if _is_parameter_key(key) or any(floating):
                side = "base" if not floating[0] else "tuned"
                bad = a if not floating[0] else b
                raise InvalidArgumentError(
                    f"{side}[{key!r}]",
                    f"is a non-float tensor ({bad.dtype}); weights must be floating point "
                    "(dequantise integer weights first)")
            if not np.array_equal(a, b):
                raise InvalidArgumentError(
                    f"tuned[{key!r}]", f"is a non-float tensor ({b.dtype}) that differs from base; "
                    "the rank advisor analyses floating-point weights only")
            skipped.append({"name": key, "shape": list(a.shape), "reason": f"non-float buffer ({a.dtype}), unchanged"})
            continue
        for side, arr in (("base", a), ("tuned", b)):
            if not np.isfinite(arr).all():
                raise InvalidArgumentError(f"{side}[{key!r}]", "contains NaN or infinite entries")
        dtype = str(dtypes[key]) if isinstance(dtypes, Mapping) and key in dtypes else str(a.dtype)
        arrays[key] = (a, b, max(_storage_eps(key, a, eps), _storage_eps(key, b, eps)), dtype)

    matrices = [k for k, (a, _, _, _) in arrays.items() if a.ndim == 2 and a.size > 0]
    bias_of = {}
    for k in matrices:
        if k.endswith(".weight"):
            bk = k[: -len(".weight")] + ".bias"
            if bk in arrays and arrays[bk][0].shape == (arrays[k][0].shape[0],):
                bias_of[k] = bk
    bias_keys = set(bias_of.values())

    layers, vectors = [], []
    for key, (a, b, e, dtype) in arrays.items():
        if key in bias_keys:
            continue
        if key in matrices:
            layers.append(_layer_advice(key, a, b, e, dtype, tol, energy, bias_of.get(key), arrays))
        elif a.ndim == 1:
            d = b.astype(np.float64) - a.astype(np.float64)
            base_norm = float(np.linalg.norm(a))
            change = float(np.linalg.norm(d))
            vectors.append({"name": key, "shape": list(a.shape), "change_norm": change,
                            "relative_change": change / base_norm if base_norm > 0 else change})
        else:
            reason = ("scalar" if a.ndim == 0 else "empty" if a.size == 0 else
                      f"{a.ndim}-D tensor (not a matrix; flatten convolution kernels to (out, -1) to advise them)")
            skipped.append({"name": key, "shape": list(a.shape), "reason": reason})
    return RankReport(layers=tuple(layers), vectors=tuple(vectors), skipped=tuple(skipped),
                      energy=float(energy), rtol=None if tol is None else float(tol))


def _layer_advice(key, a, b, eps, dtype, tol, energy, bias_key, arrays) -> LayerAdvice:
    W0 = a.astype(np.float64)                                           # (out, in)
    W1 = b.astype(np.float64)                                           # (out, in)
    delta = W1 - W0                                                     # (out, in)
    s = np.linalg.svd(delta, compute_uv=False)                          # (min(out, in),)
    rtol = max(delta.shape) * eps if tol is None else float(tol)
    scale = max(_spectral_norm(W0), _spectral_norm(W1), float(s[0]) if s.size else 0.0)
    threshold = rtol * scale
    exact = int(np.sum(s > threshold))
    spectral, frob = tail_curves(s)
    bias_change, bias_norm, bias_changed = None, 0.0, False
    if bias_key is not None:
        b0, b1, beps, _ = arrays[bias_key]
        b0 = b0.astype(np.float64)
        b1 = b1.astype(np.float64)
        bias_change = b1 - b0                                           # (out,)
        bias_norm = float(np.linalg.norm(bias_change))
        btol = (b0.size * beps if tol is None else float(tol)) * max(np.linalg.norm(b0), np.linalg.norm(b1))
        bias_changed = bool(bias_norm > btol)
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return LayerAdvice(
        name=name, weight_key=key, shape=tuple(int(n) for n in delta.shape), singular_values=s, rtol=rtol,
        tolerance=threshold, exact_rank=exact, energy=float(energy), energy_rank=energy_rank(s[:exact], energy),
        spectral_tail=spectral, frobenius_tail=frob, base_norm=float(np.linalg.norm(W0)),
        delta_norm=float(np.linalg.norm(delta)), storage_dtype=dtype, bias_key=bias_key,
        bias_change=bias_change, bias_change_norm=bias_norm, bias_changed=bias_changed, delta=delta)


# ------------------------------------------------------------------------------------------ depth-aware


@dataclass(frozen=True, eq=False)
class FNNAdvice:
    """The depth-aware requirement for a ReLU MLP base and a shallower target MLP (Theorems 3 and 6).

    Attributes
    ----------
    width, depth, target_depth : int
        ``D``, ``L``, ``L̄``.
    uniform_partition, uniform_block_ranks : tuple of int
        Block sizes of the uniform partition and ``rank(E_i)`` for its blocks.
    uniform_rank : int
        ``max_i ceil(rank(E_i) / |P_i|)`` for the uniform partition (Theorem 3).
    best_partition, best_block_ranks, best_rank : tuple of int, tuple of int, int
        The consecutive partition minimising it, the ranks of its block discrepancies, and that rank
        (Theorem 6).
    generic_threshold : int
        ``ceil(D / floor(L / L̄))``: what generic weights would need.
    """

    width: int
    depth: int
    target_depth: int
    uniform_partition: tuple
    uniform_block_ranks: tuple
    uniform_rank: int
    best_partition: tuple
    best_block_ranks: tuple
    best_rank: int
    generic_threshold: int

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def advise_fnn(frozen, target) -> FNNAdvice:
    """The smallest uniform LoRA-rank that makes a frozen ReLU MLP equal a shallower target MLP.

    Zeng & Lee 2024, Theorem 3 (uniform partition) and Theorem 6 (general partition), at instance level:
    block discrepancies ``E_i = T_i - Π_{l ∈ P_i} W_l`` and ``max_i ceil(rank(E_i) / |P_i|)``.

    Parameters
    ----------
    frozen : FNN
        ``f0`` (depth ``L``, width ``D``, weights ``W_l``).
    target : FNN
        ``f̄`` (depth ``L̄ <= L``, weights ``T_i``), same width, activation and ``final_relu``.

    Raises
    ------
    InvalidArgumentError
        As :func:`lora_theory.fnn.fnn_rank_requirement`.
    """
    from .fnn import fnn_best_partition, fnn_rank_requirement
    from .linear import discrepancy_rank
    from .partition import partition_blocks, uniform_partition
    from .thresholds import fnn_rank_threshold

    uniform_rank = fnn_rank_requirement(frozen, target)
    L, Lbar, D = frozen.depth, target.depth, frozen.width
    uniform = uniform_partition(L, Lbar)
    best, best_rank = fnn_best_partition(frozen, target)

    def block_ranks(sizes):
        return tuple(discrepancy_rank(frozen.weights[blk.start:blk.stop], target.weights[i])
                     for i, blk in enumerate(partition_blocks(sizes)))

    return FNNAdvice(
        width=D, depth=L, target_depth=Lbar, uniform_partition=tuple(uniform),
        uniform_block_ranks=block_ranks(uniform), uniform_rank=int(uniform_rank),
        best_partition=tuple(best), best_block_ranks=block_ranks(best), best_rank=int(best_rank),
        generic_threshold=fnn_rank_threshold(D, L, Lbar))
