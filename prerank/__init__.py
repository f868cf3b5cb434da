"""The cascaded pre-ranker: stage A (two-tower dot product); stage B (distilled DNN) comes later."""
