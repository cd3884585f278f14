"""Every synthetic experiment of Zeng & Lee (2024) in one resumable command, with a verdict on each claim.

``python -m verification.paper --quick`` runs, in the order of the paper, the linear model (Lemma 1), the
ReLU FNNs with ``L̄ = 1, L = 2`` and ``L̄ = 2, L = 4`` (Theorem 3), the transformers with one and two blocks
(Theorem 7), final-layers tuning (Lemma 4), fixed against trained biases, per-layer rank schedules
(Theorem 6) and the frozen-depth sweep, each on random and pretrained frozen models, each as its own
command (``python -m verification.<experiment>``) writing its own folder under ``--out``. Then it writes

* ``report.md``: every table and figure in the order of the paper, then the verdicts;
* ``verdicts.json``: the paper's claims, each with what this run measured, the criterion it was judged by
  and a status: ``holds``, ``does not hold``, ``partly`` (some of its cases hold) or ``not measured`` (this
  run has no row that can test it, e.g. an experiment left out with ``--only``).

Nothing is tuned to make a claim hold: each criterion is fixed below (:data:`EXACT_RELATIVE_MSE`,
:data:`GRADIENT_FAILS_RELATIVE_MSE`) and applied to the medians over seeds that the experiments report.

An interrupted run goes on with ``--resume DIR``: finished experiments are kept, an interrupted one is
resumed by its own ``--resume``, the rest run. Before it starts, the command prints its plan: per experiment
the gradient runs, Adam steps and high-precision constructions, and an estimate of the whole from a short
measurement of this machine's training speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .outdir import (
    SETTINGS_FILE,
    CLIError,
    FolderLock,
    OneLineParser,
    atomic_write,
    check_folder,
    claim_folder,
    positive_int,
)

#: A construction counts as exact when its test MSE is at most this fraction of the target's output power
#: (relative RMS error 1e-5). Exact constructions measure 1e-20 and below in float64 (two-block transformers:
#: per-input relative errors up to 2e-7, squared 4e-14); the first rank below a threshold leaves 1e-4 to 1e-2.
EXACT_RELATIVE_MSE = 1e-10
#: Gradient training "fails" on a problem the construction solves exactly when its test MSE stays above this
#: fraction of the target's output power (1%).
GRADIENT_FAILS_RELATIVE_MSE = 1e-2
#: Inputs scaled by 5 have about 25 times the output power of the test inputs (positively homogeneous up to
#: the biases); the x5 columns are judged against ``SHIFT_POWER * target_power``.
SHIFT_POWER = 25.0


@dataclasses.dataclass(frozen=True)
class Step:
    """One experiment of the paper: its folder name, its command (``python -m verification.<module> *argv``),
    the paper's result it checks and a title for the report."""

    name: str
    module: str
    argv: tuple
    result: str
    title: str
    family: str  # "fnn" or "tfn": which trainer measures its speed


STEPS = (
    Step("linear", "linear", (), "Lemma 1", "Linear models, L̄ = 1, L = 2", "fnn"),
    Step("fnn_L2", "fnn", ("--depth", "2", "--target-depth", "1"), "Theorem 3", "ReLU FNN, L̄ = 1, L = 2", "fnn"),
    Step("fnn_L4", "fnn", ("--depth", "4", "--target-depth", "2"), "Theorem 3", "ReLU FNN, L̄ = 2, L = 4", "fnn"),
    Step("tfn_L1", "tfn", ("--depth", "1"), "Theorem 7", "Transformer, one block", "tfn"),
    Step("tfn_L2", "tfn", ("--depth", "2"), "Theorem 7", "Transformer, two blocks", "tfn"),
    Step("final_layers", "final_layers", (), "Lemma 4", "LoRA against final-layers tuning, L̄ = 1, L = 8", "fnn"),
    Step("biases", "biases", (), "Theorem 3", "Fixed against trained biases, L̄ = 1, L = 2", "fnn"),
    Step("rank_schedule", "rank_schedule", (), "Theorem 6", "Per-layer rank schedules, L̄ = 2, L = 4", "fnn"),
    Step("depth_sweep", "depth_sweep", (), "Theorem 3", "Frozen depth L = 2, 4, ..., 14, L̄ = 1", "fnn"),
)
STEP_NAMES = tuple(s.name for s in STEPS)

