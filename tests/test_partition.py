"""Consecutive partitions of the frozen layers (Zeng & Lee 2024, Theorems 3 and 6)."""

import numpy as np
import pytest
from _helpers import partitions
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.errors import InvalidArgumentError
from lora_theory.partition import MAX_DEPTH, best_partition, check_partition, partition_blocks, uniform_partition
from lora_theory.thresholds import ceil_div, fnn_rank_threshold


def _required(sizes, block_rank):
    """max_i ceil(rank(E_i) / |P_i|) for a partition."""
    out, start = 0, 0
    for i, size in enumerate(sizes):
        out = max(out, ceil_div(block_rank(i, start, start + size), size))
        start += size
    return out


@pytest.mark.parametrize(
    "L, Lbar, expected",
    [
        (2, 1, (2,)),
        (4, 2, (2, 2)),
        (8, 1, (8,)),
        (5, 2, (2, 3)),
        (7, 3, (2, 2, 3)),
        (4, 4, (1, 1, 1, 1)),
        (3, 2, (1, 2)),
    ],
)
def test_uniform_partition(L, Lbar, expected):
    # M = floor(L / L̄) layers per block, the last block takes the remainder
    assert uniform_partition(L, Lbar) == expected


@given(L=st.integers(1, 30), data=st.data())
def test_uniform_partition_properties(L, data):
    Lbar = data.draw(st.integers(1, L))
    sizes = uniform_partition(L, Lbar)
    M = L // Lbar
    assert len(sizes) == Lbar and sum(sizes) == L
    assert all(s == M for s in sizes[:-1]) and M <= sizes[-1] < 2 * M + Lbar
    assert check_partition(sizes, L, Lbar) == sizes
    # generic weights (rank(E_i) = D for every block): the uniform partition needs ceil(D / M)
    D = 16
    assert _required(sizes, lambda i, a, b: D) == fnn_rank_threshold(D, L, Lbar)


def test_partition_blocks():
    assert partition_blocks((3, 1)) == (range(0, 3), range(3, 4))
    assert partition_blocks((1, 1, 2)) == (range(0, 1), range(1, 2), range(2, 4))
    assert [list(b) for b in partition_blocks((2,))] == [[0, 1]]


