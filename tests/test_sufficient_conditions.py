"""The FNN rank requirements are sufficient conditions, and the project's is tighter than Theorem 3's formula.

Zeng & Lee 2024, Theorems 3 and 6 say "exact *if* the rank is at least ...": a degenerate instance, whose
block discrepancies have rank below ``D``, is exact below the generic threshold ``ceil(D / floor(L / L̄))``.
The instance-level requirement of :func:`lora_theory.fnn_rank_requirement`, ``max_i ceil(rank(E_i) / |P_i|)``
with the uniform partition's actual block sizes, is Theorem 6's condition on that partition; Theorem 3's
formula ``ceil(max_i rank(E_i) / M)``, ``M = floor(L / L̄)``, divides by the shortest block size for every
block and is never smaller.
"""

import math
import warnings

import numpy as np
import sympy
from hypothesis import given
from hypothesis import strategies as st

from lora_theory import certify_fnn, fnn_rank_requirement, fnn_rank_threshold, lora_fnn
from lora_theory.errors import IllConditionedWarning
from lora_theory.fnn import block_discrepancies
from lora_theory.linear import product
from lora_theory.models import FNN, random_fnn
from lora_theory.numerics import numeric_rank
from lora_theory.partition import partition_blocks, uniform_partition
from lora_theory.symbolic import EXACT, RationalFNN


def _fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        return lora_fnn(*args, **kwargs)


def test_degenerate_instance_is_exact_below_the_generic_threshold():
    """D = 4, L = 2, L̄ = 1: the generic threshold is 2; with rank(E_1) = 2 rank 1 is exact."""
    rng = np.random.default_rng(0)
    W = [rng.integers(-3, 4, (4, 4)) / 4 for _ in range(2)]
    E = rng.integers(-3, 4, (4, 2)) @ rng.integers(-3, 4, (2, 4)) / 4  # rank 2
    T = product(W) + E
    c = rng.integers(-3, 4, 4) / 4
    frozen, target = FNN(W, [np.zeros(4), np.zeros(4)]), FNN([T], [c])
    generic = fnn_rank_threshold(4, 2, 1)
    assert generic == 2 and fnn_rank_requirement(frozen, target) == 1
    fit = _fit(frozen, target, generic - 1, input_radius=3.0)
    assert fit.exact
    x = rng.uniform(-1, 1, (200, 4))
    x *= 3.0 * (1 - 1e-12) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 3.0)  # inside the ball
    assert np.max(np.linalg.norm(fit.model(x) - target(x), axis=1)) <= fit.absolute_tolerance
    cert = certify_fnn(
        RationalFNN.from_fnn(frozen), RationalFNN.from_fnn(target), generic - 1, input_radius=sympy.Integer(3)
    )
    assert cert.outcome == EXACT  # exact, with no tolerance


def test_project_requirement_is_below_theorem3_formula_when_the_long_last_block_has_the_largest_rank():
    """L = 3, L̄ = 2: blocks of 1 and 2 layers. rank(E_1) = 1, rank(E_2) = 4: Theorem 3's formula
    ceil(4 / 1) = 4; the requirement on the actual blocks max(ceil(1/1), ceil(4/2)) = 2, and rank 2 is exact."""
    rng = np.random.default_rng(1)
    frozen = random_fnn(4, 3, seed=2, scale=0.5)
    u, v = rng.standard_normal((4, 1)), rng.standard_normal((1, 4))
    T1 = frozen.weights[0] + u @ v  # rank(E_1) = 1
    T2 = rng.uniform(-0.5, 0.5, (4, 4))  # rank(E_2) = 4
    target = FNN([T1, T2], [rng.uniform(-0.5, 0.5, 4) for _ in range(2)])
    ranks = [numeric_rank(E) for E in block_discrepancies(frozen, target)]
    assert ranks == [1, 4]
    theorem3 = math.ceil(max(ranks) / (3 // 2))
    assert fnn_rank_requirement(frozen, target) == 2 < theorem3 == 4
    fit = _fit(frozen, target, 2, input_radius=2.0)
    assert fit.exact
    x = rng.uniform(-1, 1, (200, 4))
    assert np.max(np.linalg.norm(fit.model(x) - target(x), axis=1)) <= fit.absolute_tolerance


@given(D=st.integers(2, 6), L=st.integers(1, 5), data=st.data())
def test_project_requirement_never_exceeds_theorem3_formula(D, L, data):
    Lbar = data.draw(st.integers(1, L), label="Lbar")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    frozen = random_fnn(D, L, seed=rng)
    sizes = uniform_partition(L, Lbar)
    weights = []
    for b in partition_blocks(sizes):  # block ranks 0..D
        r = int(rng.integers(0, D + 1))
        weights.append(
            product(frozen.weights[b.start : b.stop]) + rng.standard_normal((D, r)) @ rng.standard_normal((r, D))
        )
    target = FNN(weights, [np.zeros(D)] * Lbar)
    ranks = [numeric_rank(E) for E in block_discrepancies(frozen, target)]
    assert fnn_rank_requirement(frozen, target) <= math.ceil(max(ranks) / (L // Lbar))
