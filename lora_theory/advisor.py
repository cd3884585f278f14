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

Which singular values count (THEORY.md §5): the stored change ``ΔW_stored = fl_t(W_tuned) - fl_b(W_base)``
carries the storage rounding of both checkpoints, a matrix ``N`` with ``|N_ij| <= u_b|W_base_ij| +
u_t|W_tuned_ij|`` (``u`` the unit roundoff of each tensor's *storage* dtype: bfloat16 ``2^-8``, float16
``2^-11``, float32 ``2^-24``). A singular value counts when it exceeds the noise floor of
:func:`lora_theory.noise_floor.noise_floor` (a bound on ``||N||_2``; by default the sharp one that assumes
independent-looking rounding errors, with the rigorous ``||B||_F`` reported beside it) and the SVD's own
rounding ``max(out, in) · eps_compute · σ_1``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ._types import ArrayLike
from .adapter import Adapter
from .errors import InvalidArgumentError, LoraTheoryError
from .fnn import fnn_best_partition, fnn_rank_requirement
from .linear import discrepancy_rank
from .models import FNN
from .noise_floor import (
    FLOOR_MODELS,
    NoiseFloor,
    _bounds_of_scaled,
    _dtype_name,
    _power_of_two_scale,
    _scaled_bound,
    _unscale,
    entries_beyond_rounding,
    noise_floor,
    smallest_subnormal,
    storage_roundoff,
)
from .partial_spectrum import PartialSpectrum
from .partition import partition_blocks, uniform_partition
from .thresholds import fnn_rank_threshold

if TYPE_CHECKING:
    import pandas

