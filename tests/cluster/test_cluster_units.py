"""Cluster mode without processes: the partition map, rendezvous owners, the wire formats and
the [cluster] configuration (and the CLI's refusal of cluster + local durability)."""

from __future__ import annotations

import zlib

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.cluster.messages import (
    BatchMessage,
    PartitionCheckpoint,
    Reply,
    Request,
    SymbolState,
    decode_batch,
    decode_checkpoint,
    decode_reply,
    decode_request,
    encode,
)
from appliance.cluster.partitions import assignment, desired_owner, partition_of
from appliance.config import ConfigError, build_config
from tests.integration.server_harness import run_cli

NODES = ["n1", "n2", "n3", "n4", "n5"]


def test_partition_of_is_crc32_mod_and_stable() -> None:
    for symbol in ("AAPL", "MSFT", "é-unicode", "x" * 64):
        assert partition_of(symbol, 16) == zlib.crc32(symbol.encode()) % 16
        assert 0 <= partition_of(symbol, 7) < 7
    assert partition_of("AAPL", 1) == 0


def test_every_partition_has_an_owner_and_the_spread_is_fair() -> None:
    owners = assignment(256, NODES[:3])
    assert set(owners.values()) == set(NODES[:3])
    counts = [list(owners.values()).count(n) for n in NODES[:3]]
    assert min(counts) > 256 / 3 * 0.6, counts  # no node is starved
    assert assignment(4, []) == {0: None, 1: None, 2: None, 3: None}


@pytest.mark.parametrize("dead", NODES)
def test_a_dead_node_moves_only_its_own_partitions(dead: str) -> None:
    before = assignment(512, NODES)
    after = assignment(512, [n for n in NODES if n != dead])
    for p, owner in before.items():
        if owner != dead:
            assert after[p] == owner, p  # survivors keep what they had
        else:
            assert after[p] != dead
    moved = {after[p] for p, owner in before.items() if owner == dead}
    assert len(moved) > 1  # the dead node's share spreads over several survivors


def test_a_joining_node_takes_only_partitions_it_wins() -> None:
    before = assignment(512, NODES[:4])
    after = assignment(512, NODES)
    for p in range(512):
        assert after[p] in (before[p], "n5")
    assert sum(1 for p in range(512) if after[p] == "n5") > 0


def test_desired_owner_ignores_member_order() -> None:
    assert desired_owner(3, ["b", "a", "c"]) == desired_owner(3, ["c", "b", "a"])


