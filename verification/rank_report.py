"""The rank advisor on real checkpoints: streamed spectra, ranks above the storage-rounding floor, the report.

:func:`advise_stream` reads two checkpoints one layer at a time (:mod:`verification.streaming`), computes per
layer the singular values of the stored change ``ΔW`` and the statistics of its entrywise rounding bound, and
hands both to :func:`lora_theory.advisor.layer_advice_from_spectrum` with the layer's
:func:`lora_theory.noise_floor`: the rank above the floor, the floor itself and the energy rank over the whole
spectrum (Zeng & Lee 2024, Lemma 1 with ``L = 1``, i.e. Eckart–Young, per layer; THEORY.md for the floor).
Layers come in model order (:mod:`verification.architectures`), shapes as ``out x in`` of the module's logical
matrix (GPT-2's ``Conv1D`` transposed; an embedding as ``dim x vocabulary``).

Ranks under a parameter budget (or a relative error) come from :func:`lora_theory.allocate_ranks`; the report
sets them beside one uniform rank at the same budget (what extraction tools do), each with its error measured
on the spectra: ``sqrt(Σ_l Σ_{k>r_l} σ_{l,k}²) / sqrt(Σ_l ||ΔW_l||_F²)`` (exact for truncated SVDs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CheckpointReport",
    "advise_stream",
    "format_report",
    "plot_heatmap",
    "relative_error_of_ranks",
    "allocation",
    "peft_proposal",
]


@dataclass(frozen=True, eq=False)
class CheckpointReport:
    """What :func:`advise_stream` found.

    Attributes
    ----------
    layers : tuple of LayerAdvice
        One per matrix, in model order (``layers[i].floor`` its noise floor).
    kinds : tuple of str
        ``"linear"``, ``"conv1d"`` or ``"embedding"`` per layer.
    tied : tuple of tuple
        Modules sharing each layer's weight (analysed once).
    new_rows : tuple of int
        Rows the tuned tensor added per layer (a resized vocabulary; not part of ``ΔW``).
    vectors : tuple of dict
        Every 1-D tensor: ``name``, ``module``, ``shape``, ``changed`` (beyond rounding), ``change_norm``,
        ``new_rows``.
    other : tuple of (key, reason)
        Tensors not analysed.
    architecture : str or None
    base, tuned : str
    energy : float
    device : str
    spectrum : str
        What was asked for: ``"full"``, ``"partial"`` or ``"auto"`` (each layer's ``spectrum`` says what was
        used).
    spectrum_notes : tuple of (str or None)
        Per layer, why ``auto`` took the full spectrum.
    """

    layers: tuple
    kinds: tuple
    tied: tuple
    new_rows: tuple
    vectors: tuple
    other: tuple
    architecture: str | None
    base: str
    tuned: str
    energy: float
    device: str
    allocation: dict | None = field(default=None)
    layout_note: str | None = None
    spectrum: str = "full"
    spectrum_notes: tuple = ()

    @property
    def all_below_floor(self) -> bool:
        return bool(self.layers) and all(a.rank_above_floor == 0 for a in self.layers)

    def ranks(self, choice: str = "exact") -> dict:
        """``{layer: rank}``: above the floor (``"exact"``), the energy rank (``"energy"``), or the allocation."""
        if choice == "allocated":
            if self.allocation is None:
                raise ValueError("no allocation: give --budget or --error")
            return dict(self.allocation["ranks"])
        return {a.name: a.rank(choice) for a in self.layers}

    def to_dict(self) -> dict:
        layers = []
        for a, kind, tied, new in zip(self.layers, self.kinds, self.tied, self.new_rows):
            d = a.to_dict()
            d.update(kind=kind, tied=[t for t, _ in tied], new_rows=int(new), shape_text=f"{a.shape[0]} x {a.shape[1]}")
            if self.spectrum_notes:
                d["spectrum_note"] = self.spectrum_notes[len(layers)]
            layers.append(d)
        return {
            "base": self.base,
            "tuned": self.tuned,
            "architecture": self.architecture,
            "device": self.device,
            "layout_note": self.layout_note,
            "energy": self.energy,
            "layers": layers,
            "vectors": [dict(v) for v in self.vectors],
            "other": [{"name": k, "reason": r} for k, r in self.other],
            "all_below_floor": self.all_below_floor,
            "floor_summary": floor_summary(self),
            "total_parameters_above_floor": int(sum(a.parameters(a.rank_above_floor) for a in self.layers)),
            "note": __import__("lora_theory.advisor", fromlist=["PER_LAYER_NOTE"]).PER_LAYER_NOTE,
            "allocation": self.allocation,
            "spectrum": self.spectrum,
        }


def floor_summary(report) -> dict:
    floors = [float(a.floor.spectral) for a in report.layers if getattr(a, "floor", None) is not None]
    if not floors:
        return {}
    return {"min": min(floors), "max": max(floors), "layers": len(floors)}


def advise_stream(
    base_path,
    tuned_path,
    *,
    energy: float = 0.99,
    device: str = "cpu",
    tol: float | None = None,
    progress: bool = True,
    spectrum: str = "full",
) -> CheckpointReport:
    """Per-layer rank advice for two checkpoints, streamed one layer at a time (module docstring).

    Parameters
    ----------
    base_path, tuned_path : path
        Files or model folders (shards read through their index; ``config.json`` read where present).
    energy : float in (0, 1]
    device : "cpu", "cuda" or "auto"
    tol : float, optional
        Count singular values above ``tol · σ_1(ΔW)`` instead of above the noise floor.
    progress : bool
        A tqdm bar over layers on stderr.
    spectrum : "full", "partial" or "auto"
        Every singular value, or a certified partial spectrum (THEORY.md §5.5); ``"auto"`` falls back to the
        full spectrum of a layer whose counts the partial one does not settle
        (:func:`verification.streaming.stream_spectra`).

    Raises
    ------
    CheckpointError
        Unreadable or mismatched checkpoints.
    InvalidArgumentError
        Non-finite weights, bad ``energy`` / ``tol``.
    """
    from lora_theory import RoundingBounds, noise_floor
    from lora_theory.advisor import layer_advice_from_spectrum
    from lora_theory.errors import InvalidArgumentError

    from .extract import vector_changed
    from .streaming import LayerSpectrum, open_pair, stream_spectra

    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InvalidArgumentError("tol", f"must be a positive relative tolerance, got {tol!r}")
    base, tuned, lay = open_pair(base_path, tuned_path)
    layers, kinds, tied, new_rows, vectors = [], [], [], [], []

    from lora_theory import storage_roundoff

    def thresholds_fn(stats, shape, compute):
        # the thresholds of layer_advice_from_spectrum, as functions of σ_1: the count's first
        fl = noise_floor(RoundingBounds(**stats))
        unit = max(shape) * 2.0 * storage_roundoff(compute)

        def thresholds_of(s1):
            svd_tol = unit * s1
            out = [max(fl.spectral, svd_tol), max(fl.rigorous, svd_tol)]
            return ([float(tol) * s1] + out) if tol is not None else out

        return thresholds_of

    notes = []
    for item in stream_spectra(
        base,
        tuned,
        lay,
        device=device,
        rounding=True,
        progress=progress,
        spectrum=spectrum,
        thresholds_fn=thresholds_fn,
    ):
        if isinstance(item, LayerSpectrum):
            spec = item.spec
            s = item.singular_values
            if item.partial is not None:
                s = None  # the advice reads the partial spectrum
            elif not np.isfinite(s).all():
                raise InvalidArgumentError(f"tuned[{spec.weight_key!r}]", "the change holds NaN or infinite entries")
            bounds = RoundingBounds(**item.floor)
            floor = noise_floor(bounds)
            bias_changed = False
            if item.bias_change is not None:
                bias_changed = vector_changed(item.bias_base, item.bias_tuned, item.bias_dtypes)
            d0, d1 = item.dtypes
            label = d0 if d0 == d1 else f"{d0}/{d1}"
            s1 = item.singular_values
            threshold = None if tol is None else float(tol) * (float(s1[0]) if s1.size else 0.0)
            advice = layer_advice_from_spectrum(
                spec.name,
                spec.weight_key,
                item.shape,
                s,
                floor,
                base_norm=item.base_fro,
                delta_norm=item.delta_fro,
                storage_dtype=label,
                energy=energy,
                compute_dtype=item.compute_dtype,
                tolerance=threshold,
                rtol=tol,
                bias_key=spec.bias_key,
                bias_change=item.bias_change if bias_changed else None,
                bias_changed=bias_changed,
                partial=item.partial,
            )
            layers.append(advice)
            notes.append(item.spectrum_note)
            kinds.append(spec.kind)
            tied.append(spec.tied)
            new_rows.append(item.new_rows)
        else:
            v = item
            changed = v.new_rows > 0 or vector_changed(v.base, v.tuned, v.dtypes)
            vectors.append(
                {
                    "name": v.spec.key,
                    "module": v.spec.module,
                    "shape": list(v.spec.stored_shape),
                    "changed": bool(changed),
                    "change_norm": float(np.linalg.norm(v.change)),
                    "new_rows": int(v.new_rows),
                }
            )
    return CheckpointReport(
        layers=tuple(layers),
        kinds=tuple(kinds),
        tied=tuple(tied),
        new_rows=tuple(new_rows),
        vectors=tuple(vectors),
        other=tuple(lay.other),
        architecture=lay.architecture,
        base=str(base_path),
        tuned=str(tuned_path),
        energy=float(energy),
        device=str(device),
        layout_note=lay.note,
        spectrum=str(spectrum),
        spectrum_notes=tuple(notes),
    )


# ------------------------------------------------------------------------------------------ budgets


def relative_error_of_ranks(layers, ranks) -> float:
    """``sqrt(Σ_l Σ_{k>r_l} σ_{l,k}²) / sqrt(Σ_l Σ_k σ_{l,k}²)``: the relative Frobenius error of truncated SVDs
    at ``ranks`` over all layers together (Eckart–Young, exact on the measured spectra)."""
    num = den = 0.0
    for a in layers:
        r = int(ranks.get(a.name, 0))
        tail = a.frobenius_tail
        num += float(tail[min(r, tail.size - 1)]) ** 2
        den += float(tail[0]) ** 2
    return math.sqrt(num / den) if den > 0 else 0.0


def allocation(report: CheckpointReport, *, budget: int | None = None, error: float | None = None) -> dict:
    """Ranks from :func:`lora_theory.allocate_ranks` under ``budget`` parameters or a relative ``error``, beside
    :func:`lora_theory.uniform_ranks` (one rank for every layer) at the same budget; both errors measured on the
    spectra of the stored changes (:func:`relative_error_of_ranks`, checked against the allocation's own)."""
    from lora_theory import allocate_ranks, uniform_ranks

    layers = report.layers
    partial = [a.name for a in layers if a.spectrum != "full"]
    if partial:
        from lora_theory.errors import InvalidArgumentError

        raise InvalidArgumentError(
            "spectrum",
            f"ranks under a budget or an error need every singular value; {len(partial)} layers "
            f"(first {partial[0]}) have a partial spectrum: use --spectrum full",
        )
    spectra = [a.singular_values for a in layers]
    shapes = [a.shape for a in layers]
    if budget is not None:
        result = allocate_ranks(spectra, shapes, budget=int(budget))
    else:
        result = allocate_ranks(spectra, shapes, error=float(error))
    ranks = {a.name: int(r) for a, r in zip(layers, result.ranks)}
    spent = int(budget) if budget is not None else int(result.parameters)
    base = uniform_ranks(spectra, shapes, spent)
    uniform = {a.name: int(r) for a, r in zip(layers, base.ranks)}
    return {
        "budget": None if budget is None else int(budget),
        "error_target": None if error is None else float(error),
        "method": result.method,
        "ranks": ranks,
        "parameters": int(result.parameters),
        "relative_error": relative_error_of_ranks(layers, ranks),
        "uniform": {
            "rank": max(base.ranks, default=0),
            "ranks": uniform,
            "parameters": int(base.parameters),
            "relative_error": relative_error_of_ranks(layers, uniform),
        },
        "note": "relative_error = sqrt(sum of discarded sigma^2) / sqrt(sum of all sigma^2) over all layers "
        "(truncated SVD per layer, Eckart-Young); uniform: one rank for every layer at the same budget",
    }


# ------------------------------------------------------------------------------------------ output


def format_report(report: CheckpointReport, choice: str = "exact") -> str:
    """The table printed on stdout: model order, shapes ``out x in``, one line for the vectors."""
    pct = f"{100 * report.energy:g}%"
    header = (
        "layer",
        "kind",
        "shape (out x in)",
        "dtype",
        "rank > floor",
        f"energy {pct}",
        "sigma_1",
        "floor",
        "|dW|/|W|",
        "bias",
        "spectrum",
    )
    rows = []
    for a, kind, tied, new in zip(report.layers, report.kinds, report.tied, report.new_rows):
        s1 = a.singular_values[0] if a.singular_values.size else 0.0
        bias = "-" if a.bias_key is None else (f"{a.bias_change_norm:.2e}" if a.bias_changed else "unchanged")
        name = a.name + (f" (= {', '.join(t for t, _ in tied)})" if tied else "") + (f" +{new} rows" if new else "")
        rank = (
            f"{a.rank_above_floor}/{a.max_rank}"
            if a.settled
            else f"{a.rank_bounds[0]}..{a.rank_bounds[1]}/{a.max_rank} (unsettled)"
        )
        eb = a.spectrum_energy_rank_bounds
        erank = str(a.spectrum_energy_rank) if eb is None or eb[0] == eb[1] else f"{eb[0]}..{eb[1]}"
        used = "full" if a.partial is None else f"partial, rest <= {a.partial.residual:.1e}"
        rows.append(
            (
                name,
                kind,
                f"{a.shape[0]} x {a.shape[1]}",
                a.storage_dtype,
                rank,
                erank,
                f"{s1:.3e}",
                f"{a.floor.spectral:.1e}",
                f"{a.relative_change:.2e}",
                bias,
                used,
            )
        )
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    changed = [v for v in report.vectors if v["changed"]]
    names = ", ".join(v["name"] for v in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    lines.append(
        f"vectors: {len(changed)} of {len(report.vectors)} changed beyond rounding"
        + (f" ({names}; PEFT: modules_to_save)" if changed else "")
    )
    resized = [(a.name, n) for a, n in zip(report.layers, report.new_rows) if n]
    for name, n in resized:
        lines.append(f"resized: {name} gained {n} rows (new vocabulary entries); the common rows are compared")
    if report.other:
        lines.append(
            f"not analysed: {len(report.other)} tensors ({', '.join(k for k, _ in report.other[:4])}"
            + (" ..." if len(report.other) > 4 else "")
            + ")"
        )
    if report.layout_note:
        lines.append("warning: " + report.layout_note)
    if any(a.partial is not None for a in report.layers):
        lines.append(
            "partial: the leading singular values, every count proved from certified bounds (THEORY.md "
            "§5.5); 'rest <= x': every singular value past them is at most x; an energy rank 'a..b' is "
            "an interval (the whole spectrum was not computed)"
        )
    fell_back = [n for n in report.spectrum_notes if n and n.startswith("partial spectrum unsettled")]
    if fell_back:
        lines.append(f"full spectrum for {len(fell_back)} layers whose partial count was not settled")
    above = sum(a.parameters(a.rank_above_floor) for a in report.layers)
    full = sum(a.shape[0] * a.shape[1] for a in report.layers)
    if report.all_below_floor:
        fs = floor_summary(report)
        lines.append(
            f"every layer's change is below its storage-rounding floor (floors {fs['min']:.2e} to "
            f"{fs['max']:.2e}): nothing to adapt that rounding could not explain"
        )
    else:
        lines.append(f"LoRA parameters at the ranks above the floor: {above} (the matrices hold {full})")
    from lora_theory.advisor import PER_LAYER_NOTE

    lines.append("note: " + PER_LAYER_NOTE)
    if report.allocation is not None:
        al, un = report.allocation, report.allocation["uniform"]
        lines.append(
            f"allocation ({al['parameters']} parameters): relative error {al['relative_error']:.3e}; "
            f"uniform rank {un['rank']} at the same budget ({un['parameters']} parameters): "
            f"{un['relative_error']:.3e}"
        )
    return "\n".join(lines)


def plot_heatmap(report: CheckpointReport, path) -> None:
    """``spectra.png``: a heatmap of ``log10(σ_k / σ_1)`` per layer (rows in model order), the rank above the
    floor marked per layer, and beside it each layer's rank above the floor and energy rank. Readable for 30 to
    200 layers: one pixel row per layer, a label every ``ceil(L / 40)`` layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(report.layers)
    if L == 0:
        return
    kmax = max(a.singular_values.size for a in report.layers)
    grid = np.full((L, kmax), np.nan)
    for i, a in enumerate(report.layers):
        s = a.singular_values
        if s.size and s[0] > 0:
            with np.errstate(divide="ignore"):
                grid[i, : s.size] = np.log10(np.maximum(s / s[0], 1e-12))
    height = min(16.0, max(4.0, 0.09 * L + 1.5))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    im = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=-12,
        vmax=0,
        extent=(0.5, kmax + 0.5, L - 0.5, -0.5),
    )
    ranks = np.array([a.rank_above_floor for a in report.layers])
    ax.plot(ranks + 0.5, np.arange(L), "r|", ms=4, label="rank above the floor")
    step = max(1, math.ceil(L / 40))
    ticks = list(range(0, L, step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([report.layers[i].name for i in ticks], fontsize=6 if L > 40 else 7)
    ax.set_xlabel("index k")
    ax.set_xscale("log")
    ax.set_title("log10(sigma_k / sigma_1) of each layer's change (red: rank above the floor)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    ax2.barh(np.arange(L), ranks, height=0.8, color="tab:red", label="above floor")
    ax2.plot(
        [a.spectrum_energy_rank for a in report.layers],
        np.arange(L),
        "k.",
        ms=3,
        label=f"energy {100 * report.energy:g}%",
    )
    ax2.set_xlabel("rank")
    ax2.set_xscale("symlog")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_json(report: CheckpointReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def peft_proposal(report: CheckpointReport, ranks: dict) -> dict:
    """The ``LoraConfig`` for ``ranks`` built with PEFT's own class (``to_dict()`` of it under
    ``"lora_config"``), as :func:`verification.extract.extract_adapter` writes it: scale 1 on every layer
    (``lora_alpha = r``, ``alpha_pattern = rank_pattern``), a rank-1 zero adapter for a layer whose only change
    is its bias, ``fan_in_fan_out`` for ``Conv1D`` layers, embeddings left out when ``lora_bias`` is needed
    (PEFT refuses it there), changed norms in ``modules_to_save``."""
    from .architectures import require

    peft = require("peft")
    targets, bias_only, untargeted, left_out = {}, [], [], {}
    lora_bias = any(a.bias_changed for a in report.layers)
    for a, kind, tied in zip(report.layers, report.kinds, report.tied):
        r = int(ranks.get(a.name, 0))
        if r == 0 and a.bias_changed:
            targets[a.name], _ = 1, bias_only.append(a.name)
        elif r == 0:
            untargeted.append(a.name)
            continue
        elif kind == "embedding" and lora_bias:
            left_out[a.name] = "embedding: a bias change needs lora_bias, which PEFT refuses on embeddings"
            continue
        else:
            targets[a.name] = r
        for t, _ in tied:
            targets[t] = targets[a.name]
    saved = sorted({v["module"] for v in report.vectors if v["changed"] and v["module"]})
    if not targets:
        return {
            "lora_config": None,
            "ranks": {},
            "bias_only": [],
            "untargeted": untargeted,
            "left_out": left_out,
            "modules_to_save": saved,
            "parameters": 0,
            "note": "no layer changed above its storage-rounding floor: nothing to adapt",
        }
    top = max(targets.values())
    config = peft.LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=list(targets),
        rank_pattern=dict(targets),
        alpha_pattern=dict(targets),
        lora_dropout=0.0,
        bias="none",
        lora_bias=lora_bias,
        fan_in_fan_out="conv1d" in report.kinds,
        modules_to_save=saved or None,
        use_rslora=False,
    )
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["peft_type"] = "LORA"
    shape = {a.name: a.shape for a in report.layers}
    params = sum(r * (shape[n][0] + shape[n][1]) for n, r in targets.items() if n in shape)
    return {
        "lora_config": cfg,
        "ranks": dict(targets),
        "bias_only": bias_only,
        "untargeted": untargeted,
        "left_out": left_out,
        "modules_to_save": saved,
        "parameters": int(params),
        "note": "python -m verification.advise BASE TUNED --extract DIR writes this adapter with its factors",
    }