__all__ = [
    "PER_LAYER_NOTE",
    "LayerAdvice",
    "RankReport",
    "FNNAdvice",
    "advise_layers",
    "advise_fnn",
    "layer_advice_from_spectrum",
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
        w = matrix.T @ (matrix @ v)  # (in,)
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        est = math.sqrt(norm)
    return est


def _spectrum(singular_values, name: str = "singular_values") -> np.ndarray:
    """``singular_values`` as a finite, non-negative, non-increasing float64 vector, or a named error."""
    try:
        s = np.asarray(singular_values)
    except Exception as exc:
        raise InvalidArgumentError(name, f"could not be read as an array ({exc})") from None
    if (
        s.dtype == object
        or s.dtype == bool
        or not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating))
    ):
        raise InvalidArgumentError(name, f"must be a vector of real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if s.ndim != 1:
        raise InvalidArgumentError(name, f"must be a 1-D vector, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise InvalidArgumentError(name, "contains NaN or infinite values")
    if s.size and s.min() < 0:
        raise InvalidArgumentError(name, f"must be non-negative, got {s.min()!r}")
    if s.size > 1 and np.any(np.diff(s) > 0):
        raise InvalidArgumentError(name, "must be sorted in non-increasing order (singular values, largest first)")
    return s


def _energy_share(energy) -> float:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0 < energy <= 1:
        raise InvalidArgumentError("energy", f"must be a share in (0, 1], got {energy!r}")
    return float(energy)


def energy_rank(singular_values: ArrayLike, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{j<=r} σ_j^2 >= energy · Σ_j σ_j^2`` (0 for an empty or all-zero spectrum).

    Raises
    ------
    InvalidArgumentError
        ``energy`` not a number in ``(0, 1]``; ``singular_values`` not a 1-D vector of finite, non-negative,
        non-increasing numbers.
    """
    energy = _energy_share(energy)
    s = _spectrum(singular_values)
    if s.size == 0 or s[0] == 0.0:
        return 0
    sq = np.cumsum((s / s[0]) ** 2)  # scaled: no overflow for huge σ
    share = sq / sq[-1]
    # the last entry is exactly 1; a share equal to `energy` up to rounding counts as reaching it
    return int(np.argmax(share >= energy * (1.0 - 1e-12))) + 1


def tail_curves(singular_values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(σ_{r+1}, sqrt(Σ_{j>r} σ_j^2))`` for ``r = 0 .. k`` (``k`` singular values, both ``0`` at ``r = k``):
    the spectral and Frobenius error of the best rank-``r`` approximation (Eckart–Young).

    Raises
    ------
    InvalidArgumentError
        As :func:`energy_rank` for ``singular_values``.
    """
    s = _spectrum(singular_values)
    spectral = np.concatenate([s, [0.0]])  # (k + 1,)
    top = s[0] if s.size and s[0] > 0 else 1.0
    tail_sq = np.concatenate([np.cumsum(((s / top) ** 2)[::-1])[::-1], [0.0]])  # (k + 1,), in units of top^2
    return spectral, top * np.sqrt(tail_sq)


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
    rtol : float or None
        The relative tolerance when one was given (``tol`` of :func:`advise_layers`); ``None`` when the
        threshold is the noise floor.
    tolerance : float
        The absolute threshold a singular value must exceed to count: ``max(floor.spectral, svd_tolerance)``,
        or ``rtol · max(||W_base||_2, ||W_tuned||_2, σ_1)`` when ``rtol`` was given.
    exact_rank : int
        The reported rank: the number of singular values above ``tolerance``, the smallest LoRA rank that
        represents the change up to storage rounding (equal to ``rank_above_floor`` unless ``rtol`` was given).
    energy, energy_rank : float, int
        The smallest rank keeping the share ``energy`` of ``Σ σ_j^2`` over the counted singular values.
    spectral_tail, frobenius_tail : ndarray (min(out, in) + 1,)
        ``σ_{r+1}(ΔW)`` and ``sqrt(Σ_{j>r} σ_j^2)`` against ``r = 0 ..``: the error of the best rank-``r`` adapter.
    base_norm, delta_norm : float
        ``||W_base||_F`` and ``||ΔW||_F``.
    bias_change : ndarray (out,) or None
        ``b_tuned - b_base``.
    bias_changed : bool
        Whether ``||Δb||_2`` exceeds the same relative tolerance times ``max(||b_base||_2, ||b_tuned||_2)``.
    delta : ndarray (out, in) or None
        ``ΔW`` itself (not written to JSON), for :meth:`adapter`; ``None`` for advice built from a spectrum
        alone (:func:`layer_advice_from_spectrum`).
    floor : NoiseFloor or None
        The storage-rounding noise floor of this layer's stored change (THEORY.md §5).
    rank_above_floor : int
        Singular values above ``max(floor.spectral, svd_tolerance)``.
    rank_above_rigorous : int
        Singular values above ``max(floor.rigorous, svd_tolerance)``: counted whatever the rounding pattern.
        Below ``rank_above_floor`` when some counted directions rely on the independence assumption.
    spectrum_energy_rank : int
        The smallest rank keeping the share ``energy`` of ``Σ σ_j^2`` over the *whole* spectrum (rounding
        included).
    svd_tolerance : float
        ``max(out, in) · eps(compute_dtype) · σ_1``: the SVD's own rounding (numpy's ``matrix_rank`` rule).
    compute_dtype : str
        The dtype the singular values were computed in.
    entries_beyond_rounding : int or None
        How many entries of ``ΔW`` exceed their rounding bound (0: the stored change could be rounding alone);
        ``None`` when unknown (spectrum-only advice).
    spectrum : str
        ``"full"`` (every singular value computed) or ``"partial"`` (the leading ones, with certified bounds:
        :class:`lora_theory.PartialSpectrum`, THEORY.md §5.5). With a partial spectrum ``singular_values``
        holds the computed leading values only, ``spectral_tail`` ends with the certified bound on every
        value past them, and ``frobenius_tail`` is a certified *upper* bound of the error of the best
        rank-``r`` adapter.
    partial : PartialSpectrum or None
    rank_bounds : tuple (lo, hi) or None
        With a partial spectrum, ``lo <= rank_above_floor's true value <= hi``; ``rank_above_floor`` is
        ``hi`` (an adapter of that rank represents the change) and is proved only when ``lo == hi``.
    spectrum_energy_rank_bounds : tuple (lo, hi) or None
        With a partial spectrum, the interval around the energy rank over the whole spectrum;
        ``spectrum_energy_rank`` is ``hi``, exact when ``lo == hi``.
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
    floor: NoiseFloor | None = None
    rank_above_floor: int = 0
    rank_above_rigorous: int = 0
    spectrum_energy_rank: int = 0
    svd_tolerance: float = 0.0
    compute_dtype: str = "float64"
    entries_beyond_rounding: int | None = None
    spectrum: str = "full"
    partial: object = field(default=None, repr=False)
    rank_bounds: tuple | None = None
    spectrum_energy_rank_bounds: tuple | None = None

    @property
    def settled(self) -> bool:
        """Whether ``rank_above_floor`` is proved (always, from a full spectrum; a partial one may leave an
        interval, ``rank_bounds``)."""
        return self.rank_bounds is None or self.rank_bounds[0] == self.rank_bounds[1]

    @property
    def max_rank(self) -> int:
        """``min(out, in)``: the rank of a full update."""
        return int(min(self.shape))

    @property
    def below_floor(self) -> bool:
        """Whether no singular value of the stored change exceeds the noise floor (nothing to tell from rounding)."""
        return self.rank_above_floor == 0

    @property
    def relative_floor(self) -> float:
        """``floor.spectral / ||W_base||_F`` (the absolute floor when the base matrix is zero; NaN without a floor)."""
        if self.floor is None:
            return math.nan
        return self.floor.spectral / self.base_norm if self.base_norm > 0 else self.floor.spectral

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
        if self.delta is None:
            raise InvalidArgumentError(
                "rank", f"layer {self.name} was advised from its spectrum alone and holds no ΔW to factor"
            )
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
            "rtol": None if self.rtol is None else float(self.rtol),
            "tolerance": float(self.tolerance),
            "rank_above_floor": int(self.rank_above_floor),
            "rank_above_rigorous": int(self.rank_above_rigorous),
            "below_floor": bool(self.below_floor),
            "spectrum_energy_rank": int(self.spectrum_energy_rank),
            "svd_tolerance": float(self.svd_tolerance),
            "compute_dtype": self.compute_dtype,
            "entries_beyond_rounding": (
                None if self.entries_beyond_rounding is None else int(self.entries_beyond_rounding)
            ),
            "floor": None if self.floor is None else self.floor.to_dict(),
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
            "spectrum": self.spectrum,
            "settled": self.settled,
            "rank_bounds": None if self.rank_bounds is None else [int(v) for v in self.rank_bounds],
            "spectrum_energy_rank_bounds": (
                None if self.spectrum_energy_rank_bounds is None else [int(v) for v in self.spectrum_energy_rank_bounds]
            ),
            "partial": None if self.partial is None else self.partial.to_dict(),
        }


#: The columns of :meth:`RankReport.to_dataframe`, in order (``name`` becomes the index): the scalars of
#: :meth:`LayerAdvice.to_dict`, the layer's shape as ``out_features``/``in_features``, ``floor`` (the noise
#: floor's spectral value, NaN without one) and ``relative_floor``.
DATAFRAME_COLUMNS = (
    "name",
    "out_features",
    "in_features",
    "storage_dtype",
    "exact_rank",
    "max_rank",
    "energy_rank",
    "spectrum_energy_rank",
    "rank_above_floor",
    "rank_above_rigorous",
    "below_floor",
    "settled",
    "spectrum",
    "tolerance",
    "floor",
    "relative_floor",
    "base_norm",
    "delta_norm",
    "relative_change",
    "exact_parameters",
    "bias_changed",
    "bias_change_norm",
)


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
    rtol : float or None
        The relative tolerance when one was given, else ``None`` (the noise floor decides).
    note : str
        :data:`PER_LAYER_NOTE`.
    floor_model : str
        ``"independent"`` or ``"rigorous"``: which noise floor decided (THEORY.md §5).
    """

    layers: tuple
    vectors: tuple
    skipped: tuple
    energy: float
    rtol: float | None
    note: str = PER_LAYER_NOTE
    floor_model: str = "independent"

    @property
    def all_below_floor(self) -> bool:
        """Whether there are layers and none has a singular value above its noise floor."""
        return bool(self.layers) and all(a.below_floor for a in self.layers)

    @property
    def assumption_dependent(self) -> tuple:
        """Names of the layers whose counted directions are not all above the rigorous floor ``||B||_F``:
        their ranks hold only if their rounding errors look independent (THEORY.md §5.3)."""
        return tuple(a.name for a in self.layers if a.rank_above_floor > a.rank_above_rigorous)

    @property
    def floor_note(self) -> str:
        """One line on the noise floor: what it is, and that nothing exceeds it when every layer is below it."""
        floors = [a for a in self.layers if a.floor is not None]
        if not floors:
            return "no weight matrix: no noise floor"
        top = max(floors, key=lambda a: a.relative_floor)
        what = (
            f"noise floor of storage rounding ({self.floor_model} model): up to {top.relative_floor:.2e} of "
            f"||W_base||_F (layer {top.name}, {top.storage_dtype}, floor {top.floor.spectral:.2e})"
        )
        if self.all_below_floor:
            return (
                "every layer's change is below its " + what + ": no direction of a fine-tuning change can be "
                "told apart from rounding"
            )
        dependent = self.assumption_dependent
        if dependent and self.floor_model == "independent":
            return (
                what + f"; {len(dependent)} layer(s) have directions between the independent-rounding floor and "
                "the rigorous one (counted if the rounding errors look independent): "
                + ", ".join(dependent[:8])
                + (" ..." if len(dependent) > 8 else "")
            )
        return what

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
        params = sum(
            a.parameters(ranks[a.name]) + (a.shape[0] if lora_bias else 0) for a in self.layers if a.name in ranks
        )
        return {
            "lora_config": config,
            "choice": choice,
            "energy": self.energy,
            "ranks": dict(ranks),
            "bias_only": bias_only,
            "untargeted": untargeted,
            "parameters": int(params),
            "note": (
                self.note
                if ranks
                else self.floor_note + "; nothing to adapt"
                if self.all_below_floor
                else "no layer changed: nothing to adapt"
            ),
        }

    def to_dict(self) -> dict:
        return {
            "note": self.note,
            "energy": self.energy,
            "rtol": self.rtol,
            "floor_model": self.floor_model,
            "all_below_floor": self.all_below_floor,
            "floor_note": self.floor_note,
            "assumption_dependent": list(self.assumption_dependent),
            "layers": [a.to_dict() for a in self.layers],
            "vectors": [dict(v) for v in self.vectors],
            "skipped": [dict(s) for s in self.skipped],
            "total_exact_parameters": int(sum(a.parameters(a.exact_rank) for a in self.layers)),
            "total_energy_parameters": int(sum(a.parameters(a.energy_rank) for a in self.layers)),
        }

    def to_json(self, **kwargs: object) -> str:
        """:meth:`to_dict` as JSON text (``kwargs`` go to :func:`json.dumps`; ``indent=2`` unless given)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_dataframe(self) -> pandas.DataFrame:
        """The layers as a :class:`pandas.DataFrame`: one row per weight matrix (index ``name``, the checkpoint's
        order), one column per scalar of :meth:`LayerAdvice.to_dict` (:data:`DATAFRAME_COLUMNS`: ranks, norms,
        the noise floor's spectral value, parameters). The per-layer arrays (singular values, tails, bias
        changes) stay in :attr:`layers`.

        Needs pandas (``pip install pandas``, or the ``notebook`` extra); without it, raises
        :class:`ImportError` saying so.
        """
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "RankReport.to_dataframe needs pandas: pip install pandas (or lora-theory[notebook])"
            ) from None
        rows = []
        for a in self.layers:
            record = a.to_dict()
            row = {column: record[column] for column in DATAFRAME_COLUMNS if column in record}
            row["out_features"], row["in_features"] = (int(n) for n in a.shape)
            row["relative_floor"] = float(a.relative_floor)
            row["floor"] = math.nan if a.floor is None else float(a.floor.spectral)
            rows.append(row)
        return pandas.DataFrame(rows, columns=list(DATAFRAME_COLUMNS)).set_index("name")


