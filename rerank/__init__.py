"""Reranking of the fused list into the final page."""
