"""Serving side of fusion: which parameters a request gets, its bucket, and the reward tally
of its feedback. One `FusionService` per app (per worker process); its state lives in the
store, read through a short cache (`cache_seconds`), so several workers agree within that
delay and a restart resumes where the store left off.

- `assign(user_id, scene)`: with the tuner enabled on `scene`, the user's bucket in the
  open round (fusion/buckets.py) and that bucket's parameters; otherwise bucket "main",
  round -1 and the scene's parameters (stored for the scene, else the configured prior).
- `tally(served, events)`: one reward per event (fusion/reward.py) for requests served
  inside a tuner round; the store adds it to the bucket in the same write as the events.
- `put_params`: a manual change of a scene's weights (PUT /admin/fusion): validated against
  the bounds, recorded in the history with who and when, and, on the tuned scene, the
  tuner's mean is reset to it.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from core.schema import Schema
from core.store import DocWrite, ServedRequest, Store, Tally, history_entry
from fusion.buckets import CONTROL, MAIN, assign_bucket, experiment_buckets
from fusion.formula import FusionBounds, Params, check_params
from fusion.reward import DEFAULT_DWELL_CAP_MINUTES, DEFAULT_WEIGHTS, event_rewards
from fusion.tuner import FusionTuner, TunerConfig, worker_id


class ParamsError(ValueError):
    def __init__(self, errors: list[tuple[tuple, str]]):
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors))
        self.errors = errors


@dataclass(frozen=True)
class Assignment:
    bucket: str
    round_id: int  # -1: not in a tuner round
    params: Params
    stale: bool = False  # the store could not be read: last known values (or the prior) served


@dataclass(frozen=True)
class _TunerView:
    enabled: bool
    round_id: int | None
    salt: str
    share: float
    population: int
    params: dict[str, Params]  # experiment bucket -> params (control = the mean)
    mean: Params | None
    weights: dict[str, float]
    dwell_cap: float


_NO_TUNER = _TunerView(False, None, "", 0.0, 0, {}, None, dict(DEFAULT_WEIGHTS), DEFAULT_DWELL_CAP_MINUTES)


class FusionService:
    MAX_CACHED_SCENES = 256

    def __init__(self, store: Store, bounds: FusionBounds, scene: str = "home", initial_config: TunerConfig | None = None,
                 cache_seconds: float = 1.0, owner: str | None = None, clock=time.time):
        self.store, self.bounds, self.scene = store, bounds, scene
        self.initial_config = initial_config or TunerConfig()
        self.cache_seconds = cache_seconds
        self.owner = owner or worker_id()
        self.clock = clock
        self.schema: Schema | None = None
        self.prior: Params | None = None
        self.tuner: FusionTuner | None = None
        self._lock = threading.Lock()
        self._view: tuple[float, _TunerView] | None = None
        self._scenes: dict[str, tuple[float, Params, dict]] = {}

    def bind(self, schema: Schema, prior: Params) -> None:
        """Attach the loaded bundle's tasks and the configured prior (at bundle install)."""
        self.schema, self.prior = schema, dict(prior)
        self.tuner = FusionTuner(self.store, self.scene, schema, self.bounds, self.prior, self.initial_config, self.owner, self.clock)
        self.invalidate()

    def invalidate(self) -> None:
        with self._lock:
            self._view = None
            self._scenes.clear()

    # ------------------------------------------------------------------ reads (cached)

    def _tuner_view(self) -> _TunerView:
        return self._tuner_view_s()[0]

    def _tuner_view_s(self) -> tuple[_TunerView, bool]:
        """(view, stale). When the store cannot be read, the last view read (any age) is
        served, or no tuner at all (bucket main, scene parameters) if none was read yet."""
        now = time.monotonic()
        with self._lock:
            old = self._view
        if old is not None and now - old[0] < self.cache_seconds:
            return old[1], False
        try:
            view = self._read_view()
        except Exception:
            return (old[1] if old is not None else _NO_TUNER), True
        with self._lock:
            self._view = (now, view)
        return view, False

    def _read_view(self) -> _TunerView:
        doc = self.tuner.load() if self.tuner is not None else self.store.get_doc(f"tuner:{self.scene}")
        if doc is None:
            return _NO_TUNER
        cfg = doc.value["config"]
        weights, cap = dict(cfg.get("reward_weights", DEFAULT_WEIGHTS)), float(cfg.get("dwell_cap_minutes", DEFAULT_DWELL_CAP_MINUTES))
        state = doc.value.get("state")
        if self.tuner is None or state is None or state.get("tasks") != self.schema.task_names or not state.get("round"):
            return _TunerView(False, None, "", 0.0, 0, {}, None, weights, cap)
        rnd = state["round"]
        signs, alpha, tasks = state["signs"], state["alpha"], state["tasks"]

        def params(theta) -> Params:
            return {t: (a, s * math.exp(x)) for t, a, s, x in zip(tasks, alpha, signs, theta)}

        per_bucket = {b: params(rnd["buckets"][b]) for b in experiment_buckets(rnd["population"]) if b in rnd["buckets"]}
        mean = params(state["mean"])
        per_bucket[CONTROL] = mean
        return _TunerView(bool(cfg.get("enabled")), int(rnd["id"]), str(cfg.get("salt") or ""), float(cfg["traffic_share"]),
                          int(rnd["population"]), per_bucket, mean, weights, cap)

    def scene_params(self, scene: str) -> tuple[Params, dict]:
        """(params, meta) of a scene outside the experiment: stored params over the prior."""
        return self._scene_params_s(scene)[:2]

    def _scene_params_s(self, scene: str) -> tuple[Params, dict, bool]:
        """(params, meta, stale); stale: the store could not be read, so the last params read
        for the scene (any age), else the prior."""
        now = time.monotonic()
        with self._lock:
            hit = self._scenes.get(scene)
            if hit is not None and now - hit[0] < self.cache_seconds:
                return hit[1], hit[2], False
        params = dict(self.prior or {})
        meta: dict = {"source": "settings", "updated_at": None, "updated_by": None}
        try:
            doc = self.store.get_doc(f"fusion:{scene}")
        except Exception:
            if hit is not None:
                return hit[1], {**hit[2], "stale": True}, True
            return params, {**meta, "source": "prior (store unavailable)", "stale": True}, True
        if doc is not None:
            for t, (a, b) in doc.value.get("params", {}).items():
                if t in params:
                    params[t] = (float(a), float(b))
            meta = {"source": doc.value.get("source", "manual"), "updated_at": doc.value.get("updated_at"),
                    "updated_by": doc.value.get("updated_by"), "version": doc.version}
        with self._lock:
            if len(self._scenes) >= self.MAX_CACHED_SCENES:
                self._scenes.clear()
            self._scenes[scene] = (now, params, meta)
        return params, meta, False

    # ------------------------------------------------------------------ serving

    def assign(self, user_id: str, scene: str) -> Assignment:
        """Never raises for a store outage: stale values are served and flagged."""
        stale = False
        if scene == self.scene and self.tuner is not None:
            v, stale = self._tuner_view_s()
            if v.enabled and v.round_id is not None:
                b = assign_bucket(user_id, v.round_id, v.salt, v.share, v.population)
                return Assignment(b, v.round_id, v.params.get(b, v.mean), stale)
        params, _, stale2 = self._scene_params_s(scene)
        return Assignment(MAIN, -1, params, stale or stale2)

    def tally(self, served: ServedRequest, events) -> Tally | None:
        """Rewards of a feedback call, for requests served inside a tuner round."""
        if served.round_id < 0:
            return None
        v = self._tuner_view() if self.tuner is not None else self._read_view()
        return Tally(served.scene, served.round_id, served.bucket, event_rewards(events, v.weights, v.dwell_cap))

    def maybe_close(self) -> dict | None:
        """Close the open round if it is ready (any worker may call; one succeeds)."""
        if self.tuner is None:
            return None
        entry = self.tuner.maybe_close()
        if entry is not None:
            self.invalidate()
        return entry

    # ------------------------------------------------------------------ admin

    def put_params(self, scene: str, patch: dict[str, dict[str, float]], who: str, note: str | None = None) -> dict:
        """Apply a manual change of a scene's weights; raises ParamsError on bad input."""
        if self.schema is None:
            raise RuntimeError("no bundle bound")
        errors = check_params(self.schema, self.bounds, patch)
        if errors:
            raise ParamsError(errors)
        for _ in range(10):
            fdoc = self.store.get_doc(f"fusion:{scene}")
            before = dict(self.prior)
            if fdoc is not None:
                for t, (a, b) in fdoc.value.get("params", {}).items():
                    if t in before:
                        before[t] = (float(a), float(b))
            if scene == self.scene and self.tuner is not None:
                tdoc = self.tuner.load()
                st = tdoc.value.get("state")
                if st and st.get("tasks") == self.schema.task_names:
                    before = self.tuner.mean_params(st)  # what the tuned scene actually serves
            after = dict(before)
            for t, w in patch.items():
                a, b = after[t]
                after[t] = (float(w.get("alpha", a)), float(w.get("beta", b)))
            now = self.clock()
            writes = [DocWrite(f"fusion:{scene}", {"params": {t: list(v) for t, v in after.items()}, "updated_at": now,
                                                   "updated_by": who, "source": "manual"},
                               expect=fdoc.version if fdoc is not None else 0)]
            reset = False
            round_id = None
            if scene == self.scene and self.tuner is not None:
                w = self.tuner.reset_mean(tdoc, after)
                if w is not None:
                    writes.append(w)
                    reset = True
                    round_id = (w.value["state"].get("round") or {}).get("id")
            entry = history_entry(scene, "manual", round_id, {
                "who": who, "at": now, "note": note,
                "before": {t: {"alpha": a, "beta": b} for t, (a, b) in before.items()},
                "after": {t: {"alpha": a, "beta": b} for t, (a, b) in after.items()},
                "tuner_mean_reset": reset,
            }, ts=now)
            if self.store.commit(writes, [entry]):
                self.invalidate()
                return entry
        raise RuntimeError("fusion params: too many concurrent writers")

    def served_params(self, scene: str) -> tuple[Params, dict]:
        """What the scene serves outside the experiment (the tuner's mean on the tuned scene)."""
        if scene == self.scene and self.tuner is not None:
            v = self._read_view()
            if v.mean is not None:
                params, meta = self.scene_params(scene)
                return v.mean, {**meta, "tuner_enabled": v.enabled, "round": v.round_id}
        params, meta = self.scene_params(scene)
        return params, {**meta, "tuner_enabled": False}
