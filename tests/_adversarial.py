"""Adversarial points of a ball for an FNN construction: where a linearised unit comes closest to switching.

The construction of Zeng & Lee 2024, Theorem 3 makes every layer of a block but its last act linearly on
the block's input ball by raising its pre-activations above 0. On each linear region of the network a
pre-activation is affine in the input, so its minimum over the ball ``||x - x_0|| <= r`` is at
``x_0 - r g / ||g||`` (``g`` its gradient there); iterating that map from several starts finds the points
of the sphere where a unit is lowest. A unit that can go negative switches its ReLU off and makes the
adapted network leave the target.
"""

from __future__ import annotations

import numpy as np


def float_layers(model):
    """``[(W, b, relu)]`` per layer of an :class:`~lora_theory.FNN` or a ``RationalFNN``, in float64."""
    L = model.depth
    relu = [model.activation == "relu" and (l < L - 1 or model.final_relu) for l in range(L)]
    return [
        (
            np.array(np.asarray(W).tolist(), dtype=float),
            np.array(np.asarray(b).tolist(), dtype=float).reshape(-1),
            relu[l],
        )
        for l, (W, b) in enumerate(zip(model.weights, model.biases))
    ]


def inner_layers(partition) -> list:
    """0-based indices of the linearised layers: all but the last of every block."""
    out, start = [], 0
    for size in partition:
        out.extend(range(start, start + size - 1))
        start += size
    return out


def pre_activation_and_gradient(layers, layer, unit, x):
    """Pre-activation ``unit`` of ``layer`` (0-based) at ``x``, and its gradient in ``x``."""
    z, J = x, np.eye(x.size)
    for W, b, relu in layers[:layer]:
        pre = W @ z + b
        z, J = pre, W @ J
        if relu:
            on = pre > 0
            z, J = np.where(on, pre, 0.0), J * on[:, None]
    W, b, _ = layers[layer]
    return float(W[unit] @ z + b[unit]), W[unit] @ J


def adversarial_directions(layers, inner, x0, r, rng, starts=6, iterations=30):
    """For every (inner layer, unit): a unit vector ``v`` with ``x_0 + r v`` the lowest point found for
    that unit's pre-activation, over ``starts`` fixed-point iterations from random sphere points."""
    D = x0.size
    out = []
    for layer in inner:
        for unit in range(layers[layer][0].shape[0]):
            best = None
            for _ in range(starts):
                v = rng.standard_normal(D)
                v /= np.linalg.norm(v)
                for _ in range(iterations):
                    value, g = pre_activation_and_gradient(layers, layer, unit, x0 + r * v)
                    if best is None or value < best[0]:
                        best = (value, v.copy())
                    if not np.linalg.norm(g) > 0:
                        break
                    new = -g / np.linalg.norm(g)
                    if np.allclose(new, v, atol=1e-14):
                        break
                    v = new
            out.append(best[1])
    return out
