"""Safe reading of model checkpoints: safetensors, torch files with ``weights_only=True``, numpy ``.npz``.

Nothing here unpickles arbitrary objects. A file's format is recognised from its first bytes, not its name:

* safetensors: an 8-byte little-endian header length followed by a JSON header;
* torch zip files (``torch.save`` since 1.6) and legacy torch pickles: read with
  ``torch.load(..., weights_only=True)``, whose restricted unpickler accepts tensors and plain containers only
  and refuses every other global *before* calling it; a refusal is an :class:`UnsafeCheckpointError`;
* ``.npz`` archives: ``numpy.load(..., allow_pickle=False)``.

Floating tensors come back as float64 numpy arrays, with the storage dtype and its ``eps`` kept beside them
(the rank advisor's tolerance needs the storage precision, e.g. bfloat16's 7.8e-3, not float64's).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import lora_theory
from lora_theory.errors import LoraTheoryError

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "Checkpoint",
    "read_checkpoint",
    "checkpoint_format",
    "fnn_from_state_dict",
    "STATE_DICT_KEYS",
]

#: Keys under which training frameworks nest the state dict in a checkpoint (Lightning, plain scripts).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "params")


class CheckpointError(LoraTheoryError, ValueError):
    """A file is missing, is not a checkpoint, or holds no tensors. ``path`` names the file."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based file references objects other than tensors and containers; it was not executed."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The tensors of one checkpoint.

    Attributes
    ----------
    path : str
    format : str
        ``"safetensors"``, ``"torch"`` (zip), ``"torch-legacy"`` (pickle), ``"npz"``, or
        ``"directory"`` (shards merged).
    tensors : dict of str -> ndarray
        Floating tensors as float64 copies; integer and bool tensors in their own dtype.
    dtypes : dict of str -> str
        Storage dtype of every tensor (``"float32"``, ``"bfloat16"``, ``"int64"`` ...).
    eps : dict of str -> float
        Machine epsilon of the storage dtype of every floating tensor.
    source_key : str or None
        The key the state dict was nested under (``"state_dict"`` ...), if any.
    ignored : tuple of str
        Entries that were not tensors (step counters, hyperparameters) and were left out.
    """

    path: str
    format: str
    tensors: dict
    dtypes: dict
    eps: dict
    source_key: str | None = None
    ignored: tuple = ()
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)


def checkpoint_format(path) -> str:
    """The format of the file at ``path`` recognised from its first bytes (see module docstring).

    Raises
    ------
    CheckpointError
        Missing file, or none of the known formats.
    """
    path = Path(path)
    if path.is_dir():
        return "directory"
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(path, "is a damaged zip archive, not a checkpoint") from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(path, "is a zip archive but neither a torch checkpoint nor an .npz file")
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointError(
        path, "is not a checkpoint: expected safetensors, a torch.save file (zip or legacy) or an .npz archive"
    )


def _convert(path, name, value, tensors, dtypes, eps):
    if isinstance(value, torch.Tensor):
        if value.is_quantized:
            raise CheckpointError(path, f"tensor {name!r} is quantised ({value.dtype}); dequantise it first")
        if value.layout != torch.strided:
            value = value.to_dense()
        t = value.detach().cpu()
        dtypes[name] = str(t.dtype).replace("torch.", "")
        if t.is_floating_point():
            eps[name] = float(torch.finfo(t.dtype).eps)
            tensors[name] = t.to(torch.float64).numpy().copy()
        else:
            tensors[name] = t.numpy().copy()
    else:
        arr = np.asarray(value)
        dtypes[name] = str(arr.dtype)
        if np.issubdtype(arr.dtype, np.floating):
            eps[name] = float(np.finfo(arr.dtype).eps)
            tensors[name] = arr.astype(np.float64)
        else:
            tensors[name] = arr


def _read_safetensors(path):
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"is not a readable safetensors file ({exc})") from None
    return out, dict(metadata)


def _refusal_reason(exc) -> str:
    """The line of torch's refusal that names the offending global (its message is long)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "global" in ln.lower() or "unsupported" in ln.lower():
            return ln
    return lines[0] if lines else type(exc).__name__


def _torch_load(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes from the restricted unpickler
            # a file object, not the name: torch.load dispatches on a ".safetensors" suffix by itself
            with open(path, "rb") as fh:
                return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            path,
            "refused: the pickle references objects other than tensors and plain containers, so "
            f"loading it could run code; it was not executed ({_refusal_reason(exc)})",
        ) from None
    except Exception as exc:  # damaged archives, unknown storage types
        raise CheckpointError(path, f"could not be read as a torch checkpoint ({type(exc).__name__}: {exc})") from None