# ------------------------------------------------------------------------------------------ per layer


_EPS_DTYPES = {2.0**-52: "float64", 2.0**-23: "float32", 2.0**-10: "float16", 2.0**-7: "bfloat16"}


def _dtype_of_eps(value, argument: str) -> str:
    """The storage dtype whose machine epsilon is ``value`` (``eps`` of :func:`advise_layers`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(argument, f"must be a finite machine epsilon, got {value!r}")
    name = _EPS_DTYPES.get(float(value))
    if name is None:
        raise InvalidArgumentError(
            argument,
            f"must be the machine epsilon of float64, float32, float16 or bfloat16 (2^-52, 2^-23, "
            f"2^-10, 2^-7), got {value!r}; pass the storage dtypes with `dtypes` instead",
        )
    return name


def _storage_dtypes(key, a, b, eps, dtypes) -> tuple[str, str]:
    """``(base, tuned)`` storage dtype names of tensor ``key``: ``dtypes``, else ``eps``, else the arrays' own."""
    if isinstance(dtypes, Mapping) and key in dtypes:
        given = dtypes[key]
        if isinstance(given, str) and "/" in given:
            given = tuple(given.split("/", 1))
        if isinstance(given, (tuple, list)):
            if len(given) != 2:
                raise InvalidArgumentError(
                    f"dtypes[{key!r}]", f"must be a dtype or a (base, tuned) pair, got {given!r}"
                )
            return _dtype_name(given[0], f"dtypes[{key!r}]"), _dtype_name(given[1], f"dtypes[{key!r}]")
        name = _dtype_name(given, f"dtypes[{key!r}]")
        return name, name
    if isinstance(eps, Mapping):
        if key in eps:
            name = _dtype_of_eps(eps[key], f"eps[{key!r}]")
            return name, name
    elif eps is not None:
        name = _dtype_of_eps(eps, "eps")
        return name, name
    return (_dtype_name(a.dtype, f"base[{key!r}] (its dtype)"), _dtype_name(b.dtype, f"tuned[{key!r}] (its dtype)"))


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


