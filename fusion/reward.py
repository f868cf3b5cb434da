"""The tuner's reward: per impression, a configurable weighted mix of feedback events.

An impression is a (request, item) pair with any feedback event (clients send an
"impression" event for every item the user saw; a click without one still counts the
item as seen). Its reward is Σ over its events of weight[type] × amount, where amount is 1
for every event type except "dwell", whose amount is its value in minutes (value in
seconds ÷ 60, capped at `dwell_cap_minutes`: one very long dwell should not outweigh a
bucket). Default weights: click 1, dwell 1 per minute, like 2, share 3, follow 3 (positive);
dislike −5 (negative); impression 0. They mirror the synthetic world's session reward
(sim/synthetic.py DEFAULT_REWARD_WEIGHTS), with dwell minutes standing for the long view.

Buckets accumulate Σ r, Σ r² and the impression count (core/store.py), so a bucket's mean
reward per impression and its standard error come straight from the store.
"""
from __future__ import annotations

EVENT_TYPES = ("impression", "click", "dwell", "like", "share", "follow", "dislike")
DEFAULT_WEIGHTS: dict[str, float] = {"click": 1.0, "dwell": 1.0, "like": 2.0, "share": 3.0, "follow": 3.0, "dislike": -5.0}
DEFAULT_DWELL_CAP_MINUTES = 10.0


def event_reward(type_: str, value: float | None, weights: dict[str, float], dwell_cap_minutes: float = DEFAULT_DWELL_CAP_MINUTES) -> float:
    w = float(weights.get(type_, 0.0))
    if w == 0.0:
        return 0.0
    if type_ == "dwell":
        minutes = max(0.0, float(value or 0.0)) / 60.0
        return w * min(minutes, dwell_cap_minutes)
    return w


def event_rewards(events, weights: dict[str, float], dwell_cap_minutes: float = DEFAULT_DWELL_CAP_MINUTES) -> tuple[float, ...]:
    """One reward per event (objects with .type and .value)."""
    return tuple(event_reward(e.type, e.value, weights, dwell_cap_minutes) for e in events)