@st.composite
def rank_tables(draw):
    """L in 1..7, L̄ in 1..L, D in 1..16, and a block_rank(i, start, stop) in 0..D from a table."""
    L = draw(st.integers(1, 7), label="L")
    Lbar = draw(st.integers(1, L), label="Lbar")
    D = draw(st.integers(1, 16), label="D")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    # few distinct values so that ties between partitions are common
    table = {
        (i, a, b): int(rng.choice([0, D // 3, D // 2, D]))
        for i in range(Lbar)
        for a in range(L)
        for b in range(a + 1, L + 1)
    }
    return L, Lbar, D, table


@given(rank_tables())
def test_best_partition_equals_brute_force(instance):
    L, Lbar, D, table = instance
    calls = []

    def block_rank(i, a, b):
        calls.append((i, a, b))
        return table[(i, a, b)]

    sizes, value = best_partition(block_rank, L, Lbar)
    candidates = list(partitions(L, Lbar))
    values = [_required(c, lambda i, a, b: table[(i, a, b)]) for c in candidates]
    best = min(values)
    assert value == best
    assert check_partition(sizes, L, Lbar) == sizes
    assert _required(sizes, lambda i, a, b: table[(i, a, b)]) == value
    # ties go to the lexicographically smallest optimal partition
    assert sizes == min(c for c, v in zip(candidates, values) if v == best)
    # never worse than the uniform partition (Theorem 6 generalises Theorem 3)
    assert value <= _required(uniform_partition(L, Lbar), lambda i, a, b: table[(i, a, b)])
    assert len(set(calls)) == len(calls)  # each block's rank computed once


def test_best_partition_prefers_the_block_with_low_rank():
    # target layer 0 is already matched by frozen layer 0 alone (rank 0), the rest is generic: the best
    # partition gives block 0 one layer and the other three to block 1, ceil(16 / 3) = 6 < 8 (uniform)
    def block_rank(i, a, b):
        return 0 if (i, a, b) == (0, 0, 1) else 16

    sizes, value = best_partition(block_rank, 4, 2)
    assert sizes == (1, 3) and value == 6
    assert _required(uniform_partition(4, 2), block_rank) == 8


@pytest.mark.parametrize(
    "partition, match",
    [
        ((2, 0, 2), r"^partition: every block must hold at least one layer \(no empty block\)"),
        ((3, -1, 2), r"^partition: every block must hold at least one layer"),
        ((2, 1, 2), r"^partition: block sizes must cover the L = 4 frozen layers exactly, got \(2, 1, 2\) \(sum 5\)"),
        ((1, 1, 1), r"^partition: block sizes must cover the L = 4 frozen layers exactly"),
        ((2, 2), r"^partition: must have one block per target layer \(L̄ = 3\), got 2 blocks"),
        ((), r"^partition: must have one block per target layer"),
        ((2.0, 1, 1), r"^partition\[0\]: must be an integer, got 2.0"),
        ((True, 2, 1), r"^partition\[0\]: must be an integer, got True"),
        ("211", r"^partition: must be a sequence of block sizes"),
        (4, r"^partition: must be a sequence of block sizes"),
        (None, r"^partition: must be a sequence of block sizes"),
    ],
)
def test_check_partition_bad_input(partition, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_partition(partition, 4, 3)


def test_check_partition_accepts_numpy_sizes():
    assert check_partition(np.array([3, 1]), 4, 2) == (3, 1)
    assert all(type(s) is int for s in check_partition(np.array([3, 1]), 4, 2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: uniform_partition(2, 3), r"^target_depth: the target depth L̄ = 3 exceeds the frozen depth L = 2"),
        (lambda: uniform_partition(0, 1), r"^depth: must be at least 1"),
        (lambda: uniform_partition(4, 0), r"^target_depth: must be at least 1"),
        (lambda: uniform_partition(4.0, 2), r"^depth: must be an integer"),
        (lambda: best_partition(lambda i, a, b: 1, 2, 3), r"^target_depth: the target depth L̄ = 3 exceeds"),
        (lambda: best_partition(lambda i, a, b: 1, 0, 1), r"^depth: must be at least 1"),
        (lambda: best_partition(lambda i, a, b: 1, 4, 0), r"^target_depth: must be at least 1"),
        (lambda: best_partition(lambda i, a, b: 1, 4.5, 2), r"^depth: must be an integer"),
        (lambda: best_partition(lambda i, a, b: 1, 4, True), r"^target_depth: must be an integer"),
        (lambda: best_partition(None, 4, 2), r"^block_rank: must be callable"),
        (lambda: best_partition(lambda i, a, b: -1, 4, 2), r"^block_rank: must return a non-negative integer"),
        (lambda: best_partition(lambda i, a, b: 1.5, 4, 2), r"^block_rank: must return a non-negative integer"),
        # the depth cap (a depth of 10^30 ran into numpy's OverflowError before it existed)
        (lambda: best_partition(lambda i, a, b: 1, MAX_DEPTH + 1, 1), rf"^depth: must be at most {MAX_DEPTH}"),
        (lambda: best_partition(lambda i, a, b: 1, 3, MAX_DEPTH + 1), rf"^target_depth: must be at most {MAX_DEPTH}"),
        (lambda: check_partition((1, 1), MAX_DEPTH + 1, 2), rf"^depth: must be at most {MAX_DEPTH}"),
        (lambda: check_partition((1, 1), 0, 2), r"^depth: must be at least 1"),
        (lambda: check_partition((1, 1), 2, MAX_DEPTH + 1), rf"^target_depth: must be at most {MAX_DEPTH}"),
        (lambda: check_partition((1, 1), 2, 0), r"^target_depth: must be at least 1"),
        (lambda: partition_blocks(5), r"^partition: must be a sequence of block sizes, got int$"),
        (lambda: partition_blocks("12"), r"^partition: must be a sequence of block sizes, got str$"),
        (lambda: partition_blocks([]), r"^partition: must hold at least one block$"),
        (lambda: partition_blocks([1, 0]), r"^partition\[1\]: must be at least 1, got 0$"),
        (lambda: partition_blocks((1, None)), r"^partition\[1\]: must be an integer, got None$"),
    ],
)
def test_partition_functions_bad_input(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


@given(st.integers(1, 7).flatmap(lambda L: st.tuples(st.just(L), st.integers(1, L))))
def test_best_partition_asks_only_for_blocks_some_partition_can_hold(depths):
    """``block_rank`` costs an SVD per call and need not be defined elsewhere: ``best_partition`` asks only for
    blocks ``(i, start, stop)`` that some consecutive partition uses (target layer ``i`` starting at frozen
    layer ``start >= i``, with ``L̄ - 1 - i`` layers left for the blocks after it), each at most once."""
    L, Lbar = depths
    asked = []

    def block_rank(i, start, stop):
        assert i <= start < stop <= L and L - stop >= Lbar - 1 - i, (i, start, stop)
        assert (i == Lbar - 1) == (stop == L), (i, start, stop)
        asked.append((i, start, stop))
        return (start * 7 + stop * 3 + i) % 5

    best_partition(block_rank, L, Lbar)
    assert len(asked) == len(set(asked))


# --- claims pinned by mutation testing (docs/mutation.md) ---


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda depth: uniform_partition(depth, 1), "depth"),
        (lambda depth: uniform_partition(3, depth), "target_depth"),
        (lambda depth: best_partition(lambda i, a, b: 1, depth, 1), "depth"),
        (lambda depth: best_partition(lambda i, a, b: 1, 3, depth), "target_depth"),
        (lambda depth: check_partition((1,), depth, 1), "depth"),
        (lambda depth: check_partition((1,), 3, depth), "target_depth"),
    ],
    ids=[
        "uniform_partition-depth",
        "uniform_partition-target_depth",
        "best_partition-depth",
        "best_partition-target_depth",
        "check_partition-depth",
        "check_partition-target_depth",
    ],
)
def test_every_partition_function_refuses_a_depth_above_the_cap_naming_the_cap(call, name):
    """``MAX_DEPTH`` caps ``L`` and ``L̄`` alike in every function that takes them: a larger depth is refused as
    above the cap, before the depths are compared (a target depth of 10^30 is refused for its size, not for
    exceeding ``L = 3``)."""
    for depth in (MAX_DEPTH + 1, 10**30):
        with pytest.raises(InvalidArgumentError, match=rf"^{name}: must be at most {MAX_DEPTH}, got {depth}$"):
            call(depth)


def test_the_uniform_partition_is_built_at_the_depth_cap():
    # the cap itself is a valid depth, and the uniform partition costs nothing per layer beyond its tuple
    assert uniform_partition(MAX_DEPTH, 1) == (MAX_DEPTH,)
    sizes = uniform_partition(MAX_DEPTH, MAX_DEPTH)
    assert len(sizes) == MAX_DEPTH and set(sizes) == {1}
