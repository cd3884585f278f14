"""The summary as text: the stdout table and ``summary.csv``."""

from __future__ import annotations

import csv
import io

from .summary import _ROW_AXES


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
    """The table printed on stdout: one row per cell and frozen-model kind (threshold mark, prediction,
    construction, calibrated and gradient MSEs with their spread), then the pretrained-vs-random comparison."""
    buf = io.StringIO()
    thr = summary["threshold"]
    highprec = []
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        rows = summary[key]
        if not rows:
            continue
        axes = [a for a in _ROW_AXES if a in rows[0]]
        print(f"\n{spec.name}: {kind} frozen model (threshold {thr}; MSE per coordinate, medians over seeds)", file=buf)
        head = (
            "".join(a.rjust(6) for a in axes)
            + "  label".ljust(22)
            + "params".rjust(7)
            + " thr"
            + "predicted".rjust(10)
            + "construct".rjust(10)
            + "calibrat.".rjust(10)
            + "gradient".rjust(10)
            + "   [q25, q75]".ljust(22)
            + "constr x5".rjust(10)
            + "calib x5".rjust(10)
            + "grad x5".rjust(10)
        )
        print(head, file=buf)
        for r in rows:
            mark = _threshold_mark(thr, r)
            cons = r["construction_test_mse"]
            note = r["construction_note"] or "—"
            cons_s = (
                _fmt(cons, 10) if cons is not None else " " + (note if note.startswith("n/c") else "—")[:15].rjust(15)
            )
            if cons is not None and r.get("construction_precision_digits"):
                cons_s = _fmt(cons, 9) + "*"
                highprec.append(r)
            iqr = f"[{_fmt(r['gradient_test_q25'], 8).strip()}, {_fmt(r['gradient_test_q75'], 8).strip()}]"
            print(
                "".join(("—" if r[a] is None else str(r[a])).rjust(6) for a in axes)
                + "  "
                + str(r["label"]).ljust(20)
                + str(r["params"]).rjust(7)
                + mark.rjust(4)
                + _fmt(r["prediction"], 10)
                + cons_s
                + _fmt(r["calibrated_test_mse"], 10)
                + _fmt(r["gradient_test_mse"], 10)
                + "  "
                + iqr.ljust(20)
                + _fmt(r["construction_shifted_mse"], 10)
                + _fmt(r["calibrated_shifted_mse"], 10)
                + _fmt(r["gradient_shifted_mse"], 10),
                file=buf,
            )
    print(
        "params: trained parameters, trained biases included (LoRA: 2·r·D per adapted matrix, plus the biases "
        "it trains with --tune-bias; final layers: l·(D² + D))",
        file=buf,
    )
    paired = summary.get("pretrained_vs_random")
    if paired:
        print(
            f"\n{spec.name}: pretrained vs random frozen model, paired by seed (k/n: pretrained lower in k of "
            f"n seeds; ratio: median of pretrained / random)",
            file=buf,
        )
        axes = [a for a in _ROW_AXES if a in paired[0]]
        print(
            "".join(a.rjust(6) for a in axes)
            + "  label".ljust(22)
            + " thr"
            + "construction".rjust(20)
            + "gradient".rjust(20),
            file=buf,
        )

        def cell(c):
            if not c["seeds"]:
                return "—".rjust(20)
            ratio = "—" if c["median_ratio"] is None else f"{c['median_ratio']:#.3g}"
            ties = f" ={c['ties']}" if c["ties"] else ""
            return f"{c['pretrained_lower']}/{c['seeds']}{ties}".rjust(10) + ratio.rjust(10)

        for e in paired:
            mark = _threshold_mark(thr, e)
            print(
                "".join(("—" if e[a] is None else str(e[a])).rjust(6) for a in axes)
                + "  "
                + str(e["label"]).ljust(20)
                + mark.rjust(4)
                + cell(e["construction"])
                + cell(e["gradient"]),
                file=buf,
            )
        print(
            "(=t: t seeds equal; from the threshold on, both constructions are exact: their ratio compares "
            "rounding errors)",
            file=buf,
        )
    if highprec:
        digits = sorted({r["construction_precision_digits"] for r in highprec})
        n = max(r["construction_subsample"] or 0 for r in highprec)
        why = (
            "float64 weights carry a relative output error (up to 2e-7 per input measured at D = 16; "
            "construction_note gives the float64 MSE)"
            if spec.family == "tfn"
            else "not computable honestly in float64 (construction_note gives the float64 κ)"
        )
        print(
            f"* construction in high precision (mpmath, {digits[0]}{'' if len(digits) == 1 else f'..{digits[-1]}'} "
            f"digits) on the first {n} test and shifted inputs: {why}",
            file=buf,
        )
    return buf.getvalue()


CSV_FIELDS = [
    "kind",
    "depth",
    "step",
    "layers",
    "rank",
    "label",
    "method",
    "params",
    "prediction",
    "construction_test_mse",
    "construction_shifted_mse",
    "calibrated_test_mse",
    "calibrated_shifted_mse",
    "construction_kappa",
    "construction_note",
    "construction_precision_digits",
    "construction_subsample",
    "gradient_test_mse",
    "gradient_test_q25",
    "gradient_test_q75",
    "gradient_shifted_mse",
    "gradient_val_mse",
    "target_power",
]


def format_csv(summary) -> str:
    """``summary.csv``: one line per row of both frozen-model kinds, the columns :data:`CSV_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        for r in summary[key]:
            w.writerow({"kind": kind, **{k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS if k != "kind"}})
    return buf.getvalue()
