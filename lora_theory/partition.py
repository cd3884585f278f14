"""Consecutive partitions of the frozen layers into target blocks (Zeng & Lee 2024, §3, Theorems 3 and 6).

A partition of ``L`` layers into ``L̄`` blocks is written as its block sizes, e.g. ``(3, 1)``: block ``i``
(0-based here, ``i+1`` in the paper) holds layers ``sum(sizes[:i]) .. sum(sizes[:i+1]) - 1`` and stands in
for target layer ``i``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from ._validate import as_int, ceil_div
from .errors import InvalidArgumentError

__all__ = ["uniform_partition", "check_partition", "partition_blocks", "best_partition", "MAX_DEPTH"]

#: The largest depth ``L`` (and target depth ``L̄``) accepted: a partition is a tuple of ``L̄`` sizes, and a
#: depth of 10^30 raised OverflowError (10^9 would exhaust memory). Larger depths raise
#: :class:`~lora_theory.errors.InvalidArgumentError`.
MAX_DEPTH = 10**6


def uniform_partition(depth: int, target_depth: int) -> tuple[int, ...]:
    """The paper's uniform partition: ``L̄`` blocks of ``M = floor(L / L̄)`` layers, the last takes the rest."""
    L = as_int(depth, "depth", 1, MAX_DEPTH)
    Lbar = as_int(target_depth, "target_depth", 1, MAX_DEPTH)
    if Lbar > L:
        raise InvalidArgumentError("target_depth", f"the target depth L̄ = {Lbar} exceeds the frozen depth L = {L}")
    M = L // Lbar
    return (M,) * (Lbar - 1) + (L - M * (Lbar - 1),)


def check_partition(partition: Sequence[int], depth: int, target_depth: int) -> tuple[int, ...]:
    """Validate block sizes: ``L̄`` positive integers summing to ``L``."""
    if isinstance(partition, (str, bytes)) or not isinstance(partition, (Sequence, np.ndarray)):
        raise InvalidArgumentError("partition", f"must be a sequence of block sizes, got {partition!r}")
    depth = as_int(depth, "depth", 1, MAX_DEPTH)
    target_depth = as_int(target_depth, "target_depth", 1, MAX_DEPTH)
    sizes = tuple(as_int(s, f"partition[{i}]") for i, s in enumerate(partition))
    if len(sizes) != target_depth:
        raise InvalidArgumentError(
            "partition", f"must have one block per target layer (L̄ = {target_depth}), got {len(sizes)} blocks"
        )
    if any(s <= 0 for s in sizes):
        raise InvalidArgumentError(
            "partition", f"every block must hold at least one layer (no empty block), got {sizes}"
        )
    if sum(sizes) != depth:
        raise InvalidArgumentError(
            "partition", f"block sizes must cover the L = {depth} frozen layers exactly, got {sizes} (sum {sum(sizes)})"
        )
    return sizes


def partition_blocks(partition: Sequence[int]) -> tuple[range, ...]:
    """The 0-based layer indices of every block: ``(3, 1) -> (range(0, 3), range(3, 4))``.

    ``partition``: a non-empty sequence of positive integers (:class:`~lora_theory.errors.InvalidArgumentError`
    otherwise).
    """
    if isinstance(partition, (str, bytes)) or not isinstance(partition, (Sequence, np.ndarray)):
        raise InvalidArgumentError("partition", f"must be a sequence of block sizes, got {type(partition).__name__}")
    if len(partition) == 0:
        raise InvalidArgumentError("partition", "must hold at least one block")
    partition = [as_int(s, f"partition[{i}]", 1) for i, s in enumerate(partition)]
    out, start = [], 0
    for size in partition:
        out.append(range(start, start + size))
        start += size
    return tuple(out)


def best_partition(
    block_rank: Callable[[int, int, int], int], depth: int, target_depth: int
) -> tuple[tuple[int, ...], int]:
    """The consecutive partition minimising the required uniform rank ``max_i ceil(rank(E_i) / |P_i|)``.

    Zeng & Lee 2024, Theorem 6 (general partition). Dynamic programming over consecutive partitions:
    ``cost(i, l)`` = best achievable maximum when target layers ``i..L̄-1`` use frozen layers ``l..L-1``.

    Parameters
    ----------
    block_rank : callable ``(target_index, start, stop) -> int``
        ``rank(E_i)`` for target layer ``i`` realised by frozen layers ``start..stop-1``.
    depth, target_depth : int
        ``L`` and ``L̄``.

    ``depth`` and ``target_depth`` are integers in ``1..MAX_DEPTH``. ``block_rank`` is called once per
    candidate block (at most ``L̄·(L - L̄ + 1)^2`` of them, fewer as blocks repeat), and the loop takes as many
    steps.

    Returns
    -------
    (partition, rank) : the block sizes and the rank they require. Ties go to the lexicographically
    smallest partition, so the result is deterministic.
    """
    L = as_int(depth, "depth", 1, MAX_DEPTH)
    Lbar = as_int(target_depth, "target_depth", 1, MAX_DEPTH)
    if Lbar > L:
        raise InvalidArgumentError("target_depth", f"the target depth L̄ = {Lbar} exceeds the frozen depth L = {L}")
    if not callable(block_rank):
        raise InvalidArgumentError("block_rank", f"must be callable as block_rank(i, start, stop), got {block_rank!r}")

    @cache
    def rank_of(i, start, stop):
        value = block_rank(i, start, stop)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
            raise InvalidArgumentError(
                "block_rank", f"must return a non-negative integer rank, got {value!r} for block ({i}, {start}, {stop})"
            )
        return int(value)

    def here(i, start, size):
        return ceil_div(rank_of(i, start, start + size), size)

    # cost[i][start]: least achievable max over target layers i..Lbar-1 sharing frozen layers start..L-1, each
    # remaining block holding at least one layer; filled from the last target layer back (a loop, not a
    # recursion: L = L̄ = 3000 exceeded Python's recursion limit)
    cost = [dict() for _ in range(Lbar)]
    for start in range(Lbar - 1, L):
        cost[Lbar - 1][start] = here(Lbar - 1, start, L - start)
    for i in range(Lbar - 2, -1, -1):
        remaining = Lbar - i
        nxt = cost[i + 1]
        for start in range(i, L - remaining + 1):
            cost[i][start] = min(
                max(here(i, start, size), nxt[start + size]) for size in range(1, L - start - remaining + 2)
            )

    value = cost[0][0]
    # the lexicographically smallest optimal partition: at each block the smallest size that keeps the
    # optimum reachable (taking each sub-problem's own lexicographic optimum would not be: a sub-problem
    # may reach a value below the global optimum with a lexicographically larger partition)
    sizes, start = [], 0
    for i in range(Lbar - 1):
        size = next(
            size
            for size in range(1, L - start - (Lbar - i) + 2)
            if here(i, start, size) <= value and cost[i + 1][start + size] <= value
        )
        sizes.append(size)
        start += size
    sizes.append(L - start)
    return tuple(sizes), value