def advise_layers(
    base: Mapping[str, ArrayLike],
    tuned: Mapping[str, ArrayLike],
    *,
    tol: float | None = None,
    energy: float = 0.99,
    eps: float | Mapping[str, float] | None = None,
    dtypes: Mapping[str, object] | None = None,
    floor: str = "independent",
) -> RankReport:
    """The LoRA rank each layer's change needs, from two checkpoints of one architecture.

    Zeng & Lee 2024, Lemma 1 (linear models) with ``L = 1``, i.e. Eckart–Young, layer by layer (see
    :data:`PER_LAYER_NOTE` for why that is all a real checkpoint allows). A singular value of the stored change
    counts when it exceeds the storage-rounding noise floor (THEORY.md §5; :func:`lora_theory.noise_floor`).

    Parameters
    ----------
    base, tuned : mapping of str -> array
        State dicts (``name -> tensor``) of the frozen and of the fine-tuned model. Every 2-D float tensor is a
        weight matrix ``W`` of shape ``(out, in)`` (rectangular allowed); ``<layer>.bias`` (1-D, length
        ``out``) next to ``<layer>.weight`` is that layer's bias.
    tol : float, optional
        Relative tolerance ``rtol`` replacing the noise floor: a singular value of ``ΔW`` counts when it exceeds
        ``rtol · max(||W_base||_2, ||W_tuned||_2, σ_1(ΔW))`` (the floor is still computed and reported).
    energy : float in (0, 1]
        Spectrum share kept by ``energy_rank`` and ``spectrum_energy_rank``.
    eps : float or mapping of str -> float, optional
        Machine epsilon of the storage dtype of each tensor (``2^-52``, ``2^-23``, ``2^-10`` or ``2^-7``), for
        float64 copies of float32 / float16 / bfloat16 tensors; ``dtypes`` says the same more directly.
    dtypes : mapping of str -> dtype or (dtype, dtype), optional
        The storage dtype of each tensor (as :func:`lora_theory.storage_roundoff` accepts), or a ``(base,
        tuned)`` pair (also written ``"float32/bfloat16"``) when the two checkpoints differ. Default: ``eps``,
        else each array's own dtype.
    floor : {"independent", "rigorous"}
        Which noise floor decides (THEORY.md §5): the sharp one that assumes independent-looking rounding
        errors (default), or ``||B||_F`` that assumes nothing. Both are reported.

    Returns
    -------
    RankReport

    Raises
    ------
    InvalidArgumentError
        Not mappings, or empty (``base`` / ``tuned``); tensors present in one checkpoint only (argument
        ``tuned``, listing them); shapes that differ; integer or bool ``.weight`` / ``.bias`` tensors
        (quantised weights: dequantise first) or integer buffers that differ; complex or non-numeric tensors;
        NaN or infinite entries; entries so large that the change's norms overflow float64; ``tol`` not
        positive and finite; ``energy`` outside ``(0, 1]``; ``eps`` not a storage dtype's epsilon; unknown
        ``dtypes``; ``floor`` not a model name.
    LoraTheoryError
        The SVD of a change did not converge.
    """
    for side, value in (("base", base), ("tuned", tuned)):
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(
                side, f"must be a mapping name -> tensor (a state dict), got {type(value).__name__}"
            )
        if len(value) == 0:
            raise InvalidArgumentError(side, "holds no tensors")
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0 or not math.isfinite(tol)
    ):
        raise InvalidArgumentError("tol", f"must be a positive relative tolerance, got {tol!r}")
    energy = _energy_share(energy)
    if not isinstance(floor, str) or floor not in FLOOR_MODELS:
        raise InvalidArgumentError("floor", f"must be one of {FLOOR_MODELS}, got {floor!r}")
    if eps is not None and not isinstance(eps, Mapping):
        _dtype_of_eps(eps, "eps")
    if dtypes is not None and not isinstance(dtypes, Mapping):
        raise InvalidArgumentError("dtypes", f"must be a mapping name -> dtype, got {type(dtypes).__name__}")

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
            "tuned", "the checkpoints do not have the same architecture (" + "; ".join(parts) + ")"
        )

    arrays, skipped = {}, []
    for key in base:
        a = _as_tensor(base[key], "base", key)
        b = _as_tensor(tuned[key], "tuned", key)
        if a.shape != b.shape:
            raise InvalidArgumentError(
                f"tuned[{key!r}]", f"has shape {b.shape} but base has {a.shape}: the architectures differ"
            )
        floating = np.issubdtype(a.dtype, np.floating), np.issubdtype(b.dtype, np.floating)
        if not all(floating):
            if _is_parameter_key(key) or any(floating):
                side = "base" if not floating[0] else "tuned"
                bad = a if not floating[0] else b
                raise InvalidArgumentError(
                    f"{side}[{key!r}]",
                    f"is a non-float tensor ({bad.dtype}); weights must be floating point "
                    "(dequantise integer weights first)",
                )
            if not np.array_equal(a, b):
                raise InvalidArgumentError(
                    f"tuned[{key!r}]",
                    f"is a non-float tensor ({b.dtype}) that differs from base; "
                    "the rank advisor analyses floating-point weights only",
                )
            skipped.append({"name": key, "shape": list(a.shape), "reason": f"non-float buffer ({a.dtype}), unchanged"})
            continue
        for side, arr in (("base", a), ("tuned", b)):
            if not np.isfinite(arr).all():
                raise InvalidArgumentError(f"{side}[{key!r}]", "contains NaN or infinite entries")
        storage = _storage_dtypes(key, a, b, eps, dtypes)
        arrays[key] = (a, b, storage)

    matrices = [k for k, (a, _, _) in arrays.items() if a.ndim == 2 and a.size > 0]
    bias_of = {}
    for k in matrices:
        if k.endswith(".weight"):
            bk = k[: -len(".weight")] + ".bias"
            if bk in arrays and arrays[bk][0].shape == (arrays[k][0].shape[0],):
                bias_of[k] = bk
    bias_keys = set(bias_of.values())

    layers, vectors = [], []
    for key, (a, b, storage) in arrays.items():
        if key in bias_keys:
            continue
        if key in matrices:
            layers.append(_layer_advice(key, a, b, storage, tol, energy, floor, bias_of.get(key), arrays))
        elif a.ndim == 1:
            e = _power_of_two_scale(a, b)
            a_s, b_s = np.ldexp(a.astype(np.float64), -e), np.ldexp(b.astype(np.float64), -e)  # exact rescaling
            base_norm = _unscale(float(np.linalg.norm(a_s)), e, "its norm", f"base[{key!r}]")
            change = _unscale(float(np.linalg.norm(b_s - a_s)), e, "the norm of its change", f"tuned[{key!r}]")
            beyond = entries_beyond_rounding(a, b, *storage)
            vectors.append(
                {
                    "name": key,
                    "shape": list(a.shape),
                    "change_norm": change,
                    "relative_change": change / base_norm if base_norm > 0 else change,
                    "changed": beyond > 0,
                    "entries_beyond_rounding": beyond,
                }
            )
        else:
            reason = (
                "scalar"
                if a.ndim == 0
                else "empty"
                if a.size == 0
                else f"{a.ndim}-D tensor (not a matrix; flatten convolution kernels to (out, -1) to advise them)"
            )
            skipped.append({"name": key, "shape": list(a.shape), "reason": reason})
    return RankReport(
        layers=tuple(layers),
        vectors=tuple(vectors),
        skipped=tuple(skipped),
        energy=float(energy),
        rtol=None if tol is None else float(tol),
        floor_model=floor,
    )


