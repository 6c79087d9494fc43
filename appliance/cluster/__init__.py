"""Cluster mode: symbols partitioned across appliance nodes, replicated through NATS JetStream.

Off by default (`[cluster] enabled = false`): nothing here is imported then, and nats-py is not
needed. One job per module (see docs/cluster.md for the model):

- partitions: symbol -> partition number (crc32 % partitions) and the rendezvous-hash desired owner.
- messages: the wire formats (a stream message = one batch or a deletion; node-to-node
  requests and replies; a partition checkpoint), msgspec MessagePack.
- node: membership (KV `hft_nodes`), partition leases (KV `hft_owners`: create /
  update(last=revision) / delete), the fenced, deduplicated partition log (stream `HFT_P<N>`),
  checkpoints (object store `hft_checkpoints`), takeover = restore + replay, then serve.
- router: the REST handlers' cluster path: answer here when this node serves the partition,
  else NATS request/reply to its owner (`hft.req.p.<N>`), 503 partition_unavailable when none.
- sink: ZeroMQ (and shared-memory) ingest routed to the owner, acked after the owner's ack.
- status: `hft-appliance cluster status` (owners, applied sequence, lag).
- local: a NATS cluster of nats-server processes on loopback for tests, the demo and benches.
"""
