"""Fusion of the ranker's task heads into one score, and (later) its online tuner."""
