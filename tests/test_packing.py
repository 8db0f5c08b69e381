"""Best-fit-decreasing packing: C++ equals the numpy reference, nothing lost, rows fit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longsky.data.packing import fill_rate, pack_best_fit_decreasing, pack_reference


def _check_plan(plan, lengths, capacity):
    ids = np.sort(plan.sample_ids)
    assert np.array_equal(ids, np.arange(len(lengths))), "a sample was lost or duplicated"
    assert plan.row_offsets[0] == 0 and plan.row_offsets[-1] == len(lengths)
    assert np.all(np.diff(plan.row_offsets) >= 1), "empty row"
    assert np.all(plan.row_lengths(lengths) <= capacity), "row over capacity"


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=120))))
def test_cpp_matches_reference_and_invariants(case):
    capacity, lengths = case
    lengths = np.array(lengths, dtype=np.int64)
    plan = pack_best_fit_decreasing(lengths, capacity)
    ref = pack_reference(lengths, capacity)
    _check_plan(plan, lengths, capacity)
    assert np.array_equal(plan.row_offsets, ref.row_offsets)
    assert np.array_equal(plan.sample_ids, ref.sample_ids)


def test_long_tailed_lengths_match_reference_and_fill_well():
    rng = np.random.default_rng(0)
    capacity = 4096
    lengths = np.clip(rng.lognormal(5.5, 1.2, size=3000).astype(np.int64), 1, capacity)
    plan = pack_best_fit_decreasing(lengths, capacity)
    ref = pack_reference(lengths, capacity)
    _check_plan(plan, lengths, capacity)
    assert np.array_equal(plan.sample_ids, ref.sample_ids)
    assert np.array_equal(plan.row_offsets, ref.row_offsets)
    lower_bound_rows = -(-int(lengths.sum()) // capacity)
    assert plan.num_rows <= lower_bound_rows * 1.02 + 1
    assert fill_rate(plan, lengths, capacity) > 0.97
    # deterministic: same plan again
    again = pack_best_fit_decreasing(lengths.copy(), capacity)
    assert np.array_equal(again.sample_ids, plan.sample_ids)


def test_best_fit_choice_on_known_instance():
    # 6 opens row0 (room 4), 5 opens row1 (room 5), 4 fits both: best fit is row0 (room 4 -> 0),
    # then 3 goes to row1 (room 5 -> 2), then 2 fills row1.
    plan = pack_best_fit_decreasing([6, 5, 4, 3, 2], 10)
    assert [list(plan.row(r)) for r in range(plan.num_rows)] == [[0, 2], [1, 3, 4]]
    # equal lengths keep index order; equal rooms go to the row opened first
    plan = pack_best_fit_decreasing([3, 3, 3, 3], 6)
    assert [list(plan.row(r)) for r in range(plan.num_rows)] == [[0, 1], [2, 3]]


def test_bad_lengths_are_refused_with_the_sample_index():
    with pytest.raises(ValueError, match="sample 1 has length 11"):
        pack_best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="sample 0 has length 0"):
        pack_reference([0, 1], 10)
    empty = pack_best_fit_decreasing(np.zeros(0, np.int64), 8)
    assert empty.num_rows == 0 and len(empty.sample_ids) == 0
