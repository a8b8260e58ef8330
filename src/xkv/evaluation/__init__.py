"""Evaluation: RULER-style tasks generated offline, methods compared at equal measured KV bytes."""
