"""The sweep machinery shared by the command-line experiments: problems, runs, constructions, training, summaries.

Protocol (THEORY.md §4, the authors' bugs fixed; every choice below is declared in the output):

* Instances. For experiment seed ``s`` the target and the frozen model are drawn with the authors'
  initialisation from ``SeedSequence([s, tag])`` (targets do not depend on the frozen depth). A
  "pretrained" frozen model is the random one with all its weights and biases trained (Adam, lr 1e-3,
  fresh batches of 256, float64 on the CPU) toward the target until the training loss is below a third of
  the first one, at most 1000 steps.
* Data. Fresh standard Gaussian training batches of 256 every step from a stream that depends on the
  experiment seed only (shared by the grid points, ranks and frozen-model variants of that seed); the LoRA
  initialisation (``B = 0``, ``A ~ N(0, 0.25²)``) comes from (experiment seed, cell), so the grid points of
  one cell and seed start from the same ``A``; a fixed
  validation set of 256 inputs and a fixed test set of 5000 inputs drawn from two other seeds, the same for
  every run; the shifted test set is the test set times 5.
* Selection. Every run is evaluated at its final iterate (``--select best``: its best-validation iterate,
  validated every ``--validate-every`` steps). Per (frozen model, setting, seed) the grid point with the
  lowest validation loss is selected; its test MSE and shifted MSE are reported; rows give medians and
  interquartile ranges over seeds. MSEs are per coordinate, evaluated in float64.
* Construction. Built in float64 by :mod:`lora_theory` on a certified ball centred at 0 whose radius covers
  the test inputs and the shifted ones (recorded as ``domain``), and, as the authors did, with biases
  calibrated on 256 ``N(0, I)`` samples with a multiplicative margin 2 (``calibrated_*`` columns). Where
  float64 cannot represent the construction honestly (a block of more than 4 layers, or an expected relative
  rounding ``u·(κ + γ)`` above 1e-6) the MSE is ``null`` and ``κ`` is stored instead, unless the experiment
  asks for the high-precision path (``final_layers``, ``depth_sweep``): then the construction is rebuilt with
  :mod:`lora_theory.highprec` (mpmath, digits chosen from ``κ`` and ``γ``) and evaluated at that precision on
  the first ``n`` test and shifted inputs; the digits and ``n`` are recorded beside the MSE, and the float64
  ``n/c (κ=...)`` note is kept.

Layout (each module imports only those above it; entry points import this package's names only):

* :mod:`~verification.sweep.protocol`: constants, seeds, the named problem structures (:class:`FNNStructure`,
  :class:`TFNStructure`), :class:`Cell`, :class:`Run`, :class:`ExperimentSpec`.
* :mod:`~verification.sweep.records`: JSON-lines records, :class:`RunRecord` (``runs.jsonl``, its losses
  :class:`RunLosses`) and :class:`ConstructionRecord` (``constructions.jsonl``); versions.
* :mod:`~verification.sweep.problems`: targets, frozen and pretrained models (cache), evaluation sets.
* :mod:`~verification.sweep.training`: the run list, stacks of runs, evaluation, the CPU budget.
* :mod:`~verification.sweep.constructions`: float64 and raised-precision constructions, their pool and cache.
* :mod:`~verification.sweep.summary`: medians and interquartile ranges over seeds.
* :mod:`~verification.sweep.report`: the stdout table and ``summary.csv``.
* :mod:`~verification.sweep.figures`: ``figure.png``.
* :mod:`~verification.sweep.folder`: atomic writes, the default folder, the writability check.
* :mod:`~verification.sweep.driver`: :func:`execute`, one sweep end to end.
* :mod:`~verification.sweep.cli`: the parser, flag checks, settings and resume, :func:`run_cli`.
"""

