"""The paper's models as frozen dataclasses that evaluate on numpy arrays, and random instances.

* :class:`FNN`: ReLU feed-forward network ``z_l = ReLU(W_l z_{l-1} + b_l)`` (THEORY.md §1); with
  ``activation="linear"`` and no biases it is the linear model of Lemma 1.
* :class:`TFN`: the paper's simplified transformer (Zeng & Lee 2024, §5 / Theorem 7).

Batches are rows for the FNN (``x`` of shape ``(n, D)``, a layer maps ``x @ W.T + b``); for the TFN an
input ``X`` has shape ``(D, N)`` (tokens are columns), batched ``(n, D, N)``.

Random generators follow the authors' initialisation (THEORY.md §4) and take a ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _display
from ._guard import numeric_guard
from ._types import ArrayLike, Matrices, Seed
from ._validate import as_array, as_bool, as_int, as_nonnegative, as_square_sequence, readonly, rng_from
from .errors import InvalidArgumentError
from .partition import MAX_DEPTH

__all__ = ["FNN", "TFN", "random_fnn", "random_linear", "random_tfn", "relu", "softmax_columns"]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def softmax_columns(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis -2 (keys): every column of the ``(..., N, N)`` score matrix sums to 1."""
    shifted = scores - scores.max(axis=-2, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-2, keepdims=True)


@dataclass(frozen=True, eq=False)
class FNN:
    """A width-``D``, depth-``L`` feed-forward network (THEORY.md §1).

    ``z_0 = x``, ``z_l = σ(W_l z_{l-1} + b_l)`` for ``l = 1..L``; the activation ``σ`` is ReLU (or the
    identity with ``activation="linear"``); with ``final_relu=False`` the last layer is affine.

    Parameters
    ----------
    weights : sequence of L arrays, shape (D, D)
        ``W_1 .. W_L`` (paper: ``W_l`` for the frozen model, ``T_i`` for a target), ``W_1`` applied first.
    biases : sequence of L arrays, shape (D,), or None
        ``b_1 .. b_L`` (``c_i`` for a target). ``None`` means all zero; stored as zero vectors.
    activation : {"relu", "linear"}
    final_relu : bool
        Whether the output layer has a ReLU too (the authors' experiments: yes).
    """

    weights: tuple
    biases: tuple | None = None
    activation: str = "relu"
    final_relu: bool = True

    __repr__ = _display.fnn_repr

    def __post_init__(self):
        weights = as_square_sequence(self.weights, "weights")
        D = weights[0].shape[0]
        if self.biases is None:
            biases = tuple(np.zeros(D) for _ in weights)
        else:
            if isinstance(self.biases, np.ndarray) and self.biases.ndim == 1:
                raise InvalidArgumentError("biases", "must be a sequence of vectors (one per layer)")
            if isinstance(self.biases, (str, bytes)) or not isinstance(self.biases, (Sequence, np.ndarray)):
                raise InvalidArgumentError(
                    "biases", f"must be a sequence of vectors (one per layer) or None, got {type(self.biases).__name__}"
                )
            if len(self.biases) != len(weights):
                raise InvalidArgumentError(
                    "biases", f"must give one bias per layer ({len(weights)}), got {len(self.biases)}"
                )
            biases = tuple(as_array(b, f"biases[{i}]", shape=(D,)) for i, b in enumerate(self.biases))
        if not isinstance(self.activation, str) or self.activation not in ("relu", "linear"):
            raise InvalidArgumentError("activation", f"must be 'relu' or 'linear', got {self.activation!r}")
        object.__setattr__(self, "weights", tuple(readonly(w) for w in weights))
        object.__setattr__(self, "biases", tuple(readonly(b) for b in biases))
        object.__setattr__(self, "final_relu", as_bool(self.final_relu, "final_relu"))

    @property
    def width(self) -> int:
        """``D``."""
        return int(self.weights[0].shape[0])

    @property
    def depth(self) -> int:
        """``L``."""
        return len(self.weights)

    def _activate(self, pre: np.ndarray, layer: int) -> np.ndarray:
        if self.activation == "linear" or (layer == self.depth - 1 and not self.final_relu):
            return pre
        return relu(pre)

    @numeric_guard
    def activations(self, x: ArrayLike) -> list[np.ndarray]:
        """``[z_0, z_1, ..., z_L]`` for an input of shape ``(D,)`` or ``(n, D)``."""
        z = self._check_input(x)
        out = [z]
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            z = self._activate(z @ W.T + b, l)  # (n, D)
            out.append(z)
        return out

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """``f(x)``; shape ``(D,)`` or ``(n, D)`` like the input."""
        return self.activations(x)[-1]

    def _check_input(self, x) -> np.ndarray:
        x = as_array(x, "x")
        if x.ndim not in (1, 2) or x.shape[-1] != self.width:
            raise InvalidArgumentError("x", f"must have shape (D,) or (n, D) with D = {self.width}, got {x.shape}")
        return x

    def linear_map(self) -> np.ndarray:
        """``W_L ... W_1`` (the model's matrix when it is linear and bias-free)."""
        out = np.eye(self.width)
        for W in self.weights:
            out = W @ out
        return out

    def replace(self, weights: Matrices | None = None, biases: Sequence[ArrayLike] | None = None) -> FNN:
        """A copy with other weights and/or biases, same activation convention."""
        return FNN(
            self.weights if weights is None else weights,
            self.biases if biases is None else biases,
            activation=self.activation,
            final_relu=self.final_relu,
        )

    def num_parameters(self) -> int:
        return self.depth * (self.width**2 + self.width)


