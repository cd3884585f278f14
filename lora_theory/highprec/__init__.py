"""The linear, FNN and transformer constructions in high-precision arithmetic (mpmath), for ill-conditioned cases.

THEORY.md §2.3 and §3: products of 8 frozen layers with weights ``U(-1/4, 1/4)`` (D = 16) have condition
numbers ``κ`` of 1e8 to 1e12, so the float64 construction of Lemma 1 loses up to every digit, and a ReLU
block loses about ``log10(γ)`` more digits in its linearising biases. The same constructions at ``digits``
significant decimal digits lose the same *number* of digits and keep the rest: at 50 digits the 8-layer
linear block reaches the target to 1e-30 or better.

* :func:`lora_linear_mp` — Zeng & Lee 2024, Lemma 1 (linear models), SVD split of
  :func:`lora_theory.lora_linear`, with ``mpmath.svd_r`` and ``mpmath.lu_solve``;
* :func:`lora_fnn_mp` — Theorem 3 / Theorem 6 on a certified ball, with the compensating biases of
  :func:`lora_theory.fnn.lora_fnn`;
* :func:`lora_tfn_mp` — Theorem 7, the transformer construction of :func:`lora_theory.lora_tfn`, evaluated
  at that precision (two-block float64 weights carry a relative output error up to 1e-10);
* :func:`choose_digits` — the precision for given ``κ`` and ``γ``: about ``16 + log10 κ + log10 γ + safety``;
* :func:`suggest_precision` — reads a float64 fit's ``κ`` and ``γ`` and says whether float64 suffices and,
  if not, how many digits the high-precision path needs.

One module per result, as in the float64 package: :mod:`.linear`, :mod:`.fnn`, :mod:`.tfn`; the digits in
:mod:`.precision`, the advice in :mod:`.advice`, the matrices and object arrays of high-precision numbers in
:mod:`.arithmetic`. Imports run one way: ``arithmetic → precision → linear → fnn, tfn → advice``.

The inputs are float64 arrays, taken *exactly* (every float64 is an mpmath number); only the construction
and the evaluation run at raised precision. Results round to float64 on request (:meth:`predict`,
:meth:`product`), which is where a float64 consumer should read them: a float64 forward pass through the
adapted weights would lose the digits again.
"""

from .advice import PrecisionAdvice, suggest_precision
from .fnn import HighPrecisionFNNFit, lora_fnn_mp
from .linear import HighPrecisionLinearFit, lora_linear_mp
from .precision import MAX_DIGITS as MAX_DIGITS
from .precision import RERUN_DIGITS as RERUN_DIGITS
from .precision import SAFETY_DIGITS as SAFETY_DIGITS
from .precision import TARGET_DIGITS as TARGET_DIGITS
from .precision import choose_digits
from .tfn import MIN_TFN_DIGITS as MIN_TFN_DIGITS
from .tfn import HighPrecisionTFNFit, lora_tfn_mp

__all__ = [
    "choose_digits",
    "PrecisionAdvice",
    "suggest_precision",
    "HighPrecisionLinearFit",
    "lora_linear_mp",
    "HighPrecisionFNNFit",
    "lora_fnn_mp",
    "HighPrecisionTFNFit",
    "lora_tfn_mp",
]