# flags handed to every experiment unchanged (dest, flag, takes a value)
_PASSED = (
    ("quick", "--quick", False),
    ("device", "--device", True),
    ("seeds", "--seeds", True),
    ("iterations", "--iterations", True),
    ("workers", "--workers", True),
    ("chunk", "--chunk", True),
    ("frozen", "--frozen", True),
    ("no_figure", "--no-figure", False),
    ("backend", "--backend", True),
    ("address", "--address", True),
)


# ------------------------------------------------------------------------------------------------ the plan


def step_argv(step: Step, args) -> list[str]:
    """The experiment's command line for this run's settings."""
    argv = list(step.argv)
    for dest, flag, valued in _PASSED:
        value = getattr(args, dest)
        if valued and value is not None:
            argv += [flag, str(value)]
        elif not valued and value:
            argv.append(flag)
    return argv


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one experiment will do: ``runs`` gradient runs of ``iterations`` Adam steps each, ``highprec``
    constructions at raised precision taking about ``highprec_seconds`` of one core."""

    step: Step
    runs: int
    iterations: int
    highprec: int
    highprec_seconds: float

    @property
    def run_steps(self) -> int:
        return self.runs * self.iterations


def plan_step(step: Step, argv: list[str]) -> StepPlan:
    """Parse ``argv`` as the experiment would and count its work (nothing is run)."""
    from .sweep.cli import _normalise, base_parser
    from .sweep.constructions import highprec_estimate
    from .sweep.training import make_runs

    spec = importlib.import_module(f"verification.{step.module}").SPEC
    parser = base_parser(spec)
    args = parser.parse_args(argv)
    _normalise(spec, args)
    if spec.validate is not None:
        spec.validate(args)
    cells = spec.cells(args)
    runs = make_runs(spec, args, cells)
    count, seconds = highprec_estimate(cells, args.seeds)
    return StepPlan(step, len(runs), args.iterations, count, seconds)


def measure_rates(device: str, steps: int = 20) -> dict[str, float]:
    """Run-steps per second of one stack of each trainer on ``device`` (64 FNN runs, ``L = 4``; 8 transformer
    runs, two blocks; ``D = 16``, batch 256): the speed the plan's estimate divides by."""
    import torch

    import lora_theory

    from .trainer import FNNStack, TFNStack

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    D = 16
    rates = {}
    fnns = [lora_theory.random_fnn(D, 4, seed=i) for i in range(64)]
    target = lora_theory.random_fnn(D, 2, seed=999)
    stack = FNNStack(
        np.stack([np.stack(f.weights) for f in fnns]),
        np.stack([np.stack(f.biases) for f in fnns]),
        ranks=np.full((64, 4), 8),
        tune_bias=np.ones(64, bool),
        init_seeds=np.arange(64),
        device=dev,
    )
    tstack = FNNStack(np.stack(target.weights)[None], np.stack(target.biases)[None], method="none", device=dev)
    rates["fnn"] = _rate(stack, tstack, 64, (D,), steps, dev)
    tfns = [lora_theory.random_tfn(D, 2, 2, seed=i) for i in range(8)]
    params = {k: np.stack([t.parameters()[k] for t in tfns]) for k in tfns[0].parameters()}
    ttarget = lora_theory.random_tfn(D, 2, 2, seed=999)
    stack = TFNStack(params, ranks=np.full(8, 8), tune_bias=np.ones(8, bool), init_seeds=np.arange(8), device=dev)
    tstack = TFNStack({k: v[None] for k, v in ttarget.parameters().items()}, method="none", device=dev)
    rates["tfn"] = _rate(stack, tstack, 8, (D, 10), steps, dev)
    return rates


