"""A failed append changes nothing (numpy engine): SPEC 5 "no partial batch", at engine level.

Failures are injected where they can really happen: allocating a page, and a temporary inside
the vectorised merge (both raise MemoryError under memory pressure).
"""

from __future__ import annotations

import numpy as np
import pytest

import fallback.series as series_module
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine
from tests.engine.reference import ModelSeries, assert_all_windows_match

GEOMETRY = Geometry(block=4, fanout=4, chunk=64)
POLICY = RetentionPolicy(max_values=1_000, keep_after_cleanup=600)


def _loaded_series():
    rng = np.random.default_rng(17)
    series = NumpyEngine(GEOMETRY).new_series(POLICY, 0)
    model = ModelSeries(POLICY)
    for size in (37, 101, 5, 250):
        batch = rng.uniform(0, 100, size)
        series.append(batch)
        model.append(batch)
    return series, model, rng


def _assert_recovers(series, model, rng):
    """Unchanged by the failed append, and still correct for the appends that follow."""
    assert_all_windows_match(series, model.values)
    for size in (3, 64, 700):  # the last one crosses a cleanup
        batch = rng.uniform(0, 100, size)
        assert series.append(batch) == model.append(batch)
        assert_all_windows_match(series, model.values)


def test_failed_page_allocation_leaves_the_series_unchanged(monkeypatch):
    series, model, rng = _loaded_series()

    def out_of_memory(self, number):
        if number not in self.pages:
            raise MemoryError("injected")
        return self.pages[number]

    monkeypatch.setattr(series_module.PagedLevel, "page", out_of_memory)
    with pytest.raises(MemoryError):
        series.append(rng.uniform(0, 100, 300))  # needs new pages at every level
    monkeypatch.undo()
    _assert_recovers(series, model, rng)


@pytest.mark.parametrize("failing_call", range(1, 9))  # the append makes 8 merges
def test_failure_in_the_middle_of_a_multi_page_append_is_rolled_back(monkeypatch, failing_call):
    series, model, rng = _loaded_series()
    real_merge = series_module.merge_groups
    calls = {"n": 0}

    def flaky_merge(groups, out, *args):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise MemoryError("injected")
        return real_merge(groups, out, *args)

    monkeypatch.setattr(series_module, "merge_groups", flaky_merge)
    with pytest.raises(MemoryError):
        series.append(rng.uniform(0, 100, 200))  # four page segments, several merges each
    monkeypatch.undo()
    _assert_recovers(series, model, rng)
