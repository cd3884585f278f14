"""The next block's ball in :func:`lora_theory.lora_fnn` covers every input that block receives.

Block ``i`` maps its ball ``||u - u_0|| <= r`` to outputs ``ReLU(W̃_i u + c_i)`` of norm at most
``||W̃_i||_2 r + ||W̃_i u_0 + c_i||_2`` (THEORY.md §2.3), so block ``i + 1`` is sized for the ball of that
radius around 0. A radius that forgets ``W̃_i u_0 + c_i`` (or keeps only ``c_i``) is too small when the
first ball is small and off-centre and the target's biases are large: the next block's linearising levels
are then too low, a ReLU inside it switches off for some inputs of the certified ball, and the adapted
network leaves the target there. The check is behavioural: the float64 error at adversarial points of the
ball (:mod:`_adversarial`) must stay within the fit's own rounding bound.
"""

import warnings

import numpy as np
import pytest
from _adversarial import adversarial_directions, float_layers, inner_layers

from lora_theory.errors import IllConditionedWarning
from lora_theory.fnn import lora_fnn
from lora_theory.models import FNN, random_fnn

# (width, frozen depth, target depth, partition): later blocks of 2 and 3 layers, which linearise
CASES = [(3, 3, 2, (1, 2)), (4, 4, 2, (2, 2)), (3, 4, 2, (1, 3)), (3, 4, 3, (1, 1, 2))]


def _instance(D, L, Lbar, seed, bias_scale):
    frozen = random_fnn(D, L, seed=seed, scale=1.0)
    target = random_fnn(D, Lbar, seed=seed + 1000, scale=1.0)
    return frozen, FNN(target.weights, [bias_scale * c for c in target.biases])


@pytest.mark.parametrize("D, L, Lbar, partition", CASES)
def test_next_block_ball_covers_its_inputs_for_small_off_centre_balls_and_large_biases(D, L, Lbar, partition):
    worst = 0.0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        frozen, target = _instance(D, L, Lbar, seed, bias_scale=(1.0, 5.0, 20.0)[seed % 3])
        center = rng.uniform(-2, 2, D)
        radius = (0.05, 0.5)[seed % 2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            fit = lora_fnn(frozen, target, D, partition=partition, input_radius=radius, center=center)
        assert fit.exact
        directions = adversarial_directions(float_layers(fit.model), inner_layers(partition), center, radius, rng)
        directions += list(rng.standard_normal((8, D)))
        x = np.array([center + radius * (1 - 1e-12) * d / np.linalg.norm(d) for d in directions])
        assert np.all(fit.domain.contains(x))
        err = np.linalg.norm(fit.model(x) - target(x), axis=1)
        worst = max(worst, float(np.max(err / fit.absolute_tolerance)))
    assert worst <= 1.0, f"the adapted network leaves the target by {worst:.3g} times the rounding bound"
