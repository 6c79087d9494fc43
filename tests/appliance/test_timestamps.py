"""The order rule and the hot tier's marks (appliance.timestamps), against a per-value model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.timestamps import (
    OutOfOrderError,
    TimeIndex,
    check_timestamps,
    resolve,
)


def test_a_batch_without_timestamps_gets_its_receive_time_never_before_the_newest() -> None:
    assert resolve(None, 100, None, clamp=False)[:4] == (None, 100, 100, 0)
    assert resolve(None, 100, 50, clamp=False)[:4] == (None, 100, 100, 0)
    # The wall clock stepped back: moved forward, never refused (the client sent no times).
    assert resolve(None, 40, 50, clamp=False)[:4] == (None, 50, 50, 0)


def test_timestamps_that_go_back_are_refused_naming_the_first() -> None:
    with pytest.raises(OutOfOrderError, match=r"timestamps\[0\] = 9 is before .* newest .* 10"):
        resolve(np.array([9, 11]), 0, 10, clamp=False)
    with pytest.raises(OutOfOrderError, match=r"timestamps\[2\] = 4 is before timestamps\[1\]"):
        resolve(np.array([3, 5, 4]), 0, None, clamp=False)
    ok = resolve(np.array([10, 10, 12]), 0, 10, clamp=False)  # equal times are in order
    assert ok.stamp == 10 and ok.newest == 12 and ok.clamped == 0 and not ok.distinct
    assert resolve(np.array([10, 11, 12]), 0, 10, clamp=False).distinct


def test_clamp_stores_each_value_that_goes_back_at_the_previous_time() -> None:
    got = resolve(np.array([8, 12, 11, 13, 2]), 0, 10, clamp=True)
    assert got.timestamps.tolist() == [10, 12, 12, 13, 13]
    assert (got.stamp, got.newest, got.clamped) == (10, 13, 3)


def test_the_decoder_check_refuses_what_no_time_can_be() -> None:
    assert check_timestamps(np.array([0, 5], np.uint64), 2).dtype == np.int64
    with pytest.raises(ValueError, match="one timestamp per value"):
        check_timestamps(np.array([1, 2]), 3)
    with pytest.raises(ValueError, match=r"timestamps\[1\] is negative"):
        check_timestamps(np.array([1, -2]), 2)
    with pytest.raises(ValueError, match="integers"):
        check_timestamps(np.array([1.5]), 1)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        check_timestamps(np.array([1 << 63], np.uint64), 1)


batches = st.lists(
    st.tuples(
        st.integers(1, 6),  # values in the batch
        st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=6, max_size=6)),  # steps
        st.integers(0, 40),  # receive time
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=400, deadline=None)
@given(
    batches=batches,
    held=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    clamp=st.booleans(),
    window=st.integers(0, 40),
    chunk=st.sampled_from([1, 2, 3, 7, 1 << 16]),
)
def test_marks_answer_like_one_time_per_value(
    batches: list[tuple[int, list[int] | None, int]],
    held: list[int],
    clamp: bool,
    window: int,
    chunk: int,
) -> None:
    """After any batches (with or without times, refused or clamped), evicting all but the
    newest `held` values (in steps, reusing chunks), `count_since` and `marks` agree with a
    per-value list of times, for any chunk size."""
    index = TimeIndex(chunk)
    model: list[int] = []
    for count, steps, received in batches:
        times = None
        if steps is not None:
            base = (model[-1] if model else 0) - 3  # may start before the newest
            times = np.array([base + s for s in steps[:count]], np.int64)
            if times.shape[0] > 1 and clamp is False and bool(np.any(np.diff(times) < 0)):
                times = np.sort(times)
        newest = model[-1] if model else None
        try:
            resolved = resolve(times, received, newest, clamp)
        except OutOfOrderError:
            assert times is not None and newest is not None and int(times[0]) < newest
            continue
        index.append(count, resolved)
        stored = [resolved.stamp] * count if resolved.timestamps is None else resolved.timestamps
        model.extend(int(t) for t in stored)
        assert model == sorted(model)
        assert index.newest == model[-1]
    start = 0
    for keep in sorted(held, reverse=True):
        start = max(start, len(model) - keep)
        index.evict_to(start)
        live = model[start:]
        for cutoff in {live[-1] - window, live[0], live[-1], live[0] - 1, live[-1] + 1}:
            expected = sum(1 for t in live if t >= cutoff)
            assert index.count_since(cutoff, start) == expected, (cutoff, start)
    rel, ns = index.marks(start)
    assert rel[0] == 0
    expanded = np.repeat(ns, np.diff(np.append(rel, len(live))))
    assert expanded.tolist() == live
    cutoff = live[-1] - window
    restored = TimeIndex(chunk)
    restored.restore(rel, ns, len(live))
    assert restored.count_since(cutoff, 0) == sum(1 for t in live if t >= cutoff)
    assert restored.newest == live[-1]
