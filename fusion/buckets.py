"""Traffic buckets for the online fusion tuner.

A salted hash of (round, user id) gives each user a uniform number u in [0, 1) that is
stable inside a round and reshuffled between rounds (so a user is not stuck in one
perturbation, and a bucket's users differ from round to round). Users with
u < traffic_share are in the experiment: that share is split evenly into `n_explore`
exploration buckets "x0".."x{n-1}" (each serves one perturbed parameter vector) and one
"control" bucket (serves the current mean). Everyone else is in "main", which also serves
the mean. The salt (random per deployment, kept in the tuner's state) keeps clients from
predicting or steering their bucket.
"""
from __future__ import annotations

import hashlib

MAIN = "main"
CONTROL = "control"


def explore_name(k: int) -> str:
    return f"x{k}"


def experiment_buckets(n_explore: int) -> list[str]:
    """Every bucket of a round's experiment: the exploration buckets, then control."""
    return [explore_name(k) for k in range(n_explore)] + [CONTROL]


def unit_hash(salt: str, round_id: int, user_id: str) -> float:
    """Uniform in [0, 1): blake2b-64 of salt, round and user id."""
    h = hashlib.blake2b(f"{salt}\x1f{int(round_id)}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def assign_bucket(user_id: str, round_id: int, salt: str, traffic_share: float, n_explore: int) -> str:
    """The user's bucket in this round: "x<k>", "control" or "main"."""
    u = unit_hash(salt, round_id, user_id)
    if u >= traffic_share:
        return MAIN
    k = min(int(u / traffic_share * (n_explore + 1)), n_explore)
    return CONTROL if k == n_explore else explore_name(k)


def round_seed(salt: str, round_id: int) -> int:
    """Seed of a round's perturbations (deterministic from the salt and the round)."""
    h = hashlib.blake2b(f"{salt}\x1fnoise\x1f{int(round_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")
