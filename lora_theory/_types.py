"""Type aliases of the public signatures (annotations only; the checks live in :mod:`lora_theory._validate`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = ["ArrayLike", "DTypeLike", "Matrices", "Rank", "Seed", "Partition"]

#: Square matrices ``(D, D)``, one per layer (``W_1`` first).
Matrices = Sequence[ArrayLike]
#: One LoRA-rank for every layer, or one per layer.
Rank = int | Sequence[int]
#: What the random generators accept as ``seed``.
Seed = int | np.random.Generator | np.random.SeedSequence | None
#: A partition of the frozen layers into consecutive blocks, by their sizes (``None``: the default).
Partition = Sequence[int] | None
