"""Certified partial spectra (THEORY.md §5.5): a settled count is the full SVD's count; an unsettled one
never claims a value."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_noise_floor import stored

from lora_theory import noise_floor, rounding_bounds
from lora_theory.partial_spectrum import partial_spectrum


def _planted(seed, m, n, rank, noise, gap):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    s = gap * (1 + rng.random(rank))
    return (u * s) @ v.T + noise * rng.standard_normal((m, n)) / np.sqrt(max(m, n))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(40, 160),
    n=st.integers(40, 160),
    rank=st.integers(0, 8),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_a_settled_count_equals_the_full_svd_count_on_planted_changes(seed, m, n, rank, dtype):
    a = _planted(seed, m, n, rank, noise=1e-3, gap=1.0).astype(dtype)
    tau = 0.05  # far from both the planted values (>= 1) and the noise (~2e-3)
    p = partial_spectrum(a, tau)
    full = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert p.rank_lower <= int(np.count_nonzero(full > tau)) <= p.rank_upper
    if p.settled:
        assert p.rank == int(np.count_nonzero(full > tau))
    k = p.values.size
    assert np.all(p.lower <= full[:k]) and np.all(full[:k] <= p.upper)
    assert np.all(full[k:] <= p.residual)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.sampled_from([-1e-9, 0.0, 1e-9, 1e-6, -1e-6]))
def test_a_cluster_at_the_threshold_is_never_claimed(seed, offset):
    """Adversarial: singular values within rounding of τ. The interval must contain the true count; a settled
    answer must equal it."""
    rng = np.random.default_rng(seed)
    m, n, tau = 90, 60, 0.5
    u = np.linalg.qr(rng.standard_normal((m, n)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    s = np.concatenate([[3.0, 2.0], np.full(5, tau * (1 + offset)), np.linspace(0.1, 0.0, n - 7)])
    a = (u * s) @ v.T
    p = partial_spectrum(a, tau)
    true = int(np.count_nonzero(s > tau))
    assert p.rank_lower <= true <= p.rank_upper
    if p.settled:
        assert p.rank == true
    if abs(offset) < 1e-8:
        assert not p.settled  # a cluster within the certificate's width cannot be proved


def test_a_full_rank_change_above_the_floor_is_left_unsettled():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 120))  # every singular value ~ 4..25, threshold 1: rank 120
    p = partial_spectrum(a, 1.0)
    assert p.rank is None and p.rank_upper == 120


# ------------------------------------------------------------------ stored in bfloat16, float16 and float32

STORAGE = ("bfloat16", "float16", "float32")


def _floor(base, tuned, base_dtype, tuned_dtype):
    """The advisor's threshold for a stored change: the storage-rounding noise floor (THEORY.md §5)."""
    return noise_floor(rounding_bounds(base, tuned, base_dtype, tuned_dtype)).spectral


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from(STORAGE),
    m=st.integers(64, 320),
    n=st.integers(64, 320),
    rank=st.integers(1, 32),
)
def test_a_planted_rank_stored_in_low_precision_comes_out_exact_or_as_an_interval_holding_it(seed, dtype, m, n, rank):
    """Base and tuned both stored in ``dtype``; the planted singular values are 30 to 60 times the floor. The
    count above the floor is ``rank`` (checked on the full SVD), and the partial spectrum returns it, or an
    interval holding it when the rank is too large a share of the short side for the largest block."""
    rng = np.random.default_rng(seed)
    base = stored(rng.standard_normal((m, n)) / np.sqrt(n), dtype)  # (m, n)
    unit = _floor(base, base, dtype, dtype)
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0]  # (m, rank)
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0]  # (n, rank)
    tuned = stored(base + (u * (unit * (30 + 30 * rng.random(rank)))) @ v.T, dtype)
    delta = tuned - base  # float64: the stored change, exactly
    tau = _floor(base, tuned, dtype, dtype)
    assert int(np.count_nonzero(np.linalg.svd(delta, compute_uv=False) > tau)) == rank  # the construction
    p = partial_spectrum(delta, tau)
    assert p.rank_lower <= rank <= p.rank_upper
    if p.settled:
        assert p.rank == rank
    if 16 * rank <= min(m, n):  # the largest block (min(m, n) // 4, from 16) holds twice the rank
        assert p.settled


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from(STORAGE[:2]),
    m=st.integers(64, 320),
    n=st.integers(64, 320),
)
def test_an_unchanged_model_resaved_in_lower_precision_comes_out_at_rank_0(seed, dtype, m, n):
    """float32 weights re-saved in bfloat16 or float16: the change is rounding only, and the partial spectrum
    proves that nothing is above the floor."""
    rng = np.random.default_rng(seed)
    base = stored(rng.standard_normal((m, n)) / np.sqrt(n), "float32")
    tuned = stored(base, dtype)
    delta = tuned - base
    assert np.count_nonzero(delta) > 0  # the re-save did round
    p = partial_spectrum(delta, _floor(base, tuned, "float32", dtype))
    assert p.settled and p.rank == 0
