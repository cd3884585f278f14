"""Where the weight matrices of a checkpoint are, and how PEFT adapts each of them.

A checkpoint is a flat ``name -> tensor`` map; which of its 2-D tensors is a layer, in which layout, and in
which order the model uses them is defined by the model's code. With a ``config.json`` naming an architecture
that ``transformers`` knows, :func:`layout` builds that model on PyTorch's ``meta`` device (no memory, no
download) and reads the answer off its modules:

* ``nn.Linear``: weight stored ``(out, in)``; LoRA ``ΔW = B A`` with ``A`` ``r x in``, ``B`` ``out x r``;
* ``transformers.pytorch_utils.Conv1D`` (GPT-2 family): weight stored ``(in, out)``; the logical matrix is its
  transpose, and PEFT adapts it with ``fan_in_fan_out=True``. A fused projection (GPT-2's ``c_attn``, queries,
  keys and values side by side) is one module and gets one adapter;
* ``nn.Embedding``: weight stored ``(num_embeddings, dim)``; seen as a linear map of one-hot vectors its
  logical matrix is the transpose, ``dim x num_embeddings``, and PEFT's embedding form stores
  ``lora_embedding_A`` (``r x num_embeddings``) and ``lora_embedding_B`` (``dim x r``). PEFT refuses
  ``lora_bias`` there;
* tied weights (a language-model head sharing the input embedding) are one tensor, analysed once; every
  module that uses it is listed in :attr:`MatrixSpec.tied`;
* 1-D tensors (norm scales, biases) and the modules they belong to: changed ones travel in PEFT's
  ``modules_to_save``.

Without a ``config.json`` (a plain state dict), every 2-D ``<module>.weight`` is an ``nn.Linear`` and the
order is the file's, with numbered parts sorted as numbers (``layers.2`` before ``layers.10``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MatrixSpec", "VectorSpec", "Layout", "layout", "natural_key", "MissingExtraError", "require"]

#: Extras of the ``lora-theory`` package that provide each optional import.
EXTRAS = {
    "safetensors": "verify",
    "peft": "peft",
    "transformers": "peft",
    "torch": "verify",
    "matplotlib": "verify",
    "tqdm": "verify",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the ``lora-theory`` extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(
            f"{module} is not installed: pip install 'lora-theory[{extra}]' (or pip install {module.split('.')[0]})"
        ) from None


def natural_key(name: str):
    """Sort key that orders numbered parts as numbers (``h.2`` before ``h.10``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p != ""]


@dataclass(frozen=True)
class MatrixSpec:
    """One weight matrix of the model.

    Attributes
    ----------
    name : str
        The module path (PEFT's ``target_modules`` entry), e.g. ``transformer.h.0.attn.c_attn``.
    weight_key : str
        The checkpoint key of the weight tensor.
    bias_key : str or None
        The checkpoint key of the module's bias.
    kind : str
        ``"linear"``, ``"conv1d"`` (stored ``(in, out)``) or ``"embedding"`` (stored ``(num, dim)``).
    stored_shape : tuple of int
        The tensor's shape as stored.
    tied : tuple of (str, str)
        Other modules using the same weight tensor (a tied language-model head), in model order, with their
        kinds.
    """

    name: str
    weight_key: str
    bias_key: str | None
    kind: str
    stored_shape: tuple
    tied: tuple = ()

    @property
    def transposed(self) -> bool:
        """Whether the logical ``(out, in)`` matrix is the transpose of the stored tensor."""
        return self.kind in ("conv1d", "embedding")

    @property
    def shape(self) -> tuple:
        """``(out, in)`` of the logical matrix (an embedding: ``(dim, num_embeddings)``)."""
        return tuple(reversed(self.stored_shape)) if self.transposed else tuple(self.stored_shape)


@dataclass(frozen=True)
class VectorSpec:
    """A 1-D tensor (norm scale, bias) and the module that owns it (the ``modules_to_save`` entry)."""

    key: str
    module: str
    stored_shape: tuple


@dataclass(frozen=True)
class Layout:
    """The matrices and vectors of a checkpoint in model order.

    Attributes
    ----------
    matrices : tuple of MatrixSpec
    vectors : tuple of VectorSpec
        1-D tensors that are not the bias of a listed matrix.
    other : tuple of (key, reason)
        Tensors that are neither (scalars, 3-D kernels, integer buffers).
    architecture : str or None
        The ``transformers`` class the layout was read from (``None``: a plain state dict).
    config : dict or None
        The ``config.json`` contents.
    """

    matrices: tuple
    vectors: tuple
    other: tuple = ()
    architecture: str | None = None
    config: dict | None = field(default=None, repr=False)
    note: str | None = None

    def matrix(self, name: str) -> MatrixSpec:
        for m in self.matrices:
            if m.name == name:
                return m
        raise KeyError(name)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _generic(shapes: dict, dtypes: dict, order) -> Layout:
    matrices, vectors, other, biases = [], [], [], set()
    for key in order:
        shape = tuple(shapes[key])
        if not _is_float(dtypes[key]):
            other.append((key, f"non-float tensor ({dtypes[key]})"))
            continue
        if len(shape) == 2 and key.endswith(".weight") and min(shape) > 0:
            module = _module_of(key)
            bias = module + ".bias"
            has_bias = bias in shapes and tuple(shapes[bias]) == (shape[0],)
            matrices.append(MatrixSpec(module, key, bias if has_bias else None, "linear", shape))
            if has_bias:
                biases.add(bias)
    for key in order:
        shape = tuple(shapes[key])
        if key in biases or not _is_float(dtypes[key]):
            continue
        if len(shape) == 1:
            vectors.append(VectorSpec(key, _module_of(key), shape))
        elif not (len(shape) == 2 and key.endswith(".weight") and min(shape) > 0):
            other.append(
                (
                    key,
                    "scalar"
                    if not shape
                    else "empty"
                    if 0 in shape
                    else f"{len(shape)}-D tensor"
                    if len(shape) != 2
                    else "2-D tensor that is not a module weight",
                )
            )
    return Layout(tuple(matrices), tuple(vectors), tuple(other))


