"""lora-theory: the constructive proofs of Zeng & Lee, *The Expressive Power of Low-Rank Adaptation* (ICLR 2024).

Every result of the paper as a function that builds its object (LoRA adapters, biases, witnesses,
certificates) and reports what the result predicts about it. numpy, scipy, sympy and mpmath only;
constructions in float64, exact rationals or raised precision.

=====================================  ==========================================================
Result (Zeng & Lee 2024)               Functions
=====================================  ==========================================================
Lemma 1 (linear models)                :func:`lora_linear`, :func:`linear_optimal_error`,
                                       :func:`linear_gaussian_mse`, :func:`linear_rank_requirement`,
                                       :func:`optimality_gap`
Theorem 3 / 6 (ReLU FNN, partitions)   :func:`lora_fnn`, :func:`fnn_rank_requirement`,
                                       :func:`fnn_best_partition`, :func:`fnn_rank_threshold`
Theorem 5 setting: project's bound     :func:`fnn_error_bound`, :func:`fnn_error_bound_at`
Lemma 4 (final-layers tuning)          :func:`final_layers_witness`, :func:`lora_parameter_count`,
                                       :func:`final_layers_parameter_count`
Theorem 7 (transformers)               :func:`lora_tfn`, :func:`tfn_rank_requirement`,
                                       :func:`tfn_rank_threshold`
Exact / high-precision checks          :func:`certify_linear`, :func:`certify_fnn`, :func:`certify_tfn`,
                                       :func:`lora_linear_mp`, :func:`lora_fnn_mp`
Rank advice for real checkpoints       :func:`advise_layers`, :func:`advise_fnn`,
(Eckart–Young per layer; Thm 3 / 6)    :func:`layer_advice_from_spectrum`, :func:`energy_rank`,
                                       :func:`tail_curves`
Storage-rounding noise floor           :func:`storage_roundoff`, :func:`smallest_subnormal`,
(the project's, THEORY.md §5)          :func:`rounding_bounds`, :func:`noise_floor`,
                                       :func:`entries_beyond_rounding`
Ranks under a budget (the project's,   :func:`allocate_ranks`, :func:`uniform_ranks`
THEORY.md §6)
Certified partial spectra (the         :func:`partial_spectrum`, :func:`partial_spectrum_from_blocks`,
project's, THEORY.md §5.5)             :class:`PartialSpectrum`
=====================================  ==========================================================
"""

from . import symbolic as symbolic
from .adapter import Adapter
from .advisor import (
    FNNAdvice,
    LayerAdvice,
    RankReport,
    advise_fnn,
    advise_layers,
    energy_rank,
    layer_advice_from_spectrum,
    tail_curves,
)
from .allocation import RankAllocation, allocate_ranks, uniform_ranks
from .bounds import ErrorBound, fnn_error_bound, fnn_error_bound_at
from .errors import IllConditionedWarning, InvalidArgumentError, LoraTheoryError, NumericalError, SingularMatrixError
from .final_layers import Witness, final_layers_parameter_count, final_layers_witness, lora_parameter_count
from .fnn import (
    BlockFit,
    Domain,
    FNNFit,
    block_discrepancies,
    fnn_best_partition,
    fnn_rank_requirement,
    lora_fnn,
    sample_ball,
)
from .highprec import (
    HighPrecisionFNNFit,
    HighPrecisionLinearFit,
    HighPrecisionTFNFit,
    PrecisionAdvice,
    choose_digits,
    lora_fnn_mp,
    lora_linear_mp,
    lora_tfn_mp,
    suggest_precision,
)
from .linear import (
    LinearFit,
    OptimalityGap,
    discrepancy,
    discrepancy_rank,
    linear_gaussian_mse,
    linear_optimal_error,
    linear_rank_requirement,
    lora_linear,
    optimality_gap,
    product,
)
from .models import FNN, TFN, random_fnn, random_linear, random_tfn
from .noise_floor import (
    FLOOR_SAFETY,
    NoiseFloor,
    RoundingBounds,
    entries_beyond_rounding,
    noise_floor,
    rounding_bounds,
    smallest_subnormal,
    storage_roundoff,
)
from .numerics import condition_number, numeric_rank, relative_error, tolerance, unit_roundoff
from .partial_spectrum import PartialSpectrum, partial_spectrum, partial_spectrum_from_blocks
from .partition import best_partition, check_partition, partition_blocks, uniform_partition
from .symbolic import (
    Certificate,
    Check,
    certify_fnn,
    certify_linear,
    certify_tfn,
    fnn_rank_threshold_expr,
    linear_rank_threshold_expr,
    random_rational_fnn,
    random_rational_linear,
    random_rational_tfn,
    tfn_rank_threshold_expr,
)
from .tfn import TFNFit, lora_tfn, tfn_matched_discrepancies, tfn_matched_discrepancy_ranks, tfn_rank_requirement
from .thresholds import fnn_rank_threshold, linear_rank_threshold, tfn_rank_threshold

