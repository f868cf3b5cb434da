"""Feature assembly for the ranker, the multi-task ranker stage, and its training (train.py)."""
