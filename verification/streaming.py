"""Checkpoints read one tensor at a time, and the spectrum of every layer's change computed one layer at a time.

:class:`TensorSource` opens a checkpoint lazily. A folder with ``model.safetensors.index.json`` (Hugging Face
shards) reads each tensor from the file the index names, so a folder that also holds a
``consolidated.safetensors`` (the same weights in one file) is read once; a folder with one
``*.safetensors`` file, or several without an index, reads them all (a tensor in two files is refused). A
safetensors tensor is read from its file when asked for (``safe_open``: memory-mapped, nothing else loaded).
torch and ``.npz`` files cannot be read in parts: they are loaded whole
(:func:`~verification.checkpoints.read_checkpoint`).

:func:`stream_spectra` walks the :class:`~verification.architectures.Layout` in model order: for each matrix
it reads the base and tuned tensors in blocks of stored rows (:meth:`TensorSource.get_rows`, about
:data:`BLOCK_ELEMENTS` entries each), writes ``ΔW`` block by block into one preallocated float32 array on the
chosen device (float64 when a stored tensor is float64, whose rounding float32 could not resolve), gathers
the statistics of the rounding bound and ``||W_base||_F`` from the same blocks (:class:`RoundingStatistics`),
takes the singular values of ``ΔW`` and drops it before the next layer. Neither stored tensor is ever whole
in memory: peak memory is the one ``ΔW`` array, the spectrum's workspace and a few blocks, whatever the
model size.
"""

from __future__ import annotations

