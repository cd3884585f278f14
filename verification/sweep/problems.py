"""Problem instances: targets, random and pretrained frozen models (cached), evaluation sets.

Zeng & Lee 2024, §5 setting: a target ``f̄`` and a frozen model ``f₀`` per experiment seed, drawn with the
authors' initialisation (THEORY.md §4); pretrained frozen models are cached under ``models/``.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import lora_theory

from ..models import TorchFNN, TorchTFN
from ..outdir import CLIError, atomic_write
from ..trainer import BatchStream, FNNStack, gaussian_inputs
from .protocol import (
    N_TEST,
    N_VALIDATION,
    PRETRAIN_FACTOR,
    PRETRAIN_LR,
    PRETRAIN_MAX_STEPS,
    SHIFT,
    TAG_FROZEN,
    TAG_PRETRAIN,
    TAG_TARGET,
    TEST_SEED,
    VALIDATION_SEED,
    _seed_int,
    seeded_rng,
    structure_of,
)


def _structure_target(structure):
    """The part of a structure the target depends on (an FNN's target does not depend on the frozen depth)."""
    s = structure_of(structure)
    if s.family == "fnn":
        return ("fnn", s.D, s.Lbar, s.activation, s.final_relu)
    return s


def make_target(structure, seed):
    """The target of ``structure`` for experiment seed ``seed``, with the authors' initialisation; an FNN's
    target depends on ``L̄`` only, not on the frozen depth."""
    s = structure_of(structure)
    if s.family == "fnn":
        rng = seeded_rng(seed, TAG_TARGET, s.Lbar)
        if s.activation == "linear":
            return lora_theory.random_linear(s.D, s.Lbar, seed=rng)
        return lora_theory.random_fnn(s.D, s.Lbar, seed=rng, final_relu=s.final_relu)
    return lora_theory.random_tfn(s.D, s.L, s.H, seed=seeded_rng(seed, TAG_TARGET, s.L, s.H))


def make_random_frozen(structure, seed):
    """The random frozen model of ``structure`` for experiment seed ``seed`` (before any pretraining)."""
    s = structure_of(structure)
    if s.family == "fnn":
        rng = seeded_rng(seed, TAG_FROZEN, s.L)
        if s.activation == "linear":
            return lora_theory.random_linear(s.D, s.L, seed=rng)
        return lora_theory.random_fnn(s.D, s.L, seed=rng, final_relu=s.final_relu)
    return lora_theory.random_tfn(s.D, s.L, s.H, seed=seeded_rng(seed, TAG_FROZEN, s.L, s.H))


def pretrain(frozen, target, structure, seed) -> tuple:
    """THEORY.md §4: every frozen weight and bias trained toward the target (Adam lr 1e-3, fresh 256-batches,
    float64 on the CPU) until the loss is below a third of the first, at most 1000 steps.

    Returns ``(model, info)`` with ``info = {"steps", "first_loss", "last_loss"}``.
    """
    structure = structure_of(structure)
    fnn = structure.family == "fnn"
    torch_model = (TorchFNN if fnn else TorchTFN).from_numpy(frozen)
    torch_target = (TorchFNN if fnn else TorchTFN).from_numpy(target)
    params = []
    for name, p in torch_model.named_parameters():
        trainable = not (fnn and structure.activation == "linear" and name.endswith("bias"))
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    opt = torch.optim.Adam(params, lr=PRETRAIN_LR)
    shape = _input_shape(structure)
    stream = BatchStream(_seed_int(seed, TAG_PRETRAIN), 256, shape)
    first = last = None
    steps = 0
    for steps in range(1, PRETRAIN_MAX_STEPS + 1):  # noqa: B007 (read after the loop: the steps taken)
        x = stream.next()
        with torch.no_grad():
            y = torch_target(x)
        loss = ((torch_model(x) - y) ** 2).mean()
        last = float(loss.detach())
        if first is None:
            first = last
        if last < PRETRAIN_FACTOR * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch_model.to_numpy(), {"steps": steps, "first_loss": first, "last_loss": last}


def pretrain_fnns(frozens, targets, structure, seeds) -> list:
    """:func:`pretrain` for several FNN instances at once: one float64 stack on the CPU, every run with its
    own data stream and its own stopping step (its learning rate drops to zero once its loss is below a
    third of its first). Returns ``[(model, info)]`` in the order of ``seeds``."""
    from ..trainer import StackedAdam

    structure = structure_of(structure)
    R, L = len(seeds), structure.L
    linear = structure.activation == "linear"
    stack = FNNStack(
        np.stack([np.stack(f.weights) for f in frozens]),
        np.stack([np.stack(f.biases) for f in frozens]),
        method="final_layers",
        tuned_layers=[L] * R,
        activation=structure.activation,
        final_relu=structure.final_relu,
        dtype=torch.float64,
        device="cpu",
    )
    if linear:  # the linear model has no biases to train
        stack.masks["bias"] = torch.zeros((R, L, 1), dtype=torch.bool)
    target = FNNStack(
        np.stack([np.stack(t.weights) for t in targets]),
        np.stack([np.stack(t.biases) for t in targets]),
        method="none",
        activation=structure.activation,
        final_relu=structure.final_relu,
        dtype=torch.float64,
    )
    opt = StackedAdam(stack.params, stack.masks, np.full(R, PRETRAIN_LR), np.zeros(R))
    base_lr = opt.lr.clone()
    run_of_entry = torch.cat(
        [
            torch.arange(R).view(-1, *([1] * (p.dim() - 1))).expand_as(p).reshape(-1)
            for p in (stack.params[k] for k in opt.names)
        ]
    )
    streams = [BatchStream(_seed_int(s, TAG_PRETRAIN), 256, (structure.D,)) for s in seeds]
    active = np.ones(R, dtype=bool)
    first = last = None
    steps = np.zeros(R, dtype=int)
    for step in range(1, PRETRAIN_MAX_STEPS + 1):
        x = torch.stack([st.next() for st in streams])  # (R, 256, D)
        with torch.no_grad():
            y = target.forward(x)
        loss = stack.loss_and_grads(x, y).numpy().copy()
        if first is None:
            first, last = loss.copy(), loss.copy()
        last[active] = loss[active]
        steps[active] = step
        done = active & (loss < PRETRAIN_FACTOR * first)
        if done.any():
            active &= ~done
            if not active.any():
                break
            opt.lr = base_lr * torch.as_tensor(active, dtype=base_lr.dtype)[run_of_entry]
        opt.step()
    W, b = stack.weights_and_biases()
    out = []
    for i, f in enumerate(frozens):
        biases = None if linear else list(b[i].detach().numpy())
        model = f.replace(weights=list(W[i].detach().numpy()), biases=biases if biases is not None else f.biases)
        out.append((model, {"steps": int(steps[i]), "first_loss": float(first[i]), "last_loss": float(last[i])}))
    return out


class Problems:
    """Targets and frozen models per (structure, kind, seed), built once.

    With ``cache`` (a folder), pretrained frozen models are saved there as ``.npz`` files and read back
    by a resumed sweep instead of being trained again.
    """

    def __init__(self, cache: Path | None = None, make_target: Callable | None = None, key: str = ""):
        self._targets, self._frozen, self.pretrain_info = {}, {}, {}
        self.cache = cache
        self.key = key  # what the targets depend on beyond the structure and seed (in the cache name)
        self._make_target = make_target or globals()["make_target"]  # (structure, seed) -> target model

    def target(self, structure, seed):
        key = (_structure_target(structure), seed)
        if key not in self._targets:
            self._targets[key] = self._make_target(structure, seed)
        return self._targets[key]

    def _cache_path(self, structure, seed):
        name = "-".join(str(v) for v in structure) + (f"-{self.key}" if self.key else "") + f"-seed{seed}.npz"
        return self.cache / name

    def _cached(self, structure, seed):
        """The cached pretrained model of ``(structure, seed)`` (kept in memory), or ``None`` when there is none
        or the cache entry is damaged (an empty or cut file: reported on stderr, then pretrained again)."""
        key = (tuple(structure), "pretrained", seed)
        if key in self._frozen:
            return self._frozen[key]
        path = self._cache_path(structure, seed) if self.cache is not None else None
        if path is None or not path.is_file():
            return None
        try:
            model, info = _load_model(path, make_random_frozen(structure, seed))
        except ValueError as exc:
            print(f"warning: {path}: damaged cache entry ({exc}); pretrained again", file=sys.stderr)
            return None
        self._frozen[key] = model
        self.pretrain_info[f"{list(structure)} seed {seed}"] = info
        return model

    def prepare(self, structure, seeds):
        """Pretrain the FNN frozen models of ``seeds`` not yet built or cached, all at once."""
        if structure_of(structure).family != "fnn":
            return
        todo = [s for s in seeds if self._cached(structure, s) is None]
        if not todo:
            return
        frozens = [make_random_frozen(structure, s) for s in todo]
        targets = [self.target(structure, s) for s in todo]
        for s, (model, info) in zip(todo, pretrain_fnns(frozens, targets, structure, todo)):
            self.store(structure, s, model, info)

    def store(self, structure, seed, model, info):
        """Keep a pretrained frozen model (made here or by a cluster's task) and write its cache entry."""
        self._frozen[(tuple(structure), "pretrained", seed)] = model
        self.pretrain_info[f"{list(structure)} seed {seed}"] = info
        if self.cache is not None:
            _save_model(self._cache_path(structure, seed), model, info)

    def frozen(self, structure, kind, seed):
        key = (tuple(structure), kind, seed)
        if key not in self._frozen:
            random = make_random_frozen(structure, seed)
            if kind == "random":
                self._frozen[key] = random
            elif kind == "pretrained":
                if self._cached(structure, seed) is None:
                    model, info = pretrain(random, self.target(structure, seed), structure, seed)
                    if self.cache is not None:
                        _save_model(self._cache_path(structure, seed), model, info)
                    self._frozen[key] = model
                    self.pretrain_info[f"{list(structure)} seed {seed}"] = info
            else:
                raise CLIError(f"unknown frozen-model kind {kind!r}")
        return self._frozen[key]


def _save_model(path: Path, model, info):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, lora_theory.FNN):
        arrays = {"weights": np.stack(model.weights), "biases": np.stack(model.biases)}
    else:
        arrays = dict(model.parameters())
    buf = io.BytesIO()
    np.savez(buf, info=json.dumps(info), **arrays)
    atomic_write(path, buf.getvalue())


