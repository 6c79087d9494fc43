"""Unit properties of the shared summary-row arithmetic (engine_core.summary), numpy side."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine_core.layout import Geometry
from engine_core.summary import (
    COUNT,
    IDENTITY_ROW,
    M2,
    MAX,
    MEAN,
    MIN,
    REF,
    ROW_WIDTH,
    combine,
    merge_groups,
    summarize_blocks,
)
from tests.engine.reference import rounding_floor

values = st.floats(0.0, 1e15, allow_nan=False, allow_infinity=False)
blocks_shape = st.tuples(st.integers(1, 6), st.sampled_from([1, 2, 4, 8]))


def summary(x: np.ndarray) -> np.ndarray:
    """A node row for any 1-D run, anchored at its first value like the engine's rows."""
    ref = float(x[0])
    dev = x - ref
    mean = float(dev.mean())
    centred = dev - mean
    row = np.array([x.shape[0], ref, mean, float(centred @ centred), x.min(), x.max()])
    assert row.shape == (ROW_WIDTH,)
    return row


def check_row(row: np.ndarray, x: np.ndarray) -> None:
    assert row[COUNT] == len(x)
    assert row[MIN] == x.min() and row[MAX] == x.max()
    mean = row[REF] + row[MEAN]
    assert mean == pytest.approx(x.mean(), rel=1e-12, abs=1e-300)
    m2 = ((x - x.mean()) ** 2).sum()
    assert row[M2] == pytest.approx(m2, rel=1e-9, abs=rounding_floor(x))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.sampled_from([1, 2, 4, 8])), elements=values)
)
def test_summarize_blocks_matches_numpy_per_row(blocks):
    out = np.empty((blocks.shape[0], ROW_WIDTH))
    summarize_blocks(blocks, out)
    for row, block in zip(out, blocks, strict=True):
        check_row(row, block)


@settings(max_examples=200, deadline=None)
@given(st.lists(arrays(np.float64, st.integers(1, 20), elements=values), min_size=1, max_size=4))
@example([np.array([0.0]), np.array([3.4e-162, 3.4e-162])])  # subnormal squares
def test_merging_children_equals_summarizing_their_concatenation(parts):
    fanout = 4
    group = np.tile(IDENTITY_ROW, (1, fanout, 1))  # unused children stay empty
    for i, part in enumerate(parts):
        group[0, i] = summary(part)
    parent = np.empty((1, ROW_WIDTH))
    merge_groups(group, parent)
    check_row(parent[0], np.concatenate(parts))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.integers(0, 10), elements=values),
    st.lists(arrays(np.float64, st.integers(1, 20), elements=values), max_size=4),
)
def test_combine_raw_values_and_rows_equals_numpy(raw, parts):
    if not len(raw) and not parts:
        return
    rows = np.array([summary(p) for p in parts]).reshape(-1, ROW_WIDTH)
    everything = np.concatenate([raw, *parts])
    n, mean, m2, lo, hi = combine(raw, rows)
    assert n == len(everything)
    assert (lo, hi) == (everything.min(), everything.max())
    assert mean == pytest.approx(everything.mean(), rel=1e-12, abs=1e-300)
    expected_m2 = ((everything - everything.mean()) ** 2).sum()
    assert m2 == pytest.approx(expected_m2, rel=1e-9, abs=rounding_floor(everything))


def test_identity_row_changes_nothing():
    x = np.array([3.0, 5.0, 11.0])
    group = np.stack([summary(x), IDENTITY_ROW, IDENTITY_ROW])[None]
    parent = np.empty((1, ROW_WIDTH))
    merge_groups(group, parent)
    np.testing.assert_array_equal(parent[0], summary(x))


@pytest.mark.parametrize(
    ("block", "fanout", "chunk"), [(3, 4, 64), (4, 6, 64), (4, 4, 48), (8, 4, 4), (1, 4, 64)]
)
def test_geometry_rejects_shapes_the_paging_cannot_hold(block, fanout, chunk):
    with pytest.raises(ValueError):
        Geometry(block=block, fanout=fanout, chunk=chunk)
