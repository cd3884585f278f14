"""Records and models read well: a one-line summary of what a person reads first, arrays by their shape, and a
markdown table where there is one row per block, layer or check (``lora_theory/_display.py``)."""

import numpy as np
import pytest

import lora_theory as lt

#: The longest summary line allowed: it must fit a terminal or two, whatever the width of the model.
SHORT = 400


def _records():
    fr, tg = lt.random_fnn(16, 4, seed=0), lt.random_fnn(16, 2, seed=1)
    fnn_fit = lt.lora_fnn(fr, tg, 8, input_radius=1.0)
    linear = lt.random_linear(16, 2, seed=0)
    tfn_pair = lt.random_tfn(8, 2, 2, seed=0), lt.random_tfn(8, 2, 2, seed=1)
    rat = lt.random_rational_fnn(3, 2, 1, seed=0)
    return {
        "FNN": fr,
        "TFN": tfn_pair[0],
        "FNNFit": fnn_fit,
        "BlockFit": fnn_fit.block_fits[0],
        "Domain": fnn_fit.domain,
        "LinearFit": lt.lora_linear(linear.weights, np.eye(16), 4),
        "TFNFit": lt.lora_tfn(*tfn_pair, 4),
        "ErrorBound": lt.fnn_error_bound(fr, tg, 1),
        "HighPrecisionLinearFit": lt.lora_linear_mp(linear.weights[:1], np.eye(16), 16, digits=20),
        "HighPrecisionFNNFit": lt.lora_fnn_mp(
            lt.random_fnn(3, 2, seed=0), lt.random_fnn(3, 1, seed=1), 3, input_radius=1.0
        ),
        "HighPrecisionTFNFit": lt.lora_tfn_mp(lt.random_tfn(2, 1, 1, seed=0), lt.random_tfn(2, 1, 1, seed=1), 1),
        "Certificate": lt.certify_fnn(*rat, 3, input_radius=1),
        "Witness": lt.final_layers_witness(
            lt.random_fnn(3, 2, seed=0),
            lt.random_fnn(3, 2, seed=1),
            input_radius=1.0,
            n_starts=4,
            n_directions=4,
            n_refine=2,
        ),
    }


@pytest.fixture(scope="module")
def records():
    return _records()


@pytest.mark.parametrize(
    "name",
    [
        "FNN",
        "TFN",
        "FNNFit",
        "BlockFit",
        "Domain",
        "LinearFit",
        "TFNFit",
        "ErrorBound",
        "HighPrecisionLinearFit",
        "HighPrecisionFNNFit",
        "HighPrecisionTFNFit",
        "Certificate",
        "Witness",
    ],
)
def test_summary_is_one_short_line_naming_the_record(records, name):
    text = repr(records[name])
    assert text.startswith(f"{name}(") and "\n" not in text and len(text) <= SHORT, text
    assert "array([" not in text  # no array printed in full


@pytest.mark.parametrize(
    "name",
    [
        "FNNFit",
        "LinearFit",
        "TFNFit",
        "HighPrecisionLinearFit",
        "HighPrecisionFNNFit",
        "HighPrecisionTFNFit",
        "BlockFit",
    ],
)
def test_summary_says_whether_the_claim_holds(records, name):
    """The verdict a reader looks for first is the record's own: ``exact=`` as the attribute says."""
    fit = records[name]
    assert f"exact={fit.exact}" in repr(fit)


def test_summaries_carry_the_numbers_a_reader_needs(records):
    fit = records["FNNFit"]
    text = repr(fit)
    assert f"ranks={fit.ranks}" in text and f"partition={fit.partition}" in text
    assert f"kappa={fit.kappa:.4g}" in text and f"measured_error={fit.measured_error:.4g}" in text
    linear = records["LinearFit"]
    assert f"error_rank={linear.error_rank}" in repr(linear) and f"spectral_error={linear.spectral_error:.4g}" in repr(
        linear
    )
    tfn = records["TFNFit"]
    assert f"required_rank={tfn.required_rank}" in repr(tfn)
    cert = records["Certificate"]
    assert f"outcome='{cert.outcome}'" in repr(cert) and f"checks={len(cert.checks)}" in repr(cert)


def test_markdown_tables_have_a_row_per_block_layer_and_check(records):
    def rows(md):  # the table's lines but its header
        return [line for line in md.splitlines() if line.startswith("| ")][1:]

    fit = records["FNNFit"]
    assert len(rows(fit._repr_markdown_())) == len(fit.block_fits)
    linear = records["LinearFit"]
    assert len(rows(linear._repr_markdown_())) == len(linear.adapters)
    cert = records["Certificate"]
    md = cert._repr_markdown_()
    assert len(rows(md)) == len(cert.checks) and all(line.count(" | ") >= 2 for line in rows(md))


def test_the_data_stay_on_the_attributes(records):
    """The summary replaces only the printing: the arrays are all still there."""
    fit = records["FNNFit"]
    assert fit.model.weights[0].shape == (16, 16) and fit.block_fits[0].singular_values.shape == (16,)
