"""Statistics over seeds: per-cell medians and interquartile ranges, the pretrained-vs-random comparison."""

from __future__ import annotations

import math

import numpy as np

from .protocol import N_CALIBRATION, N_TEST, N_VALIDATION, PRETRAINING_PROTOCOL, SHIFT


def _median_iqr(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None, None, None
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return float(med), float(q25), float(q75)


def _median(values):
    return _median_iqr(values)[0]


def summarize(spec, args, cells, runs, records, constructions, problems) -> dict:
    """``summary.json``: per cell and frozen-model kind, the selected grid point of every seed (lowest
    validation loss), medians and interquartile ranges over seeds of the test and shifted MSEs, the
    construction's columns, the threshold and the protocol as run."""
    by_id = {r["id"]: r for r in records}
    by_cell_seed = {}
    for r in runs:
        by_cell_seed.setdefault((r.cell, r.seed), []).append(r)
    rows = {k: [] for k in args.kinds}
    for cell in cells:
        per_seed = []
        for seed in range(args.seeds):
            cand = [by_id[r.id] for r in by_cell_seed.get((cell, seed), []) if r.id in by_id]
            if not cand:
                continue
            vals = [
                c["losses"]["val"] if c["losses"]["val"] is not None and np.isfinite(c["losses"]["val"]) else math.inf
                for c in cand
            ]
            best = cand[int(np.argmin(vals))]
            per_seed.append((seed, best))
        cons = [constructions.get((cell, s)) for s in range(args.seeds)]
        cons = [c for c in cons if c is not None]
        g_med, g25, g75 = _median_iqr([b["losses"]["test"] for _, b in per_seed])
        row = {name: value for name, value in cell.axis}
        row.update(
            {
                "label": cell.label,
                "method": cell.method,
                "params": cell.params(),
                "prediction": _median([c["prediction"] for c in cons]),
                "construction_test_mse": _median([c["test_mse"] for c in cons]),
                "construction_shifted_mse": _median([c["shifted_mse"] for c in cons]),
                "calibrated_test_mse": _median([c["calibrated_test_mse"] for c in cons]),
                "calibrated_shifted_mse": _median([c["calibrated_shifted_mse"] for c in cons]),
                "construction_kappa": _median([c["kappa"] for c in cons]),
                "construction_precision_digits": max(
                    (c["precision_digits"] for c in cons if c.get("precision_digits")), default=None
                ),
                "construction_subsample": next((c["subsample"] for c in cons if c.get("subsample")), None),
                "construction_note": next((c["note"] for c in cons if c["note"]), None),
                "target_power": _median([c.get("target_power") for c in cons]),
                "gradient_test_mse": g_med,
                "gradient_test_q25": g25,
                "gradient_test_q75": g75,
                "gradient_shifted_mse": _median([b["losses"]["shifted"] for _, b in per_seed]),
                "gradient_val_mse": _median([b["losses"]["val"] for _, b in per_seed]),
                "seeds": [s for s, _ in per_seed],
                "per_seed": _per_seed_entries(cell, args.seeds, dict(per_seed), constructions),
            }
        )
        rows[cell.kind].append(row)
    threshold = spec.threshold(args)
    summary = {
        "experiment": spec.name,
        "threshold": threshold,
        "domain": _domain_description(constructions),
        "rows": rows.get("random", []),
        "pretrained_rows": rows.get("pretrained", []),
        "protocol": {
            "width": args.width,
            "seeds": args.seeds,
            "iterations": args.iterations,
            "lr_grid": args.lr_grid,
            "weight_decay_grid": args.wd_grid,
            "batch_size": 256,
            "select": args.select,
            "validate_every": args.validate_every if args.select == "best" else None,
            "training_dtype": args.dtype,
            "evaluation_dtype": "float64",
            "n_validation": N_VALIDATION,
            "n_test": N_TEST,
            "shift": SHIFT,
            "tune_bias": args.tune_bias,
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
        out.append(
            {
                "seed": s,
                "lr": b.get("config", {}).get("lr"),
                "weight_decay": b.get("config", {}).get("weight_decay"),
                "gradient_test_mse": b.get("losses", {}).get("test"),
                "gradient_shifted_mse": b.get("losses", {}).get("shifted"),
                "construction_test_mse": c.get("test_mse"),
                "construction_precision_digits": c.get("precision_digits"),
                "paired_diff_mean": b.get("paired", {}).get("diff_mean"),
                "paired_diff_se": b.get("paired", {}).get("diff_se"),
            }
        )
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
            entry[col] = {
                "seeds": len(pairs),
                "pretrained_lower": sum(y < x for x, y in pairs),
                "ties": sum(y == x for x, y in pairs),
                "median_ratio": float(np.median([y / x for x, y in pairs])) if defined else None,
            }
        out.append(entry)
    return out


def _domain_description(constructions):
    radii = [c["domain"]["radius"] for c in constructions.values() if c.get("domain")]
    if not radii:
        if any(c.get("kappa") is not None for c in constructions.values()):
            return {
                "kind": "all inputs",
                "reason": "no linearising biases: the construction (linear model or "
                "transformer) is exact for every input",
            }
        return None
    return {
        "kind": "ball",
        "center": 0.0,
        "radius": max(radii),
        "covers": "the test inputs and the shifted (x5) test inputs",
        "calibrated_column": {"kind": "samples", "n": N_CALIBRATION, "distribution": "N(0, I)", "margin": 2.0},
    }
