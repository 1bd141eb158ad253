"""Vocabulary-wide rows, a bounded chunk at a time.

Drafting and verification both turn rows of V logits into float32 work (a softmax, a sort, a top-k):
all R x (B+1) rows of a verify step at once would take gigabytes at V = 152k. The core therefore
walks such rows in chunks whose transient memory stays under :data:`WORKING_SET_BYTES`. The chunk
count depends only on the step's shape, so a step stays fixed-shape (and CUDA-graph capturable).
"""

from __future__ import annotations

# Upper bound on the transient memory of one chunk of rows.
WORKING_SET_BYTES = 256 << 20


def rows_per_chunk(bytes_per_row: int) -> int:
    """Rows processed together so that their working set stays within :data:`WORKING_SET_BYTES`."""
    return max(1, WORKING_SET_BYTES // bytes_per_row)


def row_chunks(num_rows: int, bytes_per_row: int) -> list[slice]:
    """``slice``s covering ``range(num_rows)``, each of at most :func:`rows_per_chunk` rows."""
    chunk = rows_per_chunk(bytes_per_row)
    return [slice(start, min(start + chunk, num_rows)) for start in range(0, num_rows, chunk)]
