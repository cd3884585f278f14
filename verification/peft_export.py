"""Export adapters built by :mod:`lora_theory` (or proposed by the rank advisor) for PEFT and loralib.

PEFT adapter directory (the format PEFT 0.21 writes and reads; checked against it):

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
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_theory.adapter import Adapter
from lora_theory.advisor import RankReport
from lora_theory.errors import InvalidArgumentError
from lora_theory.numerics import numeric_rank

from .outdir import write_as_open

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
            auto_biases = {
                f"layers.{l}": np.asarray(b1) - np.asarray(b0)
                for l, (b0, b1) in enumerate(zip(frozen.biases, model.biases))
            }
    elif isinstance(fit_or_adapters, Sequence) and not isinstance(fit_or_adapters, (str, bytes)):
        items = [(f"layers.{l}", a) for l, a in enumerate(fit_or_adapters)]
    else:
        raise InvalidArgumentError(
            "fit_or_adapters",
            "must be a fit (LinearFit, FNNFit), a RankReport, a sequence of Adapter or a "
            f"mapping name -> Adapter, got {type(fit_or_adapters).__name__}",
        )
    if not items:
        raise InvalidArgumentError("fit_or_adapters", "holds no adapters")
    for i, (_, a) in enumerate(items):
        if not isinstance(a, Adapter):
            raise InvalidArgumentError(f"fit_or_adapters[{i}]", f"must be an Adapter, got {type(a).__name__}")
    if names is not None:
        names = list(names)
        if len(names) != len(items):
            raise InvalidArgumentError(
                "names", f"must give one module name per adapter ({len(items)}), got {len(names)}"
            )
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
            raise InvalidArgumentError(
                "biases", f"must give one bias change (or None) per layer ({len(items)}), got {len(biases)}"
            )
        bias_map = {n: b for (n, _), b in zip(items, biases)}
    else:
        raise InvalidArgumentError(
            "biases", f"must be None, False, a sequence or a mapping, got {type(biases).__name__}"
        )

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
    delta = adapter.delta  # (out, in)
    scale = float(np.linalg.norm(adapter.B, 2) * np.linalg.norm(adapter.A, 2))
    k = numeric_rank(delta, tol=rank_tol, scale=scale)
    if k == adapter.rank:
        return adapter, k
    return Adapter.from_delta(delta, k), k


def export_peft(
    fit_or_adapters,
    directory,
    *,
    names=None,
    biases=None,
    base_model_prefix: str = "base_model.model",
    dtype="float32",
    rank_tol: float | None = None,
    target_regex: bool = False,
    choice: str = "exact",
    base_name=None,
    base_weights=None,
) -> PeftExport:
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
    base_name : str, optional
        ``base_model_name_or_path`` in ``adapter_config.json``.
    base_weights : mapping name -> array, optional
        The base's tensors the adapter changes (default for a fit: ``layers.{l}.weight`` of ``fit.frozen``);
        their :func:`base_fingerprint` goes into ``lora_theory_export.json`` for :func:`check_base`.

    Returns
    -------
    PeftExport

    Raises
    ------
    InvalidArgumentError
        Unusable inputs (see :func:`adapter_layers`), a bad ``dtype``.
    AdapterWriteError
        A factor or bias that is not finite, or not finite once rounded to ``dtype`` (float16 overflow).
    """
    from safetensors.numpy import save_file

    np_dtype = _np_dtype(dtype)
    layers = adapter_layers(fit_or_adapters, names=names, biases=biases, choice=choice)
    prefix = base_model_prefix.rstrip(".") + "." if base_model_prefix else ""
    exported, notes = [], {}
    for name, adapter, bias in layers:
        clipped, k = _clip(adapter, rank_tol)
        note = {
            "stored_rank": adapter.rank,
            "numeric_rank": k,
            "bias_changed": bias is not None,
            "clipped": k < adapter.rank,
            "bias_only": False,
            "targeted": True,
        }
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
    if not exported:  # nothing changes: a zero adapter on the first layer
        name, adapter, _ = layers[0]
        exported.append((name, Adapter.zeros(1, adapter.in_features, adapter.out_features), None))
        notes[name].update(
            targeted=True,
            exported_rank=1,
            reason="no layer changes: one zero adapter so that PEFT has something to load",
        )
    lora_bias = any(b is not None for _, _, b in exported)
    for name, a, b in exported:
        for part, arr in (("A", a.A), ("B", a.B)) + ((("bias", b),) if b is not None else ()):
            arr = np.asarray(arr, dtype=np.float64)
            with np.errstate(over="ignore"):
                rounded = arr.astype(np_dtype)
            if not np.isfinite(arr).all() or not np.isfinite(rounded).all():
                raise AdapterWriteError(
                    f"layer {name}: {part} holds values beyond {np_dtype.name}'s range (largest |entry| "
                    f"{float(np.nanmax(np.abs(arr))):.3g}); nothing was written"
                )
    tensors = {}
    for name, a, b in exported:
        tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a.A, dtype=np_dtype)  # (r, in)
        tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(a.B, dtype=np_dtype)  # (out, r)
        if lora_bias:
            bias = np.zeros(a.out_features) if b is None else b
            tensors[f"{prefix}{name}.lora_B.bias"] = np.ascontiguousarray(bias, dtype=np_dtype)  # (out,)
    ranks = {name: a.rank for name, a, _ in exported}
    top = max(ranks.values())
    targets = list(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None if base_name is None else str(base_name),
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
    if base_weights is None and hasattr(getattr(fit_or_adapters, "frozen", None), "weights"):
        base_weights = {f"layers.{l}.weight": w for l, w in enumerate(fit_or_adapters.frozen.weights)}
    if base_weights is not None:
        import torch

        weights = {k: torch.as_tensor(np.asarray(v)) for k, v in base_weights.items()}
        record["base_fingerprint"] = base_fingerprint(
            weights.__getitem__, list(weights), {k: str(v.dtype).replace("torch.", "") for k, v in weights.items()}
        )
    record["base_model_name_or_path"] = config["base_model_name_or_path"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (directory / "lora_theory_export.json").write_text(json.dumps(record, indent=2))
    metadata = {"format": "pt", "lora_theory": json.dumps(record)}
    write_as_open(directory / "adapter_model.safetensors", lambda f: save_file(tensors, f, metadata=metadata))
    return PeftExport(directory=str(directory), config=config, ranks=ranks, notes=notes, keys=tuple(tensors))


def export_loralib_state_dict(
    fit_or_adapters,
    path=None,
    *,
    names=None,
    biases=None,
    adapted_biases=None,
    pad_to: int | None = None,
    dtype="float32",
    choice: str = "exact",
) -> dict:
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
                    "adapted_biases",
                    f"layer {name} changes its bias: loralib stores the adapted bias itself, "
                    "so pass adapted_biases (or a fit)",
                )
            out[f"{name}.bias"] = np.ascontiguousarray(adapted_biases[name], dtype=np_dtype)
    if path is not None:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            write_as_open(path, lambda f: save_file(out, f, metadata={"format": "pt"}))
        else:
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in out.items()}, str(path))
    return out


