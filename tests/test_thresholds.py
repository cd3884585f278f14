"""The rank thresholds of Zeng & Lee (2024) for generic weights, and the paper's numbers."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.errors import InvalidArgumentError
from lora_theory.thresholds import ceil_div, fnn_rank_threshold, linear_rank_threshold, tfn_rank_threshold


@pytest.mark.parametrize("target_depth, depth, expected", [(1, 2, 8), (2, 4, 8), (1, 8, 2)])
def test_papers_fnn_thresholds_at_width_16(target_depth, depth, expected):
    # Zeng & Lee 2024, Theorem 3 at D = 16: (L̄=1, L=2) -> 8, (L̄=2, L=4) -> 8, (L̄=1, L=8) -> 2
    assert fnn_rank_threshold(16, depth, target_depth) == expected


def test_papers_tfn_and_linear_thresholds_at_width_16():
    assert tfn_rank_threshold(16) == 8  # Theorem 7: ceil(16 / 2)
    assert linear_rank_threshold(16, 2) == 8  # Lemma 1: ceil(16 / 2)
    # the frozen-depth sweep L̄ = 1, L in {2, 4, ..., 14}: ceil(16 / L)
    assert [linear_rank_threshold(16, L) for L in range(2, 15, 2)] == [8, 4, 3, 2, 2, 2, 2]


@given(D=st.integers(1, 64), L=st.integers(1, 16), data=st.data())
def test_formulas(D, L, data):
    Lbar = data.draw(st.integers(1, L), label="target_depth")
    assert linear_rank_threshold(D, L) == math.ceil(D / L)
    assert fnn_rank_threshold(D, L, Lbar) == math.ceil(D / (L // Lbar))
    assert fnn_rank_threshold(D, L, 1) == linear_rank_threshold(D, L)  # one target layer: one block of L
    assert tfn_rank_threshold(D) == math.ceil(D / 2)
    # a rank-R adapter per layer of a block of M = floor(L / L̄) layers covers R·M >= D directions
    R, M = fnn_rank_threshold(D, L, Lbar), L // Lbar
    assert R * M >= D and (R - 1) * M < D


@given(a=st.integers(0, 10**6), b=st.integers(1, 10**3))
def test_ceil_div_is_exact_integer_ceiling(a, b):
    assert ceil_div(a, b) == -(-a // b) == (a + b - 1) // b


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fnn_rank_threshold(16, 2, 3), r"^target_depth: the target depth L̄ = 3 exceeds the frozen depth L = 2"),
        (lambda: fnn_rank_threshold(0, 2, 1), r"^width: must be at least 1, got 0"),
        (lambda: fnn_rank_threshold(16, -1, 1), r"^depth: must be at least 1, got -1"),
        (lambda: fnn_rank_threshold(16, 2, 0), r"^target_depth: must be at least 1, got 0"),
        (lambda: fnn_rank_threshold(16.0, 2, 1), r"^width: must be an integer, got 16.0"),
        (lambda: fnn_rank_threshold(16, True, 1), r"^depth: must be an integer, got True"),
        (lambda: linear_rank_threshold(16, 0), r"^depth: must be at least 1"),
        (lambda: linear_rank_threshold("16", 2), r"^width: must be an integer"),
        (lambda: tfn_rank_threshold(0), r"^embed_dim: must be at least 1"),
        (lambda: tfn_rank_threshold(2.5), r"^embed_dim: must be an integer"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


# --- claims pinned by mutation testing (docs/mutation.md) ---


@given(width=st.integers(-8, 0), depth=st.integers(1, 8))
def test_every_threshold_refuses_a_model_without_width(width, depth):
    # A model of width D <= 0 has no directions to adapt: a threshold for it (ceil(0 / L) = 0) would be a
    # silent answer about a model that does not exist, so each formula refuses it.
    for call in (
        lambda: linear_rank_threshold(width, depth),
        lambda: fnn_rank_threshold(width, depth, 1),
        lambda: tfn_rank_threshold(width),
    ):
        with pytest.raises(InvalidArgumentError, match=r"^(width|embed_dim): must be at least 1"):
            call()
