"""Export adapters built by :mod:`lora_theory` (or proposed by the rank advisor) for PEFT and loralib.

PEFT adapter directory (STYLE.md, "Ecosystem facts"; checked against PEFT 0.21):

* ``adapter_config.json``: ``"peft_type": "LORA"``, ``r`` (the largest rank), ``lora_alpha = r``,
  ``rank_pattern`` and ``alpha_pattern`` with the same per-layer ranks (so PEFT's scale ``lora_alpha / r`` is
  1 on every layer: ``ΔW = B A`` exactly as built), ``target_modules`` (module names ``"layers.0"``, ... or a
  regex), ``bias: "none"``, ``lora_bias``, ``fan_in_fan_out: false``, ``use_rslora: false``;
* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) with keys
  ``base_model.model.<module>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``) and, when a
  bias changes, ``...lora_B.bias`` (``out``) with ``lora_bias: true`` (PEFT 0.14 or newer): PEFT adds
  ``lora_B(lora_A(x)) · scale``, so a bias on ``lora_B`` adds the bias change.

Two adjustments, both recorded:

* a layer whose adapter has more columns than ``B A`` has numeric rank (padding, or directions below the
  tolerance) is re-factored through the SVD of ``B A`` at its numeric rank ("clipped");
* PEFT refuses ``r = 0``: a layer without singular directions whose bias changes is exported as a rank-1
  adapter with zero factors carrying the bias change; a layer with neither is not targeted.

The record goes into ``lora_theory_export.json`` beside the adapter and into the safetensors metadata
(key ``"lora_theory"``), not into ``adapter_config.json``: PEFT warns about keys of its config it does not
know (``Unexpected keyword arguments ... for class LoraConfig``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_theory.adapter import Adapter
from lora_theory.advisor import RankReport
from lora_theory.errors import InvalidArgumentError
from lora_theory.numerics import numeric_rank

__all__ = ["PeftExport", "export_peft", "export_loralib_state_dict", "adapter_layers"]


@dataclass(frozen=True)
class PeftExport:
    """What :func:`export_peft` wrote.

    Attributes
    ----------
    directory : str
    config : dict
        The contents of ``adapter_config.json``.
    ranks : dict of str -> int
        The exported rank of every targeted module.
    notes : dict of str -> dict
        Per module: ``stored_rank``, ``exported_rank``, ``clipped``, ``bias_only``, ``bias_changed``;
        modules left out are listed with ``"targeted": false``.
    keys : tuple of str
        The tensor names in ``adapter_model.safetensors``.
    """

    directory: str
    config: dict
    ranks: dict
    notes: dict
    keys: tuple


def _np_dtype(dtype):
    name = str(dtype).replace("torch.", "")
    if name not in ("float32", "float64", "float16"):
        raise InvalidArgumentError("dtype", f"must be float32, float64 or float16, got {dtype!r}")
    return np.dtype(name)


def adapter_layers(fit_or_adapters, *, names=None, biases=None, choice: str = "exact"):
    """``[(module name, Adapter, bias change or None)]`` from any of the accepted inputs.

    Parameters
    ----------
    fit_or_adapters : FNNFit, LinearFit, RankReport, sequence of Adapter, or mapping name -> Adapter
        A construction (its ``adapters``; an FNN fit's bias changes are ``fit.model.biases - fit.frozen.biases``),
        the rank advisor's report (each layer's best adapter at ``choice`` rank and its bias change), or bare
        adapters (module names ``layers.{l}`` for a sequence).
    names : sequence of str, optional
        Module names, one per adapter (default ``layers.{l}``, or the mapping's / report's names).
    biases : None, False, sequence or mapping of vectors
        Bias changes ``Δb``: ``None`` takes them from the fit or report (none for bare adapters), ``False``
        exports none, otherwise one vector (or ``None``) per layer.
    """
    auto_biases = None
    if isinstance(fit_or_adapters, RankReport):
        report = fit_or_adapters
        items = [(a.name, a.adapter(a.rank(choice))) for a in report.layers]
        auto_biases = {a.name: a.bias_change for a in report.layers if a.bias_changed}
    elif isinstance(fit_or_adapters, Mapping):
        items = list(fit_or_adapters.items())
    elif hasattr(fit_or_adapters, "adapters"):
        fit = fit_or_adapters
        items = [(f"layers.{l}", a) for l, a in enumerate(fit.adapters)]
        frozen = getattr(fit, "frozen", None)
        model = getattr(fit, "model", None)
        if hasattr(frozen, "biases") and hasattr(model, "biases"):
            auto_biases = {f"layers.{l}": np.asarray(b1) - np.asarray(b0)
                           for l, (b0, b1) in enumerate(zip(frozen.biases, model.biases))}
    elif isinstance(fit_or_adapters, Sequence) and not isinstance(fit_or_adapters, (str, bytes)):
        items = [(f"layers.{l}", a) for l, a in enumerate(fit_or_adapters)]
    else:
        raise InvalidArgumentError(
            "fit_or_adapters", "must be a fit (LinearFit, FNNFit), a RankReport, a sequence of Adapter or a "
            f"mapping name -> Adapter, got {type(fit_or_adapters).__name__}")
    if not items:
        raise InvalidArgumentError("fit_or_adapters", "holds no adapters")
    for i, (_, a) in enumerate(items):
        if not isinstance(a, Adapter):
            raise InvalidArgumentError(f"fit_or_adapters[{i}]", f"must be an Adapter, got {type(a).__name__}")
    if names is not None:
        names = list(names)
        if len(names) != len(items):
            raise InvalidArgumentError("names", f"must give one module name per adapter ({len(items)}), got {len(names)}")
        items = [(n, a) for n, (_, a) in zip(names, items)]
    if len({n for n, _ in items}) != len(items):
        raise InvalidArgumentError("names", "module names must be distinct")

    if biases is None:
        bias_map = auto_biases or {}
    elif biases is False:
        bias_map = {}
    elif isinstance(biases, Mapping):
        bias_map = dict(biases)
        unknown = set(bias_map) - {n for n, _ in items}
        if unknown:
            raise InvalidArgumentError("biases", f"names modules without an adapter: {sorted(unknown)}")
    elif isinstance(biases, Sequence) and not isinstance(biases, (str, bytes)):
        if len(biases) != len(items):
            raise InvalidArgumentError("biases", f"must give one bias change (or None) per layer ({len(items)}), got {len(biases)}")
        bias_map = {n: b for (n, _), b in zip(items, biases)}
    else:
        raise InvalidArgumentError("biases", f"must be None, False, a sequence or a mapping, got {type(biases).__name__}")

    out = []
    for name, a in items:
        b = bias_map.get(name)
        if b is not None:
            b = np.asarray(b, dtype=np.float64)
            if b.shape != (a.out_features,):
                raise InvalidArgumentError(f"biases[{name!r}]", f"must have shape ({a.out_features},), got {b.shape}")
            if not np.isfinite(b).all():
                raise InvalidArgumentError(f"biases[{name!r}]", "contains NaN or infinite entries")
            if not np.any(b):
                b = None
        out.append((name, a, b))
    return out


def _clip(adapter: Adapter, rank_tol):
    """The adapter at the numeric rank of ``B A`` (re-factored through its SVD when that is lower)."""
    if adapter.rank == 0:
        return adapter, 0
    delta = adapter.delta                                               # (out, in)
    scale = float(np.linalg.norm(adapter.B, 2) * np.linalg.norm(adapter.A, 2))
    k = numeric_rank(delta, tol=rank_tol, scale=scale)
    if k == adapter.rank:
        return adapter, k
    return Adapter.from_delta(delta, k), k


def export_peft(fit_or_adapters, directory, *, names=None, biases=None, base_model_prefix: str = "base_model.model",
                dtype="float32", rank_tol: float | None = None, target_regex: bool = False,
                choice: str = "exact") -> PeftExport:
    """Write a PEFT LoRA adapter directory that ``peft.PeftModel.from_pretrained`` loads (module docstring).

    Parameters
    ----------
    fit_or_adapters, names, biases, choice
        See :func:`adapter_layers`.
    directory : str or Path
        Created if needed; ``adapter_config.json``, ``adapter_model.safetensors`` and
        ``lora_theory_export.json`` are written into it.
    base_model_prefix : str
        Prefix of the tensor names (PEFT's ``PeftModel`` wraps the model as ``base_model.model``).
    dtype : "float32", "float64" or "float16"
        Storage dtype of the factors (PEFT casts them to the base layer's dtype when loading).
    rank_tol : float, optional
        Absolute tolerance of the numeric rank of ``B A`` (default ``max(out, in)·eps·||B||_2||A||_2``).
    target_regex : bool
        Write ``target_modules`` as one anchored regex instead of a list of names.

    Returns
    -------
    PeftExport

    Raises
    ------
    InvalidArgumentError
        Unusable inputs (see :func:`adapter_layers`), a bad ``dtype``.
    """
    from safetensors.numpy import save_file

    np_dtype = _np_dtype(dtype)
    layers = adapter_layers(fit_or_adapters, names=names, biases=biases, choice=choice)
    prefix = base_model_prefix.rstrip(".") + "." if base_model_prefix else ""
    exported, notes = [], {}
    for name, adapter, bias in layers:
        clipped, k = _clip(adapter, rank_tol)
        note = {"stored_rank": adapter.rank, "numeric_rank": k, "bias_changed": bias is not None,
                "clipped": k < adapter.rank, "bias_only": False, "targeted": True}
        if k == 0:
            if bias is None:
                note.update(targeted=False, exported_rank=0, reason="no weight or bias change")
                notes[name] = note
                continue
            clipped = Adapter.zeros(1, adapter.in_features, adapter.out_features)
            note.update(bias_only=True, reason="rank 0 with a bias change: rank-1 zero factors carry lora_B.bias")
        note["exported_rank"] = clipped.rank
        notes[name] = note
        exported.append((name, clipped, bias))
    if not exported:                                   # nothing changes: a zero adapter on the first layer
        name, adapter, _ = layers[0]
        exported.append((name, Adapter.zeros(1, adapter.in_features, adapter.out_features), None))
        notes[name].update(targeted=True, exported_rank=1, reason="no layer changes: one zero adapter so that "
                           "PEFT has something to load")
    lora_bias = any(b is not None for _, _, b in exported)
    tensors = {}
    for name, a, b in exported:
        tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a.A, dtype=np_dtype)    # (r, in)
        tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(a.B, dtype=np_dtype)    # (out, r)
        if lora_bias:
            bias = np.zeros(a.out_features) if b is None else b
            tensors[f"{prefix}{name}.lora_B.bias"] = np.ascontiguousarray(bias, dtype=np_dtype)  # (out,)
    ranks = {name: a.rank for name, a, _ in exported}
    top = max(ranks.values())
    targets = list(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": ("^(" + "|".join(re.escape(t) for t in targets) + ")$") if target_regex else targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    record = {
        "producer": "lora_theory",
        "scale": "lora_alpha = r and alpha_pattern = rank_pattern: PEFT's scale lora_alpha / r is 1 on every layer",
        "layers": notes,
        "clipped": {n: [v["stored_rank"], v["exported_rank"]] for n, v in notes.items() if v.get("clipped")},
        "bias_only": [n for n, v in notes.items() if v.get("bias_only")],
        "untargeted": [n for n, v in notes.items() if not v.get("targeted")],
        "dtype": np_dtype.name,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (directory / "lora_theory_export.json").write_text(json.dumps(record, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt", "lora_theory": json.dumps(record)})
    return PeftExport(directory=str(directory), config=config, ranks=ranks, notes=notes, keys=tuple(tensors))


def export_loralib_state_dict(fit_or_adapters, path=None, *, names=None, biases=None, adapted_biases=None,
                              pad_to: int | None = None, dtype="float32", choice: str = "exact") -> dict:
    """The adapters as a loralib state dict: ``<module>.lora_A`` (``r x in``), ``<module>.lora_B`` (``out x r``).

    loralib has no bias on its adapters; it trains the layer's own bias (``mark_only_lora_as_trainable(model,
    bias="lora_only")``), so a changed bias is written as ``<module>.bias`` holding the *adapted* bias.
    loralib scales the update by ``lora_alpha / r`` (its default ``lora_alpha`` is 1): build its layers with
    ``lora_alpha = r`` so that ``ΔW = B A`` as exported; load with ``model.load_state_dict(sd, strict=False)``.

    Parameters
    ----------
    fit_or_adapters, names, biases, choice
        See :func:`adapter_layers`; ``biases`` are bias *changes* and need ``adapted_biases`` or a fit.
    path : str or Path, optional
        Also save the dict: ``.safetensors`` with safetensors, anything else with ``torch.save``.
    adapted_biases : mapping name -> vector, optional
        The full adapted biases (default: from an FNN fit, ``fit.model.biases`` where they changed).
    pad_to : int, optional
        Store every adapter at this rank (loralib layers have one fixed ``r``), extra factors zero; layers
        without directions are then included as zero adapters.
    dtype : "float32", "float64" or "float16"

    Returns
    -------
    dict of str -> ndarray
    """
    np_dtype = _np_dtype(dtype)
    layers = adapter_layers(fit_or_adapters, names=names, biases=biases, choice=choice)
    if adapted_biases is None and hasattr(fit_or_adapters, "model") and hasattr(fit_or_adapters, "frozen"):
        model = fit_or_adapters.model
        adapted_biases = {f"layers.{l}": b for l, b in enumerate(model.biases)}
    out = {}
    for name, adapter, change in layers:
        a = adapter
        if pad_to is not None:
            if pad_to < a.rank:
                raise InvalidArgumentError("pad_to", f"is {pad_to} but layer {name} needs rank {a.rank}")
            a = a.padded(pad_to)
        if a.rank > 0:
            out[f"{name}.lora_A"] = np.ascontiguousarray(a.A, dtype=np_dtype)
            out[f"{name}.lora_B"] = np.ascontiguousarray(a.B, dtype=np_dtype)
        if change is not None:
            if adapted_biases is None or name not in adapted_biases:
                raise InvalidArgumentError(
                    "adapted_biases", f"layer {name} changes its bias: loralib stores the adapted bias itself, "
                    "so pass adapted_biases (or a fit)")
            out[f"{name}.bias"] = np.ascontiguousarray(adapted_biases[name], dtype=np_dtype)
    if path is not None:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(out, str(path), metadata={"format": "pt"})
        else:
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in out.items()}, str(path))
    return out