__version__ = "0.1.0"

#: Public names, grouped as the README's table of results (submodules such as ``symbolic`` stay reachable
#: as attributes but are not star-exported). tests/test_docs.py checks that every public object is listed.
__all__ = [
    # Lemma 1 (linear models)
    "lora_linear",
    "LinearFit",
    "discrepancy",
    "discrepancy_rank",
    "product",
    "linear_optimal_error",
    "linear_gaussian_mse",
    "linear_rank_requirement",
    "linear_rank_threshold",
    "optimality_gap",
    "OptimalityGap",
    # Theorems 3 and 6 (ReLU FNN, partitions)
    "lora_fnn",
    "FNNFit",
    "BlockFit",
    "Domain",
    "block_discrepancies",
    "sample_ball",
    "fnn_rank_requirement",
    "fnn_rank_threshold",
    "fnn_best_partition",
    "best_partition",
    "check_partition",
    "partition_blocks",
    "uniform_partition",
    # Theorem 5's setting: the project's error bound
    "fnn_error_bound",
    "fnn_error_bound_at",
    "ErrorBound",
    # Lemma 4 (final-layers tuning)
    "final_layers_witness",
    "Witness",
    "lora_parameter_count",
    "final_layers_parameter_count",
    # Theorem 7 (transformers)
    "lora_tfn",
    "TFNFit",
    "tfn_rank_requirement",
    "tfn_rank_threshold",
    "tfn_matched_discrepancies",
    "tfn_matched_discrepancy_ranks",
    # Exact certificates
    "certify_linear",
    "certify_fnn",
    "certify_tfn",
    "Certificate",
    "Check",
    "linear_rank_threshold_expr",
    "fnn_rank_threshold_expr",
    "tfn_rank_threshold_expr",
    "random_rational_linear",
    "random_rational_fnn",
    "random_rational_tfn",
    # High precision
    "lora_linear_mp",
    "lora_fnn_mp",
    "lora_tfn_mp",
    "HighPrecisionLinearFit",
    "HighPrecisionFNNFit",
    "HighPrecisionTFNFit",
    "choose_digits",
    "suggest_precision",
    "PrecisionAdvice",
    # Models and adapters
    "FNN",
    "TFN",
    "random_linear",
    "random_fnn",
    "random_tfn",
    "Adapter",
    # Rank advice for real checkpoints
    "advise_layers",
    "advise_fnn",
    "layer_advice_from_spectrum",
    "energy_rank",
    "tail_curves",
    "LayerAdvice",
    "RankReport",
    "FNNAdvice",
    # Storage-rounding noise floor (the project's)
    "noise_floor",
    "rounding_bounds",
    "storage_roundoff",
    "smallest_subnormal",
    "entries_beyond_rounding",
    "NoiseFloor",
    "RoundingBounds",
    "FLOOR_SAFETY",
    # Ranks under a budget (the project's)
    "allocate_ranks",
    "uniform_ranks",
    "RankAllocation",
    # Certified partial spectra (the project's)
    "partial_spectrum",
    "partial_spectrum_from_blocks",
    "PartialSpectrum",
    # Numerics
    "condition_number",
    "numeric_rank",
    "relative_error",
    "tolerance",
    "unit_roundoff",
    # Errors
    "LoraTheoryError",
    "InvalidArgumentError",
    "NumericalError",
    "SingularMatrixError",
    "IllConditionedWarning",
]