def _storage_label(storage) -> str:
    return storage[0] if storage[0] == storage[1] else f"{storage[0]}/{storage[1]}"


def _layer_advice(key, a, b, storage, tol, energy, model, bias_key, arrays) -> LayerAdvice:
    """One layer: the change's spectrum and rounding bounds, computed on an exact power-of-two rescaling of
    both matrices (``max |W| < 1``: no overflow or underflow in the SVD and the norms), then unscaled."""
    e = _power_of_two_scale(a, b)
    with np.errstate(under="ignore"):
        W0 = np.ldexp(a.astype(np.float64), -e)  # (out, in), W_base · 2^-e
        W1 = np.ldexp(b.astype(np.float64), -e)  # (out, in), W_tuned · 2^-e
    delta = W1 - W0  # (out, in), |entries| < 2: no overflow
    try:
        s = np.linalg.svd(delta, compute_uv=False)  # (min(out, in),), scaled
    except np.linalg.LinAlgError as exc:
        raise LoraTheoryError(f"the SVD of the change of {key!r} did not converge ({exc})") from None
    u_b, u_t = storage_roundoff(storage[0]), storage_roundoff(storage[1])
    B = _scaled_bound(a, b, u_b, u_t, smallest_subnormal(storage[0]) + smallest_subnormal(storage[1]), e)
    bounds = _bounds_of_scaled(B, e, f"base[{key!r}]")
    beyond = int(np.count_nonzero(np.abs(delta) > B))
    del B
    where = f"tuned[{key!r}]"
    singular_values = np.array([_unscale(float(v), e, "the change's singular values", where) for v in s])
    delta_norm = _unscale(float(np.linalg.norm(delta)), e, "the change's norm", where)
    base_norm = _unscale(float(np.linalg.norm(W0)), e, "the base matrix's norm", f"base[{key!r}]")
    tolerance = rtol = None
    if tol is not None:
        rtol = float(tol)
        scale = max(_spectral_norm(W0), _spectral_norm(W1), float(s[0]) if s.size else 0.0)
        tolerance = _unscale(rtol * scale, e, "the tolerance", where)
    full_delta = np.ldexp(delta, e)  # finite: its norm was
    bias_change, bias_changed = None, False
    if bias_key is not None:
        b0, b1, bstorage = arrays[bias_key]
        with np.errstate(over="ignore"):
            bias_change = b1.astype(np.float64) - b0.astype(np.float64)  # (out,); overflow checked below
        if not np.isfinite(bias_change).all():
            raise InvalidArgumentError(f"tuned[{bias_key!r}]", "its change overflows float64: rescale the weights")
        if tol is None:
            bias_changed = entries_beyond_rounding(b0, b1, *bstorage) > 0
        else:
            scale = max(float(np.linalg.norm(b0.astype(np.float64))), float(np.linalg.norm(b1.astype(np.float64))))
            bias_changed = bool(np.linalg.norm(bias_change) > float(tol) * scale)
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return layer_advice_from_spectrum(
        name,
        key,
        a.shape,
        singular_values,
        noise_floor(bounds, model=model),
        base_norm=base_norm,
        delta_norm=delta_norm,
        storage_dtype=_storage_label(storage),
        energy=energy,
        compute_dtype="float64",
        tolerance=tolerance,
        rtol=rtol,
        entries_beyond_rounding=beyond,
        bias_key=bias_key,
        bias_change=bias_change,
        bias_changed=bias_changed,
        delta=full_delta,
    )