@dataclass(frozen=True, eq=False)
class TFN:
    """The paper's transformer network (Zeng & Lee 2024, Theorem 7; THEORY.md §1).

    No residual, no layer norm, no ``1/sqrt(d)`` scale. For block ``l`` and head ``h``::

        head = W_O W_V Z · softmax((W_K Z)^T (W_Q Z))   # softmax over keys: columns sum to 1
        A_l  = Σ_h head_h(Z_{l-1})
        Z_l  = W2_l ReLU(W1_l A_l + b1_l) + b2_l
        f(X) = W_out Z_L

    Parameters (``L`` blocks, ``H`` heads, embedding size ``D``)
    ----------
    wq, wk, wv, wo : arrays, shape (L, H, D, D)
    w1 : (L, D, D);  b1 : (L, D);  w2 : (L, D, D);  b2 : (L, D);  w_out : (D, D)
    """

    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w_out: np.ndarray

    def __post_init__(self):
        wq = as_array(self.wq, "wq", ndim=4)
        L, H, D, D2 = wq.shape
        if D != D2 or D == 0 or L == 0 or H == 0:
            raise InvalidArgumentError("wq", f"must have shape (L, H, D, D) with L, H, D >= 1, got {wq.shape}")
        vals = {"wq": wq}
        for name in ("wk", "wv", "wo"):
            vals[name] = as_array(getattr(self, name), name, shape=(L, H, D, D))
        for name in ("w1", "w2"):
            vals[name] = as_array(getattr(self, name), name, shape=(L, D, D))
        for name in ("b1", "b2"):
            vals[name] = as_array(getattr(self, name), name, shape=(L, D))
        vals["w_out"] = as_array(self.w_out, "w_out", shape=(D, D))
        for name, v in vals.items():
            object.__setattr__(self, name, readonly(v))

    @property
    def depth(self) -> int:
        """``L``, the number of blocks."""
        return int(self.wq.shape[0])

    @property
    def heads(self) -> int:
        """``H``."""
        return int(self.wq.shape[1])

    @property
    def embed_dim(self) -> int:
        """``D``."""
        return int(self.wq.shape[2])

    width = embed_dim

    __repr__ = _display.tfn_repr

    def parameters(self) -> dict:
        """The constructor's arguments as a dict of arrays."""
        return {n: getattr(self, n) for n in ("wq", "wk", "wv", "wo", "w1", "b1", "w2", "b2", "w_out")}

    def replace(self, **changes: ArrayLike) -> TFN:
        """A copy with some parameters replaced."""
        params = self.parameters()
        params.update(changes)
        return TFN(**params)

    @numeric_guard
    def block_outputs(self, X: ArrayLike) -> list[np.ndarray]:
        """``[Z_0, Z_1, ..., Z_L]``, each shaped like the input (``(D, N)`` or ``(n, D, N)``, ``N >= 1`` tokens)."""
        Z = as_array(X, "X")
        if Z.ndim not in (2, 3) or Z.shape[-2] != self.embed_dim:
            raise InvalidArgumentError(
                "X", f"must have shape (D, N) or (n, D, N) with D = {self.embed_dim}, got {Z.shape}"
            )
        if Z.shape[-1] == 0:
            raise InvalidArgumentError(
                "X", "must hold at least one token (N >= 1): attention over no keys is undefined"
            )
        out = [Z]
        for l in range(self.depth):
            A = np.zeros_like(Z)
            for h in range(self.heads):
                K = self.wk[l, h] @ Z  # (..., D, N)
                Q = self.wq[l, h] @ Z  # (..., D, N)
                S = softmax_columns(np.swapaxes(K, -1, -2) @ Q)  # (..., N, N), columns sum to 1
                A = A + self.wo[l, h] @ (self.wv[l, h] @ Z) @ S  # (..., D, N)
            H1 = relu(self.w1[l] @ A + self.b1[l][:, None])  # (..., D, N)
            Z = self.w2[l] @ H1 + self.b2[l][:, None]  # (..., D, N)
            out.append(Z)
        return out

    @numeric_guard
    def __call__(self, X: ArrayLike) -> np.ndarray:
        """``f(X) = W_out Z_L``, shaped like ``X``."""
        return self.w_out @ self.block_outputs(X)[-1]


