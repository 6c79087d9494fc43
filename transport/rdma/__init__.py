"""RDMA verbs ingest: the shared-memory ring, written by one-sided RDMA (see server.py)."""
