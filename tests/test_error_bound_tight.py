"""The project's per-instance error bound (:func:`lora_theory.fnn_error_bound`, THEORY.md §2.4) is attained.

Instances where every inequality of the derivation is an equality: discrepancies ``ε·Q`` with ``Q``
orthogonal (``||E x|| = ε ||x||``), target layers that are multiples of orthogonal matrices (``||T z|| =
||T||_2 ||z||``), no final ReLU and large positive hidden biases (every ReLU the identity on the inputs),
``R = 0`` (the construction changes biases only). There the RMS error equals the bound, so a bound that
drops a factor (a growth factor ``||T_k|| + ε_k`` of a later block, the input size ``sqrt(tr Σ)``, the
``||c_i||`` in the activation bounds) falls below the measured error and these tests fail.

The bound is evaluated with the samples' own second moment ``Σ = X^T X / n``: the RMS over the samples is
then what the bound bounds, with no sampling error.
"""

import math

import numpy as np
import pytest

from lora_theory.bounds import fnn_error_bound
from lora_theory.fnn import lora_fnn
from lora_theory.models import FNN

D = 16


def _orthogonal(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))
    return q


def _measured(frozen, target, rank, x):
    radius = float(np.linalg.norm(x, axis=1).max()) * (1 + 1e-9)
    fit = lora_fnn(frozen, target, rank, input_radius=radius)
    diff = fit.model(x) - target(x)
    return math.sqrt(np.mean(np.sum(diff**2, axis=1))), fit


def _samples(seed=0, n=4000):
    return np.random.default_rng(seed).standard_normal((n, D))


def test_error_bound_is_attained_by_one_block_with_orthogonal_discrepancy():
    """E = 0.1·Q, L = L̄ = 1, no final ReLU, R = 0: ||f(x) - f̄(x)|| = 0.1 ||x|| for every x, and the bound
    is 0.1·sqrt(tr Σ)."""
    T = _orthogonal(1) * 2.0
    c = np.random.default_rng(2).uniform(-1, 1, D)
    target = FNN([T], [c], final_relu=False)
    frozen = FNN([T - 0.1 * _orthogonal(3)], [np.zeros(D)], final_relu=False)
    x = _samples()
    rms, fit = _measured(frozen, target, 0, x)
    bound = fnn_error_bound(frozen, target, 0, second_moment=x.T @ x / len(x))
    assert bound.rms == pytest.approx(0.1 * math.sqrt(np.trace(x.T @ x / len(x))), rel=1e-12)
    assert rms <= bound.rms * (1 + 1e-12)
    assert rms >= bound.rms * (1 - 1e-9)  # attained
    per_sample = np.linalg.norm(fit.model(x) - target(x), axis=1)
    np.testing.assert_allclose(per_sample, bound.at(x), rtol=1e-9)  # attained at every sample


def test_error_bound_is_attained_through_a_later_block_growth_factor():
    """Block 1 errs by 0.1·Q_1, block 2 is exact and multiplies by T_2 = 5·Q_2: the error is 5·0.1·||x||,
    which only the growth factor K_1 = ||T_2|| + ε_2 accounts for."""
    T1, T2 = 0.1 * _orthogonal(4), 5.0 * _orthogonal(5)
    c1, c2 = np.full(D, 100.0), np.random.default_rng(6).uniform(-1, 1, D)  # c1: hidden ReLUs active
    target = FNN([T1, T2], [c1, c2], final_relu=False)
    frozen = FNN([T1 - 0.1 * _orthogonal(7), T2], [np.zeros(D), np.zeros(D)], final_relu=False)
    x = _samples(8)
    rms, _ = _measured(frozen, target, 0, x)
    bound = fnn_error_bound(frozen, target, 0, second_moment=x.T @ x / len(x))
    assert bound.growth_factors[0] == pytest.approx(5.0, rel=1e-12)
    assert rms <= bound.rms * (1 + 1e-12)
    assert rms >= bound.rms * (1 - 1e-9)  # attained


def test_error_bound_is_nearly_attained_through_a_large_hidden_bias():
    """Block 1 is exact with a large bias c_1, block 2 errs by 0.1·Q_2: the error is 0.1·||T_1 x + c_1||,
    dominated by ||c_1||, which only the activation bound a_1 = ||T_1|| a_0 + ||c_1|| accounts for."""
    T1, T2 = 0.1 * _orthogonal(9), _orthogonal(10)
    c1, c2 = np.full(D, 100.0), np.random.default_rng(11).uniform(-1, 1, D)
    target = FNN([T1, T2], [c1, c2], final_relu=False)
    frozen = FNN([T1, T2 - 0.1 * _orthogonal(12)], [np.zeros(D), np.zeros(D)], final_relu=False)
    x = _samples(13)
    rms, _ = _measured(frozen, target, 0, x)
    bound = fnn_error_bound(frozen, target, 0, second_moment=x.T @ x / len(x))
    assert rms <= bound.rms * (1 + 1e-12)
    # the error is 0.1·sqrt(E||T_1 x + c_1||^2) >= 0.1·(||c_1|| - t), t = ||T_1|| a_0 (Minkowski), the bound
    # 0.1·(||c_1|| + t): within a fraction 2t / a_1 of each other, 0.2 % here
    t = 0.1 * math.sqrt(np.trace(x.T @ x / len(x)))
    assert bound.activation_bounds[1] == pytest.approx(t + np.linalg.norm(c1), rel=1e-12)
    assert rms >= bound.rms * (1 - 2 * t / bound.activation_bounds[1])
