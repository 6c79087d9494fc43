"""Durability (SPEC section 8): write-ahead log, recovery, checkpoints, warm tier, history."""