finite = st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(
    symbol=st.text(min_size=1, max_size=20),
    values=st.lists(finite, min_size=1, max_size=50),
    with_times=st.booleans(),
    received_ns=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_batch_message_round_trip(
    symbol: str, values: list[float], with_times: bool, received_ns: int
) -> None:
    array = np.array(values, dtype=np.float64)
    times = np.arange(len(values), dtype=np.int64) * 7 + 1 if with_times else None
    message = BatchMessage.of(symbol, array, times, received_ns)
    back = decode_batch(encode(message))
    assert back == message
    np.testing.assert_array_equal(back.value_array(), array)
    if times is None:
        assert back.timestamp_array() is None
    else:
        np.testing.assert_array_equal(back.timestamp_array(), times)
    assert back.received_ns == received_ns and not back.delete


@given(
    op=st.sampled_from(["add_batch", "stats", "stats_batch", "symbols", "delete"]),
    partition=st.integers(min_value=0, max_value=4095),
    key=st.integers(min_value=-(2**63) + 1, max_value=8),
    queries=st.lists(st.tuples(st.text(max_size=10), st.integers(-(2**40), 8)), max_size=5),
    status=st.integers(min_value=100, max_value=599),
    body=st.binary(max_size=100),
)
def test_request_and_reply_round_trip(
    op: str, partition: int, key: int, queries: list, status: int, body: bytes
) -> None:
    request = Request(op=op, partition=partition, symbol="s", key=key, msg_id="m",
                      queries=queries)  # fmt: skip
    assert decode_request(encode(request)) == request
    assert decode_reply(encode(Reply(status=status, body=body))) == Reply(status, body)


def test_checkpoint_round_trip_and_garbage_is_refused() -> None:
    state = SymbolState("A", b"\x00" * 16, b"\x00" * 8, b"\x01" * 8)
    checkpoint = PartitionCheckpoint(seq=42, symbols=[state])
    assert decode_checkpoint(encode(checkpoint)) == checkpoint
    with pytest.raises(msgspec.DecodeError):
        decode_batch(b"\xc1not msgpack")
    with pytest.raises(msgspec.ValidationError):
        decode_request(encode({"partition": 1}))  # no op


def test_cluster_config_defaults_and_env() -> None:
    config = build_config({}, {})
    assert config.cluster.enabled is False
    assert config.cluster.partitions == 16 and config.cluster.replicas == 1
    # a publish must end while the owner's lease surely lasts (issue 16, finding 8)
    assert config.cluster.request_timeout_s < config.cluster.lease_s
    env = {
        "APP_CLUSTER__ENABLED": "true",
        "APP_CLUSTER__NODE_ID": "node-1",
        "APP_CLUSTER__NATS_URLS": '["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]',
        "APP_CLUSTER__PARTITIONS": "64",
        "APP_CLUSTER__LEASE_S": "1.5",
        "APP_CLUSTER__REQUEST_TIMEOUT_S": "1.0",
    }
    cluster = build_config({}, env).cluster
    assert cluster.nats_urls == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert (cluster.partitions, cluster.lease_s, cluster.node_id) == (64, 1.5, "node-1")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"APP_CLUSTER__ENABLED": "true"}, "cluster.node_id"),
        ({"APP_CLUSTER__NODE_ID": "bad id!"}, "cluster.node_id"),
        ({"APP_CLUSTER__PARTITIONS": "0"}, "cluster.partitions"),
        ({"APP_CLUSTER__PARTITIONS": "4097"}, "cluster.partitions"),
        ({"APP_CLUSTER__REPLICAS": "6"}, "cluster.replicas"),
        ({"APP_CLUSTER__LEASE_S": "0.1"}, "cluster.lease_s"),
        ({"APP_CLUSTER__NATS_URLS": '["http://x"]'}, "cluster.nats_urls"),
        (
            {
                "APP_CLUSTER__NATS_URLS": "[]",
                "APP_CLUSTER__ENABLED": "true",
                "APP_CLUSTER__NODE_ID": "a",
            },
            "cluster.nats_urls",
        ),
        ({"APP_CLUSTER__REQUEST_TIMEOUT_S": "0"}, "cluster.request_timeout_s"),
        (
            {
                "APP_CLUSTER__ENABLED": "true",
                "APP_CLUSTER__NODE_ID": "a",
                "APP_CLUSTER__LEASE_S": "3",
                "APP_CLUSTER__REQUEST_TIMEOUT_S": "3",
            },
            "cluster.request_timeout_s",
        ),
    ],
)
def test_cluster_config_errors_name_the_key(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config({}, env)


def test_serve_refuses_cluster_with_local_durability(tmp_path) -> None:
    env = {"APP_CLUSTER__ENABLED": "true", "APP_CLUSTER__NODE_ID": "a",
           "APP_DURABILITY__ENABLED": "true"}  # fmt: skip
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    assert "durability.enabled = false" in result.stderr + result.stdout


def test_serve_exits_2_when_nats_is_unreachable(tmp_path) -> None:
    from tests.integration.server_harness import free_port

    env = {"APP_CLUSTER__ENABLED": "true", "APP_CLUSTER__NODE_ID": "a",
           "APP_DURABILITY__ENABLED": "false", "APP_ENGINE__BACKEND": "numpy",
           "APP_CLUSTER__REQUEST_TIMEOUT_S": "1",
           "APP_CLUSTER__NATS_URLS": f'["nats://127.0.0.1:{free_port()}"]'}  # fmt: skip
    result = run_cli(tmp_path, "serve", env=env, timeout_s=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot join the cluster" in result.stderr + result.stdout
