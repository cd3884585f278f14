"""A batched trainer: many independent LoRA (or final-layers) runs trained at once as one stacked model.

Every parameter carries a leading run dimension ``R``; layers are batched matrix products. The loss is
the plain **sum** of the per-run losses (each the per-coordinate MSE of that run on its batch), so the
gradient of a run's parameters is the gradient of that run's loss alone, and a hand-written Adam with
per-run learning rate and coupled weight decay (``torch.optim.Adam(weight_decay=...)``: ``g + wd·p``) makes
the stack exactly a set of independent runs.

Data (declared; THEORY.md §4): every step each run sees a fresh batch of ``batch_size`` standard Gaussian
inputs drawn in float64 on a CPU ``torch.Generator`` seeded from the run's *data seed* only, in chunks of
:data:`DRAW_CHUNK` steps, then cast to the training dtype and moved to the device. Runs with one data seed
(the grid points, ranks and frozen-model variants of one experiment seed) therefore share their batches, and
a run's data is the same on CPU and GPU and whatever else is stacked with it. Initialisation of a run's
adapters likewise comes from its own *init seed* (LoRA: ``B = 0``, ``A ~ N(0, 0.25²)``).

Padded ranks: runs of different ranks share a stack padded to the largest rank; the padded rows of ``A``
and columns of ``B`` start at zero and their gradients, Adam moments and updates are masked, so they stay
exactly zero and ``rank(B A) <= r``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DRAW_CHUNK",
    "LORA_INIT_STD",
    "BatchStream",
    "FNNStack",
    "TFNStack",
    "StackedAdam",
    "TrainResult",
    "TrainingStopped",
    "train_stack",
    "fnn_apply",
    "tfn_apply",
    "gaussian_inputs",
    "lora_init_A",
]

#: Steps of training inputs drawn at once from a data seed's generator (part of the data definition).
DRAW_CHUNK = 50
#: Standard deviation of the LoRA ``A`` initialisation (the authors'; ``B`` starts at zero).
LORA_INIT_STD = 0.25


class TrainingStopped(Exception):
    """Raised by :func:`train_stack` when its ``stop`` event is set: the stack's runs are incomplete."""


