"""Ingest transports (wire format, ZeroMQ, shared memory, RDMA): issue 3 onward."""