#: The largest width (and number of heads) the random generators draw: a float64 matrix of side 32768 takes
#: 8 GiB, and a width of 10^30 failed inside numpy. Larger sizes raise :class:`InvalidArgumentError`.
MAX_RANDOM_WIDTH = 2**15


def _sizes(**sizes):
    """Positive integer sizes for the random generators: widths and heads up to :data:`MAX_RANDOM_WIDTH`, depths
    up to :data:`lora_theory.partition.MAX_DEPTH`."""

    return [as_int(v, name, 1, MAX_DEPTH if name == "depth" else MAX_RANDOM_WIDTH) for name, v in sizes.items()]


def _uniform(rng, s: float, shape: tuple) -> np.ndarray:
    """``U(-s, s)`` of ``shape``; for ``s`` above half the float64 maximum (where numpy's ``high - low``
    overflows) the same law drawn as ``s · U(-1, 1)``."""
    if s <= np.finfo(np.float64).max / 2:
        return rng.uniform(-s, s, size=shape)
    return s * rng.uniform(-1.0, 1.0, size=shape)


def _rng(seed):
    return rng_from(seed, "seed")


def random_fnn(
    width: int,
    depth: int,
    *,
    seed: Seed = None,
    activation: str = "relu",
    final_relu: bool = True,
    bias: bool = True,
    scale: float | None = None,
) -> FNN:
    """A random FNN with the authors' initialisation (``torch.nn.Linear``'s default).

    Weights and biases ``U(-s, s)`` with ``s = 1/sqrt(D)`` unless ``scale`` is given (D=16 gives the
    ``U(-1/4, 1/4)`` of THEORY.md §2.3). ``bias=False`` gives zero biases. ``width`` at most
    :data:`MAX_RANDOM_WIDTH`, ``depth`` at most :data:`lora_theory.partition.MAX_DEPTH`. ``seed``: None, an integer
    ``>= 0`` or a numpy Generator; ``scale`` finite and ``>= 0``; ``final_relu`` and ``bias`` booleans
    (:class:`~lora_theory.errors.InvalidArgumentError` otherwise).
    """
    D, L = _sizes(width=width, depth=depth)
    rng = _rng(seed)
    bias = as_bool(bias, "bias")
    as_bool(final_relu, "final_relu")
    s = 1.0 / np.sqrt(D) if scale is None else as_nonnegative(scale, "scale")
    weights = [_uniform(rng, s, (D, D)) for _ in range(L)]  # L x (D, D)
    biases = [_uniform(rng, s, (D,)) for _ in range(L)] if bias else None  # L x (D,)
    return FNN(weights, biases, activation=activation, final_relu=final_relu)


def random_linear(width: int, depth: int, *, seed: Seed = None, scale: float | None = None) -> FNN:
    """A random linear model (FNN with ``activation="linear"`` and no biases), authors' initialisation."""
    return random_fnn(width, depth, seed=seed, activation="linear", bias=False, scale=scale)


def random_tfn(embed_dim: int, depth: int, heads: int, *, seed: Seed = None) -> TFN:
    """A random TFN with the authors' initialisation (THEORY.md §4).

    Attention matrices ``N(0, 1)``; feed-forward weights and biases and the output layer
    ``U(-1/sqrt(D), 1/sqrt(D))`` (``nn.Linear`` default; the output layer has no bias).
    """
    D, L, H = _sizes(embed_dim=embed_dim, depth=depth, heads=heads)
    rng = _rng(seed)
    s = 1.0 / np.sqrt(D)
    att = [rng.standard_normal((L, H, D, D)) for _ in range(4)]
    return TFN(
        *att,
        w1=rng.uniform(-s, s, (L, D, D)),
        b1=rng.uniform(-s, s, (L, D)),
        w2=rng.uniform(-s, s, (L, D, D)),
        b2=rng.uniform(-s, s, (L, D)),
        w_out=rng.uniform(-s, s, (D, D)),
    )
