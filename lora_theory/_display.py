"""How the result records and models read in a terminal and a notebook.

The dataclasses' generated ``repr`` printed every array they hold (tens of thousands of characters for a fit
of width 16). Each class assigns one of these functions as its ``__repr__`` (and, where a table says more,
``_repr_markdown_``): a one-line summary of what a person reads first (sizes, ranks, whether the claim holds,
errors, ``κ``), arrays shown by their shape. The full data stay on the attributes. Nothing here computes a
result: the functions only read attributes the records already hold.
"""

from __future__ import annotations

import numbers

import numpy as np


def _value(v) -> str:
    """One field's value, short: floats to 4 significant digits, arrays as ``array(shape)``."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return f"{float(v):.4g}"
    if isinstance(v, np.ndarray):
        return f"array{v.shape}" if v.size > 4 else np.array2string(v, precision=4, separator=", ")
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, tuple) and all(isinstance(x, (numbers.Integral, numbers.Real)) for x in v):
        return "(" + ", ".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if v is None:
        return "None"
    return type(v).__name__


def summary(name: str, fields) -> str:
    """``name(key=value, ...)`` from ``(key, value)`` pairs."""
    return f"{name}(" + ", ".join(f"{k}={_value(v)}" for k, v in fields) + ")"


def _cell(text: str) -> str:
    """Text fit for one markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header, rows) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_value(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ models


def fnn_repr(m) -> str:
    return summary(
        "FNN", [("width", m.width), ("depth", m.depth), ("activation", m.activation), ("final_relu", m.final_relu)]
    )


def tfn_repr(m) -> str:
    return summary("TFN", [("embed_dim", m.embed_dim), ("depth", m.depth), ("heads", m.heads)])


# -------------------------------------------------------------------------------------------------- fits


def linear_fit_repr(fit) -> str:
    return summary(
        "LinearFit",
        [
            ("D", fit.target.shape[0]),
            ("L", len(fit.frozen)),
            ("ranks", fit.ranks),
            ("exact", fit.exact),
            ("rank_sufficient", fit.rank_sufficient),
            ("error_rank", fit.error_rank),
            ("spectral_error", fit.spectral_error),
            ("frobenius_error", fit.frobenius_error),
            ("measured_error", fit.measured_error),
            ("kappa", fit.kappa),
            ("gamma", fit.gamma),
        ],
    )


def linear_fit_markdown(fit) -> str:
    head = f"**{linear_fit_repr(fit)}**\n\n"
    rows = [(f"W_{l + 1}", a.rank, fit.ranks[l]) for l, a in enumerate(fit.adapters)]
    return head + table(["layer", "adapter rank", "budget R_l"], rows)


def domain_repr(d) -> str:
    if d.kind == "ball":
        return summary(
            "Domain",
            [("kind", d.kind), ("center", d.center), ("radius", d.radius), ("block_input_radii", d.block_input_radii)],
        )
    return summary("Domain", [("kind", d.kind), ("n_samples", d.n_samples), ("margin", d.margin)])


def block_fit_repr(b) -> str:
    return summary(
        "BlockFit",
        [
            ("layers", (b.layers.start + 1, b.layers.stop)),
            ("discrepancy_rank", b.discrepancy_rank),
            ("budget", b.budget),
            ("directions", b.directions),
            ("exact", b.exact),
            ("error", b.error),
            ("input_radius", b.input_radius),
            ("output_radius", b.output_radius),
            ("gamma", b.gamma),
        ],
    )


def fnn_fit_repr(fit) -> str:
    return summary(
        "FNNFit",
        [
            ("D", fit.target.width),
            ("L", fit.frozen.depth),
            ("Lbar", fit.target.depth),
            ("ranks", fit.ranks),
            ("partition", fit.partition),
            ("exact", fit.exact),
            ("rank_sufficient", fit.rank_sufficient),
            ("measured_error", fit.measured_error),
            ("tolerance", fit.tolerance),
            ("kappa", fit.kappa),
            ("gamma", fit.gamma),
            ("domain", fit.domain.kind),
        ],
    )


def fnn_fit_markdown(fit) -> str:
    head = f"**{fnn_fit_repr(fit)}**\n\n"
    rows = [
        (
            str(i + 1),
            f"{b.layers.start + 1}..{b.layers.stop}",
            b.discrepancy_rank,
            b.budget,
            b.directions,
            b.exact,
            b.error,
            max(b.condition_numbers.values(), default=1.0),
            b.input_radius,
            b.output_radius,
        )
        for i, b in enumerate(fit.block_fits)
    ]
    return head + table(
        [
            "block",
            "frozen layers",
            "rank(E_i)",
            "budget",
            "directions",
            "exact",
            "error",
            "κ",
            "input radius",
            "output radius",
        ],
        rows,
    )


def tfn_fit_repr(fit) -> str:
    return summary(
        "TFNFit",
        [
            ("D", fit.frozen.embed_dim),
            ("L", fit.frozen.depth),
            ("H", fit.frozen.heads),
            ("rank", fit.rank),
            ("required_rank", fit.required_rank),
            ("matched_ranks", fit.matched_ranks),
            ("exact", fit.exact),
            ("rank_sufficient", fit.rank_sufficient),
            ("measured_error", fit.measured_error),
            ("kappa", fit.kappa),
        ],
    )


def high_precision_repr(fit) -> str:
    sizes = {
        "HighPrecisionLinearFit": lambda: [("ranks", fit.ranks)],
        "HighPrecisionFNNFit": lambda: [("ranks", fit.ranks), ("partition", fit.partition), ("radius", fit.radius)],
        "HighPrecisionTFNFit": lambda: [("rank", fit.rank), ("required_rank", fit.required_rank)],
    }
    name = type(fit).__name__
    return summary(
        name,
        sizes[name]()
        + [
            ("digits", fit.digits),
            ("exact", fit.exact),
            ("rank_sufficient", fit.rank_sufficient),
            ("measured_error", fit.measured_error),
            ("tolerance", fit.tolerance),
            ("kappa", fit.kappa),
            ("gamma", fit.gamma),
        ],
    )


def error_bound_repr(b) -> str:
    return summary(
        "ErrorBound",
        [
            ("ranks", b.ranks),
            ("partition", b.partition),
            ("rms", b.rms),
            ("mse", b.mse),
            ("block_errors", tuple(b.block_errors)),
        ],
    )


# -------------------------------------------------------------------------------------------- certificates


def certificate_repr(c) -> str:
    failed = len(c.failed_checks)
    return summary(
        "Certificate",
        [
            ("model", c.model),
            ("sizes", ", ".join(f"{k}={v}" for k, v in c.sizes.items())),
            ("rank", c.rank if not isinstance(c.rank, tuple) else tuple(c.rank)),
            ("outcome", c.outcome),
            ("required_rank", c.required_rank),
            ("checks", len(c.checks)),
            ("failed", failed),
        ],
    )


def certificate_markdown(c) -> str:
    head = f"**{certificate_repr(c)}**\n\n{c.reason}\n\n"
    rows = [(_cell(k.name), "pass" if k.passed else "FAIL", _cell(k.detail)[:160]) for k in c.checks]
    return head + table(["check", "", "detail"], rows)


def witness_repr(w) -> str:
    return summary(
        "Witness",
        [
            ("found", w.found),
            ("separation", w.separation),
            ("relative_separation", w.relative_separation),
            ("lower_bound", w.lower_bound),
            ("radius", w.radius),
            ("reason", w.reason[:80]),
        ],
    )
