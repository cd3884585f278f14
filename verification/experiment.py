"""The machinery shared by the command-line experiments: problems, runs, constructions, training, summaries.

Protocol (THEORY.md §4, the authors' bugs fixed; every choice below is declared in the output):

* Instances. For experiment seed ``s`` the target and the frozen model are drawn with the authors'
  initialisation from ``SeedSequence([s, tag])`` (targets do not depend on the frozen depth). A
  "pretrained" frozen model is the random one with all its weights and biases trained (Adam, lr 1e-3,
  fresh batches of 256, float64 on the CPU) toward the target until the training loss is below a third of
  the first one, at most 1000 steps.
* Data. Fresh standard Gaussian training batches of 256 every step from a stream that depends on the
  experiment seed only (shared by the grid points, ranks and frozen-model variants of that seed); the LoRA
  initialisation (``B = 0``, ``A ~ N(0, 0.25²)``) comes from (experiment seed, cell), so the grid points of
  one cell and seed start from the same ``A``; a fixed
  validation set of 256 inputs and a fixed test set of 5000 inputs drawn from two other seeds, the same for
  every run; the shifted test set is the test set times 5.
* Selection. Every run is evaluated at its final iterate (``--select best``: its best-validation iterate,
  validated every ``--validate-every`` steps). Per (frozen model, setting, seed) the grid point with the
  lowest validation loss is selected; its test MSE and shifted MSE are reported; rows give medians and
  interquartile ranges over seeds. MSEs are per coordinate, evaluated in float64.
* Construction. Built in float64 by :mod:`lora_theory` on a certified ball centred at 0 whose radius covers
  the test inputs and the shifted ones (recorded as ``domain``), and, as the authors did, with biases
  calibrated on 256 ``N(0, I)`` samples with a multiplicative margin 2 (``calibrated_*`` columns). Where
  float64 cannot represent the construction honestly (a block of more than 4 layers, or an expected relative
  rounding ``u·(κ + γ)`` above 1e-6) the MSE is ``null`` and ``κ`` is stored instead, unless the experiment
  asks for the high-precision path (``final_layers``, ``depth_sweep``): then the construction is rebuilt with
  :mod:`lora_theory.highprec` (mpmath, digits chosen from ``κ`` and ``γ``) and evaluated at that precision on
  the first ``n`` test and shifted inputs; the digits and ``n`` are recorded beside the MSE, and the float64
  ``n/c (κ=...)`` note is kept.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import lora_theory
from lora_theory.errors import LoraTheoryError

from .models import TorchFNN, TorchTFN
from .outdir import (CLIError, FolderLock, OneLineParser, append_lines, atomic_write, check_folder, figure_bytes,
                     interrupts_deferred, open_log, write_error_message)
from .trainer import BatchStream, FNNStack, TFNStack, fnn_apply, gaussian_inputs, tfn_apply, train_stack

__all__ = ["Cell", "ExperimentSpec", "run_cli", "CLIError", "parse_ranks"]

LR_GRID = (1e-2, 1e-3, 1e-4)
WD_GRID = (0.0, 1e-4, 1e-3, 1e-2)
VALIDATION_SEED = 1_000_003
TEST_SEED = 2_000_003
CALIBRATION_SEED = 3_000_017
N_VALIDATION, N_TEST, N_CALIBRATION = 256, 5000, 256
SHIFT = 5.0
PRETRAIN_LR, PRETRAIN_MAX_STEPS, PRETRAIN_FACTOR = 1e-3, 1000, 1.0 / 3.0
#: the pretraining above in words (THEORY.md §4), as the summaries record it
PRETRAINING_PROTOCOL = "Adam lr 1e-3, fresh 256-batches, float64, until loss < first/3 (<= 1000 steps)"
MAX_HONEST_BLOCK = 4
MAX_HONEST_ROUNDING = 1e-6
TAG_TARGET, TAG_FROZEN, TAG_PRETRAIN, TAG_DATA, TAG_INIT = 1, 2, 3, 4, 5


def _seed_int(*entropy) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rng(*entropy) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


# ------------------------------------------------------------------------------------------------ cells

@dataclass(frozen=True)
class Cell:
    """One row entry: a frozen-model kind, a structure and a method, trained for every seed and grid point.

    ``structure``: ``("fnn", D, L, L̄, activation, final_relu)`` or ``("tfn", D, L, H, N)``.
    ``method``: ``"lora"`` (``ranks`` per layer for an FNN, ``(R,)`` for a TFN) or ``"final_layers"``
    (``layers`` trained fully). ``axis``: the row's coordinates, e.g. ``(("rank", 3),)``. ``label`` names the
    curve (``"lora"``, ``"final_layers"``, ``"trained_biases"``...).
    """

    kind: str
    structure: tuple
    method: str
    axis: tuple
    label: str = "lora"
    ranks: tuple | None = None
    layers: int | None = None
    tune_bias: bool = True
    highprec_subsample: int = 0     # > 0: where float64 is not honest, mpmath on this many test/shifted inputs

    @property
    def family(self) -> str:
        return self.structure[0]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "structure": list(self.structure), "method": self.method,
                "axis": [list(a) for a in self.axis], "label": self.label,
                "ranks": None if self.ranks is None else list(self.ranks), "layers": self.layers,
                "tune_bias": self.tune_bias}

    def params(self) -> int:
        """Trained parameter count, the trained biases included.

        LoRA: ``Σ_l r_l (in + out)`` (``2RDL`` for rank ``R`` on ``L`` layers of width ``D``; a TFN has
        ``4LH + 2`` adapted matrices) plus the biases trained with it when ``tune_bias``: ``L·D`` for an FNN
        (none for a linear model, which has no biases), ``2·L·D`` for a TFN (``b1``, ``b2`` of every block).
        Final layers: ``l (D² + D)``, the weights and biases of the ``l`` tuned layers.
        (:func:`lora_theory.lora_parameter_count` and :func:`lora_theory.final_layers_parameter_count`
        count weights only.)
        """
        D, L = self.structure[1], self.structure[2]
        if self.method == "final_layers":
            return self.layers * (D * D + D)
        if self.family == "tfn":
            H = self.structure[3]
            return self.ranks[0] * 2 * D * (4 * L * H + 2) + (2 * L * D if self.tune_bias else 0)
        biases = L * D if self.tune_bias and self.structure[4] != "linear" else 0
        return sum(2 * r * D for r in self.ranks) + biases


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- problems

def _structure_target(structure):
    if structure[0] == "fnn":
        _, D, L, Lbar, act, final_relu = structure
        return ("fnn", D, Lbar, act, final_relu)
    return structure


def make_target(structure, seed):
    if structure[0] == "fnn":
        _, D, L, Lbar, act, final_relu = structure
        rng = _rng(seed, TAG_TARGET, Lbar)
        if act == "linear":
            return lora_theory.random_linear(D, Lbar, seed=rng)
        return lora_theory.random_fnn(D, Lbar, seed=rng, final_relu=final_relu)
    _, D, L, H, N = structure
    return lora_theory.random_tfn(D, L, H, seed=_rng(seed, TAG_TARGET, L, H))


def make_random_frozen(structure, seed):
    if structure[0] == "fnn":
        _, D, L, Lbar, act, final_relu = structure
        rng = _rng(seed, TAG_FROZEN, L)
        if act == "linear":
            return lora_theory.random_linear(D, L, seed=rng)
        return lora_theory.random_fnn(D, L, seed=rng, final_relu=final_relu)
    _, D, L, H, N = structure
    return lora_theory.random_tfn(D, L, H, seed=_rng(seed, TAG_FROZEN, L, H))


def pretrain(frozen, target, structure, seed) -> tuple:
    """THEORY.md §4: every frozen weight and bias trained toward the target (Adam lr 1e-3, fresh 256-batches,
    float64 on the CPU) until the loss is below a third of the first, at most 1000 steps.

    Returns ``(model, info)`` with ``info = {"steps", "first_loss", "last_loss"}``.
    """
    torch_model = (TorchFNN if structure[0] == "fnn" else TorchTFN).from_numpy(frozen)
    torch_target = (TorchFNN if structure[0] == "fnn" else TorchTFN).from_numpy(target)
    params = []
    for name, p in torch_model.named_parameters():
        trainable = not (structure[0] == "fnn" and structure[4] == "linear" and name.endswith("bias"))
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    opt = torch.optim.Adam(params, lr=PRETRAIN_LR)
    shape = (structure[1],) if structure[0] == "fnn" else (structure[1], structure[4])
    stream = BatchStream(_seed_int(seed, TAG_PRETRAIN), 256, shape)
    first = last = None
    steps = 0
    for steps in range(1, PRETRAIN_MAX_STEPS + 1):
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
    from .trainer import StackedAdam

    R, L, D = len(seeds), structure[2], structure[1]
    linear = structure[4] == "linear"
    stack = FNNStack(np.stack([np.stack(f.weights) for f in frozens]), np.stack([np.stack(f.biases) for f in frozens]),
                     method="final_layers", tuned_layers=[L] * R, activation=structure[4], final_relu=structure[5],
                     dtype=torch.float64, device="cpu")
    if linear:  # the linear model has no biases to train
        stack.masks["bias"] = torch.zeros((R, L, 1), dtype=torch.bool)
    target = FNNStack(np.stack([np.stack(t.weights) for t in targets]), np.stack([np.stack(t.biases) for t in targets]),
                      method="none", activation=structure[4], final_relu=structure[5], dtype=torch.float64)
    opt = StackedAdam(stack.params, stack.masks, np.full(R, PRETRAIN_LR), np.zeros(R))
    base_lr = opt.lr.clone()
    run_of_entry = torch.cat([torch.arange(R).view(-1, *([1] * (p.dim() - 1))).expand_as(p).reshape(-1)
                              for p in (stack.params[k] for k in opt.names)])
    streams = [BatchStream(_seed_int(s, TAG_PRETRAIN), 256, (D,)) for s in seeds]
    active = np.ones(R, dtype=bool)
    first = last = None
    steps = np.zeros(R, dtype=int)
    for step in range(1, PRETRAIN_MAX_STEPS + 1):
        x = torch.stack([st.next() for st in streams])                      # (R, 256, D)
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
        self.key = key        # what the targets depend on beyond the structure and seed (in the cache name)
        self._make_target = make_target or globals()["make_target"]   # (structure, seed) -> target model

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
        if structure[0] != "fnn":
            return
        todo = [s for s in seeds if self._cached(structure, s) is None]
        if not todo:
            return
        frozens = [make_random_frozen(structure, s) for s in todo]
        targets = [self.target(structure, s) for s in todo]
        for s, (model, info) in zip(todo, pretrain_fnns(frozens, targets, structure, todo)):
            self._frozen[(tuple(structure), "pretrained", s)] = model
            self.pretrain_info[f"{list(structure)} seed {s}"] = info
            if self.cache is not None:
                _save_model(self._cache_path(structure, s), model, info)

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
    return (structure[1],) if structure[0] == "fnn" else (structure[1], structure[4])


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


# ------------------------------------------------------------------------------------------ constructions

def build_construction(cell: Cell, frozen, target, sets) -> dict:
    """The float64 construction for one cell and seed, evaluated on the test and shifted sets.

    Returns a dict with ``test_mse``, ``shifted_mse``, ``calibrated_test_mse``, ``calibrated_shifted_mse``
    (``None`` where not computable or not applicable: final-layers cells, and LoRA cells of an FNN with biases
    that keep the frozen biases, since the construction re-chooses them), ``kappa``, ``gamma``, ``exact``, ``note``, the
    domain, ``prediction`` (linear: the exact Gaussian MSE; FNN: the project's error bound, THEORY.md §2.4; TFN: none) and the
    per-sample test errors (``_test_errors``) used to pair gradient runs with it.
    """
    out = {"test_mse": None, "shifted_mse": None, "calibrated_test_mse": None, "calibrated_shifted_mse": None,
           "kappa": None, "gamma": None, "exact": None, "note": None, "prediction": None, "_test_errors": None}
    if cell.method != "lora":
        return out
    if cell.family == "fnn" and cell.structure[4] != "linear" and not cell.tune_bias:
        # the construction (and the error bound) re-chooses the biases: not these runs' method
        out["note"] = "n/a: the construction re-chooses the biases; these runs keep them fixed"
        return out
    test = sets["test"].numpy()
    shifted = sets["shifted"].numpy()
    y_test, y_shift = _model_outputs(target, test), _model_outputs(target, shifted)
    out["target_power"] = float(np.mean(y_test ** 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
        try:
            if cell.family == "tfn":
                from lora_theory.tfn import lora_tfn
                fit = lora_tfn(frozen, target, cell.ranks[0])
                out.update(kappa=fit.kappa, gamma=0.0, exact=bool(fit.exact))
                honest = lora_theory.unit_roundoff() * fit.kappa <= MAX_HONEST_ROUNDING
                models = {"": fit.model}
            elif frozen.activation == "linear":
                fit = lora_theory.lora_linear(frozen.weights, target.weights[0], list(cell.ranks)) \
                    if target.depth == 1 else None
                if fit is None:
                    out["note"] = "linear construction needs a one-layer target"
                    return out
                out.update(kappa=fit.kappa, gamma=0.0, exact=bool(fit.exact), prediction=fit.gaussian_mse)
                honest = (frozen.depth <= MAX_HONEST_BLOCK
                          and lora_theory.unit_roundoff() * fit.kappa <= MAX_HONEST_ROUNDING)
                models = {"": fit.model}
            else:
                from lora_theory.bounds import fnn_error_bound
                from lora_theory.fnn import lora_fnn
                radius = float(np.linalg.norm(shifted, axis=1).max()) * (1 + 1e-9)
                fit = lora_fnn(frozen, target, list(cell.ranks), input_radius=radius)
                out.update(kappa=fit.kappa, gamma=fit.gamma, exact=bool(fit.exact),
                           domain={"kind": "ball", "center": 0.0, "radius": radius,
                                   "calibrated": {"kind": "samples", "n": N_CALIBRATION, "margin": 2.0}})
                try:
                    out["prediction"] = fnn_error_bound(frozen, target, list(cell.ranks)).mse
                except LoraTheoryError:
                    pass
                block = max(fit.partition)
                honest = (block <= MAX_HONEST_BLOCK and
                          lora_theory.unit_roundoff() * (fit.kappa + fit.gamma) <= MAX_HONEST_ROUNDING)
                models = {"": fit.model}
                if honest:  # the authors' biases: sized on 256 N(0, I) samples, multiplicative margin 2
                    calib = gaussian_inputs(CALIBRATION_SEED, N_CALIBRATION, (frozen.width,)).numpy()
                    models["calibrated_"] = lora_fnn(frozen, target, list(cell.ranks), inputs=calib, margin=2.0).model
        except lora_theory.SingularMatrixError as exc:
            # singular to working precision: not computable in float64 (the high-precision path may be)
            out.update(kappa=exc.condition_number, note=f"n/c (κ={exc.condition_number:.1e}; {exc.matrix.split(' =')[0]})")
            return _highprec_construction(cell, frozen, target, sets, out)
        except LoraTheoryError as exc:
            out["note"] = f"construction failed: {exc}"
            return out
    if not honest:
        out["note"] = f"n/c (κ={out['kappa']:.1e})"
        return _highprec_construction(cell, frozen, target, sets, out)
    for prefix, model in models.items():
        e_test = _per_sample_errors(_model_outputs(model, test), y_test)
        e_shift = _per_sample_errors(_model_outputs(model, shifted), y_shift)
        out[f"{prefix}test_mse"] = float(e_test.mean())
        out[f"{prefix}shifted_mse"] = float(e_shift.mean())
        if prefix == "":
            out["_test_errors"] = e_test
    if cell.family == "tfn" and cell.highprec_subsample > 0:
        # float64 weights of Theorem 7's two-block construction carry a relative output error (measured at
        # D = 16, H = 2, N = 10, R = 8: median 6e-13, up to 2e-7 per input)
        # (lora_theory.highprec.lora_tfn_mp): the column then comes from the construction at raised precision
        out["note"] = (f"float64: test {out['test_mse']:.3g}, x5 {out['shifted_mse']:.3g} "
                       f"(relative {out['test_mse'] / out['target_power']:.2g}) on {len(test)} inputs")
        return _highprec_construction(cell, frozen, target, sets, out)
    return out


#: Extra digits over :func:`lora_theory.highprec.choose_digits` of the float64 ``κ``, ``γ`` (which
#: underestimate the deep blocks' values), and at least this many digits per layer of the largest block:
#: measured at D = 16, the 8-layer blocks need 57 to 59 digits and the 14-layer ones 57 to 117.
HIGHPREC_EXTRA_DIGITS = 6
HIGHPREC_DIGITS_PER_LAYER = 8


def _largest_block(cell) -> int:
    D, L, Lbar = cell.structure[1:4]
    return max(lora_theory.partition.uniform_partition(L, Lbar)) if cell.structure[4] != "linear" else L


def _highprec_construction(cell: Cell, frozen, target, sets, out: dict) -> dict:
    """The construction at raised precision (THEORY.md §3), where float64 is not honest; ``out`` completed.

    Only for LoRA cells with ``highprec_subsample > 0``. TFN: :func:`lora_theory.highprec.lora_tfn_mp`
    (digits chosen from its float64 ``κ``). FNN family: Lemma 1 (linear models,
    :func:`lora_theory.highprec.lora_linear_mp`) or Theorem 3 on the certified ball of the float64 path
    (:func:`lora_theory.highprec.lora_fnn_mp`), at ``max(choose_digits(κ, γ) + 6, 8·(largest block))``
    digits, redone at :func:`~lora_theory.highprec.choose_digits` of the ``κ``, ``γ`` found when those ask
    for more. Evaluated at working precision (:meth:`predict`) on the first ``highprec_subsample`` test and
    shifted inputs; sets ``test_mse``, ``shifted_mse``, ``precision_digits``, ``subsample``,
    ``highprec_kappa``, ``highprec_gamma``, ``highprec_seconds``. The float64 ``note`` and ``kappa`` stay.
    """
    n = int(cell.highprec_subsample)
    if n <= 0 or cell.method != "lora":
        return out
    from lora_theory.highprec import choose_digits, lora_fnn_mp, lora_linear_mp, lora_tfn_mp

    t0 = time.perf_counter()
    test, shifted = sets["test"].numpy()[:n], sets["shifted"].numpy()[:n]          # (n, D) or (n, D, N) each
    linear = frozen.activation == "linear" if cell.family == "fnn" else False
    kappa = out["kappa"] if out["kappa"] is not None and math.isfinite(out["kappa"]) else 1e16
    gamma = out["gamma"] if out["gamma"] is not None and math.isfinite(out["gamma"]) else 0.0
    radius = float(np.linalg.norm(sets["shifted"].numpy(), axis=1).max()) * (1 + 1e-9)

    def fit_at(digits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
            if linear:
                return lora_linear_mp(frozen.weights, target.weights[0], list(cell.ranks), digits=digits)
            return lora_fnn_mp(frozen, target, list(cell.ranks), input_radius=radius, digits=digits)

    try:
        if cell.family == "tfn":
            fit = lora_tfn_mp(frozen, target, cell.ranks[0])
        else:
            digits = max(choose_digits(max(kappa, 1.0), max(gamma, 0.0)) + HIGHPREC_EXTRA_DIGITS,
                         HIGHPREC_DIGITS_PER_LAYER * _largest_block(cell))
            fit = fit_at(digits)
            needed = choose_digits(fit.kappa, fit.gamma)
            if needed > digits:
                fit = fit_at(needed)
    except LoraTheoryError as exc:
        out["note"] = f"{out['note']}; high precision failed: {exc}"
        return out
    if cell.family == "fnn" and not linear:
        out["domain"] = {"kind": "ball", "center": 0.0, "radius": radius,
                         "calibrated": {"kind": "samples", "n": N_CALIBRATION, "margin": 2.0}}
    y_test, y_shift = _model_outputs(target, test), _model_outputs(target, shifted)
    out.update(test_mse=float(_per_sample_errors(fit.predict(test), y_test).mean()),
               shifted_mse=float(_per_sample_errors(fit.predict(shifted), y_shift).mean()),
               precision_digits=int(fit.digits), subsample=n, highprec_kappa=float(fit.kappa),
               highprec_gamma=float(fit.gamma), exact=bool(fit.exact), _test_errors=None,
               highprec_seconds=time.perf_counter() - t0)
    return out


def _takes_highprec(cell: Cell) -> bool:
    """Whether ``cell``'s construction takes the high-precision path whatever the instance: FNN blocks of more
    than 4 layers, and every TFN cell that asks for it."""
    if cell.highprec_subsample <= 0 or cell.method != "lora":
        return False
    return cell.family == "tfn" or _largest_block(cell) > MAX_HONEST_BLOCK


_POOL_SETS = None
_PR_SET_PDEATHSIG = 1          # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> str:
    """Make this worker process end when its parent does, even when the parent is killed by SIGKILL (which no
    handler of the parent sees). Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread that
    polls the parent's pid every second. Returns which of the two is in place."""
    import signal

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:      # the parent died before the request took effect
                    os._exit(1)
                return "prctl"
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    return "watchdog"


def _pool_init(sets, parent_pid=None, threads=1):
    """Initializer of a construction worker: dies with its parent, ``threads`` torch threads, the input sets."""
    global _POOL_SETS
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    torch.set_num_threads(max(1, int(threads)))
    _POOL_SETS = {k: torch.from_numpy(v) for k, v in sets.items()}


def construction_pool(workers: int, sets: dict):
    """The process pool of the raised-precision constructions: ``workers`` spawned processes (not forked: the
    parent holds torch's thread pools), each ending with this process (:func:`_die_with_parent`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init,
                               initargs=({k: np.asarray(v) for k, v in sets.items()}, os.getpid(), 1))


def _pool_construction(cell, frozen, target):
    return build_construction(cell, frozen, target, _POOL_SETS)


def _construction_key(cell: Cell, seed: int, extra=None) -> str:
    return _hash({"cell": cell.as_dict(), "seed": seed, "subsample": cell.highprec_subsample, "extra": extra})


def build_highprec_constructions(jobs, sets, cache: Path, workers: int, progress_file, extra=None) -> dict:
    """:func:`build_construction` for ``jobs`` (``(cell, seed, frozen, target)`` of deep blocks), in
    ``workers`` processes, each result appended to ``cache`` as it comes: a rerun (``--resume``) reads the
    finished ones back instead of rebuilding them (minutes each at 60 to 120 digits). The key of a result
    hashes its cell, seed, subsample and the experiment's ``config_extra`` (``extra``)."""
    from tqdm import tqdm

    _end_cut_line(cache)
    done = {}
    for rec in _load_records(cache, _valid_construction_record, report=True):
        done.setdefault(rec["key"], rec["construction"])
    results, todo = {}, []
    for cell, seed, frozen, target in jobs:
        key = _construction_key(cell, seed, extra)
        if isinstance(done.get(key), dict):
            results[(cell, seed)] = {**done[key], "_test_errors": None}
        else:
            todo.append((key, cell, seed, frozen, target))
    if not todo:
        return results
    workers = max(1, min(workers, len(todo)))
    bar = tqdm(total=len(todo), desc="high-precision constructions", unit="construction", file=progress_file,
               mininterval=1.0)
    with open_log(cache) as log:
        def keep(key, cell, seed, cons):
            results[(cell, seed)] = cons
            stored = {k: v for k, v in cons.items() if not k.startswith("_")}
            append_lines(log, [json.dumps({"key": key, "construction": stored}, default=_json_default)])
            bar.update(1)

        try:
            if workers == 1:
                for key, cell, seed, frozen, target in todo:
                    keep(key, cell, seed, build_construction(cell, frozen, target, sets))
            else:
                with construction_pool(workers, {k: v.numpy() for k, v in sets.items()}) as pool:
                    futures = {pool.submit(_pool_construction, cell, frozen, target): (key, cell, seed)
                               for key, cell, seed, frozen, target in todo}
                    kept = set()
                    try:
                        for fut in as_completed(futures):
                            keep(*futures[fut], fut.result())
                            kept.add(fut)
                    except BaseException:
                        # an interruption or a failed construction: keep every one that did finish
                        pool.shutdown(wait=True, cancel_futures=True)
                        for fut in _finished(futures, kept):
                            keep(*futures[fut], fut.result())
                        raise
        finally:
            bar.close()
    return results


def _mp_speed() -> float:
    """Seconds for one 16 x 16 mpmath matrix product at 50 digits here (the unit of the estimate)."""
    import mpmath

    with mpmath.mp.workdps(50):
        A = mpmath.mp.matrix(np.linspace(-1, 1, 256).reshape(16, 16).tolist())
        t = time.perf_counter()
        for _ in range(3):
            A * A
    return (time.perf_counter() - t) / 3


def highprec_estimate(cells, seeds: int) -> tuple:
    """``(count, seconds)``: the constructions that will take the high-precision path and their serial time.

    Counts LoRA cells with ``highprec_subsample > 0`` whose largest block exceeds
    :data:`MAX_HONEST_BLOCK` layers, and TFN cells with ``highprec_subsample > 0`` (times ``seeds``). The
    TFN's model: about ``1.2·L·H`` s to build and ``8·L·H`` ms per evaluated input (10x that without gmpy2).
    The FNN's model, measured at D = 16 on a 2-core CPU
    where one 16 x 16 product at 50 digits takes 9 ms: about ``0.15·L`` s to build a block of ``L`` layers
    and ``1.1·L`` ms per evaluated input (256 test and 256 shifted inputs: 4 s at L = 6, 5.5 s at L = 8,
    7 s at L = 10, 10 to 14 s at L = 14), scaled by ``(D/16)³`` and ``(D/16)²`` and by this machine's speed.
    """
    unit = _mp_speed() / 0.009
    try:
        import gmpy2  # noqa: F401  (the object-array evaluation of the TFN is ~10x faster with it)
        tfn_eval = 0.008
    except ImportError:
        tfn_eval = 0.08
    count, seconds = 0, 0.0
    for cell in filter(_takes_highprec, cells):
        if cell.family == "tfn":   # measured at D = 16, N = 10: ~1.2 s per head and block to build, 8 ms to evaluate
            D, L, H, N = cell.structure[1:5]
            per = (1.2 * L * H * (D / 16) ** 3
                   + tfn_eval * L * H * (N / 10) ** 2 * (D / 16) ** 2 * 2 * cell.highprec_subsample)
        else:
            D, L = cell.structure[1], cell.structure[2]
            per = 0.15 * L * (D / 16) ** 3 + 0.0011 * L * 2 * cell.highprec_subsample * (D / 16) ** 2
        count += seeds
        seconds += seeds * per * unit
    return count, seconds


def highprec_message(cells, seeds: int, workers: int = 1) -> str | None:
    """The pre-run line on the high-precision construction column (``None`` when it is not used)."""
    count, seconds = highprec_estimate(cells, seeds)
    if not count:
        return None
    n = max(c.highprec_subsample for c in cells)
    workers = max(1, min(workers, count))
    return (f"  construction column: {count} constructions in high precision (mpmath) on {n} test and {n} "
            f"shifted inputs each, in {workers} process{'es' if workers > 1 else ''}: estimated "
            f"{_duration(seconds / workers)} before training (those already in constructions.jsonl are "
            f"reused; --no-highprec skips them)")


HIGHPREC_SUBSAMPLE, HIGHPREC_QUICK_SUBSAMPLE = 256, 16


def add_highprec_arguments(p, default: bool = True):
    """``--no-highprec``, ``--highprec`` and ``--highprec-subsample N`` for experiments whose constructions
    take the high-precision path: by default (``default=True``, deep FNN blocks) or on request (the TFN)."""
    p.add_argument("--no-highprec", action="store_true", default=not default,
                   help="float64 constructions only" + (": deep blocks are reported n/c with their κ" if default
                                                        else " (the default)"))
    p.add_argument("--highprec", dest="no_highprec", action="store_false",
                   help=("the high-precision column (the default); with --resume, adds it to a sweep run with "
                         "--no-highprec (for example trained on a GPU, its constructions then built on a CPU)")
                   if default else "the construction column at raised precision (mpmath) on a subsample of the "
                                   "inputs, the float64 value kept in construction_note; with --resume, adds it "
                                   "to a finished sweep")
    p.add_argument("--highprec-subsample", type=int, default=None,
                   help=f"test and shifted inputs the high-precision construction is evaluated on "
                        f"(default {HIGHPREC_SUBSAMPLE}; {HIGHPREC_QUICK_SUBSAMPLE} with --quick)")


def highprec_subsample(args) -> int:
    """The ``highprec_subsample`` of the experiment's LoRA cells (0 with ``--no-highprec``)."""
    if getattr(args, "no_highprec", True):
        return 0
    return HIGHPREC_SUBSAMPLE if args.highprec_subsample is None else int(args.highprec_subsample)


def quick_highprec(args):
    """``--quick``: the high-precision construction (when it is on) on :data:`HIGHPREC_QUICK_SUBSAMPLE` inputs."""
    if args.highprec_subsample is None and not args.no_highprec:
        args.highprec_subsample = HIGHPREC_QUICK_SUBSAMPLE


def check_highprec_arguments(args, cells):
    """Validate ``--highprec-subsample`` and print the high-precision estimate (stderr) before the run."""
    n = args.highprec_subsample
    if n is not None and not 1 <= n <= N_TEST:
        raise CLIError(f"--highprec-subsample must be in 1..{N_TEST}, got {n}")
    if n is not None and args.no_highprec:
        raise CLIError("--highprec-subsample sizes the high-precision column, which is off here: add --highprec")
    msg = highprec_message(cells, args.seeds, args.workers or cpu_budget()["free"])
    if msg:
        print(msg.strip(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------- the spec

@dataclass
class ExperimentSpec:
    """What a CLI module declares: its name, extra flags, cells, threshold and how rows are labelled."""

    name: str
    description: str
    family: str                                     # "fnn" or "tfn"
    add_arguments: Callable[[argparse.ArgumentParser], None]
    cells: Callable[[argparse.Namespace], list]     # -> list of Cell (both kinds)
    threshold: Callable[[argparse.Namespace], object]
    axis_names: tuple = ("rank",)
    quick: Callable[[argparse.Namespace], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None
    extra_summary: Callable[[argparse.Namespace, list], dict] | None = None
    default_depth: int | None = None
    make_target: Callable[[argparse.Namespace, tuple, int], object] | None = None   # default: make_target
    #: what else the results depend on beyond the cells and the training settings (e.g. a target's
    #: prescribed spectrum): it enters every run's config and id, and the pretrained-model cache key
    config_extra: Callable[[argparse.Namespace], dict] | None = None


def parse_ranks(text: str, width: int) -> list:
    """``"1-16"``, ``"1,2,4"`` or ``"1-4,8"`` -> sorted distinct ints, each in ``1..width``."""
    out = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-", 1)[0],
                                                                              part[1:].split("-", 1)[1])
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CLIError(f"--ranks: cannot read {text!r} (use e.g. 1-16 or 1,2,4)") from None
    bad = [r for r in out if r < 1 or r > width]
    if bad or not out:
        raise CLIError(f"--ranks: every rank must be in 1..{width} (the width), got {sorted(out)}")
    return sorted(out)


def _floats(text, name):
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name}: cannot read {text!r} as comma-separated numbers") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise CLIError(f"{name}: need non-negative finite numbers, got {text!r}")
    return vals


class _Parser(OneLineParser):
    """argparse with a one-line error message, ``<prog>: error: ...`` (the usage stays available with --help)."""


def base_parser(spec: ExperimentSpec) -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m verification.{spec.name}", description=spec.description)
    p.add_argument("--width", type=int, default=16, help="D (default 16)")
    p.add_argument("--ranks", default=None, help="LoRA ranks, e.g. 1-16 (default) or 1,2,8")
    p.add_argument("--seeds", type=int, default=5, help="how many seeds (0..N-1; default 5)")
    p.add_argument("--iterations", type=int, default=5000, help="Adam steps per run (default 5000)")
    p.add_argument("--lr", default=",".join(str(v) for v in LR_GRID), help="learning-rate grid")
    p.add_argument("--weight-decay", default=",".join(str(v) for v in WD_GRID), help="weight-decay grid")
    p.add_argument("--frozen", default="random,pretrained", help="frozen-model kinds: random,pretrained")
    p.add_argument("--tune-bias", dest="tune_bias", action="store_true", default=True,
                   help="train the biases with the adapters (default)")
    p.add_argument("--fixed-bias", dest="tune_bias", action="store_false", help="keep the frozen biases")
    p.add_argument("--select", choices=("final", "best"), default="final",
                   help="final iterate (default) or best-validation iterate")
    p.add_argument("--validate-every", type=int, default=100, help="with --select best (default 100)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="training dtype")
    p.add_argument("--chunk", type=int, default=None,
                   help="runs per stack (default: 64 on CPU, 4096 on CUDA); the speed, not the results")
    p.add_argument("--workers", type=int, default=None,
                   help="stacks trained at once on a CPU (default: the cores free here, docs/reliability.md)")
    p.add_argument("--out", default=None, help="output folder (default results/<experiment>-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="finish an interrupted sweep in DIR")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--no-figure", action="store_true", help="skip figure.png")
    p.add_argument("--construction-only", action="store_true",
                   help="build and evaluate the constructions only, train nothing (the gradient columns stay "
                        "empty; a later --resume of the folder without this flag trains the runs)")
    spec.add_arguments(p)
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    raise CLIError(f"--device: unknown device {name!r} (use auto, cpu or cuda)")


def _check_common(args):
    if args.width < 1:
        raise CLIError(f"--width must be at least 1, got {args.width}")
    if args.seeds < 1:
        raise CLIError(f"--seeds must be at least 1, got {args.seeds}")
    if args.iterations < 1:
        raise CLIError(f"--iterations must be at least 1, got {args.iterations}")
    if args.validate_every < 1:
        raise CLIError(f"--validate-every must be at least 1, got {args.validate_every}")
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {args.workers}")
    if args.chunk is not None and args.chunk < 1:
        raise CLIError(f"--chunk must be at least 1, got {args.chunk}")
    kinds = [k.strip() for k in args.frozen.split(",") if k.strip()]
    if not kinds or any(k not in ("random", "pretrained") for k in kinds):
        raise CLIError(f"--frozen: kinds are 'random' and 'pretrained', got {args.frozen!r}")
    args.kinds = kinds
    args.lr_grid = _floats(args.lr, "--lr")
    if any(v <= 0 for v in args.lr_grid):
        raise CLIError(f"--lr: learning rates must be positive, got {args.lr!r}")
    args.wd_grid = _floats(args.weight_decay, "--weight-decay")


# ------------------------------------------------------------------------------------------------- runs

def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "lora_theory": getattr(lora_theory, "__version__", "?")}


def config_extra(spec, args) -> dict | None:
    """``spec.config_extra(args)`` as JSON values, ``None`` when the experiment declares nothing."""
    if spec.config_extra is None:
        return None
    extra = spec.config_extra(args)
    return json.loads(json.dumps(extra, sort_keys=True, default=_json_default)) if extra else None


def make_runs(spec, args, cells) -> list:
    """Every run of the sweep: ``{"id", "config", "cell", "seed", "lr", "wd"}``; ``id`` hashes ``config``,
    which holds everything the run's result depends on (cell, seed, grid point, steps, selection, dtype
    and the experiment's :attr:`ExperimentSpec.config_extra`)."""
    extra = config_extra(spec, args)
    runs = []
    for cell in cells:
        for seed in range(args.seeds):
            for lr in args.lr_grid:
                for wd in args.wd_grid:
                    config = {"experiment": spec.name, "cell": cell.as_dict(), "seed": seed, "lr": lr,
                              "weight_decay": wd, "iterations": args.iterations, "batch_size": 256,
                              "select": args.select, "validate_every": args.validate_every if args.select == "best" else None,
                              "dtype": args.dtype}
                    if extra is not None:
                        config["extra"] = extra
                    runs.append({"id": _hash(config), "config": config, "cell": cell, "seed": seed,
                                 "lr": lr, "wd": wd})
    return runs


def _chunks(runs, size, split_seeds=True):
    """Stacks of at most ``size`` runs of one structure and method; on a CPU also of one seed (then the
    batch and the target are broadcast, not gathered)."""
    groups = {}
    for r in runs:
        c = r["cell"]
        key = (c.structure, c.method) + ((r["seed"],) if split_seeds else ())
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        group.sort(key=lambda r: (r["seed"], r["cell"].kind))
        for i in range(0, len(group), size):
            yield key[:2], group[i:i + size]


def _stack_for(chunk, problems, dtype, device):
    """The stack of ``chunk``'s runs. LoRA ranks are padded to the width ``D`` whatever the chunk holds, so a
    run's arithmetic, hence its result, does not depend on ``--chunk`` or on the runs stacked with it."""
    cell0 = chunk[0]["cell"]
    structure, method = cell0.structure, cell0.method
    frozen = [problems.frozen(structure, r["cell"].kind, r["seed"]) for r in chunk]
    init_seeds = [_seed_int(r["seed"], TAG_INIT, int(_hash(r["cell"].as_dict())[:12], 16)) for r in chunk]
    tune = [r["cell"].tune_bias for r in chunk]
    if structure[0] == "fnn":
        W = np.stack([np.stack(f.weights) for f in frozen])
        b = np.stack([np.stack(f.biases) for f in frozen])
        kw = dict(activation=structure[4], final_relu=structure[5], dtype=dtype, device=device)
        if method == "lora":
            return FNNStack(W, b, method="lora", ranks=[list(r["cell"].ranks) for r in chunk],
                            tune_bias=[t and structure[4] != "linear" for t in tune], init_seeds=init_seeds,
                            rank_padding=structure[1], **kw)
        return FNNStack(W, b, method="final_layers", tuned_layers=[r["cell"].layers for r in chunk], **kw)
    params = {k: np.stack([f.parameters()[k] for f in frozen]) for k in frozen[0].parameters()}
    return TFNStack(params, method="lora", ranks=[r["cell"].ranks[0] for r in chunk], tune_bias=tune,
                    init_seeds=init_seeds, dtype=dtype, device=device, rank_padding=structure[1])


def _target_stack(structure, targets, dtype, device):
    if structure[0] == "fnn":
        W = np.stack([np.stack(t.weights) for t in targets])
        b = np.stack([np.stack(t.biases) for t in targets])
        return FNNStack(W, b, method="none", activation=structure[4], final_relu=structure[5], dtype=dtype,
                        device=device)
    params = {k: np.stack([t.parameters()[k] for t in targets]) for k in targets[0].parameters()}
    return TFNStack(params, method="none", dtype=dtype, device=device)


def _eval_chunk_size(structure, n):
    per_run = n * int(np.prod(_input_shape(structure))) * (structure[2] + 2)
    return max(1, int(2e7 // per_run))


def _evaluate(stack, targets_out, target_index, X, device):
    """Per-run per-sample float64 errors (R, n) of the trained stack on inputs X (n, ...)."""
    structure_fnn = isinstance(stack, FNNStack)
    n = X.shape[0]
    R = stack.R
    size = _eval_chunk_size(("fnn", stack.D, stack.L) if structure_fnn else ("tfn", stack.D, stack.L, 0, X.shape[-1]), n)
    Xd = X.to(device=device, dtype=torch.float64).unsqueeze(0)
    out = []
    with torch.no_grad():
        if structure_fnn:
            W, b = stack.weights_and_biases(dtype=torch.float64)
        else:
            eff = stack.effective(dtype=torch.float64)
        for i in range(0, R, size):
            sl = slice(i, i + size)
            if structure_fnn:
                pred = fnn_apply(W[sl], b[sl], Xd, stack.activation, stack.final_relu)
            else:
                pred = tfn_apply({k: v[sl] for k, v in eff.items()}, Xd)
            y = targets_out[target_index[sl]]
            err = ((pred - y) ** 2).mean(dim=tuple(range(2, pred.dim())))
            out.append(err.cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ output

def _atomic_write(path: Path, text: str):
    """:func:`verification.outdir.atomic_write`: the old file or the new one, never a part."""
    atomic_write(path, text)


def _median_iqr(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None, None, None
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return float(med), float(q25), float(q75)


def _median(values):
    return _median_iqr(values)[0]


def summarize(spec, args, cells, runs, records, constructions, problems) -> dict:
    by_id = {r["id"]: r for r in records}
    by_cell_seed = {}
    for r in runs:
        by_cell_seed.setdefault((r["cell"], r["seed"]), []).append(r)
    rows = {k: [] for k in args.kinds}
    for cell in cells:
        per_seed = []
        for seed in range(args.seeds):
            cand = [by_id[r["id"]] for r in by_cell_seed.get((cell, seed), []) if r["id"] in by_id]
            if not cand:
                continue
            vals = [c["losses"]["val"] if c["losses"]["val"] is not None and np.isfinite(c["losses"]["val"])
                    else math.inf for c in cand]
            best = cand[int(np.argmin(vals))]
            per_seed.append((seed, best))
        cons = [constructions.get((cell, s)) for s in range(args.seeds)]
        cons = [c for c in cons if c is not None]
        g_med, g25, g75 = _median_iqr([b["losses"]["test"] for _, b in per_seed])
        row = {name: value for name, value in cell.axis}
        row.update({
            "label": cell.label, "method": cell.method, "params": cell.params(),
            "prediction": _median([c["prediction"] for c in cons]),
            "construction_test_mse": _median([c["test_mse"] for c in cons]),
            "construction_shifted_mse": _median([c["shifted_mse"] for c in cons]),
            "calibrated_test_mse": _median([c["calibrated_test_mse"] for c in cons]),
            "calibrated_shifted_mse": _median([c["calibrated_shifted_mse"] for c in cons]),
            "construction_kappa": _median([c["kappa"] for c in cons]),
            "construction_precision_digits": max((c["precision_digits"] for c in cons if c.get("precision_digits")),
                                                 default=None),
            "construction_subsample": next((c["subsample"] for c in cons if c.get("subsample")), None),
            "construction_note": next((c["note"] for c in cons if c["note"]), None),
            "target_power": _median([c.get("target_power") for c in cons]),
            "gradient_test_mse": g_med, "gradient_test_q25": g25, "gradient_test_q75": g75,
            "gradient_shifted_mse": _median([b["losses"]["shifted"] for _, b in per_seed]),
            "gradient_val_mse": _median([b["losses"]["val"] for _, b in per_seed]),
            "seeds": [s for s, _ in per_seed],
            "per_seed": _per_seed_entries(cell, args.seeds, dict(per_seed), constructions),
        })
        rows[cell.kind].append(row)
    threshold = spec.threshold(args)
    summary = {
        "experiment": spec.name,
        "threshold": threshold,
        "domain": _domain_description(constructions),
        "rows": rows.get("random", []),
        "pretrained_rows": rows.get("pretrained", []),
        "protocol": {
            "width": args.width, "seeds": args.seeds, "iterations": args.iterations, "lr_grid": args.lr_grid,
            "weight_decay_grid": args.wd_grid, "batch_size": 256, "select": args.select,
            "validate_every": args.validate_every if args.select == "best" else None,
            "training_dtype": args.dtype, "evaluation_dtype": "float64", "n_validation": N_VALIDATION,
            "n_test": N_TEST, "shift": SHIFT, "tune_bias": args.tune_bias,
            "data": "fresh N(0, I) batches per step from the experiment seed's stream, shared by the grid "
                    "points, ranks and frozen-model kinds of that seed; fixed validation and test sets from "
                    "their own seeds, shared by all runs",
            "pretraining": PRETRAINING_PROTOCOL,
            "initialisation": "LoRA B = 0, A ~ N(0, 0.25^2) drawn from a seed of (experiment seed, cell): the "
                              "grid points (learning rate x weight decay) of one cell and seed start from the same A",
        },
        "pretraining": problems.pretrain_info,
    }
    if rows.get("random") and rows.get("pretrained"):
        summary["pretrained_vs_random"] = pretrained_vs_random(rows["random"], rows["pretrained"])
    if spec.extra_summary is not None:
        summary.update(spec.extra_summary(args, rows.get("random", []) + rows.get("pretrained", [])))
    return summary


def _per_seed_entries(cell, n_seeds, best_by_seed, constructions) -> list[dict]:
    """A row's per-seed record: every seed with a selected gradient run or a construction (a
    ``--construction-only`` sweep has constructions only); what a seed lacks is ``None``."""
    out = []
    for s in range(n_seeds):
        b, c = best_by_seed.get(s), constructions.get((cell, s))
        if b is None and c is None:
            continue
        b, c = b or {}, c or {}
        out.append({"seed": s, "lr": b.get("config", {}).get("lr"),
                    "weight_decay": b.get("config", {}).get("weight_decay"),
                    "gradient_test_mse": b.get("losses", {}).get("test"),
                    "gradient_shifted_mse": b.get("losses", {}).get("shifted"),
                    "construction_test_mse": c.get("test_mse"),
                    "construction_precision_digits": c.get("precision_digits"),
                    "paired_diff_mean": b.get("paired", {}).get("diff_mean"),
                    "paired_diff_se": b.get("paired", {}).get("diff_se")})
    return out


_ROW_AXES = ("depth", "step", "layers", "rank")


def pretrained_vs_random(random_rows, pretrained_rows) -> list[dict]:
    """The pretrained frozen model against the random one it was pretrained from, paired by seed (seed
    ``s``'s pretrained model starts from seed ``s``'s random one and meets the same target and test set).

    Per row (matched on the experiment's axes and label; both are kept in the entry) and per column
    (``construction``, ``gradient``, the test MSE): ``seeds`` (seeds with both numbers, NaN and missing ones
    left out; an infinite MSE, a diverged run, counts), ``pretrained_lower`` (in how many of them the
    pretrained model's MSE is lower), ``ties`` (equal) and ``median_ratio`` (median over those seeds of
    pretrained / random; null where a random MSE is 0 or both are infinite). A median over seeds can come
    out either way where the per-seed effect is small next to the seed-to-seed spread; the paired count
    shows how often pretraining helps.
    """
    def key(r):
        return tuple(r.get(a) for a in _ROW_AXES) + (r.get("label"),)

    def usable(v):
        return v is not None and not math.isnan(v)

    pre = {key(r): r for r in pretrained_rows}
    out = []
    for r in random_rows:
        q = pre.get(key(r))
        if q is None:
            continue
        entry = {a: r[a] for a in _ROW_AXES if a in r}
        entry["label"] = r.get("label")
        for col, field in (("construction", "construction_test_mse"), ("gradient", "gradient_test_mse")):
            a = {e["seed"]: e[field] for e in r["per_seed"]}
            b = {e["seed"]: e[field] for e in q["per_seed"]}
            pairs = [(a[s], b[s]) for s in sorted(a.keys() & b.keys()) if usable(a[s]) and usable(b[s])]
            defined = pairs and all(x > 0 and not (math.isinf(x) and math.isinf(y)) for x, y in pairs)
            entry[col] = {"seeds": len(pairs), "pretrained_lower": sum(y < x for x, y in pairs),
                          "ties": sum(y == x for x, y in pairs),
                          "median_ratio": float(np.median([y / x for x, y in pairs])) if defined else None}
        out.append(entry)
    return out


def _domain_description(constructions):
    radii = [c["domain"]["radius"] for c in constructions.values() if c.get("domain")]
    if not radii:
        if any(c.get("kappa") is not None for c in constructions.values()):
            return {"kind": "all inputs", "reason": "no linearising biases: the construction (linear model or "
                                                    "transformer) is exact for every input"}
        return None
    return {"kind": "ball", "center": 0.0, "radius": max(radii),
            "covers": "the test inputs and the shifted (x5) test inputs",
            "calibrated_column": {"kind": "samples", "n": N_CALIBRATION, "distribution": "N(0, I)",
                                  "margin": 2.0}}


def _fmt(v, width=9):
    if v is None:
        return "—".rjust(width)
    if isinstance(v, str):
        return v.rjust(width)
    return f"{v:.2e}".rjust(width)


def _threshold_mark(thr, row) -> str:
    """``">="`` for a row at or above its threshold (per depth where ``thr`` is a dict), else ``""``."""
    t = thr.get(str(row.get("depth"))) if isinstance(thr, dict) else thr
    return ">=" if isinstance(t, int) and row.get("rank") is not None and row["rank"] >= t else ""


def format_table(spec, summary) -> str:
    buf = io.StringIO()
    thr = summary["threshold"]
    highprec = []
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        rows = summary[key]
        if not rows:
            continue
        axes = [a for a in _ROW_AXES if a in rows[0]]
        print(f"\n{spec.name}: {kind} frozen model (threshold {thr}; MSE per coordinate, medians over seeds)",
              file=buf)
        head = "".join(a.rjust(6) for a in axes) + "  label".ljust(22) + "params".rjust(7) + " thr" + \
            "predicted".rjust(10) + "construct".rjust(10) + "calibrat.".rjust(10) + "gradient".rjust(10) + \
            "   [q25, q75]".ljust(22) + "constr x5".rjust(10) + "calib x5".rjust(10) + "grad x5".rjust(10)
        print(head, file=buf)
        for r in rows:
            mark = _threshold_mark(thr, r)
            cons = r["construction_test_mse"]
            note = r["construction_note"] or "—"
            cons_s = _fmt(cons, 10) if cons is not None else " " + (note if note.startswith("n/c") else "—")[:15].rjust(15)
            if cons is not None and r.get("construction_precision_digits"):
                cons_s = _fmt(cons, 9) + "*"
                highprec.append(r)
            iqr = f"[{_fmt(r['gradient_test_q25'], 8).strip()}, {_fmt(r['gradient_test_q75'], 8).strip()}]"
            print("".join(("—" if r[a] is None else str(r[a])).rjust(6) for a in axes) + "  " + str(r["label"]).ljust(20) +
                  str(r["params"]).rjust(7) + mark.rjust(4) + _fmt(r["prediction"], 10) + cons_s +
                  _fmt(r["calibrated_test_mse"], 10) + _fmt(r["gradient_test_mse"], 10) + "  " + iqr.ljust(20) +
                  _fmt(r["construction_shifted_mse"], 10) + _fmt(r["calibrated_shifted_mse"], 10) +
                  _fmt(r["gradient_shifted_mse"], 10), file=buf)
    print("params: trained parameters, trained biases included (LoRA: 2·r·D per adapted matrix, plus the biases "
          "it trains with --tune-bias; final layers: l·(D² + D))", file=buf)
    paired = summary.get("pretrained_vs_random")
    if paired:
        print(f"\n{spec.name}: pretrained vs random frozen model, paired by seed (k/n: pretrained lower in k of "
              f"n seeds; ratio: median of pretrained / random)", file=buf)
        axes = [a for a in _ROW_AXES if a in paired[0]]
        print("".join(a.rjust(6) for a in axes) + "  label".ljust(22) + " thr" + "construction".rjust(20) +
              "gradient".rjust(20), file=buf)

        def cell(c):
            if not c["seeds"]:
                return "—".rjust(20)
            ratio = "—" if c["median_ratio"] is None else f"{c['median_ratio']:#.3g}"
            ties = f" ={c['ties']}" if c["ties"] else ""
            return f"{c['pretrained_lower']}/{c['seeds']}{ties}".rjust(10) + ratio.rjust(10)

        for e in paired:
            mark = _threshold_mark(thr, e)
            print("".join(("—" if e[a] is None else str(e[a])).rjust(6) for a in axes) + "  " +
                  str(e["label"]).ljust(20) + mark.rjust(4) + cell(e["construction"]) + cell(e["gradient"]),
                  file=buf)
        print("(=t: t seeds equal; from the threshold on, both constructions are exact: their ratio compares "
              "rounding errors)", file=buf)
    if highprec:
        digits = sorted({r["construction_precision_digits"] for r in highprec})
        n = max(r["construction_subsample"] or 0 for r in highprec)
        why = ("float64 weights carry a relative output error (up to 2e-7 per input measured at D = 16; "
               "construction_note gives the float64 MSE)" if spec.family == "tfn" else
               "not computable honestly in float64 (construction_note gives the float64 κ)")
        print(f"* construction in high precision (mpmath, {digits[0]}{'' if len(digits) == 1 else f'..{digits[-1]}'} "
              f"digits) on the first {n} test and shifted inputs: {why}", file=buf)
    return buf.getvalue()


CSV_FIELDS = ["kind", "depth", "step", "layers", "rank", "label", "method", "params", "prediction",
              "construction_test_mse", "construction_shifted_mse", "calibrated_test_mse", "calibrated_shifted_mse",
              "construction_kappa", "construction_note", "construction_precision_digits",
              "construction_subsample", "gradient_test_mse", "gradient_test_q25",
              "gradient_test_q75", "gradient_shifted_mse", "gradient_val_mse", "target_power"]


def format_csv(summary) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        for r in summary[key]:
            w.writerow({"kind": kind, **{k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS if k != "kind"}})
    return buf.getvalue()


FIGURE_FLOOR = 1e-32     # exact zeros drawn at this MSE on the log scale


def figure_series(spec, summary) -> list:
    """The curves of :func:`make_figure`: dicts ``{"kind", "curve", "label", "x", "y", "lo", "hi", "style"}``.

    Gradient curves: one per frozen-model kind and row label (and group axis, e.g. the depth), with the
    interquartile band. Construction curves: one per kind (and group axis), whatever the row labels, from
    the rows that have a construction MSE; where the construction re-chooses the biases (FNNs with biases,
    whose ``domain`` is a certified ball) the label says so. Rows of runs that keep the frozen biases have
    no construction value (it is not their method), so nothing of theirs is drawn as a construction.
    """
    x_axis = "params" if spec.name == "final_layers" else spec.axis_names[-1]
    group_axes = list(spec.axis_names[:-1])
    rechosen = (summary.get("domain") or {}).get("kind") == "ball"
    out = []
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        rows = summary[key]
        grad, cons = {}, {}
        for r in rows:
            group = tuple(r[a] for a in group_axes)
            grad.setdefault((r["label"],) + group, []).append(r)
            if r["construction_test_mse"] is not None:
                cons.setdefault(group, {}).setdefault(r[x_axis], r["construction_test_mse"])
        for i, (skey, rs) in enumerate(sorted(grad.items(), key=lambda kv: _natural(kv[0]))):
            rs = sorted((r for r in rs if r["gradient_test_mse"] is not None), key=lambda r: r[x_axis])
            if rs:
                out.append({"kind": kind, "curve": "gradient", "style": i, "group": skey[1:],
                            "label": f"{kind} " + " ".join(str(v) for v in skey) + ": gradient",
                            "x": [r[x_axis] for r in rs], "y": [r["gradient_test_mse"] for r in rs],
                            "lo": [r["gradient_test_q25"] for r in rs], "hi": [r["gradient_test_q75"] for r in rs]})
        for i, (group, points) in enumerate(sorted(cons.items(), key=lambda kv: _natural(kv[0]))):
            xs = sorted(points)
            name = " ".join([kind] + [f"{a} {v}" for a, v in zip(group_axes, group)])
            out.append({"kind": kind, "curve": "construction", "style": i, "group": group,
                        "label": f"{name}: construction" + (" (biases re-chosen)" if rechosen else ""),
                        "x": xs, "y": [points[x] for x in xs], "lo": None, "hi": None})
    return out


def _natural(key) -> tuple:
    """Sort key of a tuple of labels and numbers: numbers by value (depth 2 before depth 10)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def _save_figure(fig, path: Path):
    """The figure drawn in memory, then written whole (:func:`verification.outdir.atomic_write`)."""
    atomic_write(path, figure_bytes(fig, dpi=130))


def make_grouped_figure(spec, summary, path: Path):
    """For experiments with a group axis (the depth sweep): one panel per frozen-model kind, one colour per
    group (e.g. frozen depth ``L``), gradient solid with its IQR band, construction dashed, and each
    group's threshold marked on its construction curve."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    series = figure_series(spec, summary)
    kinds = [k for k in ("random", "pretrained") if any(c["kind"] == k for c in series)] or ["random"]
    groups = sorted({c["group"] for c in series}, key=_natural)
    cmap = colormaps["viridis"]
    colour = {g: cmap(i / max(1, len(groups) - 1) * 0.9) for i, g in enumerate(groups)}
    group_axes = spec.axis_names[:-1]
    thr = summary["threshold"] if isinstance(summary["threshold"], dict) else {}
    floor = FIGURE_FLOOR
    fig = Figure(figsize=(5.2 * len(kinds), 4.8))
    axes = [fig.add_subplot(1, len(kinds), i + 1) for i in range(len(kinds))]
    for ax, kind in zip(axes, kinds):
        for c in (c for c in series if c["kind"] == kind):
            g = c["group"]
            name = " ".join(f"{a} {v}" for a, v in zip(group_axes, g))
            y = [max(v, floor) for v in c["y"]]
            if c["curve"] == "gradient":
                ax.plot(c["x"], y, "-", marker="o", ms=3, color=colour[g], label=f"{name}: gradient")
                ax.fill_between(c["x"], [max(v, floor) for v in c["lo"]], [max(v, floor) for v in c["hi"]],
                                color=colour[g], alpha=0.12)
            else:
                t = thr.get(str(g[0])) if len(g) == 1 else None
                ax.plot(c["x"], y, "--", marker="s", ms=3, color=colour[g], mfc="none",
                        label=f"{name}: construction" + (f" (threshold {t})" if t is not None else ""))
                if t is not None and t in c["x"]:
                    ax.plot([t], [y[c["x"].index(t)]], marker="v", ms=7, color=colour[g])
        ax.set_yscale("log")
        ax.set_xlabel(spec.axis_names[-1])
        ax.set_title(f"{kind} frozen model")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="best", ncol=2)
    axes[0].set_ylabel("test MSE per coordinate (median over seeds)")
    fig.suptitle(f"{spec.name}: construction (dashed, ▼ at the threshold) vs gradient-trained (solid); "
                 f"floor {floor:g}", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def make_figure(spec, summary, path: Path):
    """MSE against the experiment's axis, log scale: construction and gradient (IQR band), random and pretrained
    (the curves of :func:`figure_series`); experiments with a group axis get :func:`make_grouped_figure`."""
    from matplotlib.figure import Figure

    if len(spec.axis_names) > 1:
        return make_grouped_figure(spec, summary, path)
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"random": "tab:blue", "pretrained": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    floor = FIGURE_FLOOR
    for c in figure_series(spec, summary):
        ls = styles[c["style"] % len(styles)]
        y = [max(v, floor) for v in c["y"]]
        if c["curve"] == "gradient":
            ax.plot(c["x"], y, ls, marker="o", ms=3, color=colours[c["kind"]], label=c["label"])
            ax.fill_between(c["x"], [max(v, floor) for v in c["lo"]], [max(v, floor) for v in c["hi"]],
                            color=colours[c["kind"]], alpha=0.15)
        else:
            ax.plot(c["x"], y, ls, marker="s", ms=3, color=colours[c["kind"]], alpha=0.6, mfc="none",
                    label=c["label"])
    x_axis = "params" if spec.name == "final_layers" else spec.axis_names[-1]
    thr = summary["threshold"]
    if isinstance(thr, int) and spec.axis_names[-1] == "rank" and spec.name != "final_layers":
        ax.axvline(thr, color="grey", lw=0.8, ls=":", label=f"threshold {thr}")
    ax.set_yscale("log")
    ax.set_xlabel(x_axis)
    ax.set_ylabel("test MSE per coordinate (median over seeds)")
    ax.set_title(f"{spec.name}: construction vs gradient-trained (floor {floor:g} for exact zeros)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- driver

def _read_config(spec, out: Path, flag: str) -> dict:
    """The ``config.json`` of an experiment folder (read only); refuses one of another experiment."""
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise CLIError(f"{flag} {out}: no config.json there (not an experiment folder)")
    try:
        saved = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"{flag} {out}: cannot read config.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"{flag} {out}: config.json is not a JSON object (edited or damaged); nothing was changed")
    if saved.get("experiment") != spec.name:
        raise CLIError(f"{flag} {out}: that folder holds the experiment {saved.get('experiment')!r}, "
                       f"not {spec.name!r}")
    argv = saved.get("argv")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        # never let argparse fall back to the live command line (argv null) or fail on a number or a list
        raise CLIError(f"{flag} {out}: config.json's argv is {type(argv).__name__ if argv is not None else 'null'}"
                       f"{' (missing)' if 'argv' not in saved else ''}, not the list of strings of the command "
                       f"line that made the sweep (edited or damaged); nothing was changed")
    for key in ("settings", "construction"):
        if saved.get(key) is not None and not isinstance(saved[key], dict):
            raise CLIError(f"{flag} {out}: config.json's {key} is not a JSON object (edited or damaged); "
                           f"nothing was changed")
    return saved


#: flags that change where or how fast a sweep runs, not its results
RUN_FLAGS = ("device", "chunk", "workers", "no_figure")
#: flags that change only the construction column, never a training run: a ``--resume`` takes them from its
#: own command line, so a sweep trained with ``--no-highprec`` can get its high-precision column later
CONSTRUCTION_FLAGS = ("no_highprec", "highprec_subsample")
_NOT_SETTINGS = RUN_FLAGS + CONSTRUCTION_FLAGS + ("construction_only", "out", "resume", "quick", "quick_applied", "ranks_list",
                             "lr", "weight_decay", "frozen")          # the last three: parsed into the grids, kinds
_SETTING_FLAGS = {"kinds": "--frozen", "lr_grid": "--lr", "wd_grid": "--weight-decay", "tune_bias": "--tune-bias",
                  "config_extra": "the experiment's target"}


def run_settings(spec, args) -> dict:
    """Every setting the sweep's results depend on (all flags after ``--quick``, less :data:`RUN_FLAGS` and
    the output folder), as JSON values: two command lines with equal settings make the same sweep."""
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if settings.get("select") != "best":
        settings["validate_every"] = None
    extra = config_extra(spec, args)
    if extra is not None:
        settings["config_extra"] = extra
    return json.loads(json.dumps(settings, sort_keys=True, default=_json_default))


def _saved_settings(spec, saved: dict) -> dict | None:
    """The settings of a folder's ``config.json`` (re-derived from its command line for older folders)."""
    if saved.get("settings") is not None:
        return saved["settings"]
    try:
        args = base_parser(spec).parse_args(saved["argv"])
        _normalise(spec, args)
        return run_settings(spec, args)
    except (SystemExit, CLIError, LoraTheoryError):
        return None


def default_out(name: str) -> Path:
    """``results/<name>-<time>``: the output folder when ``--out`` is not given."""
    return Path("results") / f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def writable_folder(out: Path) -> None:
    """Create ``out`` (the ``--out`` folder) and check that a file can be written there (CLIError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _prepare_out(spec, args, settings: dict, out: Path, check_only: bool = False):
    """The output folder of a new sweep, checked writable (called once the input is valid, the folder's
    ownership checked and its lock held).

    A folder that already holds this experiment is reused only for the same settings (the sweep goes on
    where it stopped, as with ``--resume``). With other settings it is refused if it holds any run, so
    that runs of two sweeps are never mixed; a folder with no run is started afresh. ``check_only``: the
    refusal alone, nothing created or removed.
    """
    if not check_only:
        writable_folder(out)
    if (out / "config.json").exists():
        saved = _read_config(spec, out, "--out")
        old = _saved_settings(spec, saved)
        if old is not None:   # folders written before a flag stopped counting as a setting
            old = {k: v for k, v in old.items() if k not in _NOT_SETTINGS}
        if old != settings:
            if (out / "runs.jsonl").is_file() and (out / "runs.jsonl").read_bytes().strip():   # any line
                old = old or {}
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                flags = ", ".join(_SETTING_FLAGS.get(k, "--" + k.replace("_", "-")) for k in diff)
                raise CLIError(f"--out {out}: holds a {spec.name} sweep with other settings "
                               f"({flags or 'its command line'}): use another --out, or --resume {out} to finish it")
            if check_only:
                return out
            for stale in [out / "runs.jsonl", out / "constructions.jsonl", *sorted((out / "pretrained").glob("*.npz"))]:
                stale.unlink(missing_ok=True)      # no run in it: start afresh
    return out


def _finished(futures, handled) -> list:
    """The futures that finished cleanly and were not handled yet (after an interruption: keep their work)."""
    return [f for f in futures if f not in handled and f.done() and not f.cancelled() and f.exception() is None]


def _end_cut_line(path: Path):
    """End a last line cut by an interruption, so that the next record appended starts on its own line."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as log:
                log.write("\n")


def _valid_run_record(rec) -> bool:
    """A ``runs.jsonl`` record the summaries can use: an id, a config and the three losses (numbers or null)."""
    if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("config"), dict)
            and isinstance(rec.get("losses"), dict) and isinstance(rec.get("experiment"), str)):
        return False
    losses = rec["losses"]
    return all(k in losses and (losses[k] is None or (isinstance(losses[k], (int, float))
                                                      and not isinstance(losses[k], bool)))
               for k in ("val", "test", "shifted"))


def _valid_construction_record(rec) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("construction"), dict)


def _load_records(path: Path, valid: Callable[[object], bool] | None = None, report: bool = False) -> list:
    """The records of the JSON Lines file ``path`` (``[]`` when missing), read as bytes.

    A line that is not UTF-8, not JSON, or not ``valid`` is skipped: a line cut by an interruption or a
    damaged one (its run is simply run again, its construction built again). With ``report``, the skipped
    lines are counted on stderr (one line per file); the file itself is never changed here.
    """
    records, bad = [], []
    if path.exists():
        for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                bad.append(number)
                continue
            if valid is not None and not valid(rec):
                bad.append(number)
                continue
            records.append(rec)
    if bad and report:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {path}: {len(bad)} damaged or cut line{'s' if len(bad) > 1 else ''} skipped (line "
              f"{shown}); what they held is computed again", file=sys.stderr)
    return records


def estimate_rate(chunk, problems, dtype, device, structure, iterations) -> float:
    """Run-steps per second of a stack like ``chunk`` on this device (a few timed steps)."""
    stack = _stack_for(chunk, problems, dtype, device)
    targets = [problems.target(structure, chunk[0]["seed"])]
    tstack = _target_stack(structure, targets, dtype, device)
    R = len(chunk)
    kw = dict(data_index=[0] * R, target_index=[0] * R, target_data_index=[0], data_seeds=[0],
              lr=np.full(R, 1e-3), weight_decay=np.full(R, 0.0), batch_size=256, input_shape=_input_shape(structure))
    steps = 3 if structure[0] == "tfn" else 10
    train_stack(stack, tstack, iterations=2, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    train_stack(stack, tstack, iterations=steps, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return R * steps / (time.perf_counter() - t)


def cpu_budget() -> dict:
    """The cores this process may use now: ``cores`` (those it may run on, ``os.sched_getaffinity``: a
    container's or ``taskset``'s limit, not the machine's count), ``load`` (the 1-minute load average: work of
    other processes, e.g. a second sweep) and ``free = cores - floor(load)``, at least 1. The default
    ``--workers`` is ``free``, and each worker gets ``free // workers`` torch threads, so that two sweeps
    started one after the other do not both take every core (oversubscribed threads slow each other down
    many times over)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return {"cores": cores, "load": load, "free": max(1, cores - min(cores, int(load)))}


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def execute(spec: ExperimentSpec, args, out: Path, progress_file=None, cells=None) -> dict:
    from tqdm import tqdm

    progress_file = sys.stderr if progress_file is None else progress_file
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    chunk_size = args.chunk or (4096 if device.type == "cuda" else 64)
    budget = cpu_budget()
    workers = args.workers if args.workers else (1 if device.type == "cuda" else budget["free"])
    cpu_line = None
    if device.type == "cpu":
        threads = max(1, budget["free"] // workers)
        torch.set_num_threads(threads)
        cpu_line = (f"  CPU: {budget['free']} of {budget['cores']} cores free here (1-minute load "
                    f"{budget['load']:.1f}): {workers} stack{'s' if workers > 1 else ''} at once, {threads} torch "
                    f"thread{'s' if threads > 1 else ''} each (--workers sets it)")
    cells = spec.cells(args) if cells is None else cells
    runs = make_runs(spec, args, cells)
    runs_path = out / "runs.jsonl"
    records = {}
    for r in _load_records(runs_path, _valid_run_record, report=True):
        if r["experiment"] == spec.name:
            records.setdefault(r["id"], r)               # a run written twice (an older version's bug): the first
    records = list(records.values())
    done = {r["id"] for r in records}
    todo = [] if args.construction_only else [r for r in runs if r["id"] not in done]
    extra = config_extra(spec, args)
    problems = Problems(cache=out / "pretrained", make_target=None if spec.make_target is None else
                        (lambda structure, seed: spec.make_target(args, structure, seed)),
                        key="" if extra is None else _hash(extra)[:12])
    if args.construction_only:
        print(f"{spec.name}: constructions only, no training ({len(done)} of {len(runs)} runs already done); "
              f"output {out}", file=progress_file)
    else:
        print(f"{spec.name}: {len(runs)} runs x {args.iterations} steps ({len(runs) - len(todo)} already done); "
              f"device {device}, training in {args.dtype}; output {out}", file=progress_file)
    if cpu_line and todo:
        print(cpu_line, file=progress_file)
    if todo:  # before any pretraining: the estimate times stacks on random frozen models (the speed is the same)
        first_key, first_chunk = next(_chunks(todo, chunk_size, device.type == "cpu"))
        probe = [{**r, "cell": dataclasses.replace(r["cell"], kind="random")} for r in first_chunk]
        rate = estimate_rate(probe, problems, dtype, device, first_key[0], args.iterations)
        total = len(todo) * args.iterations
        parallel = max(1, min(workers, len(list(_chunks(todo, chunk_size, device.type == "cpu")))))
        eta = total / (rate * parallel)
        msg = (f"  about {rate:,.0f} run-steps/s per stack here ({parallel} at once): {total:,} run-steps, "
               f"estimated {_duration(eta)} of training")
        if eta > 3600:
            msg += " (hours of arithmetic on this device: consider --quick or --device cuda)"
        print(msg, file=progress_file)
    if "pretrained" in args.kinds:
        structures = list(dict.fromkeys(c.structure for c in cells))
        print(f"  first: the pretrained frozen models ({len(structures)} structure(s) x {args.seeds} seeds, float64 "
              f"on the CPU; cached in {out / 'pretrained'}) and the constructions", file=progress_file)
        for structure in structures:
            problems.prepare(structure, range(args.seeds))

    sets = evaluation_sets(cells[0].structure) if cells else None
    constructions, deep = {}, []
    plain = [(cell, seed) for cell in cells for seed in range(args.seeds) if not _takes_highprec(cell)]
    with tqdm(total=len(plain), desc="constructions (float64)", unit="construction", file=progress_file,
              disable=not plain, mininterval=1.0) as bar:
        for cell in cells:
            for seed in range(args.seeds):
                frozen = problems.frozen(cell.structure, cell.kind, seed)
                target = problems.target(cell.structure, seed)
                if _takes_highprec(cell):
                    deep.append((cell, seed, frozen, target))
                else:
                    constructions[(cell, seed)] = build_construction(cell, frozen, target, sets)
                    bar.update()
    if deep:
        constructions.update(build_highprec_constructions(
            deep, sets, out / "constructions.jsonl", args.workers or budget["free"], progress_file, extra))

    bar = tqdm(total=len(todo) * args.iterations, desc=spec.name, unit="run-step", unit_scale=True,
               file=progress_file, disable=not todo, mininterval=1.0)
    vers = versions()
    _end_cut_line(runs_path)
    eval_cache = {}
    stop = threading.Event()      # set on an interruption: every stack still training stops at its next step

    def train_chunk(structure, chunk):
        t0 = time.perf_counter()
        stack = _stack_for(chunk, problems, dtype, device)
        seeds = sorted({r["seed"] for r in chunk})
        data_seeds = [_seed_int(s, TAG_DATA) for s in seeds]
        seed_pos = {s: i for i, s in enumerate(seeds)}
        targets = [problems.target(structure, s) for s in seeds]   # one target per seed and structure
        tstack = _target_stack(structure, targets, dtype, device)
        tindex = np.array([seed_pos[r["seed"]] for r in chunk])
        if structure not in eval_cache:
            eval_cache[structure] = evaluation_sets(structure)
        eval_sets = eval_cache[structure]
        t_out = {k: torch.as_tensor(np.stack([_model_outputs(t, v.numpy()) for t in targets])).to(device)
                 for k, v in eval_sets.items()}
        result = train_stack(
            stack, tstack, data_index=tindex, target_index=tindex, target_data_index=list(range(len(seeds))),
            data_seeds=data_seeds, lr=np.array([r["lr"] for r in chunk]),
            weight_decay=np.array([r["wd"] for r in chunk]), iterations=args.iterations, batch_size=256,
            input_shape=_input_shape(structure), select=args.select, validate_every=args.validate_every,
            val_inputs=eval_sets["val"], val_targets=t_out["val"], progress=lambda k: bar.update(k * len(chunk)),
            stop=stop)
        ti = torch.as_tensor(tindex, device=device)
        errs = {k: _evaluate(stack, t_out[k], ti, eval_sets[k], device) for k in ("val", "test", "shifted")}
        wall = (time.perf_counter() - t0) / len(chunk)
        out = []
        for i, r in enumerate(chunk):
            cons = constructions.get((r["cell"], r["seed"])) or {}
            rec = {"id": r["id"], "experiment": spec.name, "config": r["config"], "config_hash": r["id"],
                   "seed": r["seed"], "versions": vers, "device": str(device),
                   "losses": {"train_final": _num(result.final_train_loss[i]),
                              "train_curve": {"steps": result.curve_steps,
                                              "loss": [_num(v) for v in result.curve[:, i]]},
                              "val": _num(errs["val"][i].mean()), "test": _num(errs["test"][i].mean()),
                              "shifted": _num(errs["shifted"][i].mean())},
                   "wall_time_s": wall}
            if result.best_step is not None:
                rec["best_step"] = int(result.best_step[i])
            if cons.get("_test_errors") is not None:
                d = errs["test"][i] - cons["_test_errors"]
                rec["paired"] = {"diff_mean": _num(d.mean()), "diff_se": _num(d.std(ddof=1) / math.sqrt(d.size))}
            out.append(rec)
        return out

    chunks = list(_chunks(todo, chunk_size, device.type == "cpu"))
    for structure, _ in {(k[0], None) for k, _ in chunks}:
        eval_cache[structure] = evaluation_sets(structure)
    with open_log(runs_path) as log:
        def write(recs):
            append_lines(log, [json.dumps(rec) for rec in recs])     # a stack's records whole, or none of them
            records.extend(recs)

        try:
            if workers <= 1 or len(chunks) <= 1:
                for (structure, _method), chunk in chunks:
                    write(train_chunk(structure, chunk))
            else:
                # stacks are independent: train several at once, one torch thread each (ops release the GIL)
                pool = ThreadPoolExecutor(workers)
                futures = [pool.submit(train_chunk, key[0], chunk) for key, chunk in chunks]
                written = set()
                try:
                    for fut in as_completed(futures):
                        write(fut.result())
                        written.add(fut)
                except BaseException:
                    # an interruption (Ctrl-C, or a stack that failed): stop the stacks still training at their
                    # next step, drop those not started, and keep every stack that did finish
                    stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    for fut in _finished(futures, written):
                        write(fut.result())
                    raise
                pool.shutdown(wait=True)
        finally:
            bar.close()
    return summarize(spec, args, cells, runs, records, constructions, problems)


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _given_flags(parser, argv) -> dict:
    """``{dest: option as typed}`` for the options that ``argv`` gives explicitly (abbreviations included)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.option_strings and a.dest != "help"})
    parser.parse_args(argv, namespace=ns)
    typed = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
    options = {}                                    # dest -> its option strings (--tune-bias, --fixed-bias: one dest)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            options.setdefault(a.dest, []).extend(a.option_strings)
    given = {}
    for dest, strings in options.items():
        if getattr(ns, dest, unset) is not unset:
            names = [t for t in typed if any(o.startswith(t) for o in strings)]
            given[dest] = names[0] if names else strings[0]
    return given


def _normalise(spec, args):
    """The common checks and ``--quick`` applied to parsed arguments (in place)."""
    args.ranks_list = None
    _check_common(args)
    if args.quick and spec.quick is not None:
        spec.quick(args)


def run_cli(spec: ExperimentSpec, argv=None) -> int:
    """Parse ``argv``, run the experiment, print the table and write the files. Returns the exit status.

    Every input is validated (the cells built, so ranks, depths and the experiment's own flags are
    checked) before the output folder is created or touched: bad input exits with status 2 and a one-line
    message, and leaves an existing folder as it was. The folder must be new, empty or this experiment's own
    (:func:`verification.outdir.check_folder`); a second run on a folder another run is writing is refused
    (:class:`verification.outdir.FolderLock`). The old summaries stay until the new ones are written whole;
    a failed write (a full disk) ends with one line naming the folder (status 1); Ctrl-C while the
    summaries are written waits for them (status 130).
    """
    parser = base_parser(spec)
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    argv = list(argv if argv is not None else sys.argv[1:])
    out, lock = None, None
    try:
        saved, construction = None, {}
        if args.resume:
            resume_dir = Path(args.resume)
            saved = _read_config(spec, resume_dir, "--resume")
            given = _given_flags(parser, argv)
            try:
                resumed = parser.parse_args(saved["argv"])
            except SystemExit:
                raise CLIError(f"--resume {resume_dir}: its saved command line does not parse") from None
            # the construction column asked for on an earlier resume, then on this command line
            construction = {**(saved.get("construction") or {}),
                            **{dest: getattr(args, dest) for dest in CONSTRUCTION_FLAGS if dest in given}}
            for dest, value in construction.items():
                setattr(resumed, dest, value)
            for dest in RUN_FLAGS:        # where and how fast it runs: from this command line
                if dest in given:
                    setattr(resumed, dest, getattr(args, dest))
            ignored = [flag for dest, flag in given.items()
                       if dest not in RUN_FLAGS + CONSTRUCTION_FLAGS + ("resume", "construction_only")]
            if ignored:
                print(f"warning: --resume {resume_dir} goes on with the settings saved there; ignoring "
                      f"{', '.join(ignored)}", file=sys.stderr)
            resumed.construction_only = args.construction_only   # never inherited: a resume trains unless told
            args = resumed
            args.resume, args.out = str(resume_dir), str(resume_dir)
        _normalise(spec, args)
        if spec.validate is not None:
            spec.validate(args)
        resolve_device(args.device)
        cells = spec.cells(args)
        make_runs(spec, args, cells)
        # the input is valid: now the folder, whose ownership is checked before anything is created in it
        flag = "--out" if saved is None else "--resume"
        target = Path(args.out) if args.out else default_out(spec.name)
        if check_folder(target, spec.name, flag) and saved is None:    # refused settings leave it as it was
            _prepare_out(spec, args, run_settings(spec, args), target, check_only=True)
        lock = FolderLock(target, f"python -m verification.{spec.name}", flag).acquire()
        check_folder(target, spec.name, flag)          # again under the lock: another run may have been first
        if saved is None:
            settings = run_settings(spec, args)
            out = _prepare_out(spec, args, settings, target)
            _atomic_write(out / "config.json", json.dumps(
                {"experiment": spec.name, "argv": argv, "settings": settings,
                 "created": _dt.datetime.now().isoformat(timespec="seconds")}, indent=1))
        else:
            out = target
            saved = _read_config(spec, out, "--resume")   # as it is now, under the lock
            if construction != (saved.get("construction") or {}):   # the folder's column from now on
                _atomic_write(out / "config.json", json.dumps({**saved, "construction": construction}, indent=1))
        summary = execute(spec, args, out, cells=cells)
        with interrupts_deferred():       # Ctrl-C now waits until the files are written whole
            written = _write_summaries(spec, args, summary, out)   # first: a closed stdout cannot lose them
            print(format_table(spec, summary))
        print(f"wrote {out}/{', '.join(written)}, runs.jsonl")
        return 0
    except (CLIError, LoraTheoryError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f": finish with --resume {out}" if out is not None else ""), file=sys.stderr)
        return 130
    except OSError as exc:
        if out is None or isinstance(exc, BrokenPipeError):     # not the folder's fault
            raise
        resume = f"--resume {out}" if (out / "config.json").is_file() else None   # else: the same command again
        print(write_error_message(prog, out, exc, resume), file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def _write_summaries(spec, args, summary, out: Path) -> list[str]:
    """``summary.csv`` and ``summary.json`` (each written whole, the JSON last), then the figure, whose failure
    is a warning. The old files are replaced only by complete new ones; an old figure is removed once the
    new summaries are written and no new figure is (it would show other results). Returns the names written."""
    texts = {"summary.csv": format_csv(summary), "summary.json": json.dumps(summary, indent=1, default=_json_default)}
    for name, text in texts.items():
        _atomic_write(out / name, text)
    written = list(texts)
    if not args.no_figure:
        try:
            make_figure(spec, summary, out / "figure.png")
            written.append("figure.png")
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the results are written; the drawing is an extra
            print(f"warning: figure.png not written ({type(exc).__name__}: {exc}); the summaries are complete",
                  file=sys.stderr)
    if "figure.png" not in written:
        (out / "figure.png").unlink(missing_ok=True)
    return written


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


# --------------------------------------------------------------------------------------- common settings

def fnn_structure(args, depth, target_depth, activation="relu"):
    return ("fnn", args.width, depth, target_depth, activation, True)


def lora_cells(args, structure, ranks, *, label="lora", tune_bias=None, axis_extra=()):
    L = structure[2]
    tb = args.tune_bias if tune_bias is None else tune_bias
    out = []
    for kind in args.kinds:
        for R in ranks:
            per_layer = (R,) if structure[0] == "tfn" else (R,) * L
            out.append(Cell(kind=kind, structure=structure, method="lora", axis=tuple(axis_extra) + (("rank", R),),
                            label=label, ranks=per_layer, tune_bias=tb))
    return out


def apply_quick(args, ranks="1,4,8,16", seeds=2, iterations=100):
    """``--quick``: a few ranks (unless ``--ranks`` is given), at most 2 seeds, a 2-point grid, at most 100 steps."""
    args.quick_applied = True
    if args.ranks is None:
        D = args.width
        args.ranks = ",".join(str(min(int(r), D)) for r in ranks.split(","))
    args.seeds = min(args.seeds, seeds)
    args.iterations = min(args.iterations, iterations)
    args.lr_grid = args.lr_grid[:2]
    args.wd_grid = args.wd_grid[:1]