def layer_advice_from_spectrum(
    name: str,
    weight_key: str,
    shape: tuple[int, int],
    singular_values: ArrayLike,
    floor: NoiseFloor | None,
    *,
    base_norm: float,
    delta_norm: float,
    storage_dtype: str,
    energy: float = 0.99,
    compute_dtype: str = "float64",
    tolerance: float | None = None,
    rtol: float | None = None,
    entries_beyond_rounding: int | None = None,
    bias_key: str | None = None,
    bias_change: ArrayLike | None = None,
    bias_changed: bool = False,
    delta: ArrayLike | None = None,
    partial: PartialSpectrum | None = None,
) -> LayerAdvice:
    """A :class:`LayerAdvice` from a change's spectrum and noise floor, without the matrix (streaming callers).

    Zeng & Lee 2024, Lemma 1 with ``L = 1`` (Eckart–Young): the smallest LoRA rank representing the stored
    change up to storage rounding is the number of singular values above ``max(floor.spectral,
    svd_tolerance)``, ``svd_tolerance = max(out, in) · eps(compute_dtype) · σ_1`` (the SVD's own rounding).

    Parameters
    ----------
    name, weight_key : str
        The layer's module path and its checkpoint key.
    shape : tuple (out, in)
    singular_values : array (min(out, in),)
        *All* singular values of the stored ``ΔW`` (finite, non-negative, non-increasing).
    floor : NoiseFloor
        :func:`lora_theory.noise_floor` of the layer's :class:`RoundingBounds` (same ``shape``).
    base_norm, delta_norm : float
        ``||W_base||_F`` and ``||ΔW||_F`` (finite, ``>= 0``).
    storage_dtype : str
        The label recorded (``"bfloat16"`` or ``"float32/bfloat16"``).
    energy : float in (0, 1]
    compute_dtype : dtype
        What the SVD ran in (``"float32"`` for a float32 torch SVD); sets ``svd_tolerance``.
    tolerance, rtol : float, optional
        An absolute threshold replacing the floor, and the relative tolerance it came from (recorded).
    entries_beyond_rounding : int, optional
        :func:`lora_theory.entries_beyond_rounding` of the matrix, when the caller computed it.
    bias_key, bias_change, bias_changed : optional
        The layer's bias key, ``b_tuned - b_base`` (``(out,)``) and whether it changed beyond rounding.
    delta : array (out, in), optional
        ``ΔW`` when the caller keeps it (for :meth:`LayerAdvice.adapter`).
    partial : PartialSpectrum, optional
        A certified partial spectrum of ``ΔW`` (:func:`lora_theory.partial_spectrum`) in place of
        ``singular_values`` (then ``None``): the counts come from its certified bounds, as intervals where
        they are not settled (THEORY.md §5.5). ``svd_tolerance`` uses its computed ``σ̂_1``.

    Raises
    ------
    InvalidArgumentError
        A shape that is not two positive integers, a spectrum of the wrong length or not finite, non-negative
        and sorted, a floor of another shape, negative or non-finite norms or tolerance, unknown dtypes,
        ``energy`` outside ``(0, 1]``, a bias change or ``delta`` of the wrong shape.
    """
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in shape)
    ):
        raise InvalidArgumentError("shape", f"must be (out, in) with positive integers, got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    if partial is not None:
        return _advice_from_partial(
            name,
            weight_key,
            shape,
            partial,
            floor,
            base_norm=base_norm,
            delta_norm=delta_norm,
            storage_dtype=storage_dtype,
            energy=energy,
            compute_dtype=compute_dtype,
            tolerance=tolerance,
            rtol=rtol,
            bias_key=bias_key,
            bias_change=bias_change,
            bias_changed=bias_changed,
        )
    s = _spectrum(singular_values)
    if s.size != min(shape):
        raise InvalidArgumentError(
            "singular_values", f"must hold all min(out, in) = {min(shape)} singular values, got {s.size}"
        )
    if not isinstance(floor, NoiseFloor):
        raise InvalidArgumentError("floor", f"must be a NoiseFloor, got {type(floor).__name__}")
    if tuple(floor.shape) != shape:
        raise InvalidArgumentError("floor", f"is for shape {floor.shape}, the layer is {shape}")
    energy = _energy_share(energy)
    for label, value in (("base_norm", base_norm), ("delta_norm", delta_norm)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(label, f"must be a finite number >= 0, got {value!r}")
    if tolerance is not None and (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)
        or not math.isfinite(tolerance)
        or tolerance < 0
    ):
        raise InvalidArgumentError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
    compute = _dtype_name(compute_dtype, "compute_dtype")
    svd_tolerance = max(shape) * 2.0 * storage_roundoff(compute) * (float(s[0]) if s.size else 0.0)
    above_floor = max(floor.spectral, svd_tolerance)
    threshold = above_floor if tolerance is None else float(tolerance)
    exact = int(np.count_nonzero(s > threshold))
    if bias_change is not None:
        bias_change = np.asarray(bias_change, dtype=np.float64)
        if bias_change.shape != (shape[0],) or not np.isfinite(bias_change).all():
            raise InvalidArgumentError(
                "bias_change", f"must be a finite ({shape[0]},) vector, got shape {bias_change.shape}"
            )
    if delta is not None and np.shape(delta) != shape:
        raise InvalidArgumentError("delta", f"must have shape {shape}, got {np.shape(delta)}")
    spectral, frob = tail_curves(s)
    return LayerAdvice(
        name=str(name),
        weight_key=str(weight_key),
        shape=shape,
        singular_values=s,
        rtol=None if rtol is None else float(rtol),
        tolerance=float(threshold),
        exact_rank=exact,
        energy=energy,
        energy_rank=energy_rank(s[:exact], energy),
        spectral_tail=spectral,
        frobenius_tail=frob,
        base_norm=float(base_norm),
        delta_norm=float(delta_norm),
        storage_dtype=str(storage_dtype),
        bias_key=bias_key,
        bias_change=bias_change,
        bias_change_norm=0.0 if bias_change is None else float(np.linalg.norm(bias_change)),
        bias_changed=bool(bias_changed),
        delta=delta,
        floor=floor,
        rank_above_floor=int(np.count_nonzero(s > above_floor)),
        rank_above_rigorous=int(np.count_nonzero(s > max(floor.rigorous, svd_tolerance))),
        spectrum_energy_rank=energy_rank(s, energy),
        svd_tolerance=float(svd_tolerance),
        compute_dtype=compute,
        entries_beyond_rounding=None if entries_beyond_rounding is None else int(entries_beyond_rounding),
    )


def _advice_from_partial(
    name,
    weight_key,
    shape,
    partial,
    floor,
    *,
    base_norm,
    delta_norm,
    storage_dtype,
    energy,
    compute_dtype,
    tolerance,
    rtol,
    bias_key,
    bias_change,
    bias_changed,
) -> LayerAdvice:
    """:func:`layer_advice_from_spectrum` from a :class:`PartialSpectrum` (THEORY.md §5.5)."""
    if not isinstance(partial, PartialSpectrum):
        raise InvalidArgumentError("partial", f"must be a PartialSpectrum, got {type(partial).__name__}")
    if tuple(sorted(partial.shape)) != tuple(sorted(shape)):
        raise InvalidArgumentError("partial", f"is for shape {partial.shape}, the layer is {shape}")
    if not isinstance(floor, NoiseFloor) or tuple(floor.shape) != shape:
        raise InvalidArgumentError("floor", f"must be a NoiseFloor for shape {shape}")
    energy = _energy_share(energy)
    compute = _dtype_name(compute_dtype, "compute_dtype")
    s = _spectrum(partial.values, "partial.values")
    svd_tolerance = max(shape) * 2.0 * storage_roundoff(compute) * (float(s[0]) if s.size else 0.0)
    above_floor = max(floor.spectral, svd_tolerance)
    threshold = above_floor if tolerance is None else float(tolerance)
    bounds = partial.count(threshold)
    floor_bounds = partial.count(above_floor)
    rigorous = partial.count(max(floor.rigorous, svd_tolerance))
    exact = bounds[1]
    if bias_change is not None:
        bias_change = np.asarray(bias_change, dtype=np.float64)
        if bias_change.shape != (shape[0],) or not np.isfinite(bias_change).all():
            raise InvalidArgumentError(
                "bias_change", f"must be a finite ({shape[0]},) vector, got shape {bias_change.shape}"
            )
    spectral = np.concatenate([s, [partial.residual]])  # (b + 1,): σ̂, then the bound past them
    fro_sq = float(delta_norm) ** 2
    frob = np.sqrt(np.maximum(fro_sq - np.concatenate([[0.0], np.cumsum(partial.lower**2)]), 0.0))  # (b + 1,)
    e_bounds = partial.energy_rank_bounds(energy)
    return LayerAdvice(
        name=str(name),
        weight_key=str(weight_key),
        shape=shape,
        singular_values=s,
        rtol=None if rtol is None else float(rtol),
        tolerance=float(threshold),
        exact_rank=int(exact),
        energy=energy,
        energy_rank=energy_rank(s[: min(exact, s.size)], energy),
        spectral_tail=spectral,
        frobenius_tail=frob,
        base_norm=float(base_norm),
        delta_norm=float(delta_norm),
        storage_dtype=str(storage_dtype),
        bias_key=bias_key,
        bias_change=bias_change,
        bias_change_norm=0.0 if bias_change is None else float(np.linalg.norm(bias_change)),
        bias_changed=bool(bias_changed),
        delta=None,
        floor=floor,
        rank_above_floor=int(floor_bounds[1]),
        rank_above_rigorous=int(rigorous[0]),
        spectrum_energy_rank=int(e_bounds[1]),
        svd_tolerance=float(svd_tolerance),
        compute_dtype=compute,
        entries_beyond_rounding=None,
        spectrum="partial",
        partial=partial,
        rank_bounds=tuple(int(v) for v in floor_bounds),
        spectrum_energy_rank_bounds=tuple(int(v) for v in e_bounds),
    )


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


def advise_fnn(frozen: FNN, target: FNN) -> FNNAdvice:
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

    uniform_rank = fnn_rank_requirement(frozen, target)
    L, Lbar, D = frozen.depth, target.depth, frozen.width
    uniform = uniform_partition(L, Lbar)
    best, best_rank = fnn_best_partition(frozen, target)

    def block_ranks(sizes):
        return tuple(
            discrepancy_rank(frozen.weights[blk.start : blk.stop], target.weights[i])
            for i, blk in enumerate(partition_blocks(sizes))
        )

    return FNNAdvice(
        width=D,
        depth=L,
        target_depth=Lbar,
        uniform_partition=tuple(uniform),
        uniform_block_ranks=block_ranks(uniform),
        uniform_rank=int(uniform_rank),
        best_partition=tuple(best),
        best_block_ranks=block_ranks(best),
        best_rank=int(best_rank),
        generic_threshold=fnn_rank_threshold(D, L, Lbar),
    )