def _rate(stack, tstack, R, shape, steps, dev) -> float:
    import torch

    from .trainer import train_stack

    def train(iterations):
        train_stack(
            stack,
            tstack,
            data_index=np.zeros(R, int),
            target_index=np.zeros(R, int),
            target_data_index=[0],
            data_seeds=[7],
            lr=np.full(R, 1e-3),
            weight_decay=np.full(R, 1e-4),
            iterations=iterations,
            batch_size=256,
            input_shape=shape,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train(2)
    t0 = time.perf_counter()
    train(steps)
    return R * steps / (time.perf_counter() - t0)


def format_plan(plans: list[StepPlan], rates: dict[str, float] | None, done: set[str]) -> str:
    lines = [f"  {'experiment':<14}{'runs':>8}{'steps':>8}{'run-steps':>13}{'high-prec.':>12}  estimate"]
    total = 0.0
    for p in plans:
        if p.step.name in done:
            lines.append(f"  {p.step.name:<14}{'finished: kept':>41}")
            continue
        seconds = p.highprec_seconds + (p.run_steps / rates[p.step.family] if rates else 0.0)
        total += seconds
        lines.append(
            f"  {p.step.name:<14}{p.runs:>8}{p.iterations:>8}{p.run_steps:>13,}{p.highprec:>12}  "
            + (_duration(seconds) if rates else "-")
        )
    if rates:
        lines.append(
            f"  whole: about {_duration(total)} (one stack at a time at "
            + ", ".join(f"{k} {v:,.0f} run-steps/s" for k, v in rates.items())
            + " measured here, plus the high-precision constructions on one core; the experiments "
            "train several stacks at once where cores are free, so it can be less)"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------ verdicts


def _exact(row) -> bool | None:
    mse, power = row.get("construction_test_mse"), row.get("target_power")
    if mse is None or power is None or not math.isfinite(mse) or power <= 0:
        return None
    return mse <= EXACT_RELATIVE_MSE * power


def _threshold_of(summary, row):
    thr = summary["threshold"]
    if isinstance(thr, dict):
        return thr.get(str(row.get("depth")))
    return thr


def _verdict(claim, status, measured, criterion, experiments):
    return {"claim": claim, "status": status, "measured": measured, "criterion": criterion, "experiments": experiments}


def _status(results: list[bool]) -> str:
    if not results:
        return "not measured"
    if all(results):
        return "holds"
    return "does not hold" if not any(results) else "partly"


def _kinds(summary):
    return (("random", summary.get("rows", [])), ("pretrained", summary.get("pretrained_rows", [])))


def _ranked_rows(summaries: dict, names) -> tuple[list, list]:
    """``(used, rows)``: the experiments of ``names`` this run has, and every one of their rows with a rank
    and a threshold, as ``(name, frozen kind, row, rank, threshold)``."""
    used, rows = [], []
    for name in names:
        summary = summaries.get(name)
        if summary is None:
            continue
        used.append(name)
        for kind, kind_rows in _kinds(summary):
            for row in kind_rows:
                rank, thr = row.get("rank"), _threshold_of(summary, row)
                if rank is not None and thr is not None:
                    rows.append((name, kind, row, rank, thr))
    return used, rows


def verdict_threshold(summaries: dict) -> list[dict]:
    """The construction is exact from each threshold on (the theorems' sufficiency) and not before (random
    weights are generic: the discrepancy has full rank)."""
    from_on, before, measured = [], [], []
    used, rows = _ranked_rows(
        summaries, ("linear", "fnn_L2", "fnn_L4", "tfn_L1", "tfn_L2", "final_layers", "biases", "depth_sweep")
    )
    for name, kind, row, rank, thr in rows:
        exact = _exact(row)
        if exact is None:
            continue
        (from_on if rank >= thr else before).append(exact if rank >= thr else not exact)
        measured.append(
            {
                "experiment": name,
                "frozen": kind,
                "depth": row.get("depth"),
                "rank": rank,
                "threshold": thr,
                "label": row.get("label"),
                "exact": exact,
                "relative_mse": row["construction_test_mse"] / row["target_power"],
            }
        )
    crit = f"exact: construction test MSE <= {EXACT_RELATIVE_MSE:g} x the target's output power (median over seeds)"
    return [
        _verdict(
            "The construction is exact at every rank from the threshold on (Lemma 1, Theorems 3, 6, 7)",
            _status(from_on),
            [m for m in measured if m["rank"] >= m["threshold"]],
            crit,
            used,
        ),
        _verdict(
            "Below the threshold the construction is not exact (random frozen models are generic)",
            _status(before),
            [m for m in measured if m["rank"] < m["threshold"]],
            crit,
            used,
        ),
    ]


def verdict_depth(summaries: dict) -> list[dict]:
    """The smallest exact rank falls as the frozen model deepens (depth sweep, ``L̄ = 1``)."""
    summary = summaries.get("depth_sweep")
    claim = "The rank the construction needs falls as the frozen model deepens (threshold ceil(D/L))"
    crit = "per frozen-model kind: the smallest rank run at which the construction is exact never rises with L"
    if summary is None:
        return [_verdict(claim, "not measured", [], crit, [])]
    measured, results = [], []
    for kind, rows in _kinds(summary):
        smallest = {}
        for row in rows:
            if _exact(row):
                d = row["depth"]
                smallest[d] = min(smallest.get(d, math.inf), row["rank"])
        depths = sorted(smallest)
        if len(depths) >= 2:
            results.append(
                all(smallest[a] >= smallest[b] for a, b in zip(depths, depths[1:]))
                and smallest[depths[0]] > smallest[depths[-1]]
            )
        measured.append(
            {
                "frozen": kind,
                "smallest_exact_rank": {str(d): smallest[d] for d in depths},
                "threshold": summary["threshold"],
            }
        )
    return [_verdict(claim, _status(results), measured, crit, ["depth_sweep"])]


def verdict_final_layers(summaries: dict) -> list[dict]:
    """Gradient-trained LoRA beats tuning the final layers at equal (or fewer) trained parameters."""
    summary = summaries.get("final_layers")
    claim = "LoRA beats final-layers tuning at equal trained parameters (Lemma 4)"
    crit = (
        "each final-layers row against the LoRA row with the most trained parameters not above its own: "
        "LoRA's gradient-trained test MSE is lower"
    )
    if summary is None:
        return [_verdict(claim, "not measured", [], crit, [])]
    measured, results = [], []
    for kind, rows in _kinds(summary):
        lora = sorted(
            (r for r in rows if r.get("method") == "lora" and r.get("gradient_test_mse") is not None),
            key=lambda r: r["params"],
        )
        for row in rows:
            if row.get("method") != "final_layers" or row.get("gradient_test_mse") is None:
                continue
            cheaper = [r for r in lora if r["params"] <= row["params"]]
            if not cheaper:
                measured.append(
                    {
                        "frozen": kind,
                        "layers": row.get("layers"),
                        "params": row["params"],
                        "note": "no LoRA row with at most as many trained parameters",
                    }
                )
                continue
            best = cheaper[-1]
            wins = best["gradient_test_mse"] < row["gradient_test_mse"]
            results.append(wins)
            measured.append(
                {
                    "frozen": kind,
                    "layers": row.get("layers"),
                    "params": row["params"],
                    "final_layers_mse": row["gradient_test_mse"],
                    "lora_rank": best.get("rank"),
                    "lora_params": best["params"],
                    "lora_mse": best["gradient_test_mse"],
                    "lora_lower": wins,
                }
            )
    return [_verdict(claim, _status(results), measured, crit, ["final_layers"])]


def verdict_schedule(summaries: dict) -> list[dict]:
    """Each rank schedule is exact where Theorem 6's first-block rank sum says it is sufficient, and (random
    frozen models: ``rank(E_i) = D``) not exact where it falls short."""
    summary = summaries.get("rank_schedule")
    claim = "Rank schedules come out as the first block's rank sum predicts (Theorem 6)"
    crit = "construction exact exactly where the first block's rank sum reaches rank(E_1) = D"
    if summary is None or "predictions" not in summary:
        return [_verdict(claim, "not measured", [], crit, [])]
    measured, results = [], []
    for kind, rows in _kinds(summary):
        for row in rows:
            pred = summary["predictions"].get(str(row.get("step")))
            exact = _exact(row)
            if pred is None or exact is None:
                continue
            results.append(exact == pred["predicted_exact"])
            measured.append(
                {"frozen": kind, "ranks": pred["ranks"], "predicted_exact": pred["predicted_exact"], "exact": exact}
            )
    return [_verdict(claim, _status(results), measured, crit, ["rank_schedule"])]


def verdict_pretrained(summaries: dict) -> list[dict]:
    """The pretrained frozen model needs less rank: below the threshold its construction error is lower than
    the random model it was pretrained from, paired by seed, at each rank."""
    claim = "A pretrained frozen model needs less rank than a random one (paired by seed, per rank)"
    crit = "at each rank below the threshold: the pretrained model's construction MSE lower in most seeds"
    measured, results, used = [], [], []
    for name in ("linear", "fnn_L2", "fnn_L4"):
        summary = summaries.get(name)
        if summary is None or not summary.get("pretrained_vs_random"):
            continue
        used.append(name)
        for entry in summary["pretrained_vs_random"]:
            if entry.get("rank") is None or entry["rank"] >= summary["threshold"]:
                continue
            c = entry["construction"]
            if not c["seeds"]:
                continue
            lower = c["pretrained_lower"] > c["seeds"] / 2
            results.append(lower)
            measured.append(
                {
                    "experiment": name,
                    "rank": entry["rank"],
                    "seeds": c["seeds"],
                    "pretrained_lower": c["pretrained_lower"],
                    "median_ratio": c["median_ratio"],
                    "holds": lower,
                }
            )
    return [_verdict(claim, _status(results), measured, crit, used)]


def verdict_tfn_gradient(summaries: dict) -> list[dict]:
    """Gradient training of the two-block transformer fails where the construction is exact."""
    summary = summaries.get("tfn_L2")
    claim = "Gradient training of the two-block transformer fails where the construction is exact"
    crit = (
        f"at every rank from the threshold on: the selected gradient run's test MSE above "
        f"{GRADIENT_FAILS_RELATIVE_MSE:g} x the target's output power while the construction is exact"
    )
    if summary is None:
        return [_verdict(claim, "not measured", [], crit, [])]
    measured, results = [], []
    for kind, rows in _kinds(summary):
        for row in rows:
            if row.get("rank") is None or row["rank"] < summary["threshold"] or not _exact(row):
                continue
            if row.get("gradient_test_mse") is None:
                continue
            rel = row["gradient_test_mse"] / row["target_power"]
            results.append(rel > GRADIENT_FAILS_RELATIVE_MSE)
            measured.append(
                {
                    "frozen": kind,
                    "rank": row["rank"],
                    "gradient_relative_mse": rel,
                    "construction_relative_mse": row["construction_test_mse"] / row["target_power"],
                }
            )
    return [_verdict(claim, _status(results), measured, crit, ["tfn_L2"])]


def verdict_shift(summaries: dict) -> list[dict]:
    """The construction's certified biases survive inputs scaled by 5; the sample-calibrated biases do not."""
    claim = (
        "The construction with certified biases stays exact on inputs scaled by 5; the one with "
        "sample-calibrated biases does not"
    )
    crit = (
        f"from the threshold on, relative to {SHIFT_POWER:g} x the target's output power: certified x5 MSE "
        f"<= {EXACT_RELATIVE_MSE:g}, calibrated x5 MSE above it"
    )
    measured, results = [], []
    used, rows = _ranked_rows(summaries, ("fnn_L2", "fnn_L4", "rank_schedule", "depth_sweep"))
    for name, kind, row, rank, thr in rows:
        if rank < thr or not _exact(row):
            continue
        certified, calibrated = row.get("construction_shifted_mse"), row.get("calibrated_shifted_mse")
        if certified is None or calibrated is None:
            continue
        scale = SHIFT_POWER * row["target_power"]
        ok = certified <= EXACT_RELATIVE_MSE * scale and not calibrated <= EXACT_RELATIVE_MSE * scale
        results.append(ok)
        measured.append(
            {
                "experiment": name,
                "frozen": kind,
                "depth": row.get("depth"),
                "rank": rank,
                "certified_relative_mse": certified / scale,
                "calibrated_relative_mse": calibrated / scale,
                "holds": ok,
            }
        )
    return [_verdict(claim, _status(results), measured, crit, used)]


VERDICTS = (
    verdict_threshold,
    verdict_depth,
    verdict_final_layers,
    verdict_schedule,
    verdict_pretrained,
    verdict_tfn_gradient,
    verdict_shift,
)


def verdicts(summaries: dict) -> list[dict]:
    """Every claim's verdict from the experiments' ``summary.json`` contents (``{step name: summary}``)."""
    return [v for rule in VERDICTS for v in rule(summaries)]


# -------------------------------------------------------------------------------------------------- report


def format_report(out: Path, steps, found: list[dict], settings: dict) -> str:
    lines = [
        "# The paper's synthetic experiments",
        "",
        f"Zeng & Lee (2024), *The Expressive Power of Low-Rank Adaptation*, reproduced by "
        f"`python -m verification.paper {' '.join(settings['argv'])}` on {settings['created']}.",
        "",
    ]
    for step in steps:
        folder = out / step.name
        lines += [
            f"## {step.title} ({step.result})",
            "",
            f"`python -m verification.{step.module} {' '.join(settings['step_argv'][step.name])}`; "
            f"files in `{step.name}/`.",
            "",
        ]
        table = folder / "table.txt"
        if table.is_file():
            lines += ["```", table.read_text(encoding="utf-8").rstrip(), "```", ""]
        else:
            lines += ["(not run)", ""]
        if (folder / "figure.png").is_file():
            lines += [f"![{step.title}]({step.name}/figure.png)", ""]
    lines += ["## Verdicts", "", "| claim | status | criterion |", "| --- | --- | --- |"]
    for v in found:
        lines.append(f"| {v['claim']} | **{v['status']}** | {v['criterion']} |")
    lines += ["", "What each verdict measured is in `verdicts.json`."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m verification.paper", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every experiment's --quick (a few minutes on a CPU)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per experiment (default: each experiment's)")
    p.add_argument(
        "--iterations", type=positive_int, default=None, help="Adam steps per run (default: each experiment's)"
    )
    p.add_argument("--frozen", default=None, help="frozen-model kinds (default random,pretrained)")
    p.add_argument("--workers", type=positive_int, default=None, help="stacks trained at once on a CPU")
    p.add_argument("--chunk", type=positive_int, default=None, help="runs per stack")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default=None,
        help="local (default) or ray: every experiment's units of work as Ray tasks",
    )
    p.add_argument("--address", default=None, help="with --backend ray: a running Ray cluster")
    p.add_argument("--only", default=None, help=f"comma-separated experiments out of {','.join(STEP_NAMES)}")
    p.add_argument("--no-figure", action="store_true", help="skip the figures")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--out", default=None, help="output folder (default results/paper-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="finish an interrupted run in DIR")
    return p


def _selected(args) -> list[Step]:
    if args.only is None:
        return list(STEPS)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        raise ValueError(f"--only: unknown experiments {unknown or names}; choose from {', '.join(STEP_NAMES)}")
    return [s for s in STEPS if s.name in names]


def _read_summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _run_step(step: Step, argv: list[str], folder: Path) -> int:
    """Run (or resume) one experiment into ``folder``; its table is kept in ``table.txt``."""
    module = importlib.import_module(f"verification.{step.module}")
    full = ["--resume", str(folder)] if (folder / "config.json").is_file() else [*argv, "--out", str(folder)]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = module.main(full)
    text = captured.getvalue()
    sys.stdout.write(text)
    if code == 0:
        atomic_write(folder / "table.txt", text)
    return code


def main(argv=None) -> int:
    parser = _parser()
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    argv = list(argv if argv is not None else sys.argv[1:])
    try:
        if args.resume:
            out = Path(args.resume)
            if not check_folder(out, "paper", "--resume"):
                raise CLIError(f"--resume {out}: not a folder of python -m verification.paper")
            saved = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
            resumed = parser.parse_args(saved["argv"])
            if "--device" in argv:  # where it runs: from this command line
                resumed.device = args.device
            for dest in ("backend", "address"):  # for the experiments not started yet
                if f"--{dest}" in argv:
                    setattr(resumed, dest, getattr(args, dest))
            args = resumed
        else:
            out = Path(args.out) if args.out else Path("results") / f"paper-{_dt.datetime.now():%Y%m%d-%H%M%S}"
            if check_folder(out, "paper", "--out"):
                raise CLIError(
                    f"--out {out}: holds an earlier run of this command: finish it with --resume {out}, "
                    f"or use another folder"
                )
            saved = None
        steps = _selected(args)
        step_argvs = {s.name: step_argv(s, args) for s in steps}
        plans = [plan_step(s, step_argvs[s.name]) for s in steps]  # every experiment's flags checked first
    except SystemExit:  # an experiment's parser refused a flag (its one-line message is printed)
        return 2
    except Exception as exc:  # noqa: BLE001 - CLIError, LoraTheoryError and the experiments' own refusals
        if type(exc).__name__ not in ("CLIError", "LoraTheoryError", "InvalidArgumentError") and not isinstance(
            exc, ValueError
        ):
            raise
        return parser.refuse(exc)

    done = {
        s.name for s in steps if (out / s.name / "summary.json").is_file() and (out / s.name / "table.txt").is_file()
    }
    rates = measure_rates(args.device)
    print(f"paper: {len(steps)} experiments into {out}\n" + format_plan(plans, rates, done), file=sys.stderr)
    if args.plan:
        return 0
    try:
        if saved is None:
            saved = {"argv": argv, "step_argv": step_argvs}
            claim_folder(out, "paper", saved)
            saved = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
        lock = FolderLock(out, "python -m verification.paper", "--resume" if args.resume else "--out").acquire()
    except CLIError as exc:
        return parser.refuse(exc)
    try:
        for i, step in enumerate(steps, 1):
            if step.name in done:
                continue
            print(
                f"paper: [{i}/{len(steps)}] {step.title}: python -m verification.{step.module} "
                f"{' '.join(step_argvs[step.name])}",
                file=sys.stderr,
            )
            try:
                code = _run_step(step, step_argvs[step.name], out / step.name)
            except KeyboardInterrupt:
                code = 130
            if code != 0:
                print(f"{prog}: {step.name} stopped (exit status {code}); finish with --resume {out}", file=sys.stderr)
                return code
        summaries = {s.name: _read_summary(out / s.name) for s in steps}
        summaries = {k: v for k, v in summaries.items() if v is not None}
        found = verdicts(summaries)
        atomic_write(
            out / "verdicts.json",
            json.dumps(
                {
                    "verdicts": found,
                    "criteria": {
                        "exact_relative_mse": EXACT_RELATIVE_MSE,
                        "gradient_fails_relative_mse": GRADIENT_FAILS_RELATIVE_MSE,
                        "shift_power": SHIFT_POWER,
                    },
                },
                indent=1,
            ),
        )
        atomic_write(out / "report.md", format_report(out, steps, found, saved))
    finally:
        lock.release()
    print("\npaper: verdicts")
    for v in found:
        print(f"  {v['status']:<14} {v['claim']}")
    print(f"wrote {out}/report.md, verdicts.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
