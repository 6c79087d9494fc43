"""Deleted symbols across restarts: the tombstone beside the log, with and without checkpoints
before and after the deletion, against a model of what the hot tier must hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.durability import tombstones, wal
from appliance.durability.checkpoint import Checkpointer
from appliance.durability.recovery import recover
from appliance.durability.writer import DurableWriter
from appliance.store import Store, UnknownSymbolError
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def make_store() -> Store:
    return Store(
        NumpyEngine(),
        retention=RetentionPolicy(max_values=10_000, keep_after_cleanup=5_000),
        max_symbols=2,
        starting_capacity=16,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def open_writer(data: Path, clock: Clock, store: Store | None = None, result=None):
    checkpointer = Checkpointer(data, 10, background=False, clock=clock)
    store = store or make_store()
    kwargs = {}
    if result is not None:
        kwargs = {"next_lsn": result.next_lsn, "totals": result.totals, "tail": result.tail,
                  "retired_totals": result.retired_totals}  # fmt: skip
    writer = DurableWriter(
        store, wal.wal_dir(data), sync="never", checkpointer=checkpointer, **kwargs
    )
    writer.start()
    return writer, store


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from("AB"), st.integers(1, 5)),
        st.tuples(st.just("delete"), st.sampled_from("AB"), st.just(0)),
        st.tuples(st.just("checkpoint"), st.just(""), st.just(0)),
        st.tuples(st.just("restart"), st.just(""), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_recovery_matches_a_model_of_appends_deletes_checkpoints_and_restarts(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, str, int]]
) -> None:
    data = tmp_path_factory.mktemp("data")
    clock = Clock()
    writer, store = open_writer(data, clock)
    hot: dict[str, list[float]] = {}  # the model: what the hot tier holds
    totals: dict[str, int] = {}  # values ever accepted per symbol (numbering goes on)
    counter = 0.0
    try:
        for op, symbol, n in ops:
            if op == "append":
                values = [counter + i for i in range(n)]
                counter += n
                if symbol not in hot and len(hot) >= 2:
                    continue  # both slots taken: the writer would refuse it (tested elsewhere)
                record = writer.submit(symbol, np.array(values)).result()
                assert record.first_index == totals.get(symbol, 0)
                hot.setdefault(symbol, []).extend(values)
                totals[symbol] = totals.get(symbol, 0) + n
            elif op == "delete":
                if symbol not in hot:
                    with pytest.raises(UnknownSymbolError):
                        writer.delete_symbol(symbol)
                    continue
                dropped, tombstone = writer.delete_symbol(symbol)
                assert (dropped, tombstone.total) == (len(hot.pop(symbol)), totals[symbol])
            elif op == "checkpoint":
                clock.now += 10  # due: written after the next group, which this op sends
                symbol = next((s for s in "AB" if s in hot), "A")
                writer.submit(symbol, np.array([counter])).result()
                hot.setdefault(symbol, []).append(counter)
                totals[symbol] = totals.get(symbol, 0) + 1
                counter += 1
            else:  # restart: close (with its shutdown checkpoint), recover, go on
                writer.close()
                writer, store = _reopen(data, clock)
            assert {s: store.snapshot_values(s).tolist() for s in store.symbols()} == hot
    finally:
        writer.close()
    recovered = make_store()
    result = recover(recovered, data)
    assert {s: recovered.snapshot_values(s).tolist() for s in recovered.symbols()} == hot
    for symbol, total in totals.items():
        assert (result.totals.get(symbol) or result.retired_totals.get(symbol)) == total


def _reopen(data: Path, clock: Clock):
    store = make_store()
    result = recover(store, data)
    return open_writer(data, clock, store, result)


def test_the_tombstone_file_is_replaced_atomically_and_moves_forward(tmp_path: Path) -> None:
    tombstones.record(tmp_path, "A", tombstones.Tombstone(5, 10))
    tombstones.record(tmp_path, "B", tombstones.Tombstone(6, 1))
    tombstones.record(tmp_path, "A", tombstones.Tombstone(9, 12))
    assert tombstones.load(tmp_path) == {
        "A": tombstones.Tombstone(9, 12),
        "B": tombstones.Tombstone(6, 1),
    }
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / tombstones.FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert tombstones.load(tmp_path / "nowhere") == {}
