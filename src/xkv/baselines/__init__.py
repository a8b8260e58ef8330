"""Baselines that xKV is compared with, one file per method (single-layer SVD is ``XKVConfig(group_size=1)``)."""
