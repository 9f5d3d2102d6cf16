"""Memory budgets and the softmax floor of the AnyUp re-implementation (see the package docstring)."""

from __future__ import annotations

__all__ = [
    "CHUNK_BUDGET_FACTOR",
    "DEFAULT_STRIP_BYTES",
    "DEFAULT_TILE_BUDGET_BYTES",
    "LFU_BLOCK_BYTES",
    "SOFTMAX_FLOOR",
]

#: Upper bound on the memory of one attention tile (logits, softmax, mask, queries, outputs);
#: within it the tile shape comes from a cost model (:meth:`AnyUp._plan_tiles`).
DEFAULT_TILE_BUDGET_BYTES = 16 * 2**20
#: The reference (autograd) RoPE and feature-unification row chunks use this multiple of the budget.
CHUNK_BUDGET_FACTOR = 8
#: Bytes of one ``[D, n]`` strip of the fused encoder passes on the CPU (128 channels x 1024 px
#: in float32: the strip, its SiLU input and the conv output stay inside a 2 MiB L2 cache).
DEFAULT_STRIP_BYTES = 2**19
#: Bytes of one ``[pixels, C, D]`` block of the fused feature unification on the CPU.
LFU_BLOCK_BYTES = 2**21
#: Softmax inputs more than this below their row maximum are raised to it (module docstring).
SOFTMAX_FLOOR = 80.0
