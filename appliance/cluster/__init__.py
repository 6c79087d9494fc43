"""Cluster mode: symbols partitioned across appliance nodes, replicated through NATS JetStream.

Off by default (`[cluster] enabled = false`): nothing here is imported then, and nats-py is not
needed. One job per module (see docs/cluster.md for the model):

- partitions: symbol -> partition number (crc32 % partitions) and the rendezvous-hash desired owner.
- membership: this node's heartbeat in KV `hft_nodes` and the live member list.
- ownership: partition leases in KV `hft_owners` (create / update(last=revision) / release).
- log: per-partition JetStream stream `HFT_P<N>`: encode, fenced publish, decode, replay.
- checkpoints: partition state at a stream sequence in the object store `hft_checkpoints`.
- forwarding: NATS request/reply to a partition's owner (`hft.req.p.<N>`), 503 when none answers.
- node: ties them together in a running appliance (takeover = restore + replay, then serve).
- status: `hft-appliance cluster status` (owners, applied sequence, lag) and the cluster metrics.
- local: a NATS cluster of nats-server processes on loopback for tests, the demo and benches.
"""
