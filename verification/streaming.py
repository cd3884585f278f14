"""Checkpoints read one tensor at a time, and the spectrum of every layer's change computed one layer at a time.

:class:`TensorSource` opens a checkpoint lazily. A folder with ``model.safetensors.index.json`` (Hugging Face
shards) reads each tensor from the file the index names, so a folder that also holds a
``consolidated.safetensors`` (the same weights in one file) is read once; a folder with one
``*.safetensors`` file, or several without an index, reads them all (a tensor in two files is refused). A
safetensors tensor is read from its file when asked for (``safe_open``: memory-mapped, nothing else loaded).
torch and ``.npz`` files cannot be read in parts: they are loaded whole
(:func:`~verification.checkpoints.read_checkpoint`).

:func:`stream_spectra` walks the :class:`~verification.architectures.Layout` in model order: for each matrix
it reads the base and tuned tensors, forms ``ΔW`` in float32 on the chosen device (float64 when a stored
tensor is float64, whose rounding float32 could not resolve), takes its singular values and drops ``ΔW``
before the next layer. Peak memory is a few copies of the largest tensor, whatever the model size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import Layout, natural_key, require
from .architectures import layout as build_layout
from .checkpoints import CheckpointError, checkpoint_format

__all__ = [
    "TensorSource",
    "LayerSpectrum",
    "VectorChange",
    "stream_spectra",
    "open_pair",
    "resized_rows",
    "partial_spectrum_of",
]

INDEX_NAME = "model.safetensors.index.json"


class TensorSource:
    """Lazy read access to the tensors of a checkpoint file or folder (module docstring).

    Attributes
    ----------
    path : str
    files : dict of str -> str
        Which file holds each tensor.
    shapes, dtypes : dict of str -> tuple / str
    order : list of str
        The keys in file order (the index's order for shards).
    metadata : dict
    """

    #: keep one memory-mapped handle per shard open between reads (``False``: reopen per tensor)
    keep_open = False

    def __init__(self, path):
        self.path = str(path)
        self._handles, self._eager = {}, None
        p = Path(path)
        fmt = checkpoint_format(p)
        self.folder = p if fmt == "directory" else p.parent
        if fmt == "directory":
            index = p / INDEX_NAME
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(index, f"is not a shard index ({exc})") from None
                files = {k: str(p / f) for k, f in weight_map.items()}
                missing = sorted({f for f in files.values() if not Path(f).is_file()})
                if missing:
                    raise CheckpointError(index, f"names shards that are not in the folder: {missing[:4]}")
            else:
                shards = sorted(p.glob("*.safetensors"))
                if not shards:
                    self._load_eager(p)
                    return
                files = {}
                for f in shards:
                    for k in self._open(str(f)).keys():
                        if k in files:
                            raise CheckpointError(
                                p,
                                f"tensor {k!r} is in {Path(files[k]).name} and {f.name}, and the folder has no "
                                f"{INDEX_NAME} saying which to read",
                            )
                        files[k] = str(f)
            self.files = files
        elif fmt == "safetensors":
            self.files = {k: str(p) for k in self._open(str(p)).keys()}
        else:
            self._load_eager(p)
            return
        self.shapes, self.dtypes = {}, {}
        for k, f in self.files.items():
            sl = self._open(f).get_slice(k)
            self.shapes[k] = tuple(sl.get_shape())
            self.dtypes[k] = _dtype_name(sl.get_dtype())
        self.order = list(self.files)
        self.metadata = {}
        self._handles = {}  # the headers are read; no map stays open between reads

    def _load_eager(self, p):
        from .checkpoints import read_checkpoint

        ck = read_checkpoint(p)
        self._eager = ck
        self.files = {k: str(p) for k in ck.tensors}
        self.shapes = {k: tuple(v.shape) for k, v in ck.tensors.items()}
        self.dtypes = dict(ck.dtypes)
        self.order = list(ck.tensors)
        self.metadata = dict(ck.metadata)

    def _open(self, f):
        if f not in self._handles:
            safetensors = require("safetensors")
            try:
                self._handles[f] = safetensors.safe_open(f, framework="pt")
            except Exception as exc:
                raise CheckpointError(f, f"is not a readable safetensors file ({exc})") from None
        return self._handles[f]

    def keys(self):
        return list(self.order)

    def get(self, key):
        """The tensor ``key`` as stored (a torch tensor on the CPU)."""
        import torch

        if self._eager is not None:
            arr = self._eager.tensors[key]
            t = torch.from_numpy(np.ascontiguousarray(arr))
            stored = self.dtypes[key]
            if stored in ("bfloat16", "float16", "float32") and t.dtype == torch.float64:
                t = t.to(getattr(torch, stored))
            return t
        if not self.keep_open:
            # a fresh handle per tensor: its memory map (and the file pages it touched, which count in the
            # process's resident memory) is released when the handle is dropped, instead of accumulating
            # over every shard of both checkpoints
            safetensors = require("safetensors")
            with safetensors.safe_open(self.files[key], framework="pt") as handle:
                return handle.get_tensor(key)
        return self._open(self.files[key]).get_tensor(key)

    def layout(self) -> Layout:
        return build_layout(self.shapes, self.dtypes, folder=self.folder, order=sorted(self.order, key=natural_key))


def _dtype_name(code: str) -> str:
    return {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }.get(code, code.lower())


def open_pair(base_path, tuned_path):
    """Both sources and the base's layout; the tuned checkpoint must hold the same tensors.

    A 2-D tensor whose first dimension grew (a resized vocabulary) is allowed; every other shape difference,
    and a tensor present in one checkpoint only, raises :class:`CheckpointError`.
    """
    base, tuned = TensorSource(base_path), TensorSource(tuned_path)
    missing = [k for k in base.shapes if k not in tuned.shapes]
    extra = [k for k in tuned.shapes if k not in base.shapes]
    if missing or extra:
        parts = ([f"missing from tuned: {missing[:6]}"] if missing else []) + (
            [f"only in tuned: {extra[:6]}"] if extra else []
        )
        raise CheckpointError(tuned_path, "does not have the base's architecture (" + "; ".join(parts) + ")")
    for k, s in base.shapes.items():
        t = tuned.shapes[k]
        if (
            s != t
            and not (len(s) == len(t) == 2 and s[1] == t[1] and t[0] > s[0])
            and not (len(s) == len(t) == 1 and t[0] > s[0])
        ):
            raise CheckpointError(
                tuned_path, f"tensor {k!r} has shape {t} but the base has {s}: the architectures differ"
            )
    return base, tuned, base.layout()


def resized_rows(base_shape, tuned_shape) -> int:
    """How many rows the tuned tensor added (a resized vocabulary), 0 when the shapes agree."""
    return int(tuned_shape[0]) - int(base_shape[0]) if tuple(base_shape) != tuple(tuned_shape) else 0


@dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """The singular values of one layer's change, and what the noise floor and the report need.

    Attributes
    ----------
    spec : MatrixSpec
    shape : tuple (out, in)
        The logical shape compared (a resized vocabulary: the common rows only).
    dtypes : tuple of str
        Storage dtypes of the base and tuned weight.
    singular_values : ndarray (min(out, in),) or (b,)
        ``σ(ΔW)`` in float64, descending (computed in ``compute_dtype``); with a partial spectrum the ``b``
        computed leading values (``partial``).
    compute_dtype : str
    base_fro, delta_fro : float
        ``||W_base||_F`` and ``||ΔW||_F``.
    new_rows : int
        Rows (vocabulary entries) the tuned tensor added; not part of ``ΔW``.
    floor : object
        What ``floor_fn(W_base, W_tuned, dtypes)`` returned (the storage-rounding noise floor), or ``None``.
    bias_change : ndarray (out,) or None
    bias_dtypes : tuple of str or None
    partial : PartialSpectrum or None
        The certified partial spectrum, when one was used.
    spectrum : str
        ``"full"`` or ``"partial"``: which was used.
    spectrum_note : str or None
        Why ``--spectrum auto`` took the full spectrum.
    """

    spec: object
    shape: tuple
    dtypes: tuple
    singular_values: np.ndarray
    compute_dtype: str
    base_fro: float
    delta_fro: float
    new_rows: int = 0
    floor: object = None
    bias_change: np.ndarray | None = None
    bias_base: np.ndarray | None = field(default=None, repr=False)
    bias_tuned: np.ndarray | None = field(default=None, repr=False)
    bias_dtypes: tuple | None = None
    partial: object = field(default=None, repr=False)
    spectrum: str = "full"
    spectrum_note: str | None = None


@dataclass(frozen=True, eq=False)
class VectorChange:
    """A changed or unchanged 1-D tensor (norm scale, bias without a matrix)."""

    spec: object
    dtypes: tuple
    change: np.ndarray = field(repr=False)
    base: np.ndarray = field(repr=False)
    tuned: np.ndarray = field(repr=False)
    new_rows: int = 0

    @property
    def changed(self) -> bool:
        return bool(np.any(self.change != 0)) or self.new_rows > 0


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device", "cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def _compute_dtype(*dtypes):
    import torch

    return torch.float64 if "float64" in dtypes else torch.float32


#: Unit roundoff ``u`` and smallest subnormal ``η`` of each storage dtype (round to nearest).
ROUNDOFF = {
    "float64": (2.0**-53, 2.0**-1074),
    "float32": (2.0**-24, 2.0**-149),
    "float16": (2.0**-11, 2.0**-24),
    "bfloat16": (2.0**-8, 2.0**-133),
}


def rounding_statistics(w0, w1, dtypes, *, block_rows: int = 1024) -> dict:
    """The statistics of the entrywise rounding bound ``B = u_b|W_base| + u_t|W_tuned| + η_b + η_t`` of a stored
    change, computed on the tensors' device in blocks of rows (no full-size copy of ``B``).

    Returns ``{"shape", "row_max", "col_max", "entry_max", "frobenius"}`` (``max_i ||B_i,:||``,
    ``max_j ||B_:,j||``, ``max B_ij``, ``||B||_F``): the fields of :class:`lora_theory.RoundingBounds`. The
    subnormal terms are added through the triangle inequality (``+ η·sqrt(n)`` to a row norm ...), so every
    statistic is an upper bound of the exact one. Sums run in float64 over float32 blocks and squares
    (float64 blocks when a stored tensor is float64 or an entry is beyond 1e18, where float32 squares could
    overflow).
    """
    import torch

    (ub, eb), (ut, et) = ROUNDOFF[str(dtypes[0])], ROUNDOFF[str(dtypes[1])]
    m, n = w0.shape
    big = max(float(w0.abs().max()), float(w1.abs().max())) if w0.numel() else 0.0
    cd = torch.float64 if "float64" in dtypes or big > 1e18 else torch.float32
    row_max, entry_max = 0.0, 0.0
    col_sq = torch.zeros(n, dtype=torch.float64, device=w0.device)
    fro_sq = 0.0
    for start in range(0, m, block_rows):
        a = w0[start : start + block_rows].to(cd, copy=True).abs_().mul_(ub)
        a.add_(w1[start : start + block_rows].to(cd).abs_(), alpha=ut)  # (rows, n): B without η
        sq = a.square()  # float32 squares stay finite below 1e18
        rows = sq.sum(dim=1, dtype=torch.float64)
        row_max = max(row_max, float(rows.max()))
        col_sq += sq.sum(dim=0, dtype=torch.float64)
        fro_sq += float(rows.sum())
        entry_max = max(entry_max, float(a.max()))
        del a, sq, rows
    eta = eb + et
    import math

    # float32 blocks round each entry of B by a relative 2^-24 at most (two products and a sum): widen by
    # 2^-20 so that every statistic stays an upper bound
    up = 1.0 + (2.0**-20 if cd == torch.float32 else 2.0**-48)
    return {
        "shape": (int(m), int(n)),
        "row_max": up * math.sqrt(row_max) + eta * math.sqrt(n),
        "col_max": up * math.sqrt(float(col_sq.max())) + eta * math.sqrt(m),
        "entry_max": up * entry_max + eta,
        "frobenius": up * math.sqrt(fro_sq) + eta * math.sqrt(m * n),
    }


def svdvals_tall(matrix):
    """``torch.linalg.svdvals`` of the tall orientation (rows >= columns): the same singular values, and on a
    CPU 2.5 times faster for a 1024 x 32000 matrix than of that matrix as given (measured, one thread)."""
    import torch

    return torch.linalg.svdvals(matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T)


#: ``--spectrum auto`` takes the full spectrum of a matrix whose short side is below this: its ``svdvals`` is
#: cheap, and a block of 16 or more singular values would be a large share of it.
PARTIAL_MIN_SIDE = 256

SPECTRUM_CHOICES = ("auto", "full", "partial")


def partial_spectrum_of(delta, thresholds_of, *, block: int = 16, block_rows: int = 1024, seed: int = 0):
    """:func:`lora_theory.partial_spectrum.partial_spectrum_from_blocks` of a torch matrix (any device), in
    its tall orientation, read in float64 row blocks of ``block_rows`` (one block in host memory at a time).

    ``thresholds_of(σ̂_1)`` returns the thresholds whose counts the caller needs; the first is certified
    (THEORY.md §5.5), the others are read from the same bounds. Returns the :class:`PartialSpectrum` and
    whether every count is settled.
    """
    import torch

    from lora_theory.partial_spectrum import partial_spectrum_from_blocks

    a = delta if delta.shape[0] >= delta.shape[1] else delta.T  # (m, n), m >= n

    def blocks():
        for start in range(0, a.shape[0], block_rows):
            yield a[start : start + block_rows].to(torch.float64).cpu().numpy()  # (rows, n) float64

    part = partial_spectrum_from_blocks(tuple(a.shape), blocks, lambda s1: thresholds_of(s1)[0], block=block, seed=seed)
    s1 = float(part.values[0]) if part.values.size else 0.0
    settled = all(lo == hi for lo, hi in (part.count(t) for t in thresholds_of(s1)))
    return part, settled


def logical(tensor, spec, rows=None):
    """The stored tensor as the ``(out, in)`` matrix of its module (first ``rows`` stored rows only)."""
    if rows is not None:
        tensor = tensor[:rows]
    return tensor.T if spec.transposed else tensor


def stream_spectra(
    base: TensorSource,
    tuned: TensorSource,
    lay: Layout,
    *,
    device: str = "cpu",
    floor_fn=None,
    progress: bool = True,
    spectrum: str = "full",
    thresholds_fn=None,
):
    """Yield a :class:`LayerSpectrum` per matrix of ``lay`` in model order, then a :class:`VectorChange` per
    vector; one layer in memory at a time (module docstring).

    Parameters
    ----------
    floor_fn : callable, optional
        ``floor_fn(W_base, W_tuned, dtypes) -> object``, called with the two logical matrices (torch tensors
        in their storage dtype on the device, common rows only) and their storage dtype names: where the
        storage-rounding noise floor of the layer is computed.
    progress : bool
        A tqdm bar over layers on stderr.
    spectrum : "full", "partial" or "auto"
        ``"full"``: every singular value (``svdvals``). ``"partial"``: a certified partial spectrum
        (:func:`partial_spectrum_of`; its counts may be left as intervals). ``"auto"``: partial, and the full
        spectrum where a count is not settled or the short side is below :data:`PARTIAL_MIN_SIDE`.
    thresholds_fn : callable
        ``thresholds_fn(floor, shape, compute_dtype) -> thresholds_of``, with ``thresholds_of(σ̂_1)`` the
        thresholds whose counts are needed (the first certified); required unless ``spectrum="full"``.
    """
    import torch

    if spectrum not in SPECTRUM_CHOICES:
        raise CheckpointError("--spectrum", f"must be one of {', '.join(SPECTRUM_CHOICES)}, got {spectrum!r}")
    if spectrum != "full" and thresholds_fn is None:
        raise CheckpointError("--spectrum", "a partial spectrum needs the thresholds it must settle")
    dev = _device(device)
    items = list(lay.matrices)
    bar = None
    if progress:
        tqdm = require("tqdm").tqdm
        bar = tqdm(total=len(items) + len(lay.vectors), desc="layers", unit="layer", leave=False)
    try:
        for spec in items:
            w0 = base.get(spec.weight_key)
            w1 = tuned.get(spec.weight_key)
            d0, d1 = base.dtypes[spec.weight_key], tuned.dtypes[spec.weight_key]
            rows = w0.shape[0] if w1.shape[0] != w0.shape[0] else None
            new_rows = resized_rows(w0.shape, w1.shape)
            if rows is not None:
                w1 = w1[:rows]
            cd = _compute_dtype(d0, d1)
            # ΔW in one buffer: the tuned tensor converted, the base subtracted in place (no third copy)
            delta = logical(w1, spec).to(dev, cd, copy=True)  # (out, in)
            w0d = logical(w0, spec).to(dev)
            delta.sub_(w0d)
            shape = tuple(delta.shape)
            base_fro = float(torch.linalg.vector_norm(w0d, dtype=cd))
            floor = floor_fn(w0d, logical(w1, spec).to(dev), (d0, d1)) if floor_fn is not None else None
            del w0, w1, w0d
            delta_fro = float(torch.linalg.vector_norm(delta))
            part, used, note = None, "full", None
            if spectrum == "partial" or (spectrum == "auto" and min(shape) >= PARTIAL_MIN_SIDE):
                cname = str(cd).replace("torch.", "")
                part, settled = partial_spectrum_of(delta, thresholds_fn(floor, shape, cname))
                used = "partial"
                if not settled and spectrum == "auto":
                    note = (
                        f"partial spectrum unsettled (counts {part.rank_lower}..{part.rank_upper} with block "
                        f"{part.block}): full spectrum computed"
                    )
                    part, used = None, "full"
            elif spectrum == "auto":
                note = f"short side below {PARTIAL_MIN_SIDE}: full spectrum"
            s = part.values if part is not None else svdvals_tall(delta).double().cpu().numpy()  # (k,)
            del delta
            bias = None, None, None, None
            if spec.bias_key is not None:
                b0 = base.get(spec.bias_key).double()
                b1 = tuned.get(spec.bias_key).double()[: b0.shape[0]]
                bias = (
                    (b1 - b0).numpy(),
                    b0.numpy(),
                    b1.numpy(),
                    (base.dtypes[spec.bias_key], tuned.dtypes[spec.bias_key]),
                )
            yield LayerSpectrum(
                spec=spec,
                shape=shape,
                dtypes=(d0, d1),
                singular_values=s,
                compute_dtype=str(cd).replace("torch.", ""),
                base_fro=base_fro,
                delta_fro=delta_fro,
                new_rows=new_rows,
                floor=floor,
                bias_change=bias[0],
                bias_base=bias[1],
                bias_tuned=bias[2],
                bias_dtypes=bias[3],
                partial=part,
                spectrum=used,
                spectrum_note=note,
            )
            if bar is not None:
                bar.update(1)
        for v in lay.vectors:
            x0 = base.get(v.key).double()
            x1 = tuned.get(v.key).double()
            n = x0.shape[0]
            yield VectorChange(
                spec=v,
                dtypes=(base.dtypes[v.key], tuned.dtypes[v.key]),
                change=(x1[:n] - x0).numpy(),
                base=x0.numpy(),
                tuned=x1.numpy(),
                new_rows=int(x1.shape[0] - n),
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