from ..outdir import CLIError
from .cli import (
    CONSTRUCTION_FLAGS,
    RUN_FLAGS,
    apply_quick,
    base_parser,
    fnn_structure,
    lora_cells,
    parse_ranks,
    run_cli,
    run_settings,
)
from .constructions import (
    HIGHPREC_DIGITS_PER_LAYER,
    HIGHPREC_EXTRA_DIGITS,
    HIGHPREC_QUICK_SUBSAMPLE,
    HIGHPREC_SUBSAMPLE,
    add_highprec_arguments,
    build_construction,
    build_highprec_constructions,
    check_highprec_arguments,
    construction_pool,
    highprec_estimate,
    highprec_message,
    highprec_subsample,
    quick_highprec,
)
from .driver import execute
from .figures import FIGURE_FLOOR, figure_series, make_figure, make_grouped_figure, save_figure
from .folder import default_out, writable_folder
from .problems import Problems, evaluation_sets, make_random_frozen, make_target, pretrain, pretrain_fnns
from .protocol import (
    CALIBRATION_SEED,
    LR_GRID,
    MAX_HONEST_BLOCK,
    MAX_HONEST_ROUNDING,
    N_CALIBRATION,
    N_TEST,
    N_VALIDATION,
    PRETRAIN_FACTOR,
    PRETRAIN_LR,
    PRETRAIN_MAX_STEPS,
    PRETRAINING_PROTOCOL,
    SHIFT,
    TAG_DATA,
    TAG_FROZEN,
    TAG_INIT,
    TAG_PRETRAIN,
    TAG_TARGET,
    TEST_SEED,
    VALIDATION_SEED,
    WD_GRID,
    Cell,
    ExperimentSpec,
    FNNStructure,
    Run,
    Structure,
    TFNStructure,
    seeded_rng,
    structure_of,
)
from .records import ConstructionRecord, RunLosses, RunRecord, versions
from .report import CSV_FIELDS, format_csv, format_table
from .summary import pretrained_vs_random, summarize
from .training import config_extra, cpu_budget, estimate_rate, make_runs, resolve_device

__all__ = [
    "CALIBRATION_SEED",
    "CONSTRUCTION_FLAGS",
    "CSV_FIELDS",
    "Cell",
    "ConstructionRecord",
    "ExperimentSpec",
    "FIGURE_FLOOR",
    "FNNStructure",
    "HIGHPREC_DIGITS_PER_LAYER",
    "HIGHPREC_EXTRA_DIGITS",
    "HIGHPREC_QUICK_SUBSAMPLE",
    "HIGHPREC_SUBSAMPLE",
    "LR_GRID",
    "MAX_HONEST_BLOCK",
    "MAX_HONEST_ROUNDING",
    "N_CALIBRATION",
    "N_TEST",
    "N_VALIDATION",
    "PRETRAINING_PROTOCOL",
    "PRETRAIN_FACTOR",
    "PRETRAIN_LR",
    "PRETRAIN_MAX_STEPS",
    "Problems",
    "RUN_FLAGS",
    "Run",
    "RunLosses",
    "RunRecord",
    "SHIFT",
    "Structure",
    "TAG_DATA",
    "TAG_FROZEN",
    "TAG_INIT",
    "TAG_PRETRAIN",
    "TAG_TARGET",
    "TEST_SEED",
    "TFNStructure",
    "VALIDATION_SEED",
    "WD_GRID",
    "add_highprec_arguments",
    "apply_quick",
    "base_parser",
    "build_construction",
    "build_highprec_constructions",
    "check_highprec_arguments",
    "config_extra",
    "construction_pool",
    "cpu_budget",
    "default_out",
    "estimate_rate",
    "evaluation_sets",
    "execute",
    "figure_series",
    "fnn_structure",
    "format_csv",
    "format_table",
    "highprec_estimate",
    "highprec_message",
    "highprec_subsample",
    "lora_cells",
    "make_figure",
    "make_grouped_figure",
    "make_random_frozen",
    "make_runs",
    "make_target",
    "parse_ranks",
    "pretrain",
    "pretrain_fnns",
    "pretrained_vs_random",
    "quick_highprec",
    "resolve_device",
    "run_cli",
    "run_settings",
    "save_figure",
    "seeded_rng",
    "structure_of",
    "summarize",
    "versions",
    "writable_folder",
    "CLIError",
]
