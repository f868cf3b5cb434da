"""Recall paths (ann, itemcf, graph, popular/fresh), their offline builders, and the merge."""
