"""The paper's models as plain torch modules, equal to :mod:`lora_theory.models` in float64.

* :class:`TorchFNN`: ``z_l = σ(W_l z_{l-1} + b_l)``; its linear maps are ``layers.{l}`` (``nn.Linear(D, D)``,
  always with a bias, zero for the linear model), batches are rows (``x @ W.T + b``).
* :class:`TorchTFN`: the simplified transformer of Zeng & Lee 2024, Theorem 7 (THEORY.md §1). Per block
  ``blocks.{l}``: heads ``blocks.{l}.heads.{h}.{query,key,value,output}`` (``nn.Linear(D, D, bias=False)``),
  the feed-forward layers ``blocks.{l}.ff1`` and ``blocks.{l}.ff2`` (``nn.Linear(D, D)``); the output layer
  ``output`` (``nn.Linear(D, D, bias=False)``). Input ``X`` of shape ``(n, D, N)``: tokens are columns, as in
  the numpy model.

Every linear map is an ``nn.Linear`` so that PEFT (or any LoRA library) can target it by module name; the
project's adapter convention is ``W + B @ A`` with ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``
(:func:`merge_adapter` applies one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import lora_theory
from lora_theory.errors import InvalidArgumentError

__all__ = ["TorchFNN", "TorchTFN", "merge_adapter"]


def _tensor(array, dtype, device) -> torch.Tensor:
    return torch.tensor(np.array(array, dtype=np.float64)).to(dtype=dtype, device=device)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


class TorchFNN(nn.Module):
    """Width-``D``, depth-``L`` feed-forward network; ``layers.{l}`` is ``nn.Linear(D, D)`` (``W_{l+1}``, ``b_{l+1}``).

    Parameters
    ----------
    width, depth : int
        ``D`` and ``L``.
    activation : {"relu", "linear"}
    final_relu : bool
        ReLU after the output layer too (the authors' experiments; THEORY.md §1).
    dtype, device
        Of the parameters (float64 by default).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        activation: str = "relu",
        final_relu: bool = True,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__()
        if activation not in ("relu", "linear"):
            raise InvalidArgumentError("activation", f"must be 'relu' or 'linear', got {activation!r}")
        if int(width) < 1 or int(depth) < 1:
            raise InvalidArgumentError("width", f"width and depth must be at least 1, got {width}, {depth}")
        self.width = int(width)
        self.depth = int(depth)
        self.activation = activation
        self.final_relu = bool(final_relu)
        self.layers = nn.ModuleList(
            nn.Linear(self.width, self.width, bias=True, dtype=dtype, device=device) for _ in range(self.depth)
        )

    @classmethod
    def from_numpy(cls, fnn: lora_theory.FNN, dtype=torch.float64, device=None) -> TorchFNN:
        """The torch copy of a :class:`lora_theory.FNN` (same weights, biases, activation convention)."""
        model = cls(fnn.width, fnn.depth, fnn.activation, fnn.final_relu, dtype=dtype, device=device)
        with torch.no_grad():
            for layer, W, b in zip(model.layers, fnn.weights, fnn.biases):
                layer.weight.copy_(_tensor(W, dtype, device))
                layer.bias.copy_(_tensor(b, dtype, device))
        return model

    def to_numpy(self) -> lora_theory.FNN:
        """The :class:`lora_theory.FNN` with these weights (float64)."""
        return lora_theory.FNN(
            [_numpy(l.weight) for l in self.layers],
            [_numpy(l.bias) for l in self.layers],
            activation=self.activation,
            final_relu=self.final_relu,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` for ``x`` of shape ``(n, D)`` (or ``(D,)``)."""
        z = x
        for l, layer in enumerate(self.layers):
            z = layer(z)  # (n, D)
            if self.activation == "relu" and (l < self.depth - 1 or self.final_relu):
                z = torch.relu(z)
        return z


class _Head(nn.Module):
    def __init__(self, D, dtype, device):
        super().__init__()
        self.query = nn.Linear(D, D, bias=False, dtype=dtype, device=device)
        self.key = nn.Linear(D, D, bias=False, dtype=dtype, device=device)
        self.value = nn.Linear(D, D, bias=False, dtype=dtype, device=device)
        self.output = nn.Linear(D, D, bias=False, dtype=dtype, device=device)


class _Block(nn.Module):
    def __init__(self, D, H, dtype, device):
        super().__init__()
        self.heads = nn.ModuleList(_Head(D, dtype, device) for _ in range(H))
        self.ff1 = nn.Linear(D, D, dtype=dtype, device=device)
        self.ff2 = nn.Linear(D, D, dtype=dtype, device=device)


class TorchTFN(nn.Module):
    """The transformer network of Zeng & Lee 2024, Theorem 7 (THEORY.md §1), as named ``nn.Linear`` maps.

    ``blocks.{l}.heads.{h}.query/key/value/output`` hold ``W_Q, W_K, W_V, W_O``; ``blocks.{l}.ff1`` holds
    ``W1_l, b1_l``; ``blocks.{l}.ff2`` holds ``W2_l, b2_l``; ``output`` holds ``W_out``.

    Parameters
    ----------
    embed_dim, depth, heads : int
        ``D``, ``L`` (blocks) and ``H``.
    """

    def __init__(self, embed_dim: int, depth: int, heads: int, dtype=torch.float64, device=None):
        super().__init__()
        if min(int(embed_dim), int(depth), int(heads)) < 1:
            raise InvalidArgumentError(
                "embed_dim", f"embed_dim, depth and heads must be at least 1, got {embed_dim}, {depth}, {heads}"
            )
        self.embed_dim, self.depth, self.heads = int(embed_dim), int(depth), int(heads)
        self.blocks = nn.ModuleList(_Block(self.embed_dim, self.heads, dtype, device) for _ in range(self.depth))
        self.output = nn.Linear(self.embed_dim, self.embed_dim, bias=False, dtype=dtype, device=device)

    @classmethod
    def from_numpy(cls, tfn: lora_theory.TFN, dtype=torch.float64, device=None) -> TorchTFN:
        """The torch copy of a :class:`lora_theory.TFN`."""
        model = cls(tfn.embed_dim, tfn.depth, tfn.heads, dtype=dtype, device=device)
        t = lambda a: _tensor(a, dtype, device)  # noqa: E731
        with torch.no_grad():
            for l, block in enumerate(model.blocks):
                for h, head in enumerate(block.heads):
                    head.query.weight.copy_(t(tfn.wq[l, h]))
                    head.key.weight.copy_(t(tfn.wk[l, h]))
                    head.value.weight.copy_(t(tfn.wv[l, h]))
                    head.output.weight.copy_(t(tfn.wo[l, h]))
                block.ff1.weight.copy_(t(tfn.w1[l]))
                block.ff1.bias.copy_(t(tfn.b1[l]))
                block.ff2.weight.copy_(t(tfn.w2[l]))
                block.ff2.bias.copy_(t(tfn.b2[l]))
            model.output.weight.copy_(t(tfn.w_out))
        return model

    def to_numpy(self) -> lora_theory.TFN:
        """The :class:`lora_theory.TFN` with these weights (float64)."""
        att = {
            k: np.stack(
                [np.stack([_numpy(getattr(head, name).weight) for head in block.heads]) for block in self.blocks]
            )
            for k, name in (("wq", "query"), ("wk", "key"), ("wv", "value"), ("wo", "output"))
        }
        return lora_theory.TFN(
            **att,
            w1=np.stack([_numpy(b.ff1.weight) for b in self.blocks]),
            b1=np.stack([_numpy(b.ff1.bias) for b in self.blocks]),
            w2=np.stack([_numpy(b.ff2.weight) for b in self.blocks]),
            b2=np.stack([_numpy(b.ff2.bias) for b in self.blocks]),
            w_out=_numpy(self.output.weight),
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """``f(X)`` for ``X`` of shape ``(n, D, N)`` (tokens are columns); returns ``(n, D, N)``."""
        Z = X.transpose(-1, -2)  # (n, N, D): tokens as rows
        for block in self.blocks:
            A = 0
            for head in block.heads:
                scores = head.key(Z) @ head.query(Z).transpose(-1, -2)  # (n, N, N): [i, j] = k_i . q_j
                S = torch.softmax(scores, dim=-2)  # over keys i: columns sum to 1
                A = A + S.transpose(-1, -2) @ head.output(head.value(Z))  # (n, N, D)
            Z = block.ff2(torch.relu(block.ff1(A)))  # (n, N, D)
        return self.output(Z).transpose(-1, -2)  # (n, D, N)


def merge_adapter(layer: nn.Linear, A, B) -> None:
    """Add ``B @ A`` (the project's adapter convention, ``A`` (r, in), ``B`` (out, r)) to ``layer.weight`` in place."""
    A = torch.as_tensor(np.asarray(A, dtype=np.float64) if not isinstance(A, torch.Tensor) else A)
    B = torch.as_tensor(np.asarray(B, dtype=np.float64) if not isinstance(B, torch.Tensor) else B)
    with torch.no_grad():
        delta = (B.to(torch.float64) @ A.to(torch.float64)).to(layer.weight.dtype).to(layer.weight.device)
        if delta.shape != layer.weight.shape:
            raise InvalidArgumentError(
                "A", f"B @ A has shape {tuple(delta.shape)}, the layer {tuple(layer.weight.shape)}"
            )
        layer.weight.add_(delta)
