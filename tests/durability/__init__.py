"""Durability (issue 5): write-ahead log, recovery, checkpoints, warm tier."""
