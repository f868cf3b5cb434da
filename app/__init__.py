"""Composition root: pipeline wiring, HTTP routes (public + admin), CLI."""