# ------------------------------------------------------------------------------ PEFT's own classes


class AdapterWriteError(InvalidArgumentError):
    """The adapter as it would be written does not hold what was built (overflow, underflow, non-finite
    values in the written precision); nothing was written."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.argument = "dtype"


class AdapterBaseError(InvalidArgumentError):
    """An adapter is being loaded onto a base whose weights differ from the base it was built for."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.argument = "base"


#: Name of the record written beside ``adapter_config.json``.
RECORD_NAME = "lora_theory_export.json"
#: Entries sampled per tensor for the base fingerprint.
FINGERPRINT_SAMPLES = 16


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One module's part of an adapter, in float64 (what was built).

    Attributes
    ----------
    name : str
        The module path.
    kind : str
        ``"linear"``, ``"conv1d"`` or ``"embedding"`` (PEFT's embedding form).
    A, B : ndarray (r, in), (out, r)
        ``ΔW ≈ B A`` of the logical ``(out, in)`` matrix (an embedding: ``dim x num_embeddings``).
    bias : ndarray (out,) or None
        ``Δb``, carried by ``lora_B.bias`` (needs ``lora_bias``; not for embeddings).
    """

    name: str
    kind: str
    A: np.ndarray
    B: np.ndarray
    bias: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _torch_dtype(name):
    import torch

    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if str(name) not in table:
        raise InvalidArgumentError("dtype", f"must be one of {sorted(table)}, got {name!r}")
    return table[str(name)]


def _unit_roundoff(name) -> float:
    return {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}[str(name)]


def _skeleton(modules: dict):
    """A meta-device ``nn.Module`` tree with an ``nn.Linear`` / ``nn.Embedding`` / parameter holder at each
    path of ``modules`` (``path -> (kind, shape or dict of leaf -> shape)``): what PEFT needs to name, size and
    save an adapter for a plain state dict."""
    import torch
    from torch import nn

    class Holder(nn.Module):
        def __init__(self, params):
            super().__init__()
            for leaf, shape in params.items():
                self.register_parameter(leaf, nn.Parameter(torch.empty(shape)))

    root = nn.Module()
    with torch.device("meta"):
        for path, (kind, shape, has_bias) in modules.items():
            parent = root
            parts = path.split(".")
            for p in parts[:-1]:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            if kind == "linear":
                mod = nn.Linear(shape[1], shape[0], bias=has_bias)
            elif kind == "embedding":
                mod = nn.Embedding(shape[1], shape[0])
            elif kind == "conv1d":
                from transformers.pytorch_utils import Conv1D

                mod = Conv1D(shape[0], shape[1])
            else:
                mod = Holder(shape)
            parent.add_module(parts[-1], mod)
    return root


def base_fingerprint(get, keys, dtypes) -> dict:
    """A fingerprint of the base weights an adapter is built for: per tensor its shape, storage dtype, the
    float64 sum of its entries and ``FINGERPRINT_SAMPLES`` entries at fixed positions, and a digest of all.

    Parameters
    ----------
    get : callable key -> torch tensor (as stored)
    keys : iterable of str
    dtypes : mapping key -> storage dtype name
    """
    import hashlib

    import torch

    tensors = {}
    for key in keys:
        t = get(key)
        flat = t.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel())).round().long()
        tensors[key] = {
            "shape": list(t.shape),
            "dtype": str(dtypes[key]),
            "sum": float(flat.double().sum()),
            "samples": [float(v) for v in flat[idx].double()],
        }
    digest = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "tensors": tensors}


def check_base(directory, base) -> dict:
    """Check that ``base`` holds the weights the adapter in ``directory`` was built for.

    Parameters
    ----------
    directory : path
        An adapter written by :func:`write_peft_adapter` (its ``lora_theory_export.json``).
    base : torch ``nn.Module``, a checkpoint path, or a mapping key -> tensor
        The base model as it will be used.

    Returns
    -------
    dict
        The recorded fingerprint.

    Raises
    ------
    AdapterBaseError
        A tensor is missing, has another shape, or differs at a sampled entry or in its sum beyond the
        rounding of its storage precision.
    """
    import torch

    record_path = Path(directory) / RECORD_NAME
    if not record_path.is_file():
        raise AdapterBaseError(f"{directory}: no {RECORD_NAME}, so the base this adapter was built for is unknown")
    fp = json.loads(record_path.read_text()).get("base_fingerprint")
    if not fp:
        raise AdapterBaseError(f"{record_path}: records no base fingerprint")
    if isinstance(base, torch.nn.Module):
        state = dict(base.named_parameters(remove_duplicate=False))
        state.update(dict(base.named_buffers()))
        get = state.__getitem__
        have = state
    elif isinstance(base, Mapping):
        get, have = base.__getitem__, base
    else:
        from .streaming import TensorSource

        src = TensorSource(base)
        get, have = src.get, src.shapes
    for key, rec in fp["tensors"].items():
        if key not in have:
            raise AdapterBaseError(
                f"the base has no tensor {key!r}; the adapter in {directory} was built for another model"
            )
        t = torch.as_tensor(get(key)).detach().cpu()
        if list(t.shape) != rec["shape"]:
            raise AdapterBaseError(
                f"base tensor {key!r} has shape {tuple(t.shape)}, the adapter in {directory} was built for "
                f"{tuple(rec['shape'])}"
            )
        stored = _torch_dtype(rec["dtype"]) if rec["dtype"] in ("float32", "float64", "float16", "bfloat16") else None
        flat = t.reshape(-1)
        if stored is not None:
            flat = flat.to(stored)  # the base as it was stored
        idx = torch.linspace(0, flat.numel() - 1, len(rec["samples"])).round().long()
        got = flat[idx].double().numpy()
        want = np.asarray(rec["samples"])
        total = float(flat.double().sum())
        u = _unit_roundoff(rec["dtype"]) if stored is not None else 0.0
        scale = float(flat.double().abs().sum())
        if not np.array_equal(got, want) or abs(total - rec["sum"]) > 4 * u * scale + 1e-300:
            raise AdapterBaseError(
                f"base tensor {key!r} differs from the one the adapter in {directory} was built for "
                f"(fingerprint {fp['digest'][:12]}): loading it there would apply the change to other weights"
            )
    return fp


def load_peft_adapter(model, directory):
    """``peft.PeftModel.from_pretrained(model, directory)`` after :func:`check_base` (raises
    :class:`AdapterBaseError` on a base the adapter was not built for)."""
    from .architectures import require

    check_base(directory, model)
    peft = require("peft")
    return peft.PeftModel.from_pretrained(model, str(directory))


def write_peft_adapter(
    entries,
    directory,
    *,
    skeleton,
    dtype="float32",
    modules_to_save=None,
    base_name=None,
    fingerprint=None,
    record=None,
    fan_in_fan_out=None,
):
    """Write ``entries`` as a PEFT LoRA adapter with PEFT's own classes, after checking what will be written.

    PEFT builds the adapter: ``LoraConfig`` (``target_modules``, ``r = lora_alpha``, ``rank_pattern =
    alpha_pattern`` so every layer's scale is 1, ``fan_in_fan_out`` for ``Conv1D`` layers, ``lora_bias`` when a
    bias changes, ``modules_to_save``) and ``get_peft_model`` on ``skeleton`` (the architecture on the meta
    device, no weights), the factors are assigned to its parameters, and ``save_pretrained`` writes the
    folder. Before anything is written, every factor is rounded to ``dtype`` and the product is checked:
    ``||B̃ Ã - B A||_F <= (2u + u²)·||B||_F·||A||_F`` (``u`` the unit roundoff of ``dtype``; it holds for
    rounding without overflow or underflow) and every value finite; a violation raises
    :class:`AdapterWriteError` and writes nothing. The folder is written beside ``directory`` and renamed into
    place, so a failure leaves no half-written adapter.

    Parameters
    ----------
    entries : sequence of LoraEntry
    directory : path
        Must not exist or be empty.
    skeleton : torch nn.Module
        The model (meta device is enough) whose module paths the entries name.
    dtype : "float32" (default), "float64", "float16" or "bfloat16"
    modules_to_save : mapping module path -> {leaf: ndarray}, optional
        Whole modules whose tuned parameters travel with the adapter (changed norms).
    base_name : str, optional
        ``base_model_name_or_path`` written into ``adapter_config.json``.
    fingerprint : dict, optional
        :func:`base_fingerprint` of the base, written into ``lora_theory_export.json``.
    record : dict, optional
        More of the export's record for ``lora_theory_export.json``.

    Returns
    -------
    dict
        The record written (``checks`` holds the measured product errors and their bounds).
    """
    import os
    import shutil
    import tempfile
    import warnings

    import torch

    from .architectures import require
    from .outdir import fresh_modes_under

    peft = require("peft")
    tdtype = _torch_dtype(dtype)
    u = _unit_roundoff(dtype)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise AdapterWriteError(
            f"{directory} exists and is not an empty folder: the adapter is written only into a new one"
        )
    entries = list(entries)
    modules_to_save = dict(modules_to_save or {})
    if not entries and not modules_to_save:
        raise AdapterWriteError("nothing to write: no layer and no vector changed above the noise floor")

    # ---- round to the written precision and check before writing
    finfo = torch.finfo(tdtype)
    tensors, checks = {}, {}
    for e in entries:
        A64, B64 = np.asarray(e.A, np.float64), np.asarray(e.B, np.float64)
        parts = {"A": A64, "B": B64} | ({"bias": np.asarray(e.bias, np.float64)} if e.bias is not None else {})
        for part, arr in parts.items():
            if not np.isfinite(arr).all():
                raise AdapterWriteError(f"layer {e.name}: the built {part} factor holds NaN or infinite values")
            big = float(np.abs(arr).max(initial=0.0))
            if big > finfo.max:
                raise AdapterWriteError(
                    f"layer {e.name}: an entry of {part} is {big:.3g}, beyond {dtype}'s largest value {finfo.max:.3g}; "
                    "write it in a wider dtype (float32 or float64)"
                )
        A_w = torch.from_numpy(A64).to(tdtype)
        B_w = torch.from_numpy(B64).to(tdtype)
        err = float(np.linalg.norm(B_w.double().numpy() @ A_w.double().numpy() - B64 @ A64))
        bound = (2 * u + u * u) * float(np.linalg.norm(B64)) * float(np.linalg.norm(A64))
        check = {"product_error": err, "bound": bound}
        if not err <= bound:
            raise AdapterWriteError(
                f"layer {e.name}: in {dtype} the product B A is off by {err:.3g}, above the rounding bound "
                f"{bound:.3g} (entries underflow); write it in a wider dtype"
            )
        if e.bias is not None:
            b_w = torch.from_numpy(np.asarray(e.bias, np.float64)).to(tdtype)
            berr = float(np.linalg.norm(b_w.double().numpy() - e.bias))
            bbound = u * float(np.linalg.norm(e.bias))
            check.update(bias_error=berr, bias_bound=bbound)
            if not berr <= bbound:
                raise AdapterWriteError(
                    f"layer {e.name}: the bias change underflows in {dtype}; write it in a wider dtype"
                )
        checks[e.name] = check
        tensors[e.name] = (A_w, B_w, None if e.bias is None else b_w)
    saved = {}
    for module, leaves in modules_to_save.items():
        saved[module] = {}
        for leaf, arr in leaves.items():
            arr = np.asarray(arr, np.float64)
            if not np.isfinite(arr).all() or float(np.abs(arr).max(initial=0.0)) > finfo.max:
                raise AdapterWriteError(f"module {module}: {leaf} does not fit {dtype} (overflow or non-finite)")
            saved[module][leaf] = torch.from_numpy(arr).to(tdtype)

    # ---- PEFT's config and model
    ranks = {e.name: e.rank for e in entries}
    top = max(ranks.values(), default=1)
    kinds = {e.kind for e in entries}
    lora_bias = any(e.bias is not None for e in entries)
    if lora_bias and "embedding" in kinds:
        raise AdapterWriteError(
            "lora_bias is needed for a bias change but PEFT refuses it on an embedding layer that is also adapted"
        )
    config_fan_in_fan_out = ("conv1d" in kinds) if fan_in_fan_out is None else bool(fan_in_fan_out)
    config = peft.LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=list(ranks) or None,
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        bias="none",
        lora_bias=lora_bias,
        fan_in_fan_out=config_fan_in_fan_out,
        modules_to_save=list(saved) or None,
        init_lora_weights=False,
        use_rslora=False,
        use_dora=False,
        inference_mode=True,
    )
    if not ranks:  # modules_to_save only: PEFT needs one target; a zero adapter on no module is not possible
        raise AdapterWriteError("only vectors changed: PEFT's LoRA needs at least one adapted layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set per module; tied embeddings
        model = peft.get_peft_model(skeleton, config)
    state, pre = {}, "base_model.model."
    for e in entries:
        A_w, B_w, b_w = tensors[e.name]
        if e.kind == "embedding":
            state[f"{pre}{e.name}.lora_embedding_A.default"] = A_w.contiguous()
            state[f"{pre}{e.name}.lora_embedding_B.default"] = B_w.contiguous()
        else:
            state[f"{pre}{e.name}.lora_A.default.weight"] = A_w.contiguous()
            state[f"{pre}{e.name}.lora_B.default.weight"] = B_w.contiguous()
            if lora_bias:
                bias = b_w if b_w is not None else torch.zeros(B_w.shape[0], dtype=tdtype)
                state[f"{pre}{e.name}.lora_B.default.bias"] = bias.contiguous()
    for module, leaves in saved.items():
        for leaf, t in leaves.items():
            state[f"{pre}{module}.modules_to_save.default.{leaf}"] = t.contiguous()
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise AdapterWriteError(
            f"PEFT's model has no parameters {result.unexpected_keys[:4]}: the module paths "
            "do not match the architecture"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT takes a 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        adapter_state = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    meta = [k for k, v in adapter_state.items() if v.is_meta]
    if meta:
        raise AdapterWriteError(f"PEFT's adapter has parameters that were not built: {meta[:4]}")
    model.peft_config["default"].base_model_name_or_path = None if base_name is None else str(base_name)
    # PEFT rewrites the flag of its config per module it meets (a Linear after a Conv1D leaves it False);
    # the saved config states the Conv1D layout, and PEFT sets it per module again when it loads
    model.peft_config["default"].fan_in_fan_out = config_fan_in_fan_out

    record = dict(record or {})
    record.update(
        producer="lora_theory",
        dtype=str(dtype),
        ranks=dict(ranks),
        lora_bias=lora_bias,
        modules_to_save=sorted(saved),
        checks=checks,
        scale="lora_alpha = r and alpha_pattern = rank_pattern: PEFT's scale lora_alpha / r is 1 on every layer",
        base_model_name_or_path=None if base_name is None else str(base_name),
        base_fingerprint=fingerprint,
    )
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2))
        fresh_modes_under(tmp)  # mkdtemp's 0700 and safetensors' 0600 would outlive the rename
        _verify_written(tmp, state, pre)
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _verify_written(folder, state, pre):
    """Read the written adapter back and compare every tensor with what was assigned (same dtype, bitwise)."""
    import torch
    from safetensors.torch import load_file

    written = load_file(str(Path(folder) / "adapter_model.safetensors"))
    expect = {}
    for k, v in state.items():
        key = re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.default(\.|$)", r".\1\2", k)
        key = re.sub(r"\.modules_to_save\.default\.", ".", key)
        expect[key] = v
    if set(written) != set(expect):
        raise AdapterWriteError(f"PEFT wrote tensors {sorted(set(written) ^ set(expect))[:4]} other than those built")
    for k, v in expect.items():
        w = written[k]
        if w.dtype != v.dtype or w.shape != v.shape or not torch.equal(w, v) or not torch.isfinite(w).all():
            raise AdapterWriteError(f"{folder}: tensor {k} as written differs from what was built")


def check_fnn_adapter(fit, directory, *, samples_per_shell: int = 64, seed: int = 0) -> dict:
    """Check an FNN adapter as written (``directory``, in its stored precision) against the adapted model
    that was built (``fit.model``, float64), on the fit's ball.

    The written factors and bias changes are read back, the network ``W_l + B̃_l Ã_l``, ``b_l + Δb̃_l`` is
    evaluated in float64 at points on spheres of radius ``R, R/10, ...`` down to ``min(R, 1)`` around the
    ball's centre (``samples_per_shell`` each, plus the centre), and the largest relative output error
    ``||f_written(x) - f_built(x)|| / ||f_built(x)||`` is compared with ``tolerance(κ, γ, dtype)``
    (:func:`lora_theory.numerics.tolerance`, the fit's own tolerance rule at the written precision). Large
    radii round the linearising biases with an absolute error near ``u·R·||W||``, which inputs of unit size
    see as a relative error near ``u·R``: such an adapter does not hold in that precision.

    Returns
    -------
    dict
        ``holds``, ``max_relative_error``, ``at_norm`` (the input norm where it occurred), ``tolerance``,
        ``dtype``, ``finite``.
    """
    from safetensors.numpy import load_file

    from lora_theory.numerics import tolerance

    directory = Path(directory)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    dtype = next(iter(tensors.values())).dtype.name
    frozen, built = fit.frozen, fit.model
    finite = all(np.isfinite(v).all() for v in tensors.values())
    tol = tolerance(fit.kappa, fit.gamma, dtype=np.dtype(dtype))
    result = {"dtype": dtype, "tolerance": float(tol), "finite": bool(finite)}
    if not finite:
        return result | {"holds": False, "max_relative_error": float("inf"), "at_norm": None}
    weights, biases = [], []
    for l, (W, b) in enumerate(zip(frozen.weights, frozen.biases)):
        pre = f"base_model.model.layers.{l}."
        W = np.asarray(W, np.float64).copy()
        b = np.asarray(b, np.float64).copy()
        if pre + "lora_A.weight" in tensors:
            with np.errstate(over="ignore", invalid="ignore"):
                W = W + tensors[pre + "lora_B.weight"].astype(np.float64) @ tensors[pre + "lora_A.weight"].astype(
                    np.float64
                )
        if pre + "lora_B.bias" in tensors:
            b = b + tensors[pre + "lora_B.bias"].astype(np.float64)
        weights.append(W)
        biases.append(b)
    if not all(np.isfinite(W).all() for W in weights):
        return result | {"holds": False, "max_relative_error": float("inf"), "at_norm": None}
    D = weights[0].shape[1]
    center = np.zeros(D) if fit.domain.center is None else np.asarray(fit.domain.center, np.float64)
    R = float(fit.domain.radius) if fit.domain.radius is not None else 1.0
    radii = [R]
    while radii[-1] / 10 >= min(R, 1.0) * (1 - 1e-12) and len(radii) < 400:
        radii.append(radii[-1] / 10)
    rng = np.random.default_rng(seed)
    pts = [center[None, :]]
    for r in radii:
        d = rng.standard_normal((samples_per_shell, D))
        pts.append(center + r * d / np.linalg.norm(d, axis=1, keepdims=True))
    X = np.concatenate(pts)  # (n, D)
    written = lora_forward(weights, biases, built, X)
    reference = lora_forward(built.weights, built.biases, built, X)
    with np.errstate(over="ignore", invalid="ignore"):
        num = np.linalg.norm(written - reference, axis=1)
        den = np.linalg.norm(reference, axis=1)
        rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), num)
    if not np.isfinite(rel).all() or not math.isfinite(tol):
        return result | {"holds": False, "max_relative_error": float("inf"), "at_norm": None}
    worst = int(np.argmax(rel))
    # the fit's own guarantee, at the written precision: ||f(x) - f̄(x)|| <= tolerance · s_out on the domain
    with np.errstate(over="ignore", invalid="ignore"):
        target = lora_forward(fit.target.weights, fit.target.biases, fit.target, X)
        absolute = float(np.max(np.linalg.norm(written - target, axis=1)))
        allowed = float(tol * fit.output_radius)
    # a relative tolerance of 1 or more bounds nothing: such a precision cannot hold the construction
    holds = bool(tol < 1 and rel[worst] <= tol and math.isfinite(allowed) and absolute <= allowed)
    return result | {
        "holds": holds,
        "max_relative_error": float(rel[worst]),
        "at_norm": float(np.linalg.norm(X[worst] - center)),
        "max_error_to_target": absolute,
        "allowed_error_to_target": allowed,
    }


def lora_forward(weights, biases, like, X):
    """Evaluate the MLP with ``like``'s activation convention (ReLU between layers, ``final_relu``) in float64."""
    h = np.asarray(X, np.float64)
    L = len(weights)
    with np.errstate(over="ignore", invalid="ignore"):
        for l, (W, b) in enumerate(zip(weights, biases)):
            h = h @ np.asarray(W).T + np.asarray(b)
            if like.activation == "relu" and (l < L - 1 or like.final_relu):
                h = np.maximum(h, 0.0)
    return h