def _load_model(path: Path, like):
    """A cached pretrained model shaped like ``like`` and its info; ``ValueError`` for a damaged entry (empty or
    cut file, not an npz, a missing or misshapen array, a non-finite value, unreadable info)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data["info"]))
            if isinstance(like, lora_theory.FNN):
                arrays = {"weights": data["weights"], "biases": data["biases"]}
                expected = {"weights": np.stack(like.weights).shape, "biases": np.stack(like.biases).shape}
            else:
                arrays = {k: data[k] for k in like.parameters()}
                expected = {k: np.shape(v) for k, v in like.parameters().items()}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    for k, a in arrays.items():
        if a.shape != expected[k] or a.dtype.kind != "f" or not np.isfinite(a).all():
            raise ValueError(f"array {k!r} of shape {a.shape} and dtype {a.dtype}, expected {expected[k]} finite")
    if not isinstance(info, dict) or not {"steps", "first_loss", "last_loss"} <= set(info):
        raise ValueError("no pretraining info")
    if isinstance(like, lora_theory.FNN):
        model = like.replace(weights=list(arrays["weights"]), biases=list(arrays["biases"]))
    else:
        model = like.replace(**arrays)
    return model, info


def _input_shape(structure):
    """One input's shape: ``(D,)`` for an FNN, ``(D, N)`` for a TFN."""
    s = structure_of(structure)
    return (s.D,) if s.family == "fnn" else (s.D, s.N)


def evaluation_sets(structure):
    """Validation (256), test (5000) and shifted test (5 x test) inputs, float64 CPU, fixed seeds."""
    shape = _input_shape(structure)
    val = gaussian_inputs(VALIDATION_SEED, N_VALIDATION, shape)
    test = gaussian_inputs(TEST_SEED, N_TEST, shape)
    return {"val": val, "test": test, "shifted": test * SHIFT}


def _model_outputs(model, X: np.ndarray) -> np.ndarray:
    return np.asarray(model(X), dtype=np.float64)


def _per_sample_errors(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, pred.ndim))
    return np.mean((pred - y) ** 2, axis=axes)