import json
import math
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
    "layer_delta",
    "RoundingStatistics",
    "rounding_statistics",
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

    def _eager_tensor(self, key, arr):
        """``arr`` (the loaded tensor ``key`` or some of its rows) as a torch tensor in its storage dtype."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(arr))
        stored = self.dtypes[key]
        if stored in ("bfloat16", "float16", "float32") and t.dtype == torch.float64:
            t = t.to(getattr(torch, stored))
        return t

    def get(self, key):
        """The tensor ``key`` as stored (a torch tensor on the CPU)."""
        if self._eager is not None:
            return self._eager_tensor(key, self._eager.tensors[key])
        if not self.keep_open:
            # a fresh handle per tensor: its memory map (and the file pages it touched, which count in the
            # process's resident memory) is released when the handle is dropped, instead of accumulating
            # over every shard of both checkpoints
            safetensors = require("safetensors")
            with safetensors.safe_open(self.files[key], framework="pt") as handle:
                return handle.get_tensor(key)
        return self._open(self.files[key]).get_tensor(key)

    def get_rows(self, key, start: int, stop: int):
        """Stored rows ``start:stop`` of the tensor ``key`` (a torch tensor on the CPU, storage dtype).

        A safetensors tensor is read through a fresh handle (``get_slice``): its memory map, which holds the
        file pages these rows touched and which count in the process's resident memory, is released once the
        returned block is dropped, so reading a tensor block by block never holds more than the blocks alive.
        A torch or ``.npz`` checkpoint is already loaded whole: its rows are sliced from it.
        """
        start, stop = int(start), int(stop)
        if self._eager is not None:
            return self._eager_tensor(key, self._eager.tensors[key][start:stop])
        if not self.keep_open:
            safetensors = require("safetensors")
            with safetensors.safe_open(self.files[key], framework="pt") as handle:
                return handle.get_slice(key)[start:stop]
        return self._open(self.files[key]).get_slice(key)[start:stop]

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
    floor : dict or None
        The statistics of the storage-rounding bound (:meth:`RoundingStatistics.result`; the noise floor's
        input), or ``None`` unless asked for.
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


#: Entries beyond this make the statistics run in float64: float32 squares could overflow.
FLOAT32_STATISTICS_MAX = 1e18


class RoundingStatistics:
    """The statistics of the entrywise rounding bound ``B = u_b|W_base| + u_t|W_tuned| + η_b + η_t`` of a stored
    change, gathered from consecutive blocks of rows (:meth:`add`), so that no full-size copy of ``B`` or of
    either tensor is needed; :meth:`result` gives what :func:`rounding_statistics` returns.

    Parameters
    ----------
    shape : tuple (rows, cols)
        The shape of the matrix whose rows are fed (the stored tensor, common rows only).
    dtypes : tuple of str
        Storage dtypes of the base and tuned tensors.
    transposed : bool
        The logical ``(out, in)`` matrix is the transpose of the fed one (``Conv1D``, embeddings): its row
        statistics are the fed columns' and the reported shape is ``(cols, rows)``.
    compute : torch dtype, optional
        float32 or float64 blocks (default: float64 when a stored dtype is float64, else float32). A block
        with an entry beyond :data:`FLOAT32_STATISTICS_MAX` sets :attr:`needs_float64` on a float32
        accumulator: the caller feeds the blocks again to one in float64 (what :func:`rounding_statistics`
        chooses from the whole tensors), since its float32 squares could overflow.

    The sums run in float64 over float32 (or float64) blocks and squares. Row norms are complete within a
    block; column sums of squares and ``||B||_F²`` accumulate over blocks.
    """

    def __init__(self, shape, dtypes, *, transposed: bool = False, compute=None):
        import torch

        self.dtypes = (str(dtypes[0]), str(dtypes[1]))
        (self.ub, self.eb), (self.ut, self.et) = ROUNDOFF[self.dtypes[0]], ROUNDOFF[self.dtypes[1]]
        self.m, self.n = int(shape[0]), int(shape[1])
        self.transposed = bool(transposed)
        if compute is None:
            compute = torch.float64 if "float64" in self.dtypes else torch.float32
        self.compute = compute
        self.rows = 0  # rows fed so far
        self.max0 = self.max1 = 0.0  # max |W_base|, max |W_tuned| over the fed rows (NaN once one is NaN)
        self.row_max, self.entry_max, self.fro_sq = 0.0, 0.0, 0.0
        self.col_sq = None  # (cols,) float64 on the blocks' device

    @property
    def needs_float64(self) -> bool:
        """Whether an entry beyond :data:`FLOAT32_STATISTICS_MAX` was seen by a float32 accumulator."""
        import torch

        return self.compute != torch.float64 and max(self.max0, self.max1) > FLOAT32_STATISTICS_MAX

    @staticmethod
    def _abs_max(block) -> float:
        # torch's max: NaN when the block holds one (as max over the whole tensor would be)
        return float(block.abs().max()) if block.numel() else 0.0

    def track(self, b0, b1) -> None:
        """Record the largest magnitudes of a block (what :attr:`needs_float64` reads) without the statistics."""
        for attr, blk in (("max0", b0), ("max1", b1)):
            v, cur = self._abs_max(blk), getattr(self, attr)
            setattr(self, attr, v if (math.isnan(v) or v > cur) and not math.isnan(cur) else cur)

    def add(self, b0, b1) -> None:
        """Feed the next rows ``(rows, cols)`` of the base and tuned tensors (any device, storage dtypes)."""
        import torch

        from lora_theory.errors import InvalidArgumentError

        if tuple(b0.shape) != tuple(b1.shape) or b0.ndim != 2 or b0.shape[1] != self.n:
            raise InvalidArgumentError(
                "blocks", f"of shapes {tuple(b0.shape)} and {tuple(b1.shape)} for a {self.m} x {self.n} matrix"
            )
        if self.rows + b0.shape[0] > self.m:
            raise InvalidArgumentError("blocks", f"{self.rows + b0.shape[0]} rows fed to a matrix of {self.m}")
        self.track(b0, b1)
        if self.col_sq is None:
            self.col_sq = torch.zeros(self.n, dtype=torch.float64, device=b0.device)
        self.rows += int(b0.shape[0])
        a = b0.to(self.compute, copy=True).abs_().mul_(self.ub)
        a.add_(b1.to(self.compute).abs_(), alpha=self.ut)  # (rows, cols): B without η
        sq = a.square()  # float32 squares stay finite below FLOAT32_STATISTICS_MAX
        rows = sq.sum(dim=1, dtype=torch.float64)  # (rows,)
        if a.numel():
            self.row_max = max(self.row_max, float(rows.max()))
            self.entry_max = max(self.entry_max, float(a.max()))
        self.col_sq += sq.sum(dim=0, dtype=torch.float64)
        self.fro_sq += float(rows.sum())

    def result(self) -> dict:
        """``{"shape", "row_max", "col_max", "entry_max", "frobenius"}`` of the logical matrix: the fields of
        :class:`lora_theory.RoundingBounds`, every one an upper bound of the exact statistic (the subnormal
        terms added through the triangle inequality, ``+ η·sqrt(n)`` to a row norm ...).

        Raises :class:`~lora_theory.errors.InvalidArgumentError` when fewer rows were fed than the shape has,
        or when :attr:`needs_float64`.
        """
        import torch

        from lora_theory.errors import InvalidArgumentError

        if self.rows != self.m:
            raise InvalidArgumentError(
                "blocks", f"{self.rows} rows of {self.m} were fed: the statistics would miss rows"
            )
        if self.needs_float64:
            raise InvalidArgumentError(
                "blocks", f"an entry beyond {FLOAT32_STATISTICS_MAX:g}: feed the blocks again in float64"
            )
        m, n = self.m, self.n
        fed_rows_max = self.row_max  # max over fed rows of the squared norms
        fed_cols_max = float(self.col_sq.max()) if self.col_sq is not None and self.col_sq.numel() else 0.0
        if self.transposed:  # the logical rows are the fed columns
            m, n = n, m
            fed_rows_max, fed_cols_max = fed_cols_max, fed_rows_max
        eta = self.eb + self.et
        # float32 blocks round each entry of B by a relative 2^-24 at most (two products and a sum): widen by
        # 2^-20 so that every statistic stays an upper bound
        up = 1.0 + (2.0**-20 if self.compute == torch.float32 else 2.0**-48)
        return {
            "shape": (int(m), int(n)),
            "row_max": up * math.sqrt(fed_rows_max) + eta * math.sqrt(n),
            "col_max": up * math.sqrt(fed_cols_max) + eta * math.sqrt(m),
            "entry_max": up * self.entry_max + eta,
            "frobenius": up * math.sqrt(self.fro_sq) + eta * math.sqrt(m * n),
        }


def rounding_statistics(w0, w1, dtypes, *, block_rows: int = 1024) -> dict:
    """The statistics of the entrywise rounding bound ``B = u_b|W_base| + u_t|W_tuned| + η_b + η_t`` of a stored
    change, computed on the tensors' device in blocks of rows (no full-size copy of ``B``).

    Returns ``{"shape", "row_max", "col_max", "entry_max", "frobenius"}`` (``max_i ||B_i,:||``,
    ``max_j ||B_:,j||``, ``max B_ij``, ``||B||_F``): the fields of :class:`lora_theory.RoundingBounds`. The
    subnormal terms are added through the triangle inequality (``+ η·sqrt(n)`` to a row norm ...), so every
    statistic is an upper bound of the exact one. Sums run in float64 over float32 blocks and squares
    (float64 blocks when a stored tensor is float64 or an entry is beyond 1e18, where float32 squares could
    overflow). The whole-tensor form of :class:`RoundingStatistics`, which :func:`stream_spectra` feeds block
    by block as it reads.
    """
    import torch

    big = max(float(w0.abs().max()), float(w1.abs().max())) if w0.numel() else 0.0
    cd = torch.float64 if "float64" in dtypes or big > FLOAT32_STATISTICS_MAX else torch.float32
    acc = RoundingStatistics(tuple(w0.shape), dtypes, compute=cd)
    for start in range(0, w0.shape[0], block_rows):
        acc.add(w0[start : start + block_rows], w1[start : start + block_rows])
    return acc.result()


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


#: Entries of one block of stored rows that :func:`stream_spectra` reads at a time: 4 Mi (8 MiB of bfloat16,
#: 16 MiB as float32; 1024 rows of a 4096-column tensor).
BLOCK_ELEMENTS = 1 << 22


def block_rows_for(columns: int, elements: int | None = None) -> int:
    """Rows per block for a tensor of ``columns`` stored columns: ``elements // columns`` (default
    :data:`BLOCK_ELEMENTS`), at least 1."""
    return max(1, int(BLOCK_ELEMENTS if elements is None else elements) // max(1, int(columns)))


def _row_blocks(base, tuned, key, rows: int, step: int, device):
    """``(start, base block, tuned block)`` over stored rows ``0:rows`` of ``key`` in blocks of ``step`` rows, each
    block ``(≤ step, cols)`` in its storage dtype on ``device``; every row read once, in order."""
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        b0 = base.get_rows(key, start, stop).to(device)  # (stop - start, cols)
        b1 = tuned.get_rows(key, start, stop).to(device)
        if b0.shape[0] != stop - start or b1.shape[0] != stop - start or b0.shape[1:] != b1.shape[1:]:
            raise CheckpointError(
                base.files[key], f"rows {start}:{stop} of {key!r} read as {tuple(b0.shape)} and {tuple(b1.shape)}"
            )
        yield start, b0, b1
        del b0, b1


def logical(tensor, spec, rows=None):
    """The stored tensor as the ``(out, in)`` matrix of its module (first ``rows`` stored rows only)."""
    if rows is not None:
        tensor = tensor[:rows]
    return tensor.T if spec.transposed else tensor


def layer_delta(base, tuned, spec, *, device="cpu", rounding: bool = False, block_rows: int | None = None) -> tuple:
    """``ΔW = W_tuned - W_base`` of one matrix, read in blocks of stored rows (module docstring).

    The stored tensors are read ``block_rows`` rows at a time (default :func:`block_rows_for`; a resized
    tuned tensor: its first rows, as many as the base has); each block's difference is written into one
    preallocated array in the compute dtype (float32, float64 when a stored dtype is float64) as
    ``fl(fl(W_t) - fl(W_b))`` entrywise, the value the whole tensors give. ``||W_base||_F`` and, with
    ``rounding``, the rounding statistics (:class:`RoundingStatistics`) are gathered from the same blocks.

    Returns
    -------
    delta : torch tensor (out, in)
        The logical change on ``device`` (a transposed view of the stored orientation for ``Conv1D`` and
        embeddings).
    base_fro : float
        ``||W_base||_F`` over the compared rows: float64 sum of the blocks' squared norms in the compute dtype.
    floor : dict or None
        :meth:`RoundingStatistics.result` with ``rounding``, else ``None``.
    """
    import torch

    dev = torch.device(device) if isinstance(device, str) else device
    key = spec.weight_key
    d0, d1 = base.dtypes[key], tuned.dtypes[key]
    m, n = (int(v) for v in base.shapes[key])  # stored; a resized tuned tensor: its first m rows
    cd = _compute_dtype(d0, d1)
    step = int(block_rows) if block_rows is not None else block_rows_for(n)
    if step < 1:
        raise CheckpointError("block_rows", f"must be a positive number of rows, got {block_rows!r}")
    delta = torch.empty((m, n), dtype=cd, device=dev)  # (m, n) stored orientation
    stats = RoundingStatistics((m, n), (d0, d1), transposed=spec.transposed) if rounding else None
    base_sq = 0.0  # ||W_base||_F², summed in float64 over the blocks' compute-dtype norms
    for start, b0, b1 in _row_blocks(base, tuned, key, m, step, dev):
        blk = delta[start : start + b0.shape[0]]  # (rows, n) view
        blk.copy_(b1)
        blk.sub_(b0)
        base_sq += float(torch.linalg.vector_norm(b0, dtype=cd)) ** 2
        if stats is not None:
            stats.add(b0, b1)
        del b0, b1, blk
    if stats is not None and stats.needs_float64:
        # an entry beyond FLOAT32_STATISTICS_MAX, whose float32 square could overflow: the statistics again in
        # float64, as rounding_statistics chooses from the whole tensors (ΔW itself is done)
        stats = RoundingStatistics((m, n), (d0, d1), transposed=spec.transposed, compute=torch.float64)
        for _start, b0, b1 in _row_blocks(base, tuned, key, m, step, dev):
            stats.add(b0, b1)
            del b0, b1
    floor = stats.result() if stats is not None else None
    return logical(delta, spec), math.sqrt(base_sq), floor


def stream_spectra(
    base: TensorSource,
    tuned: TensorSource,
    lay: Layout,
    *,
    device: str = "cpu",
    rounding: bool = False,
    progress: bool = True,
    spectrum: str = "full",
    thresholds_fn=None,
    block_rows: int | None = None,
):
    """Yield a :class:`LayerSpectrum` per matrix of ``lay`` in model order, then a :class:`VectorChange` per
    vector; one layer in memory at a time, each tensor read in blocks of rows (module docstring).

    Parameters
    ----------
    rounding : bool
        Gather the statistics of each layer's storage-rounding bound (:class:`RoundingStatistics`, the
        noise floor's input) into :attr:`LayerSpectrum.floor` from the blocks as they are read.
    progress : bool
        A tqdm bar over layers on stderr.
    spectrum : "full", "partial" or "auto"
        ``"full"``: every singular value (``svdvals``). ``"partial"``: a certified partial spectrum
        (:func:`partial_spectrum_of`; its counts may be left as intervals). ``"auto"``: partial, and the full
        spectrum where a count is not settled or the short side is below :data:`PARTIAL_MIN_SIDE`.
    thresholds_fn : callable
        ``thresholds_fn(floor, shape, compute_dtype) -> thresholds_of``, with ``thresholds_of(σ̂_1)`` the
        thresholds whose counts are needed (the first certified); required unless ``spectrum="full"``.
    block_rows : int, optional
        Stored rows per block (default :func:`block_rows_for`: about :data:`BLOCK_ELEMENTS` entries). The
        blocks change only the order of the sums behind ``base_fro`` and the rounding statistics.
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
            key = spec.weight_key
            d0, d1 = base.dtypes[key], tuned.dtypes[key]
            new_rows = resized_rows(base.shapes[key], tuned.shapes[key])
            cd = _compute_dtype(d0, d1)
            delta, base_fro, floor = layer_delta(
                base, tuned, spec, device=dev, rounding=rounding, block_rows=block_rows
            )  # (out, in)
            shape = tuple(delta.shape)
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
