"""Datasets: MovieLens-100k and the seeded synthetic world, in one schema."""
