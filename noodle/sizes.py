"""Documented size limits of a planning problem, checked before anything grows with them.

The planner's cost tables hold ``nodes x (units + 1)^2`` stage costs (compute and memory,
16 bytes each) and ``nodes^2 x (units + 1)`` hops, and every solver reads them whole.
Past these limits a spec is refused at once with the numbers (``SpecError``, exit 2)
instead of spending minutes and gigabytes before any solver starts:

* at most ``MAX_NODES`` (256) nodes in the cluster;
* at most ``MAX_UNITS`` (1024) placement units (embedding + blocks + head; a transformers
  config may declare at most ``MAX_UNITS - 2`` blocks);
* ``nodes x (units + 1)^2 <= MAX_TABLE_CELLS`` (2^24: 256 MiB of stage tables, built in
  ~1.5 s on the 2-core development machine), e.g. 258 units x 128 nodes (8.6 M cells) and
  254 units x 256 nodes are fine, 1024 units need 15 nodes or fewer.

The bounds on the numbers a spec holds (bytes, times, tokens, batch sizes, memory, speeds) live
here too, so every edge that reads such a number (the spec, the wire, the CLI) uses the same ones.
"""

from __future__ import annotations

__all__ = ["MAX_NODES", "MAX_UNITS", "MAX_TABLE_CELLS", "size_problem", "MAX_BYTES", "MAX_MS", "MAX_TOKENS", "MAX_BATCH",
           "MAX_MEMORY_GB", "MIN_SCORE", "MAX_SCORE", "MAX_TIME_LIMIT_S"]

MAX_NODES = 256
MAX_UNITS = 1024
MAX_TABLE_CELLS = 2**24

# Bounds on numbers (documented in docs/spec.md and docs/troubleshooting.md): finite, and small enough that
# sums and products over every unit and node stay exact in float64 and int64.
MAX_BYTES = 2**50  # 1 PiB per unit
MAX_MS = 1e9  # about 11.6 days per step
MAX_TOKENS = 2**24
MAX_BATCH = 2**16
MAX_MEMORY_GB = 2.0**20  # 1 PiB per node
MIN_SCORE, MAX_SCORE = 1e-6, 1e6  # compute_score, tflops, GB/s: positive and not vanishingly small
MAX_TIME_LIMIT_S = 1e6


def size_problem(num_units: int, num_nodes: int) -> str | None:
    """What is too large about ``num_units`` units on ``num_nodes`` nodes, or None when within the limits."""
    if num_nodes > MAX_NODES:
        return f"{num_nodes} nodes, at most {MAX_NODES} are supported"
    if num_units > MAX_UNITS:
        return f"{num_units} placement units, at most {MAX_UNITS} are supported"
    cells = num_nodes * (num_units + 1) ** 2
    if cells > MAX_TABLE_CELLS:
        fit = max(1, MAX_TABLE_CELLS // (num_units + 1) ** 2)
        return (f"{num_units} units x {num_nodes} nodes need {cells:,} cost-table cells, at most "
                f"{MAX_TABLE_CELLS:,} are supported (with {num_units} units: at most {fit} nodes)")
    return None
