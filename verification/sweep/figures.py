"""The summary as figures: MSE against the row axis, one curve per label and frozen-model kind."""

from __future__ import annotations

from pathlib import Path

from ..outdir import atomic_write, figure_bytes

FIGURE_FLOOR = 1e-32  # exact zeros drawn at this MSE on the log scale


def figure_series(spec, summary) -> list:
    """The curves of :func:`make_figure`: dicts ``{"kind", "curve", "label", "x", "y", "lo", "hi", "style"}``.

    Gradient curves: one per frozen-model kind and row label (and group axis, e.g. the depth), with the
    interquartile band. Construction curves: one per kind (and group axis), whatever the row labels, from
    the rows that have a construction MSE; where the construction re-chooses the biases (FNNs with biases,
    whose ``domain`` is a certified ball) the label says so. Rows of runs that keep the frozen biases have
    no construction value (it is not their method), so nothing of theirs is drawn as a construction.
    """
    x_axis = "params" if spec.name == "final_layers" else spec.axis_names[-1]
    group_axes = list(spec.axis_names[:-1])
    rechosen = (summary.get("domain") or {}).get("kind") == "ball"
    out = []
    for kind, key in (("random", "rows"), ("pretrained", "pretrained_rows")):
        rows = summary[key]
        grad, cons = {}, {}
        for r in rows:
            group = tuple(r[a] for a in group_axes)
            grad.setdefault((r["label"],) + group, []).append(r)
            if r["construction_test_mse"] is not None:
                cons.setdefault(group, {}).setdefault(r[x_axis], r["construction_test_mse"])
        for i, (skey, rs) in enumerate(sorted(grad.items(), key=lambda kv: _natural(kv[0]))):
            rs = sorted((r for r in rs if r["gradient_test_mse"] is not None), key=lambda r: r[x_axis])
            if rs:
                out.append(
                    {
                        "kind": kind,
                        "curve": "gradient",
                        "style": i,
                        "group": skey[1:],
                        "label": f"{kind} " + " ".join(str(v) for v in skey) + ": gradient",
                        "x": [r[x_axis] for r in rs],
                        "y": [r["gradient_test_mse"] for r in rs],
                        "lo": [r["gradient_test_q25"] for r in rs],
                        "hi": [r["gradient_test_q75"] for r in rs],
                    }
                )
        for i, (group, points) in enumerate(sorted(cons.items(), key=lambda kv: _natural(kv[0]))):
            xs = sorted(points)
            name = " ".join([kind] + [f"{a} {v}" for a, v in zip(group_axes, group)])
            out.append(
                {
                    "kind": kind,
                    "curve": "construction",
                    "style": i,
                    "group": group,
                    "label": f"{name}: construction" + (" (biases re-chosen)" if rechosen else ""),
                    "x": xs,
                    "y": [points[x] for x in xs],
                    "lo": None,
                    "hi": None,
                }
            )
    return out


def _natural(key) -> tuple:
    """Sort key of a tuple of labels and numbers: numbers by value (depth 2 before depth 10)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def save_figure(fig, path: Path):
    """The figure drawn in memory, then written whole (:func:`verification.outdir.atomic_write`)."""
    atomic_write(path, figure_bytes(fig, dpi=130))


def make_grouped_figure(spec, summary, path: Path):
    """For experiments with a group axis (the depth sweep): one panel per frozen-model kind, one colour per
    group (e.g. frozen depth ``L``), gradient solid with its IQR band, construction dashed, and each
    group's threshold marked on its construction curve."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    series = figure_series(spec, summary)
    kinds = [k for k in ("random", "pretrained") if any(c["kind"] == k for c in series)] or ["random"]
    groups = sorted({c["group"] for c in series}, key=_natural)
    cmap = colormaps["viridis"]
    colour = {g: cmap(i / max(1, len(groups) - 1) * 0.9) for i, g in enumerate(groups)}
    group_axes = spec.axis_names[:-1]
    thr = summary["threshold"] if isinstance(summary["threshold"], dict) else {}
    floor = FIGURE_FLOOR
    fig = Figure(figsize=(5.2 * len(kinds), 4.8))
    axes = [fig.add_subplot(1, len(kinds), i + 1) for i in range(len(kinds))]
    for ax, kind in zip(axes, kinds):
        for c in (c for c in series if c["kind"] == kind):
            g = c["group"]
            name = " ".join(f"{a} {v}" for a, v in zip(group_axes, g))
            y = [max(v, floor) for v in c["y"]]
            if c["curve"] == "gradient":
                ax.plot(c["x"], y, "-", marker="o", ms=3, color=colour[g], label=f"{name}: gradient")
                ax.fill_between(
                    c["x"],
                    [max(v, floor) for v in c["lo"]],
                    [max(v, floor) for v in c["hi"]],
                    color=colour[g],
                    alpha=0.12,
                )
            else:
                t = thr.get(str(g[0])) if len(g) == 1 else None
                ax.plot(
                    c["x"],
                    y,
                    "--",
                    marker="s",
                    ms=3,
                    color=colour[g],
                    mfc="none",
                    label=f"{name}: construction" + (f" (threshold {t})" if t is not None else ""),
                )
                if t is not None and t in c["x"]:
                    ax.plot([t], [y[c["x"].index(t)]], marker="v", ms=7, color=colour[g])
        ax.set_yscale("log")
        ax.set_xlabel(spec.axis_names[-1])
        ax.set_title(f"{kind} frozen model")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="best", ncol=2)
    axes[0].set_ylabel("test MSE per coordinate (median over seeds)")
    fig.suptitle(
        f"{spec.name}: construction (dashed, ▼ at the threshold) vs gradient-trained (solid); floor {floor:g}",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


def make_figure(spec, summary, path: Path):
    """MSE against the experiment's axis, log scale: construction and gradient (IQR band), random and pretrained
    (the curves of :func:`figure_series`); experiments with a group axis get :func:`make_grouped_figure`."""
    from matplotlib.figure import Figure

    if len(spec.axis_names) > 1:
        return make_grouped_figure(spec, summary, path)
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"random": "tab:blue", "pretrained": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    floor = FIGURE_FLOOR
    for c in figure_series(spec, summary):
        ls = styles[c["style"] % len(styles)]
        y = [max(v, floor) for v in c["y"]]
        if c["curve"] == "gradient":
            ax.plot(c["x"], y, ls, marker="o", ms=3, color=colours[c["kind"]], label=c["label"])
            ax.fill_between(
                c["x"],
                [max(v, floor) for v in c["lo"]],
                [max(v, floor) for v in c["hi"]],
                color=colours[c["kind"]],
                alpha=0.15,
            )
        else:
            ax.plot(c["x"], y, ls, marker="s", ms=3, color=colours[c["kind"]], alpha=0.6, mfc="none", label=c["label"])
    x_axis = "params" if spec.name == "final_layers" else spec.axis_names[-1]
    thr = summary["threshold"]
    if isinstance(thr, int) and spec.axis_names[-1] == "rank" and spec.name != "final_layers":
        ax.axvline(thr, color="grey", lw=0.8, ls=":", label=f"threshold {thr}")
    ax.set_yscale("log")
    ax.set_xlabel(x_axis)
    ax.set_ylabel("test MSE per coordinate (median over seeds)")
    ax.set_title(f"{spec.name}: construction vs gradient-trained (floor {floor:g} for exact zeros)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