def _state_dict(path, obj):
    """The ``name -> tensor`` mapping in a loaded torch object, and the key it was nested under."""
    if isinstance(obj, torch.Tensor):
        raise CheckpointError(path, "holds a single tensor, not a state dict (name -> tensor)")
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, key
    raise CheckpointError(
        path, f"holds no tensors at its top level nor under {list(STATE_DICT_KEYS)} (keys: {list(obj)[:10]})"
    )


def _read_file(path, fmt):
    metadata = {}
    if fmt == "safetensors":
        raw, metadata = _read_safetensors(path)
        source = None
    elif fmt in ("torch", "torch-legacy"):
        raw, source = _state_dict(path, _torch_load(path))
    elif fmt == "npz":
        try:
            with np.load(str(path), allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        except ValueError as exc:  # object arrays need pickle: refused
            raise UnsafeCheckpointError(path, f"refused: holds pickled object arrays ({exc})") from None
        source = None
    else:  # pragma: no cover - checkpoint_format returns only the formats above
        raise CheckpointError(path, f"unknown format {fmt}")
    return raw, source, metadata


def read_checkpoint(path) -> Checkpoint:
    """Read the tensors of a checkpoint file (or of every shard in a directory) without unpickling objects.

    Parameters
    ----------
    path : str or Path
        A safetensors file, a ``torch.save`` file (zip or legacy; a state dict, possibly nested under one of
        :data:`STATE_DICT_KEYS`), an ``.npz`` archive, or a directory: its ``*.safetensors`` shards, or else
        its ``*.bin`` / ``*.pt`` / ``*.pth`` files, merged.

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        Missing file, unknown format, damaged file, no tensors, a key present in two shards.
    UnsafeCheckpointError
        A pickle that references anything but tensors and containers (refused by torch's ``weights_only``
        unpickler before any of it runs) or an ``.npz`` with object arrays.
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "directory":
        files = sorted(path.glob("*.safetensors")) or sorted(
            p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext)
        )
        if not files:
            raise CheckpointError(path, "is a directory without *.safetensors, *.bin, *.pt or *.pth files")
        parts = [(f, checkpoint_format(f)) for f in files]
    else:
        parts = [(path, fmt)]
    tensors, dtypes, eps, ignored, metadata, source = {}, {}, {}, [], {}, None
    for file, file_fmt in parts:
        raw, source, meta = _read_file(file, file_fmt)
        metadata.update(meta)
        for name, value in raw.items():
            if name in tensors:
                raise CheckpointError(path, f"tensor {name!r} appears in more than one shard")
            if isinstance(value, (torch.Tensor, np.ndarray)):
                _convert(file, name, value, tensors, dtypes, eps)
            else:
                ignored.append(name)
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    return Checkpoint(
        path=str(path),
        format=fmt,
        tensors=tensors,
        dtypes=dtypes,
        eps=eps,
        source_key=source,
        ignored=tuple(ignored),
        metadata=metadata,
    )


def fnn_from_state_dict(
    tensors, *, activation: str = "relu", final_relu: bool = True, path: str = "state dict"
) -> lora_theory.FNN:
    """A :class:`lora_theory.FNN` from ``layers.{l}.weight`` / ``layers.{l}.bias`` tensors (a TorchFNN's state dict).

    Raises
    ------
    CheckpointError
        No ``layers.0.weight``, gaps in the layer numbers, non-square or mismatched shapes, other keys.
    """
    if isinstance(tensors, Checkpoint):
        path, tensors = tensors.path, tensors.tensors
    depth = 0
    while f"layers.{depth}.weight" in tensors:
        depth += 1
    if depth == 0:
        raise CheckpointError(path, "has no 'layers.0.weight': not a plain MLP with layers.{l} = nn.Linear(D, D)")
    expected = {f"layers.{l}.{p}" for l in range(depth) for p in ("weight", "bias")}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise CheckpointError(path, f"is not a plain MLP: unexpected tensors {unknown[:8]}")
    weights = [np.asarray(tensors[f"layers.{l}.weight"], dtype=np.float64) for l in range(depth)]
    biases = [
        np.asarray(tensors.get(f"layers.{l}.bias", np.zeros(weights[l].shape[0])), dtype=np.float64)
        for l in range(depth)
    ]
    try:
        return lora_theory.FNN(weights, biases, activation=activation, final_relu=final_relu)
    except ValueError as exc:
        raise CheckpointError(path, f"is not a plain width-D MLP ({exc})") from None
