"""Zeng & Lee 2024, Theorem 7 (transformers) in exact rational arithmetic: :func:`certify_tfn`, every matched
product of the walk of :func:`lora_theory.lora_tfn` equal to its target, the biases too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sympy

from .._validate import as_int
from ..errors import InvalidArgumentError
from ..models import TFN
from ..tfn import _Carried, _walk, _WalkArithmetic
from ..thresholds import ceil_div
from .certificate import NOT_MET, Certificate, _finish, _Recorder, _Stop, _store
from .linear import _exact_chain
from .rational import _dm, _eye, _sym, _vec

_HEAD = ("wq", "wk", "wv", "wo")


@dataclass(frozen=True, eq=False)
class RationalTFN:
    """A transformer network with exact rational parameters (the exact twin of :class:`~lora_theory.TFN`).

    Attributes
    ----------
    wq, wk, wv, wo : tuple (L) of tuple (H) of sympy.ImmutableMatrix (D, D)
    w1, w2 : tuple (L) of sympy.ImmutableMatrix (D, D)
    b1, b2 : tuple (L) of sympy.ImmutableMatrix (D, 1)
    w_out : sympy.ImmutableMatrix (D, D)
    """

    wq: tuple
    wk: tuple
    wv: tuple
    wo: tuple
    w1: tuple
    b1: tuple
    w2: tuple
    b2: tuple
    w_out: object

    def __post_init__(self):
        def seq(v, name):
            if (
                isinstance(v, (str, bytes, sympy.MatrixBase))
                or not isinstance(v, (Sequence, np.ndarray))
                or len(v) == 0
            ):
                raise InvalidArgumentError(name, "must be a non-empty sequence (one entry per block)")
            return list(v)

        wq = seq(self.wq, "wq")
        Lb = len(wq)
        H = len(seq(wq[0], "wq[0]"))
        n = _dm(wq[0][0], "wq[0][0]").shape[0]
        vals = {}
        for name in _HEAD:
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(
                tuple(
                    _sym(_dm(M, f"{name}[{l}][{h}]", (n, n))) for h, M in enumerate(_heads(stack[l], H, f"{name}[{l}]"))
                )
                for l in range(Lb)
            )
        for name in ("w1", "w2"):
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(_sym(_dm(M, f"{name}[{l}]", (n, n))) for l, M in enumerate(stack))
        for name in ("b1", "b2"):
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(_sym(_vec(v, f"{name}[{l}]", n)) for l, v in enumerate(stack))
        vals["w_out"] = _sym(_dm(self.w_out, "w_out", (n, n)))
        for name, v in vals.items():
            object.__setattr__(self, name, v)

    @property
    def depth(self) -> int:
        """``L``, the number of blocks."""
        return len(self.wq)

    @property
    def heads(self) -> int:
        """``H``."""
        return len(self.wq[0])

    @property
    def embed_dim(self) -> int:
        """``D``."""
        return int(self.w_out.shape[0])

    width = embed_dim

    @classmethod
    def from_tfn(cls, model: TFN) -> RationalTFN:
        """The exact rational values of a float64 :class:`~lora_theory.TFN`."""
        return cls(
            *(list(getattr(model, n)) for n in _HEAD),
            w1=list(model.w1),
            b1=list(model.b1),
            w2=list(model.w2),
            b2=list(model.b2),
            w_out=model.w_out,
        )

    def to_float(self) -> TFN:
        """The nearest float64 :class:`~lora_theory.TFN`."""

        def f(M):
            return np.array(M.tolist(), dtype=float)

        heads = {n: np.array([[f(M) for M in row] for row in getattr(self, n)]) for n in _HEAD}
        return TFN(
            **heads,
            w1=np.array([f(M) for M in self.w1]),
            b1=np.array([f(v).reshape(-1) for v in self.b1]),
            w2=np.array([f(M) for M in self.w2]),
            b2=np.array([f(v).reshape(-1) for v in self.b2]),
            w_out=f(self.w_out),
        )


def _heads(value, H, name):
    if (
        isinstance(value, (str, bytes, sympy.MatrixBase))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) != H
    ):
        raise InvalidArgumentError(name, f"must hold H = {H} head matrices")
    return list(value)


def _as_rational_tfn(model, name) -> RationalTFN:
    if isinstance(model, RationalTFN):
        return model
    if isinstance(model, TFN):
        return RationalTFN.from_tfn(model)
    raise InvalidArgumentError(name, f"must be a lora_theory.TFN or a RationalTFN, got {type(model).__name__}")


def certify_tfn(frozen: TFN | RationalTFN, target: TFN | RationalTFN, rank: int) -> Certificate:
    """Exact certificate for Zeng & Lee 2024, Theorem 7 (transformer networks).

    Runs the construction of :func:`lora_theory.tfn.lora_tfn` exactly (``C_0 = I``, ``C_l = T2_l W2_l^{-1}``;
    block ``l``, head ``h``: scores ``(W_K + Δ_K)^T (W_Q + Δ_Q) = C_{l-1}^T T_K^T T_Q C_{l-1}``, values
    ``(W_O + Δ_O)(W_V + Δ_V) = W1_l^{-1} T1_l T_O T_V C_{l-1}``; ``b1_l = c1_l``; ``b2_l = W2_l T2_l^{-1} c2_l``
    for ``l < L``; output ``(W_out + Δ_out)(W2_L + Δ_2) = T_out T2_L`` and
    ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``), each product by the exact Lemma 1 chain with two factors.

    Checks, exactly: each matched product equals its target; ``W1_l (W_O + Δ_O)(W_V + Δ_V) == T1_l T_O T_V
    C_{l-1}`` (hidden pre-activations equal the target's); ``C_l W2_l == T2_l`` and ``C_l b2_l == c2_l``
    (``Z̄_l = C_l Z_l``); ``(W_out + Δ_out) b2_L == T_out c2_L``; every ``rank(Δ) <= R``. Together they prove
    ``f(X) = f̄(X)`` for every input ``X``.

    Parameters
    ----------
    frozen, target : TFN or RationalTFN
        Same ``L``, ``H``, ``D``.
    rank : int in 0..D
        ``R`` for every adapter.

    Returns
    -------
    Certificate
        ``"exact"``, or ``"sufficient condition not met"`` naming the singular matrix or the matched rank
        ``G > 2R`` (never ``"impossible"``: the paper proves no lower bound for transformers).
    """
    f0 = _as_rational_tfn(frozen, "frozen")
    fbar = _as_rational_tfn(target, "target")
    Lb, H, n = f0.depth, f0.heads, f0.embed_dim
    if (fbar.depth, fbar.heads, fbar.embed_dim) != (Lb, H, n):
        raise InvalidArgumentError(
            "target",
            f"must have the frozen network's depth, heads and embedding size (L, H, D) = "
            f"{(Lb, H, n)}, got {(fbar.depth, fbar.heads, fbar.embed_dim)}",
        )
    R = as_int(rank, "rank", 0, n)
    sizes = {"D": n, "L": Lb, "H": H}
    rec = _Recorder(f0, fbar)
    G = [0] * Lb

    def g(M):
        return _dm(M, "model")

    def budget(kind, l, h):
        what = {
            "qk": "scores (W_K + Δ_K)^T (W_Q + Δ_Q)",
            "ov": "values (W_O + Δ_O)(W_V + Δ_V)",
            "out": "output (W_out + Δ_out)(W2_L + Δ_2)",
        }[kind]
        where = f"block {l}, head {h}" if h is not None else f"block {l}"

        def reason(rank_E, k):
            return (
                f"matched rank G = {rank_E} exceeds 2R = {k} ({what}, {where}); Theorem 7 needs no more, "
                "but this does not prove impossibility"
            )

        return reason

    def chain(kind, l, h, factors, names, matched):
        label = f"{kind}[{l},{h}]: " if h is not None else f"{kind}: "
        adapters, adapted, rank_E = _exact_chain(
            rec, factors, matched, (R, R), names, label, NOT_MET, budget(kind, l, h)
        )
        G[l] = max(G[l], rank_E)
        return adapters, adapted

    new = {name: [[None] * H for _ in range(Lb)] for name in _HEAD}
    b2 = [None] * Lb
    w2_last = w_out = None

    def param(model, name, l, h):
        value = getattr(model, name)
        return g(value if name == "w_out" else value[l][h] if h is not None else value[l])

    def inverse(M, name, context):
        rec.invertible(M, name, context)
        return 0.0, M.lu_solve

    def right_inverse(M, name, context):
        rec.invertible(M, name, context)
        Mt = M.transpose()
        return 0.0, lambda X: Mt.lu_solve(X.transpose()).transpose()

    arith = _WalkArithmetic(
        frozen=lambda name, l, h: param(f0, name, l, h),
        target=lambda name, l, h: param(fbar, name, l, h),
        mul=lambda A, B: A * B,
        T=lambda A: A.transpose(),
        eye=_eye(n),
        inverse=inverse,
        right_inverse=right_inverse,
    )
    try:
        for step in _walk(arith, Lb, H, {}):
            if isinstance(step, _Carried):
                l, C = step.block, step.C
                b2[l] = step.b2  # (n, 1) W2 T2^-1 c2
                rec.equal(f"block {l}: C_{l + 1} W2 == T2", C * step.W2, step.T2)
                rec.equal(f"block {l}: C_{l + 1} b2 == c2 (block output = C^-1 × target's)", C * b2[l], step.c2)
                continue
            l, h = step.block, step.head
            (a1, a2), (m1, m2) = chain(step.kind, l, h, list(step.factors), list(step.names), step.matched)
            if step.kind == "qk":
                _store(rec, ("wq", l, h), *a1)
                # W_K^T + B2 A2 = (W_K + A2^T B2^T)^T: the adapter of W_K is A_K = B2^T, B_K = A2^T
                _store(rec, ("wk", l, h), a2[1].transpose(), a2[0].transpose())
                new["wq"][l][h], new["wk"][l][h] = m1, m2.transpose()
            elif step.kind == "ov":
                _store(rec, ("wv", l, h), *a1)
                _store(rec, ("wo", l, h), *a2)
                new["wv"][l][h], new["wo"][l][h] = m1, m2
                W1 = param(f0, "w1", l, None)
                rec.equal(f"ov[{l},{h}]: W1 (W_O + Δ_O)(W_V + Δ_V) == T1 T_O T_V C", W1 * m2 * m1, step.hidden)
            else:
                (a_w2, a_out), (w2_last, w_out) = (a1, a2), (m1, m2)
        last = Lb - 1
        _store(rec, ("w2", last, None), *a_w2)
        _store(rec, ("w_out", last, None), *a_out)
        rec.invertible(w_out, "W_out + Δ_out", "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2")
        rhs = g(fbar.w_out) * g(fbar.b2[last])  # (n, 1) T_out c2_L
        b2[last] = w_out.lu_solve(rhs)
        rec.equal("out: (W_out + Δ_out) b2_L == T_out c2_L", w_out * b2[last], rhs)
    except _Stop as stop:  # the instance threshold needs every matched rank: unknown after a stop
        return _finish(rec, "tfn", sizes, R, None, stop=stop)
    adapted = RationalTFN(
        *([[_sym(M) for M in row] for row in new[nm]] for nm in _HEAD),
        w1=list(f0.w1),
        b1=list(fbar.b1),
        w2=[f0.w2[l] for l in range(Lb - 1)] + [_sym(w2_last)],
        b2=[_sym(v) for v in b2],
        w_out=_sym(w_out),
    )
    return _finish(
        rec,
        "tfn",
        sizes,
        R,
        max(ceil_div(x, 2) for x in G),
        adapted=adapted,
        theorem="every matched product and bias equals its target, so f(X) = f̄(X) for every input X "
        "(Zeng & Lee 2024, Theorem 7)",
    )