def _is_float(dtype: str) -> bool:
    return "float" in str(dtype)


def read_config(folder) -> dict | None:
    """The ``config.json`` of a model folder, or ``None``."""
    if folder is None:
        return None
    p = Path(folder)
    p = p if p.is_dir() else p.parent
    cfg = p / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None


def _meta_model(config: dict):
    """The ``transformers`` model named by ``config["architectures"][0]``, built on the meta device."""
    transformers = require("transformers")
    torch = require("torch")
    names = config.get("architectures") or []
    if not names or not hasattr(transformers, names[0]):
        return None, None
    cls = getattr(transformers, names[0])
    cfg_cls = transformers.AutoConfig.for_model(config["model_type"]).__class__ if "model_type" in config else None
    cfg = (cfg_cls or transformers.PretrainedConfig).from_dict(config)
    with torch.device("meta"):
        model = cls._from_config(cfg)
    return model, names[0]


def _kind(mod) -> str:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (
        "conv1d"
        if isinstance(mod, Conv1D)
        else "embedding"
        if isinstance(mod, torch.nn.Embedding)
        else "linear"
        if isinstance(mod, torch.nn.Linear)
        else type(mod).__name__
    )


def layout(shapes: dict, dtypes: dict, *, folder=None, order=None) -> Layout:
    """The :class:`Layout` of a checkpoint from its tensor shapes and dtypes (module docstring).

    Parameters
    ----------
    shapes, dtypes : mapping of str -> tuple / str
        Every tensor's stored shape and dtype name (``"float32"``, ``"bfloat16"`` ...).
    folder : path, optional
        The model folder (or a file in it); its ``config.json``, if any, names the architecture.
    order : sequence of str, optional
        The keys in file order (default: natural sort).
    """
    order = list(order) if order is not None else sorted(shapes, key=natural_key)
    config = read_config(folder)
    if config is None or not config.get("architectures"):
        return _generic(shapes, dtypes, order if order else sorted(shapes, key=natural_key))
    try:
        model, arch = _meta_model(config)
    except MissingExtraError:
        raise
    except Exception as exc:  # a config transformers cannot build
        model, arch = None, f"{(config.get('architectures') or ['?'])[0]} ({type(exc).__name__}: {exc})"
    if model is None:
        generic = _generic(shapes, dtypes, sorted(shapes, key=natural_key))
        name = arch or (config.get("architectures") or ["?"])[0]
        return Layout(
            generic.matrices,
            generic.vectors,
            generic.other,
            None,
            config,
            note=f"config.json names {name}, which this transformers cannot build: every 2-D weight is "
            "read as an nn.Linear stored (out, in); a Conv1D-style (in, out) layer would be "
            "transposed wrongly",
        )
    import torch
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    # parameters in model order, with every name a shared tensor has
    seen, params = {}, []
    for pname, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(pname)
        params.append((pname, id(p)))
    matrices, vectors, other, used = [], [], [], set()
    done_ids = set()
    for _pname, pid in params:
        if pid in done_ids:
            continue
        done_ids.add(pid)
        aliases = seen[pid]
        key = next((a for a in aliases if a in shapes), None)
        if key is None:
            continue
        used.update(a for a in aliases if a in shapes)
        shape = tuple(shapes[key])
        if not _is_float(dtypes[key]):
            other.append((key, f"non-float tensor ({dtypes[key]})"))
            continue
        module = _module_of(key)
        mod = modules.get(module)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) == 2 and isinstance(mod, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
            kind = _kind(mod)
            bias = module + ".bias"
            has_bias = kind != "embedding" and getattr(mod, "bias", None) is not None and bias in shapes
            tied = tuple((_module_of(a), _kind(modules.get(_module_of(a)))) for a in aliases if a != key)
            matrices.append(MatrixSpec(module, key, bias if has_bias else None, kind, shape, tied))
        elif len(shape) == 1:
            if leaf == "bias" and any(m.bias_key == key for m in matrices):
                continue
            vectors.append(VectorSpec(key, module, shape))
        else:
            other.append(
                (
                    key,
                    "scalar"
                    if not shape
                    else f"{len(shape)}-D tensor"
                    if len(shape) != 2
                    else f"2-D parameter of a {type(mod).__name__} (not a Linear, Conv1D or Embedding)",
                )
            )
    bias_keys = {m.bias_key for m in matrices if m.bias_key}
    vectors = [v for v in vectors if v.key not in bias_keys]
    for key in sorted(set(shapes) - used - bias_keys, key=natural_key):
        # buffers and tensors the model does not declare as parameters
        other.append((key, "not a parameter of " + arch))
    return Layout(tuple(matrices), tuple(vectors), tuple(other), arch, config)
