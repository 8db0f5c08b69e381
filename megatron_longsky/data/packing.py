"""Best-fit-decreasing packing of samples into rows of the training sequence length.

A plan is two arrays in CSR form: row ``r`` holds samples
``sample_ids[row_offsets[r]:row_offsets[r+1]]`` (in placement order). The C++
extension ``megatron_longsky._ext_packing`` does the work; :func:`pack_reference`
is a slow numpy version with the same rules, kept for tests. Rules (both):

* samples are placed longest first, equal lengths by lower sample index;
* each goes into the open row with the least remaining room that still fits it,
  ties to the row opened first; if none fits, a new row is opened.

So the plan depends only on the lengths and the capacity: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackingPlan:
    row_offsets: np.ndarray  # int64[n_rows + 1]
    sample_ids: np.ndarray  # int64[n_samples]

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.sample_ids[self.row_offsets[r]:self.row_offsets[r + 1]]

    def row_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Total length packed into each row."""
        per_sample = np.asarray(lengths, dtype=np.int64)[self.sample_ids]
        return np.add.reduceat(per_sample, self.row_offsets[:-1]) if len(per_sample) else np.zeros(0, np.int64)


def _check_lengths(lengths, capacity: int) -> np.ndarray:
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"sample {i} has length {int(lengths[i])}, outside [1, capacity={capacity}] "
                         f"({len(bad)} such samples); truncate or drop them before packing")
    return lengths


def pack_best_fit_decreasing(lengths, capacity: int) -> PackingPlan:
    """Pack ``lengths`` (each in [1, capacity]) into rows of ``capacity`` (C++)."""
    lengths = _check_lengths(lengths, capacity)
    try:
        from megatron_longsky import _ext_packing
    except ImportError as exc:
        raise ImportError(
            "the C++ packing extension megatron_longsky._ext_packing is not built; run "
            "`pip install --no-build-isolation --no-deps -e .` in the repository"
        ) from exc
    offsets, samples = _ext_packing.pack_bfd(lengths, int(capacity))
    return PackingPlan(np.asarray(offsets), np.asarray(samples))


def pack_reference(lengths, capacity: int) -> PackingPlan:
    """The numpy reference: same rules as the C++ code, O(samples x rows)."""
    lengths = _check_lengths(lengths, capacity)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(n, dtype=np.int64)
    row_of = np.empty(n, dtype=np.int64)
    n_rows = 0
    no_fit = np.iinfo(np.int64).max
    for sample in order:
        need = lengths[sample]
        if n_rows:
            open_rooms = room[:n_rows]
            candidates = np.where(open_rooms >= need, open_rooms, no_fit)
            best = int(np.argmin(candidates))  # lowest row id among equal rooms
            row = best if candidates[best] != no_fit else -1
        else:
            row = -1
        if row < 0:
            row = n_rows
            room[row] = capacity
            n_rows += 1
        room[row] -= need
        row_of[sample] = row
    placed = row_of[order]
    by_row = np.argsort(placed, kind="stable")  # keeps placement order inside a row
    sample_ids = order[by_row]
    counts = np.bincount(row_of, minlength=n_rows) if n else np.zeros(0, np.int64)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return PackingPlan(offsets, sample_ids.astype(np.int64))


def fill_rate(plan: PackingPlan, lengths, capacity: int) -> float:
    """Packed tokens / (rows x capacity)."""
    if plan.num_rows == 0:
        return 1.0
    return float(np.asarray(lengths, dtype=np.int64).sum()) / (plan.num_rows * capacity)
