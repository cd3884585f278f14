"""lora-theory: the constructive proofs of Zeng & Lee, *The Expressive Power of Low-Rank Adaptation* (ICLR 2024).

Every theorem of the paper as a function that builds its object (LoRA adapters, biases, witnesses) and
reports what the theorem predicts about it. numpy, scipy and sympy only; float64 throughout.
"""

from .adapter import Adapter
from .errors import IllConditionedWarning, InvalidArgumentError, LoraTheoryError, SingularMatrixError
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
from .numerics import condition_number, numeric_rank, relative_error, tolerance, unit_roundoff
from .partition import best_partition, check_partition, partition_blocks, uniform_partition
from .thresholds import fnn_rank_threshold, linear_rank_threshold, tfn_rank_threshold

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