def gaussian_inputs(seed: int, n: int, shape: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """``n`` standard Gaussian inputs of ``shape`` (float64, CPU) from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g, dtype=torch.float64) * scale


class BatchStream:
    """Fresh Gaussian batches for one data seed: a CPU generator, drawn in float64 in chunks of steps."""

    def __init__(self, seed: int, batch_size: int, shape: Sequence[int]):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.batch_size = int(batch_size)
        self.shape = tuple(shape)
        self._buffer = None
        self._pos = DRAW_CHUNK

    def next(self) -> torch.Tensor:
        if self._pos == DRAW_CHUNK:
            self._buffer = torch.randn(
                (DRAW_CHUNK, self.batch_size, *self.shape), generator=self.generator, dtype=torch.float64
            )
            self._pos = 0
        out = self._buffer[self._pos]
        self._pos += 1
        return out


# ------------------------------------------------------------------------------------------- forward maps


def fnn_apply(
    weights: torch.Tensor, biases: torch.Tensor, x: torch.Tensor, activation: str = "relu", final_relu: bool = True
) -> torch.Tensor:
    """Stacked FNN: ``weights`` (R, L, D, D), ``biases`` (R, L, D), ``x`` (R, n, D) or (1, n, D) -> (R, n, D).

    One batched kernel (``baddbmm``, a shared ``x`` expanded without a copy) whatever ``R``: a run's outputs
    are then the same numbers whichever runs it is stacked with (a broadcast ``matmul`` folds the runs into
    one product whose summation order, and with it the last bits, depended on their number).
    """
    L = weights.shape[1]
    R = max(x.shape[0], weights.shape[0])
    z = x.expand(R, *x.shape[1:])
    for l in range(L):
        W = weights[:, l].transpose(1, 2).expand(R, -1, -1)  # (R, D, D) = W_l^T
        b = biases[:, l].unsqueeze(1).expand(R, -1, -1)  # (R, 1, D)
        z = torch.baddbmm(b, z, W)  # (R, n, D)
        if activation == "relu" and (l < L - 1 or final_relu):
            z = torch.relu(z)
    return z


def tfn_apply(p: dict, X: torch.Tensor) -> torch.Tensor:
    """Stacked TFN (THEORY.md §1). ``p`` maps ``wq, wk, wv, wo`` (R, L, H, D, D), ``w1, w2`` (R, L, D, D),
    ``b1, b2`` (R, L, D), ``w_out`` (R, D, D); ``X`` (R, n, D, N) or (1, n, D, N) -> (R, n, D, N).

    Tokens of all samples are rows of one matrix, so every projection is one batched product per run and
    head with ``n·N`` rows, whose result viewed as ``(R·n, N, D)`` feeds the ``N x N`` attention products
    without a copy (heads side by side would need a permuted copy of every projection, a fifth of a
    training step on a CPU).
    """
    R, L, H, D, _ = p["wq"].shape
    n, N = X.shape[1], X.shape[-1]
    Z = X.transpose(-1, -2).expand(R, n, N, D).reshape(R, n * N, D)  # (R, nN, D) tokens as rows
    for l in range(L):
        A = None
        for h in range(H):
            K = torch.bmm(Z, p["wk"][:, l, h].transpose(-1, -2)).view(R * n, N, D)  # rows k_i = W_K z_i
            Q = torch.bmm(Z, p["wq"][:, l, h].transpose(-1, -2)).view(R * n, N, D)  # rows q_j = W_Q z_j
            OV = torch.bmm(p["wo"][:, l, h], p["wv"][:, l, h])  # (R, D, D) = W_O W_V
            V = torch.bmm(Z, OV.transpose(-1, -2)).view(R * n, N, D)  # rows W_O W_V z_i
            S = torch.softmax(torch.bmm(K, Q.transpose(-1, -2)), dim=-2)  # (Rn, N, N) over keys i
            head = torch.bmm(S.transpose(-1, -2), V)  # (Rn, N, D)
            A = head if A is None else A + head
        A = A.view(R, n * N, D)  # (R, nN, D)
        H1 = torch.relu(torch.baddbmm(p["b1"][:, l].unsqueeze(1), A, p["w1"][:, l].transpose(-1, -2)))
        Z = torch.baddbmm(p["b2"][:, l].unsqueeze(1), H1, p["w2"][:, l].transpose(-1, -2))  # (R, nN, D)
    out = torch.bmm(Z, p["w_out"].transpose(-1, -2))  # (R, nN, D)
    return out.view(R, n, N, D).transpose(-1, -2)  # (R, n, D, N)


def lora_init_A(seed: int, ranks: Sequence[int], width: int) -> list[torch.Tensor]:
    """A run's LoRA ``A`` factors, ``N(0, 0.25²)``, float64 on CPU: one ``(r_k, D)`` draw per adapter in order.

    Depends on the run's init seed and its own ranks only (not on what it is stacked with).
    """
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randn((int(r), width), generator=g, dtype=torch.float64) * LORA_INIT_STD for r in ranks]


def _lora_init(init_seeds, ranks, rmax, width, dtype, device):
    """Stacked ``A`` of shape (R, K, rmax, D) (``K`` adapters per run), padded rows zero; ``B`` is zero."""
    R, K = ranks.shape
    A = torch.zeros((R, K, rmax, width), dtype=torch.float64)
    for i, s in enumerate(init_seeds):
        for k, a in enumerate(lora_init_A(s, ranks[i].tolist(), width)):
            A[i, k, : a.shape[0]] = a
    return A.to(dtype=dtype, device=device)


def _grad_buffers(params: dict) -> dict:
    """Where a hand-written backward writes each parameter's gradient: its ``grad`` when already set with the
    right shape and dtype (e.g. :attr:`StackedAdam.grads`, overwritten in place), else a new tensor."""
    return {
        k: (
            t.grad
            if t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
            else torch.empty_like(t)
        )
        for k, t in params.items()
    }


def _padded_rank(ranks: torch.Tensor, rank_padding: int | None) -> int:
    """The padded rank of a stack: ``rank_padding``, or the largest rank (at least 1) when it is ``None``."""
    largest = max(int(ranks.max()), 1)
    if rank_padding is None:
        return largest
    if int(rank_padding) < largest:
        raise ValueError(f"rank_padding {rank_padding} is below the largest rank {largest}")
    return int(rank_padding)


def _rank_mask(ranks: torch.Tensor, rmax: int) -> torch.Tensor:
    """(R, ...) integer ranks -> (R, ..., rmax) bool, True on the first ``rank`` slots."""
    return torch.arange(rmax) < ranks.unsqueeze(-1)


class FNNStack:
    """``R`` runs on frozen FNNs of one shape, stacked.

    Parameters
    ----------
    weights : (R, L, D, D), biases : (R, L, D)
        The frozen models (float64 arrays or tensors).
    method : {"lora", "final_layers", "none"}
        ``"lora"``: adapters ``B A`` on every layer, ranks per run and layer ``ranks`` (R, L);
        ``"final_layers"``: the last ``tuned_layers[r]`` layers' weights and biases trained fully;
        ``"none"``: nothing trained (a target model).
    tune_bias : (R,) bool
        LoRA only: biases of every layer trained too.
    init_seeds : (R,) int
        Seeds of each run's adapter initialisation.
    rank_padding : int, optional
        LoRA only: the rank every run's ``A`` and ``B`` are padded to (zero rows and columns), at least the
        largest rank (the default). A fixed padding (e.g. ``D``) makes a run's arithmetic, hence its result,
        independent of the ranks of the runs stacked with it: the matrix kernels sum in another order for
        another inner dimension, and float32 training carries such rounding differences into the results.
    """

    def __init__(
        self,
        weights,
        biases,
        *,
        activation="relu",
        final_relu=True,
        method="lora",
        ranks=None,
        tuned_layers=None,
        tune_bias=None,
        init_seeds=None,
        dtype=torch.float32,
        device="cpu",
        rank_padding=None,
    ):
        W = torch.tensor(np.array(weights, dtype=np.float64))
        b = torch.tensor(np.array(biases, dtype=np.float64))
        R, L, D, _ = W.shape
        self.R, self.L, self.D = R, L, D
        self.activation, self.final_relu, self.method = activation, final_relu, method
        self.dtype, self.device = dtype, device
        self.frozen_weights = W.to(dtype=dtype, device=device)
        self.frozen_biases = b.to(dtype=dtype, device=device)
        self.params: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor | None] = {}
        tune_bias = np.zeros(R, bool) if tune_bias is None else np.asarray(tune_bias, bool)
        if method == "lora":
            ranks = torch.as_tensor(np.asarray(ranks, dtype=np.int64)).reshape(R, L)
            self.ranks = ranks
            self.rmax = _padded_rank(ranks, rank_padding)
            mask = _rank_mask(ranks, self.rmax)  # (R, L, rmax)
            self.params["A"] = _lora_init(init_seeds, ranks, self.rmax, D, dtype, device)  # (R, L, rmax, D)
            self.params["B"] = torch.zeros((R, L, D, self.rmax), dtype=dtype, device=device)
            self.masks["A"] = mask.unsqueeze(-1).to(device)  # (R, L, rmax, 1)
            self.masks["B"] = mask.unsqueeze(-2).to(device)  # (R, L, 1, rmax)
            if tune_bias.any():
                self.params["bias"] = self.frozen_biases.clone()
                self.masks["bias"] = torch.as_tensor(tune_bias).view(R, 1, 1).expand(R, L, 1).to(device)
        elif method == "final_layers":
            tuned = np.asarray(tuned_layers, dtype=np.int64).reshape(R)
            layer_mask = torch.as_tensor(np.arange(L)[None, :] >= (L - tuned)[:, None])  # (R, L)
            self.params["weight"] = self.frozen_weights.clone()
            self.params["bias"] = self.frozen_biases.clone()
            self.masks["weight"] = layer_mask.view(R, L, 1, 1).to(device)
            self.masks["bias"] = layer_mask.view(R, L, 1).to(device)
        elif method != "none":
            raise ValueError(f"unknown method {method!r}")
        for p in self.params.values():
            p.requires_grad_(True)

    def weights_and_biases(self, params=None, dtype=None):
        """Effective ``(weights (R, L, D, D), biases (R, L, D))``; in ``dtype`` (e.g. float64 for evaluation)."""
        p = self.params if params is None else params
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        if "weight" in p:
            W = cast(p["weight"])
        else:
            W = cast(self.frozen_weights)
            if "A" in p:
                W = W + cast(p["B"]) @ cast(p["A"])  # (R, L, D, D)
        b = cast(p["bias"]) if "bias" in p else cast(self.frozen_biases)
        return W, b

    def forward(self, x, params=None, dtype=None):
        W, b = self.weights_and_biases(params, dtype)
        return fnn_apply(W, b, x, self.activation, self.final_relu)

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-run MSE on ``(x, y)`` (R, n, D) and the gradients of their sum, by a hand-written backward.

        The same numbers autograd computes (tested), with fewer passes over the activations: a ReLU's
        backward reads the stored activation, the gradient of ``W = W0 + B A`` is ``B^T gW`` / ``gW A^T``.
        Sets ``p.grad`` for every trainable parameter and returns the per-run losses (R,).

        A ``p.grad`` already set (e.g. to the optimiser's buffer :attr:`StackedAdam.grads`) is overwritten in
        place, not accumulated into; otherwise a new one is allocated.
        """
        with torch.no_grad():
            p = self.params
            L = self.L
            n = x.shape[1]
            ws = self._workspace(n, x.dtype, x.device)
            if "weight" in p:
                W = p["weight"]
            elif "A" in p:  # W0 + B A, written into a buffer
                W = torch.matmul(p["B"], p["A"], out=ws["W"]).add_(self.frozen_weights)
            else:
                W = self.frozen_weights  # (R, L, D, D)
            b = p["bias"] if "bias" in p else self.frozen_biases  # (R, L, D)
            relu = [self.activation == "relu" and (l < L - 1 or self.final_relu) for l in range(L)]
            zs = [x]
            z = x
            for l in range(L):
                z = torch.baddbmm(b[:, l].unsqueeze(1), z, W[:, l].transpose(1, 2), out=ws["z"][l])  # (R, n, D)
                if relu[l]:
                    z.clamp_(min=0)
                zs.append(z)
            g, g_next = ws["g"]
            diff = torch.sub(z, y, out=g)  # (R, n, D)
            n_el = diff.shape[1] * diff.shape[2]
            per_run = torch.linalg.vector_norm(diff, dim=(1, 2)) ** 2 / n_el  # (R,)
            g = diff.mul_(2.0 / n_el)
            grads = _grad_buffers(p)
            need_w = "weight" in p or "A" in p
            gW = ws["gW"]  # (L, R, D, D), layer-major
            gb = grads.get("bias")  # (R, L, D)
            for l in reversed(range(L)):
                if relu[l]:  # ReLU' = 1[z > 0], in place on g
                    g = torch.ops.aten.threshold_backward.grad_input(g, zs[l + 1], 0, grad_input=g)
                if need_w:
                    torch.bmm(g.transpose(1, 2), zs[l], out=gW[l])  # (R, D, D) = g^T z_{l-1}
                if gb is not None:
                    torch.sum(g, dim=1, out=gb[:, l])  # (R, D)
                if l > 0:
                    g, g_next = torch.bmm(g, W[:, l], out=g_next), g  # (R, n, D) = g W_l
            if need_w:
                gW = ws["gW_runs"].copy_(gW.transpose(0, 1))  # (R, L, D, D)
            if "weight" in p:
                grads["weight"].copy_(gW)
            if "A" in p:
                torch.matmul(p["B"].transpose(-1, -2), gW, out=grads["A"])  # (R, L, r, D) = B^T gW
                torch.matmul(gW, p["A"].transpose(-1, -2), out=grads["B"])  # (R, L, D, r) = gW A^T
            for k, t in p.items():
                t.grad = grads[k]
        return per_run

    def _workspace(self, n, dtype, device) -> dict:
        """Buffers of :meth:`loss_and_grads` for batches of ``n``, kept between steps: a step allocates no
        large tensor (freeing and re-allocating them every step costs the kernel's page faults)."""
        key = (n, dtype, device)
        if getattr(self, "_ws_key", None) != key:
            R, L, D = self.R, self.L, self.D
            new = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
            self._ws = {
                "z": [new(R, n, D) for _ in range(L)],
                "g": [new(R, n, D), new(R, n, D)],
                "W": new(R, L, D, D),
                "gW": new(L, R, D, D),
                "gW_runs": new(R, L, D, D),
            }
            self._ws_key = key
        return self._ws

    def adapters(self, run: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """LoRA only: ``[(A_l, B_l)]`` of one run, at its own rank (float64 numpy)."""
        out = []
        for l in range(self.L):
            r = int(self.ranks[run, l])
            A = self.params["A"][run, l, :r].detach().cpu().double().numpy()
            B = self.params["B"][run, l, :, :r].detach().cpu().double().numpy()
            out.append((A, B))
        return out


_TFN_ATT = ("wq", "wk", "wv", "wo")
_TFN_KEYS = ("wq", "wk", "wv", "wo", "w1", "b1", "w2", "b2", "w_out")


class TFNStack:
    """``R`` runs on frozen TFNs of one shape, stacked (THEORY.md §2.7 placement of the adapters).

    LoRA adapters on ``W_Q, W_K, W_V, W_O`` of every head and block, on ``W2`` of the last block and on
    ``W_out``; the biases ``b1, b2`` of every block are trained when ``tune_bias``. ``frozen`` maps the
    :class:`lora_theory.TFN` parameter names to arrays with a leading run dimension.
    """

    def __init__(
        self,
        frozen: dict,
        *,
        method="lora",
        ranks=None,
        tune_bias=None,
        init_seeds=None,
        dtype=torch.float32,
        device="cpu",
        rank_padding=None,
    ):
        self.frozen = {
            k: torch.tensor(np.array(frozen[k], dtype=np.float64)).to(dtype=dtype, device=device) for k in _TFN_KEYS
        }
        R, L, H, D, _ = self.frozen["wq"].shape
        self.R, self.L, self.H, self.D = R, L, H, D
        self.method, self.dtype, self.device = method, dtype, device
        self.params, self.masks = {}, {}
        tune_bias = np.zeros(R, bool) if tune_bias is None else np.asarray(tune_bias, bool)
        if method == "lora":
            ranks = torch.as_tensor(np.asarray(ranks, dtype=np.int64)).reshape(R)
            self.ranks = ranks
            self.rmax = _padded_rank(ranks, rank_padding)  # see FNNStack
            mask = _rank_mask(ranks, self.rmax)  # (R, rmax)
            # adapters of a run in a fixed order: wq, wk, wv, wo of every (block, head), then w2 (last block), w_out
            K = 4 * L * H + 2
            A_all = _lora_init(init_seeds, ranks.view(R, 1).expand(R, K), self.rmax, D, dtype, device)
            att = A_all[:, : 4 * L * H].reshape(R, L, H, 4, self.rmax, D)
            m = mask.view(R, 1, 1, self.rmax).expand(R, L, H, self.rmax)
            for i, k in enumerate(_TFN_ATT):
                self.params[f"A_{k}"] = att[:, :, :, i].contiguous()  # (R, L, H, rmax, D)
                self.params[f"B_{k}"] = torch.zeros((R, L, H, D, self.rmax), dtype=dtype, device=device)
                self.masks[f"A_{k}"] = m.unsqueeze(-1).to(device)
                self.masks[f"B_{k}"] = m.unsqueeze(-2).to(device)
            for i, k in enumerate(("w2", "w_out")):
                self.params[f"A_{k}"] = A_all[:, 4 * L * H + i].contiguous()  # (R, rmax, D)
                self.params[f"B_{k}"] = torch.zeros((R, D, self.rmax), dtype=dtype, device=device)
                self.masks[f"A_{k}"] = mask.unsqueeze(-1).to(device)
                self.masks[f"B_{k}"] = mask.unsqueeze(-2).to(device)
            if tune_bias.any():
                tb = torch.as_tensor(tune_bias).view(R, 1, 1).to(device)
                for k in ("b1", "b2"):
                    self.params[k] = self.frozen[k].clone()
                    self.masks[k] = tb
        elif method != "none":
            raise ValueError(f"unknown method {method!r}")
        for p in self.params.values():
            p.requires_grad_(True)

    def effective(self, params=None, dtype=None) -> dict:
        p = self.params if params is None else params
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        out = {k: cast(v) for k, v in self.frozen.items()}
        for k in _TFN_ATT + ("w_out",):
            if f"A_{k}" in p:
                out[k] = out[k] + cast(p[f"B_{k}"]) @ cast(p[f"A_{k}"])
        if "A_w2" in p:
            delta = cast(p["B_w2"]) @ cast(p["A_w2"])  # (R, D, D)
            last = torch.zeros_like(out["w2"])
            last[:, -1] = delta
            out["w2"] = out["w2"] + last
        for k in ("b1", "b2"):
            if k in p:
                out[k] = cast(p[k])
        return out

    def forward(self, X, params=None, dtype=None):
        return tfn_apply(self.effective(params, dtype), X)

    def loss_and_grads(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Per-run MSE on ``(X, Y)`` (R or 1, n, D, N) and the gradients of their sum, by a hand-written backward.

        The numbers autograd computes through :func:`tfn_apply` (tested), in the same token-row layout
        (``Z`` (R, n·N, D), one row per token), with every activation and gradient in buffers kept between
        steps and the loss's gradient formed in place. Per block and head the scores are formed as the
        bilinear form they are, ``S_raw = Z G Z^T`` per sequence with ``G = W_K^T W_Q`` (``k_i · q_j =
        z_i^T G z_j``: one projection ``P = Z G`` instead of two, and one weight gradient), then
        ``S = softmax_i(S_raw)`` (keys ``i`` down the rows) and ``head = S^T V``, ``V = Z (W_O W_V)^T``.
        Backward: ``dS = V dhead^T``, ``dV = S dhead``, ``dS_raw = S ⊙ (dS - Σ_i S ⊙ dS)``,
        ``dP = dS_raw Z``, ``gG = Z^T dP`` (summed over sequences), split into ``W_K gG`` for ``W_Q`` and
        ``W_Q gG^T`` for ``W_K``; the block input gets ``dP G^T + dS_raw^T P + dV W_O W_V``; ``W_O W_V``
        splits its gradient ``gOV`` into ``gOV W_V^T`` and ``W_O^T gOV``; an adapter's ``W = W0 + B A``
        gets ``B^T gW`` and ``gW A^T``. Sets ``p.grad`` for every trainable parameter (a ``p.grad`` already set,
        e.g. to :attr:`StackedAdam.grads`, is overwritten in place) and returns the per-run losses (R,).
        """
        if self.method != "lora":
            raise ValueError("loss_and_grads trains LoRA adapters; this stack has none")
        with torch.no_grad():
            p = self.params
            R, L, H, D = self.R, self.L, self.H, self.D
            n, N = X.shape[1], X.shape[-1]
            nN, Rn = n * N, R * n
            ws = self._workspace(n, N, X.dtype, X.device)
            T = lambda t: t.transpose(-1, -2)  # noqa: E731
            lh = lambda t: t.permute(1, 2, 0, 3, 4)  # noqa: E731  (R, L, H, ..) -> (L, H, R, ..)
            # effective weights W0 + B A, block- and head-major so that every (l, h) slice is contiguous
            eff = {}
            for k in _TFN_ATT:
                W = torch.matmul(p[f"B_{k}"], p[f"A_{k}"], out=ws[f"BA_{k}"]).add_(self.frozen[k])  # (R, L, H, D, D)
                eff[k] = ws[f"W_{k}"].copy_(lh(W))  # (L, H, R, D, D)
            W2 = ws["W2"].copy_(self.frozen["w2"].transpose(0, 1))  # (L, R, D, D)
            W2[-1].baddbmm_(p["B_w2"], p["A_w2"])
            Wout = torch.baddbmm(self.frozen["w_out"], p["B_w_out"], p["A_w_out"], out=ws["Wout"])  # (R, D, D)
            W1 = ws["W1"].copy_(self.frozen["w1"].transpose(0, 1))  # (L, R, D, D)
            OV = torch.matmul(eff["wo"], eff["wv"], out=ws["OV"])  # (L, H, R, D, D) = W_O W_V
            KQ = torch.matmul(T(eff["wk"]), eff["wq"], out=ws["KQ"])  # (L, H, R, D, D) = W_K^T W_Q
            OVT = ws["OVT"].copy_(T(OV))
            W1T, W2T = ws["W1T"].copy_(T(W1)), ws["W2T"].copy_(T(W2))
            b1 = (p["b1"] if "b1" in p else self.frozen["b1"]).transpose(0, 1).unsqueeze(2)  # (L, R, 1, D)
            b2 = (p["b2"] if "b2" in p else self.frozen["b2"]).transpose(0, 1).unsqueeze(2)  # (L, R, 1, D)

            # forward, keeping what the backward reads; every block input per run (the scores read each
            # run's sequences), one shared input batch (R or 1 leading, or stride 0) broadcast by the copy
            Z = ws["Z"][0]
            Z.view(R, n, N, D).copy_(T(X))  # (R, nN, D) tokens as rows
            for l in range(L):
                A = ws["A"][l]  # (R, nN, D) sum of the heads
                for h in range(H):
                    P = torch.bmm(Z, KQ[l, h], out=ws["P"][l][h]).view(Rn, N, D)  # rows W_Q^T W_K z_i
                    V = torch.bmm(Z, OVT[l, h], out=ws["V"][l][h]).view(Rn, N, D)  # rows W_O W_V z_i
                    S_raw = torch.bmm(P, T(Z.view(Rn, N, D)), out=ws["S_raw"])  # (Rn, N, N) k_i . q_j
                    S = torch.ops.aten._softmax.out(S_raw, -2, False, out=ws["S"][l][h])  # over keys i
                    if h == 0:
                        torch.bmm(T(S), V, out=A.view(Rn, N, D))  # (Rn, N, D) head_j = sum_i S_ij v_i
                    else:
                        A.view(Rn, N, D).baddbmm_(T(S), V)
                H1 = torch.baddbmm(b1[l], A, W1T[l], out=ws["H1"][l]).clamp_(min=0)  # (R, nN, D)
                Z = torch.baddbmm(b2[l], H1, W2T[l], out=ws["Z"][l + 1])  # (R, nN, D)
            diff = torch.bmm(Z, T(Wout), out=ws["G"])  # (R, nN, D) output tokens
            diff.sub_(T(Y).reshape(Y.shape[0], nN, D))
            n_el = nN * D
            per_run = torch.linalg.vector_norm(diff, dim=(1, 2)) ** 2 / n_el  # (R,)
            G = diff.mul_(2.0 / n_el)  # d(sum of losses)/d out

            # backward: gradients of the effective weights, block- and head-major
            gW = {k: ws[f"g{k}"] for k in _TFN_ATT}  # (L, H, R, D, D)
            gW2, gb1, gb2 = ws["gW2"], ws["gb1"], ws["gb2"]  # (R, D, D), (L, R, D) x 2
            gWout = torch.bmm(T(G), Z, out=ws["gWout"])  # (R, D, D)
            dZ = torch.bmm(G, Wout, out=ws["dZ"])  # (R, nN, D)
            for l in reversed(range(L)):
                H1, A, Z_in = ws["H1"][l], ws["A"][l], ws["Z"][l]
                if l == L - 1:  # W2 is adapted in the last block only
                    torch.bmm(T(dZ), H1, out=gW2)
                torch.sum(dZ, dim=1, out=gb2[l])
                dH = torch.bmm(dZ, W2[l], out=ws["dH"])  # (R, nN, D)
                torch.ops.aten.threshold_backward.grad_input(dH, H1, 0, grad_input=dH)  # ReLU' = 1[H1 > 0]
                torch.sum(dH, dim=1, out=gb1[l])
                dA = torch.bmm(dH, W1[l], out=ws["dA"]).view(Rn, N, D)  # dhead of every head
                for h in range(H):
                    P, V = (ws[k][l][h].view(Rn, N, D) for k in ("P", "V"))
                    S = ws["S"][l][h]  # (Rn, N, N)
                    dS = torch.bmm(V, T(dA), out=ws["dS"])  # (Rn, N, N)
                    dV = torch.bmm(S, dA, out=ws["dV"])  # (Rn, N, D)
                    dS_raw = torch.ops.aten._softmax_backward_data.out(dS, S, -2, S.dtype, grad_input=ws["S_raw"])
                    dP = torch.bmm(dS_raw, Z_in.view(Rn, N, D), out=ws["dP"]).view(R, nN, D)
                    dV = dV.view(R, nN, D)
                    gKQ = torch.bmm(T(Z_in), dP, out=ws["gKQ"])  # (R, D, D) gradient of W_K^T W_Q
                    torch.bmm(eff["wk"][l, h], gKQ, out=gW["wq"][l, h])  # W_K gKQ
                    torch.bmm(eff["wq"][l, h], T(gKQ), out=gW["wk"][l, h])  # W_Q gKQ^T
                    gOV = torch.bmm(T(dV), Z_in, out=ws["gOV"])  # (R, D, D)
                    torch.bmm(gOV, T(eff["wv"][l, h]), out=gW["wo"][l, h])
                    torch.bmm(T(eff["wo"][l, h]), gOV, out=gW["wv"][l, h])
                    if l > 0:  # dZ of the block's input
                        if h == 0:
                            torch.bmm(dP, T(KQ[l, h]), out=ws["dZ"])  # through P = Z W_K^T W_Q
                        else:
                            ws["dZ"].baddbmm_(dP, T(KQ[l, h]))
                        ws["dZ"].view(Rn, N, D).baddbmm_(T(dS_raw), P)  # through the keys' side, Z^T
                        ws["dZ"].baddbmm_(dV, OV[l, h])
                dZ = ws["dZ"]

            grads = _grad_buffers(p)
            runs_first = lambda t: t.permute(2, 0, 1, 3, 4)  # noqa: E731  (L, H, R, ..) -> (R, L, H, ..)
            for k in _TFN_ATT:
                g = runs_first(gW[k])  # (R, L, H, D, D)
                torch.matmul(T(p[f"B_{k}"]), g, out=grads[f"A_{k}"])  # (R, L, H, r, D) = B^T gW
                torch.matmul(g, T(p[f"A_{k}"]), out=grads[f"B_{k}"])  # (R, L, H, D, r) = gW A^T
            for k, g in (("w2", gW2), ("w_out", gWout)):
                torch.bmm(T(p[f"B_{k}"]), g, out=grads[f"A_{k}"])  # (R, r, D)
                torch.bmm(g, T(p[f"A_{k}"]), out=grads[f"B_{k}"])  # (R, D, r)
            for k, g in (("b1", gb1), ("b2", gb2)):
                if k in p:
                    grads[k].copy_(g.transpose(0, 1))  # (R, L, D)
            for k, t in p.items():
                t.grad = grads[k]
        return per_run

    def _workspace(self, n, N, dtype, device) -> dict:
        """Buffers of :meth:`loss_and_grads` for batches of ``n`` sequences of ``N`` tokens, kept between
        steps (a step allocates no large tensor)."""
        key = (n, N, dtype, device)
        if getattr(self, "_ws_key", None) != key:
            R, L, H, D = self.R, self.L, self.H, self.D
            nN, Rn = n * N, R * n
            new = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
            per_lh = lambda *shape: [[new(*shape) for _ in range(H)] for _ in range(L)]  # noqa: E731
            ws = {
                "Z": [new(R, nN, D) for _ in range(L + 1)],
                "A": [new(R, nN, D) for _ in range(L)],
                "H1": [new(R, nN, D) for _ in range(L)],
                "P": per_lh(R, nN, D),
                "V": per_lh(R, nN, D),
                "S": per_lh(Rn, N, N),
                "S_raw": new(Rn, N, N),
                "G": new(R, nN, D),
                "dZ": new(R, nN, D),
                "dH": new(R, nN, D),
                "dA": new(R, nN, D),
                "dS": new(Rn, N, N),
                "dV": new(Rn, N, D),
                "dP": new(Rn, N, D),
                "gOV": new(R, D, D),
                "gKQ": new(R, D, D),
                "KQ": new(L, H, R, D, D),
                "OVT": new(L, H, R, D, D),
                "W1": new(L, R, D, D),
                "W2": new(L, R, D, D),
                "W1T": new(L, R, D, D),
                "W2T": new(L, R, D, D),
                "Wout": new(R, D, D),
                "OV": new(L, H, R, D, D),
                "gW2": new(R, D, D),
                "gb1": new(L, R, D),
                "gb2": new(L, R, D),
                "gWout": new(R, D, D),
            }
            for k in _TFN_ATT:
                ws[f"BA_{k}"] = new(R, L, H, D, D)
                ws[f"W_{k}"] = new(L, H, R, D, D)
                ws[f"g{k}"] = new(L, H, R, D, D)
            self._ws, self._ws_key = ws, key
        return self._ws


# ------------------------------------------------------------------------------------------------- Adam


class StackedAdam:
    """Adam with coupled weight decay over stacked tensors, per-run ``lr`` and ``weight_decay``.

    Per entry, exactly the update of ``torch.optim.Adam(lr, betas, eps, weight_decay)`` (default, non-amsgrad):
    ``g += wd·p; m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²; p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)``.
    Entries where ``masks[name]`` is False get a zero gradient, so their moments and updates stay zero.

    All parameters are updated as one flat vector, in place (a handful of operations per step whatever their
    number): the parameters become views of one flat tensor (``p.data`` is re-pointed; the tensors themselves,
    their shapes and values are unchanged), ``m[name]``, ``v[name]`` are views of the flat moments, and
    :attr:`grads` are views of one flat gradient buffer: a backward that writes its gradients there (set
    ``p.grad = opt.grads[name]`` before :meth:`FNNStack.loss_and_grads`) saves gathering them.
    """

    def __init__(self, params: dict, masks: dict, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.masks = params, masks
        any_p = next(iter(params.values()))
        dev, dt = any_p.device, any_p.dtype
        lr = torch.as_tensor(np.asarray(lr, dtype=np.float64)).to(device=dev, dtype=dt)
        wd = torch.as_tensor(np.asarray(weight_decay, dtype=np.float64)).to(device=dev, dtype=dt)
        self.names = list(params)
        self.sizes = [params[k].numel() for k in self.names]
        total = sum(self.sizes)

        def flat(per_run, k):  # (R,) -> every entry of params[k], flattened
            p = params[k]
            return per_run.view(-1, *([1] * (p.dim() - 1))).expand_as(p).reshape(-1)

        self.lr = torch.cat([flat(lr, k) for k in self.names])  # (P,)
        self.wd = torch.cat([flat(wd, k) for k in self.names])  # (P,)
        self.use_wd = bool((wd != 0).any())
        if any(masks.get(k) is not None for k in self.names):
            self.mask = torch.cat(
                [
                    (
                        masks[k].expand_as(params[k])
                        if masks.get(k) is not None
                        else torch.ones_like(params[k], dtype=torch.bool)
                    ).reshape(-1)
                    for k in self.names
                ]
            ).to(dev)  # (P,) bool
        else:
            self.mask = None
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self.param_flat = torch.cat([params[k].detach().reshape(-1) for k in self.names])  # (P,)
        self.grad_flat = torch.zeros(total, device=dev, dtype=dt)
        self.m_flat = torch.zeros(total, device=dev, dtype=dt)
        self.v_flat = torch.zeros(total, device=dev, dtype=dt)
        self._denom = torch.empty(total, device=dev, dtype=dt)
        self._num = torch.empty(total, device=dev, dtype=dt)
        self.m, self.v, self.grads, off = {}, {}, {}, 0
        for k, n in zip(self.names, self.sizes):
            p = params[k]
            p.data = self.param_flat[off : off + n].view(p.shape)
            self.grads[k] = self.grad_flat[off : off + n].view(p.shape)
            self.m[k] = self.m_flat[off : off + n].view(p.shape)
            self.v[k] = self.v_flat[off : off + n].view(p.shape)
            off += n
        self._zero = torch.zeros((), device=dev, dtype=dt)

    def _flat_grad(self) -> torch.Tensor:
        """The gradients as one flat vector: :attr:`grad_flat`, filled from ``p.grad`` unless already there."""
        for k in self.names:
            grad, buf = self.params[k].grad, self.grads[k]
            if grad.data_ptr() != buf.data_ptr() or grad.stride() != buf.stride():
                buf.copy_(grad)
        return self.grad_flat

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        t = self.step_count
        bc1 = 1 - self.beta1**t
        bc2_sqrt = math.sqrt(1 - self.beta2**t)
        g = self._flat_grad()  # (P,), consumed in place
        if self.use_wd:
            g.addcmul_(self.param_flat, self.wd)
        if self.mask is not None:
            torch.where(self.mask, g, self._zero, out=g)
        self.m_flat.lerp_(g, 1 - self.beta1)
        self.v_flat.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        denom = torch.sqrt(self.v_flat, out=self._denom).div_(bc2_sqrt).add_(self.eps)
        update = torch.mul(self.m_flat, self.lr, out=self._num).div_(denom).mul_(1.0 / bc1)  # lr/bc1 · m / denom
        self.param_flat.sub_(update)
        for k in self.names:
            self.params[k].grad = None


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """Per run: the final training loss, the loss curve at checkpoints, and (``select="best"``) the step chosen."""

    final_train_loss: np.ndarray
    curve_steps: list
    curve: np.ndarray  # (checkpoints, R)
    best_step: np.ndarray | None = None
    best_val_loss: np.ndarray | None = None
    params: dict = field(default_factory=dict)


def subnormals_are_flushed() -> bool:
    """Whether this thread's CPU flushes subnormal floats to zero (a subnormal then reads as 0)."""
    return bool(torch.tensor([5e-324], dtype=torch.float64)[0] == 0)


@contextlib.contextmanager
def subnormals_flushed(enabled: bool = True):
    """Flush subnormal floats to zero on this thread's CPU for the duration (restored after).

    The TFN's attention scores run to the hundreds, so most of the softmax's probabilities underflow
    toward zero through the subnormal range (below 1.2e-38 in float32, 2.2e-308 in float64), where x86
    arithmetic is many times slower: flushing them made the TFN training step about 1.09x faster (median
    of paired rounds on the 2-core CPU) with bitwise-equal losses and gradients in that test. A flushed value
    changes by less than the smallest normal number, far below the rounding of every output. Applies to the
    calling thread (each CPU stack trains in its own thread with one intra-op thread); a thread that already
    flushes them is left so.
    """
    changed = enabled and not subnormals_are_flushed() and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def train_stack(
    stack,
    target,
    *,
    data_index,
    target_index,
    target_data_index,
    data_seeds,
    lr,
    weight_decay,
    iterations,
    batch_size=256,
    input_shape=None,
    select="final",
    validate_every=100,
    val_inputs=None,
    val_targets=None,
    curve_points=20,
    progress: Callable[[int], None] | None = None,
    betas=(0.9, 0.999),
    eps=1e-8,
    backward="manual",
    stop=None,
) -> TrainResult:
    """Train a stack of runs for ``iterations`` steps of Adam on fresh Gaussian batches.

    Parameters
    ----------
    stack : FNNStack or TFNStack
        The runs (``R``), with their trainable parameters.
    target : FNNStack or TFNStack with ``method="none"``
        The distinct target models (``T``), evaluated on their data seed's batch every step.
    data_index : (R,) int
        Index into ``data_seeds`` of each run's data seed.
    target_index : (R,) int
        Index into the targets of each run's target.
    target_data_index : (T,) int
        Index into ``data_seeds`` of each target's data seed (equal to its runs').
    data_seeds : sequence of int
        The distinct data seeds (one :class:`BatchStream` each).
    lr, weight_decay : (R,) float
    select : {"final", "best"}
        ``"best"``: every ``validate_every`` steps (and at the end) evaluate the validation loss on
        ``val_inputs`` (float64, shape (n_val, *input_shape), shared) against ``val_targets`` (T, n_val, ...)
        and keep each run's best iterate; the stack's parameters are set to it at the end.
    progress : callable(steps_done_increment), optional
    stop : threading.Event, optional
        Checked before every step; once set, :class:`TrainingStopped` is raised (an interrupted sweep stops
        all its stacks promptly, also those trained in other threads).
    backward : {"manual", "autograd"}
        The stack's hand-written backward (default; ``loss_and_grads``) or autograd (the reference).
    """
    device, dtype = stack.device, stack.dtype
    manual = backward == "manual" and hasattr(stack, "loss_and_grads")
    input_shape = tuple(input_shape) if input_shape is not None else (stack.D,)
    streams = [BatchStream(s, batch_size, input_shape) for s in data_seeds]
    data_index = torch.as_tensor(np.asarray(data_index, dtype=np.int64), device=device)
    target_index = torch.as_tensor(np.asarray(target_index, dtype=np.int64), device=device)
    target_data_index = torch.as_tensor(np.asarray(target_data_index, dtype=np.int64), device=device)
    opt = StackedAdam(stack.params, stack.masks, lr, weight_decay, betas, eps)
    R = stack.R
    single_seed = len(streams) == 1
    single_target = target.R == 1
    reduce_dims = tuple(range(1, 2 + len(input_shape)))
    checkpoints = sorted({max(1, round(iterations * (i + 1) / curve_points)) for i in range(curve_points)})
    curve, curve_steps = [], []
    best = None
    if select == "best":
        val_x = val_inputs.to(dtype=dtype, device=device).unsqueeze(0)
        val_y = val_targets.to(dtype=dtype, device=device)[target_index]
        best = {k: p.detach().clone() for k, p in stack.params.items()}
        best_loss = torch.full((R,), math.inf, dtype=torch.float64, device=device)
        best_step = torch.zeros(R, dtype=torch.int64, device=device)

        def validate(step):
            nonlocal best_loss
            with torch.no_grad():
                pred = stack.forward(val_x)
                loss = ((pred - val_y) ** 2).mean(dim=reduce_dims).double()
                better = loss < best_loss  # NaN never counts as better
                best_loss = torch.where(better, loss, best_loss)
                best_step.copy_(torch.where(better, torch.full_like(best_step, step), best_step))
                for k, p in stack.params.items():
                    shape = (R,) + (1,) * (p.dim() - 1)
                    best[k].copy_(torch.where(better.view(shape), p.detach(), best[k]))

    last_loss = None
    pending = 0
    with subnormals_flushed(torch.device(device).type == "cpu"):
        for step in range(1, iterations + 1):
            if stop is not None and stop.is_set():
                raise TrainingStopped(f"stopped before step {step} of {iterations}")
            xs = torch.stack([s.next() for s in streams]).to(device=device, dtype=dtype)  # (S, n, *shape)
            with torch.no_grad():
                if single_target:
                    y = target.forward(xs[target_data_index])  # (1, n, *shape), broadcast
                else:
                    y = target.forward(xs[target_data_index])[target_index]  # (R, n, *shape)
            if single_seed:
                x = xs.expand(R, *xs.shape[1:])  # (R, n, *shape), no copy
            else:
                x = xs[data_index]  # (R, n, *shape)
            if manual:
                for k, p in stack.params.items():
                    p.grad = opt.grads[k]  # written in place, no gather
                per_run = stack.loss_and_grads(x, y)  # (R,), grads set
            else:
                pred = stack.forward(x)
                per_run = ((pred - y) ** 2).mean(dim=reduce_dims)  # (R,)
                per_run.sum().backward()
            opt.step()
            if step in checkpoints:
                last_loss = per_run.detach().double().cpu().numpy()
                curve.append(last_loss)
                curve_steps.append(step)
            if select == "best" and (step % validate_every == 0 or step == iterations):
                validate(step)
            pending += 1
            if progress is not None and (pending >= 50 or step == iterations):
                progress(pending)
                pending = 0
    result = TrainResult(final_train_loss=last_loss, curve_steps=curve_steps, curve=np.array(curve))
    if select == "best":
        with torch.no_grad():
            for k, p in stack.params.items():
                p.copy_(best[k])
        result.best_step = best_step.cpu().numpy()
        result.best_val_loss = best_loss.cpu().numpy()
    return result
