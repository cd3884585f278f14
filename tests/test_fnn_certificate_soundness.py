"""An "exact" FNN certificate is sound: the adapted network equals the target, in exact rational arithmetic,
at the points of the certified ball most likely to break it.

:func:`lora_theory.certify_fnn` proves ``f(x) = f̄(x)`` on ``||x - x_0|| <= r`` from exact checks on each
block plus an argument about the ball each block's input lies in (centre ``ReLU(T_i u_0 + c_i)``, radius
grown by ``||T_i||_2``). That argument is code too, and a wrong ball makes the checks pass on the wrong set.
This test does not trust it: it evaluates the adapted network and the target with ``Fraction`` arithmetic
(no rounding anywhere) at rational points of the input ball chosen adversarially:

* for every linearised layer (every layer of a block but its last) and every unit of it, the point of the
  ball that minimises that unit's pre-activation in the adapted network, found by iterating
  ``x <- x_0 - r·g(x)/||g(x)||`` (``g`` the pre-activation's gradient, constant on each linear region, so a
  fixed point is a minimiser over the ball within its region) from several starts; a unit that can go
  negative switches its ReLU off and makes the adapted network leave the target;
* random rational points on the sphere ``||x - x_0|| = r`` and inside the ball.

Every point is exactly rational and exactly within the ball: the direction is rounded to a rational unit
vector by an inverse stereographic projection, which has rational coordinates and norm exactly 1.
"""

from fractions import Fraction

import numpy as np
import pytest
import sympy
from _adversarial import adversarial_directions, float_layers, inner_layers

from lora_theory.symbolic import EXACT, RationalFNN, certify_fnn, random_rational_fnn

# (width, frozen depth, target depth, partition): several depths, first blocks of 1 to 3 layers, and second
# blocks of 2 and 3 layers, whose levels are sized on the ball the first block's output was given
CASES = [
    (3, 2, 1, (2,)),
    (3, 3, 1, (3,)),
    (2, 3, 2, (1, 2)),
    (3, 3, 2, (1, 2)),
    (3, 4, 2, (1, 3)),
    (3, 4, 2, (2, 2)),
    (2, 4, 3, (1, 1, 2)),
    (3, 4, 3, (1, 2, 1)),
]


# ------------------------------------------------------------------------------------------ exact pieces


def _fractions(M) -> list:
    """A sympy matrix as a list of rows of Fractions."""
    return [[Fraction(int(sympy.Rational(v).p), int(sympy.Rational(v).q)) for v in row] for row in M.tolist()]


def _exact_net(model):
    """``[(W, b, relu)]`` per layer, in Fractions."""
    L = model.depth
    relu = [model.activation == "relu" and (l < L - 1 or model.final_relu) for l in range(L)]
    return [
        (_fractions(W), [row[0] for row in _fractions(b)], relu[l])
        for l, (W, b) in enumerate(zip(model.weights, model.biases))
    ]


def _exact_forward(net, x) -> list:
    z = list(x)
    for W, b, relu in net:
        z = [sum((w * v for w, v in zip(row, z)), Fraction(0)) + bi for row, bi in zip(W, b)]
        if relu:
            z = [v if v > 0 else Fraction(0) for v in z]
    return z


def _rational_unit(d, denominator=2**20) -> list:
    """A rational vector of norm exactly 1 near the unit vector ``d``: its stereographic projection from the
    pole ``e_p`` (``p`` the smallest coordinate, so ``1 - d_p >= 1``) rounded to rationals, mapped back."""
    d = np.asarray(d, dtype=float)
    d = d / np.linalg.norm(d)
    p = int(np.argmin(d))  # pole e_p: 1 - d_p >= 1
    others = [i for i in range(d.size) if i != p]
    t = [Fraction(d[i] / (1 - d[p])).limit_denominator(denominator) for i in others]
    s = sum(v * v for v in t)
    out = [Fraction(0)] * d.size
    for i, v in zip(others, t):
        out[i] = 2 * v / (s + 1)
    out[p] = (s - 1) / (s + 1)
    assert sum(v * v for v in out) == 1
    return out


# ------------------------------------------------------------------------------------------- the points


def _certified_points(cert, x0, r, rng, n_random=8):
    """Exact rational points of the ball ``||x - x_0|| <= r``: adversarial sphere points, random sphere
    points and random interior points."""
    layers = float_layers(cert.adapted)
    x0f = np.array([float(v) for v in x0])
    directions = adversarial_directions(layers, inner_layers(cert.sizes["partition"]), x0f, float(r), rng)
    directions += list(rng.standard_normal((n_random, x0f.size)))
    points = []
    for k, d in enumerate(directions):
        v = _rational_unit(d)
        scale = r if k < len(directions) - n_random // 2 else r * Fraction(int(rng.integers(1, 16)), 16)
        points.append([c + scale * vi for c, vi in zip(x0, v)])
    return points


def _balls(n, rng):
    """(centre, radius) pairs: centred and off-centre, small and large, rational."""
    centre = [Fraction(int(k), 4) for k in rng.integers(-4, 5, n)]
    return [([Fraction(0)] * n, Fraction(1, 4)), (centre, Fraction(1, 2)), (centre, Fraction(3))]


@pytest.mark.parametrize("final_relu", [True, False])
@pytest.mark.parametrize("n, depth, target_depth, partition", CASES)
def test_exact_fnn_certificate_holds_at_adversarial_rational_points(n, depth, target_depth, partition, final_relu):
    certified = 0
    for seed in range(12):
        frozen, target = random_rational_fnn(n, depth, target_depth, seed=seed, final_relu=final_relu)
        # large target biases put ReLU(T u_0 + c) far from T u_0 + c: the next ball's centre matters
        bias_scale = (1, 4, 8)[seed % 3]
        target = RationalFNN(
            target.weights, tuple(c * bias_scale for c in target.biases), target.activation, target.final_relu
        )
        rng = np.random.default_rng(seed)
        f_target = _exact_net(target)
        x0, r = _balls(n, rng)[(seed // 3) % 3]
        cert = certify_fnn(frozen, target, n, partition=partition, input_radius=r, center=x0)
        if cert.outcome != EXACT:
            continue  # a singular draw: nothing claimed
        certified += 1
        f_adapted = _exact_net(cert.adapted)
        for x in _certified_points(cert, x0, r, rng):
            assert sum((a - c) ** 2 for a, c in zip(x, x0)) <= r * r
            assert _exact_forward(f_adapted, x) == _exact_forward(f_target, x), (
                f"certificate 'exact' (seed {seed}, centre {x0}, radius {r}) but f(x) != f̄(x) at x = {x}"
            )
    assert certified >= 6  # the case is not vacuous
