"""Hypothesis strategies for FNN instances whose block discrepancies have a known rank.

A target layer ``T_i = Π_{l ∈ P_i} W_l + C_i F_i`` with bounded random factors ``C_i`` (D x ρ_i) and ``F_i``
(ρ_i x D) has ``rank(E_i) = ρ_i`` with probability 1, so tests can check that ``Σ_{l ∈ P_i} R_l >= ρ_i``
decides exactness without trusting the library's rank computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from lora_theory.linear import product
from lora_theory.models import FNN, random_fnn
from lora_theory.partition import partition_blocks


@dataclass
class Instance:
    frozen: FNN
    target: FNN
    partition: tuple
    block_ranks: tuple  # ρ_i = rank(E_i) by construction
    ranks: tuple  # per-layer LoRA budgets R_l
    seed: int

    @property
    def width(self):
        return self.frozen.width

    def budgets(self):
        return tuple(sum(self.ranks[b.start : b.stop]) for b in partition_blocks(self.partition))


def low_rank(rng, D, rho, scale):
    """A ``D x D`` matrix of rank ``rho`` (with probability 1) as a product of bounded random factors."""
    C = rng.uniform(-scale, scale, size=(D, rho))
    F = rng.uniform(-scale, scale, size=(rho, D))
    return C @ F


def make_target(frozen, partition, block_ranks, seed, final_relu=True, bias_scale=None):
    """The target ``T_i = Π_{P_i} W_l + C_i F_i`` with ``rank(C_i F_i) = block_ranks[i]``; biases ``U(-s, s)``."""
    rng = np.random.default_rng(seed)
    D = frozen.width
    s = 1.0 / np.sqrt(D)
    weights = [
        product(frozen.weights[b.start : b.stop]) + low_rank(rng, D, rho, s)
        for b, rho in zip(partition_blocks(partition), block_ranks)
    ]
    bs = s if bias_scale is None else bias_scale
    biases = [rng.uniform(-bs, bs, size=D) for _ in weights]
    return FNN(weights, biases, final_relu=final_relu)


@st.composite
def compositions(draw, total, parts):
    """A consecutive partition of ``total`` layers into ``parts`` non-empty blocks."""
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1))) if parts > 1 else []
    bounds = [0, *cuts, total]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


@st.composite
def fnn_instances(draw, max_width=16, max_depth=4, final_relu=None):
    """A frozen FNN (authors' initialisation), a target with known block-discrepancy ranks, per-layer ranks."""
    D = draw(st.integers(2, max_width))
    L = draw(st.integers(1, max_depth))
    Lbar = draw(st.integers(1, L))
    partition = draw(compositions(L, Lbar))
    block_ranks = tuple(draw(st.integers(0, D)) for _ in partition)
    ranks = tuple(draw(st.integers(0, D)) for _ in range(L))
    seed = draw(st.integers(0, 2**32 - 1))
    fr = draw(st.booleans()) if final_relu is None else final_relu
    frozen = random_fnn(D, L, seed=seed, final_relu=fr)
    target = make_target(frozen, partition, block_ranks, seed + 1, final_relu=fr)
    return Instance(frozen, target, partition, block_ranks, ranks, seed)
