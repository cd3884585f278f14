"""Extract a PEFT LoRA adapter from two checkpoints: the truncated SVD of every layer's change at chosen ranks.

For each layer given a rank ``r > 0`` the change ``ΔW = W_tuned - W_base`` (the logical ``(out, in)``
matrix, :mod:`verification.architectures`) is factored as ``B A`` with the best rank-``r`` approximation
(Eckart–Young; Zeng & Lee 2024, Lemma 1 with ``L = 1``): ``B = U_r Σ_r^{1/2}`` (``out x r``) and
``A = Σ_r^{1/2} V_r^T`` (``r x in``), balanced so that neither factor is much larger than the other (the
largest entry is then at most ``sqrt(σ_1)``, which keeps float16 exports in range longer). The layers are
read one at a time (:class:`~verification.streaming.TensorSource`).

What travels how (PEFT 0.21):

* ``nn.Linear`` and ``Conv1D`` changes: ``lora_A`` / ``lora_B`` (``fan_in_fan_out=True`` when a ``Conv1D``
  is adapted; PEFT sets it per module);
* a changed bias of an adapted layer: ``lora_B.bias`` with ``lora_bias=True``; of a layer whose weight did
  not change: a rank-1 adapter with zero factors that carries the bias;
* embeddings: PEFT's embedding form (``lora_embedding_A`` / ``lora_embedding_B``). PEFT refuses
  ``lora_bias`` on embeddings, so when a bias change needs ``lora_bias`` the embeddings are left out and the
  record says so. A weight tied to the embedding (a language-model head) gets the same change through its
  own adapter (the factors transposed where its layout is);
* changed 1-D tensors (norm scales and offsets): their module in ``modules_to_save``, with the tuned values;
* a resized vocabulary: the new rows cannot be added by an adapter on the base's embedding; that layer is left
  out (recorded, with the number of new rows).

The written folder is checked against what was built in the precision written
(:func:`~verification.peft_export.write_peft_adapter`) and records the base: ``base_model_name_or_path``
and a fingerprint of the base weights it changes (:func:`~verification.peft_export.check_base`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .architectures import _meta_model, require
from .peft_export import AdapterWriteError, LoraEntry, _skeleton, base_fingerprint, write_peft_adapter
from .streaming import logical, open_pair, resized_rows

__all__ = ["extract_adapter", "vector_changed", "STORAGE_ROUNDOFF"]

#: Unit roundoff of each storage dtype (round to nearest; :func:`lora_theory.storage_roundoff`).
STORAGE_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def vector_changed(base, tuned, dtypes) -> bool:
    """Whether a 1-D tensor changed beyond the rounding of its storage: some entry of ``x_t - x_b`` above
    ``u_b|x_b| + u_t|x_t| + η_b + η_t`` (:func:`lora_theory.entries_beyond_rounding`, which proves a change;
    a model re-saved in a lower precision is unchanged by this test). A tuned vector with more entries (a
    resized vocabulary) is compared on the common ones."""
    from lora_theory import entries_beyond_rounding

    x0 = np.asarray(base, np.float64)
    x1 = np.asarray(tuned, np.float64)[: x0.shape[0]]
    return entries_beyond_rounding(x0, x1, str(dtypes[0]), str(dtypes[1])) > 0


def _factors(delta, r):
    """Balanced rank-``r`` factors of ``delta`` (torch, ``(out, in)``): ``B`` (out, r), ``A`` (r, in), float64,
    and the relative Frobenius error ``sqrt(Σ_{k>r} σ_k²) / ||ΔW||_F`` the truncation leaves (Eckart–Young)."""
    import torch

    if delta.shape[0] >= delta.shape[1]:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    else:  # the tall orientation is the faster one on a CPU
        V, S, Uh = torch.linalg.svd(delta.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    root = S[:r].sqrt()
    B = (U[:, :r] * root).double().cpu().numpy()
    A = (root[:, None] * Vh[:r]).double().cpu().numpy()
    s = S.double().cpu().numpy()
    total = float(np.sqrt(np.sum(s**2)))
    discarded = float(np.sqrt(np.sum(s[r:] ** 2))) / total if total > 0 else 0.0
    return B, A, discarded


def extract_adapter(
    base_path,
    tuned_path,
    ranks,
    directory,
    *,
    dtype="float32",
    device="cpu",
    base_name=None,
    vectors=True,
    progress=True,
) -> dict:
    """Write the PEFT adapter of rank ``ranks[name]`` per layer for the change from ``base_path`` to
    ``tuned_path`` (module docstring).

    Parameters
    ----------
    base_path, tuned_path : path
        Checkpoint files or model folders (``config.json`` read where present).
    ranks : mapping module name -> int
        Layers not named, or given 0, are not adapted (their bias change, if any, still travels).
    directory : path
        The adapter folder (new or empty).
    dtype : "float32" (default), "float64", "float16" or "bfloat16"
        Storage dtype of the factors.
    device : "cpu", "cuda" or "auto"
        Where the SVDs run (float32; float64 when ``dtype`` or a stored tensor is float64).
    base_name : str, optional
        ``base_model_name_or_path`` (default: the base path).
    vectors : bool
        Export changed norms (``modules_to_save``).

    Returns
    -------
    dict
        The record written to ``lora_theory_export.json``.

    Raises
    ------
    CheckpointError
        Unreadable or mismatched checkpoints.
    AdapterWriteError
        Nothing to export, a rank beyond the layer's, or a precision the factors do not fit in.
    """
    import torch

    from .streaming import _compute_dtype, _device, layer_delta

    dev = _device(device)
    base, tuned, lay = open_pair(base_path, tuned_path)
    names = {m.name for m in lay.matrices}
    unknown = sorted(set(ranks) - names)
    if unknown:
        raise AdapterWriteError(f"ranks name layers the checkpoint does not have: {unknown[:6]}")
    entries, notes, left_out, fp_keys, truncation = [], {}, {}, [], {}
    bar = require("tqdm").tqdm(total=len(lay.matrices), desc="extract", unit="layer", leave=False, disable=not progress)
    for spec in lay.matrices:
        r = int(ranks.get(spec.name, 0))
        bar.update(1)
        w0s, w1s = base.shapes[spec.weight_key], tuned.shapes[spec.weight_key]
        grown = resized_rows(w0s, w1s)
        bias_change = None
        if spec.bias_key is not None:
            b0 = base.get(spec.bias_key).double().numpy()
            b1 = tuned.get(spec.bias_key).double().numpy()
            if vector_changed(b0, b1, (base.dtypes[spec.bias_key], tuned.dtypes[spec.bias_key])):
                bias_change = b1[: b0.shape[0]] - b0
        if r <= 0 and bias_change is None:
            continue
        if grown:
            left_out[spec.name] = f"resized: the tuned weight has {grown} new rows an adapter on the base cannot add"
            continue
        if not 0 <= r <= min(spec.shape):
            raise AdapterWriteError(f"rank {r} for layer {spec.name} is beyond its rank {min(spec.shape)}")
        if r > 0:
            cd = (
                torch.float64
                if "float64" in (dtype, base.dtypes[spec.weight_key], tuned.dtypes[spec.weight_key])
                else torch.float32
            )
            if cd == _compute_dtype(base.dtypes[spec.weight_key], tuned.dtypes[spec.weight_key]):
                # read in blocks of rows, as the spectra are: neither stored tensor is ever whole in memory
                delta, _, _ = layer_delta(base, tuned, spec, device=dev)  # (out, in), the value b - a gives
            else:  # float64 factors asked of lower-precision weights: the difference of the float64 values
                a = logical(base.get(spec.weight_key), spec).to(dev, cd)
                b = logical(tuned.get(spec.weight_key), spec).to(dev, cd)
                delta = b - a
                del a, b
            B, A, truncation[spec.name] = _factors(delta, r)
            del delta
        else:  # bias only: PEFT refuses r = 0; zero factors carry lora_B.bias
            B, A = np.zeros((spec.shape[0], 1)), np.zeros((1, spec.shape[1]))
            notes[spec.name] = "bias only: a rank-1 adapter with zero factors carries the bias change"
        entries.append((spec, LoraEntry(spec.name, spec.kind, A, B, bias_change)))
        fp_keys.append(spec.weight_key)
    bar.close()

    lora_bias = any(e.bias is not None for _, e in entries)
    final = []
    for spec, e in entries:
        if e.kind == "embedding" and lora_bias:
            left_out[spec.name] = (
                "embedding left out: a bias change needs lora_bias, which PEFT refuses on embedding layers"
            )
            fp_keys.remove(spec.weight_key)
            continue
        final.append(e)
        for other, other_kind in spec.tied:  # a head tied to this weight: the same change, its own adapter
            if other_kind not in ("linear", "conv1d", "embedding"):
                left_out[other] = f"tied to {spec.name} but a {other_kind}, which PEFT's LoRA does not adapt"
                continue
            # an embedding's logical matrix is the transpose of its stored (num, dim) tensor, a Linear's is not
            flip = (other_kind in ("conv1d", "embedding")) != spec.transposed
            A, B = (e.B.T.copy(), e.A.T.copy()) if flip else (e.A, e.B)
            final.append(LoraEntry(other, other_kind, A, B, None))
            notes[other] = f"tied to {spec.name}: the same change through its own adapter"

    to_save = {}
    if vectors:
        for v in lay.vectors:
            x0 = base.get(v.key).double().numpy()
            x1 = tuned.get(v.key).double().numpy()
            if not vector_changed(x0, x1, (base.dtypes[v.key], tuned.dtypes[v.key])):
                continue
            if not v.module or x1.shape != x0.shape:
                left_out[v.key] = (
                    "a top-level tensor: PEFT saves whole modules"
                    if not v.module
                    else f"resized: {x1.shape[0] - x0.shape[0]} new entries"
                )
                continue
            to_save.setdefault(v.module, {})
    # every parameter of a saved module: PEFT copies the whole module
    saved = {}
    for module in to_save:
        leaves = {}
        for key in [k for k in base.shapes if k.rsplit(".", 1)[0] == module]:
            leaves[key.rsplit(".", 1)[1]] = tuned.get(key).double().numpy()
            fp_keys.append(key)
        saved[module] = leaves

    if lay.architecture is not None:
        skeleton, _ = _meta_model(lay.config)
    else:
        mods = {m.name: (m.kind, m.shape, m.bias_key is not None) for m in lay.matrices}
        for module, leaves in saved.items():
            mods[module] = ("holder", {leaf: tuple(arr.shape) for leaf, arr in leaves.items()}, False)
        skeleton = _skeleton(mods)
    fingerprint = base_fingerprint(base.get, fp_keys, base.dtypes)
    record = {
        "base": str(base_path),
        "tuned": str(tuned_path),
        "architecture": lay.architecture,
        "requested_ranks": {k: int(v) for k, v in ranks.items() if int(v) > 0},
        "left_out": left_out,
        "notes": notes,
        "truncation": truncation,
        "truncation_note": "per layer ||dW - B A||_F / ||dW||_F of the stored change (Eckart-Young tail)",
    }
    return write_peft_adapter(
        final,
        Path(directory),
        skeleton=skeleton,
        dtype=dtype,
        modules_to_save=saved,
        base_name=str(base_path) if base_name is None else base_name,
        fingerprint=fingerprint,
        record=record,
    )
