"""Online tuning of the fusion weights: CEM or OpenAI-style ES over traffic buckets.

Search space. The tuner moves θ_k = log|β_k| for the tuned tasks (all tasks unless the config
names some); α_k stays at its configured value. The sign of β_k never changes: it is fixed by
the task's polarity (`TaskSpec.negative`), β_k = sign_k · exp(θ_k), sign_k = −1 for negative
tasks (dislike) and +1 otherwise. So a negative task keeps β < 0 whatever the noise, and the
search is scale-free: a perturbation of ±0.3 in θ multiplies |β| by e^±0.3 for a weight of
0.05 and one of 2 alike. Bounds are a box in θ: [log beta_min, log beta_max] (fusion.formula
.FusionBounds); every sampled and every updated θ is clipped to it.

A round. At its start the round's perturbations are drawn (seeded by the salt and the round
id) and stored with the tuner's state, so every worker serves the same parameters:
- CEM: P exploration buckets x0..x{P-1}, θ_i = μ + σ ⊙ ε_i;
- ES: P/2 antithetic pairs, x{2j} = μ + σ ⊙ ε_j and x{2j+1} = μ − σ ⊙ ε_j;
plus the control bucket, which serves μ (as does the "main" traffic outside the experiment).
Feedback joined to a request's bucket accumulates the bucket's reward statistics
(fusion/reward.py, core/store.py). The round closes when every experiment bucket has
`min_impressions` impressions, or after `max_round_seconds` (then buckets with fewer than
`min_usable_share` × min_impressions impressions are left out of the update). Exactly one
worker closes a round: it takes the store's lock "tuner:<scene>", re-reads the state, checks
the round is still open, and commits the round record together with the new state as one
compare-and-set (the store also refuses a second record of the same round).

Updates (F_i: bucket i's mean reward per impression; all buckets ran in the same period, so
comparing them directly is comparing deltas to control):
- CEM (cross-entropy method): elites = the best ⌈ρ · usable⌉ buckets (ρ = elite_frac);
  μ ← (1 − a) μ + a · mean(elite θ); σ² ← (1 − a) σ² + a · var(elite θ) + Z
  (a = smoothing, Z = extra_noise keeps it exploring). ALGORITHM-NOTES "Fusion".
- ES (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to RL"):
  fitness shaped to centred ranks in [−0.5, 0.5] over all 2n returns;
  g = Σ_j (R⁺_j − R⁻_j) ε_j / (2 n σ); μ ← μ + step_size · g (plain SGD); σ is kept.

Guardrails:
- bounds (above); σ clipped to [sigma_min, sigma_max] after every update;
- prior initialisation: μ starts at log|β| of the scene's configured weights (the stored
  fusion parameters, else the settings' prior), σ at sigma_init;
- a cap on the mean's move per round: |Δμ_k| ≤ max_move (log space, per task);
- rollback: the traffic that serves the mean (control + main) has a reward r_c per round;
  its trailing baseline b is the mean of the last `baseline_rounds` accepted rounds. If
  r_c < b − rollback_margin · |b| and the drop is also significant
  (b − r_c ≥ rollback_z · SE), the round regressed. A regressed round holds μ and σ (no
  update, not added to the baseline); `rollback_confirm_rounds` (2) regressed rounds in a
  row roll back: μ returns to the last good mean (the mean served in the last accepted
  round), σ to sigma_init, and the baseline restarts. One regressed round is not enough:
  a round's reward per impression is noisier than its per-impression standard error says
  (impressions of one feed are correlated, dwell is heavy-tailed): tune-sim's 3k world,
  rounds of 2000 impressions per bucket, SE 0.033, had consecutive rounds 0.497 → 0.402
  with the mean barely moved, and single-round rollbacks fired in no-fault runs;
- optional σ re-initialisation every `sigma_reinit_seconds` (86400: daily; 0: off).
Each closed round is stored in the history with every bucket's parameters and statistics.
"""
from __future__ import annotations

import math
import os
import secrets
import socket
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schema import Schema
from core.store import BucketStats, Doc, DocWrite, Store, history_entry
from fusion.buckets import CONTROL, MAIN, experiment_buckets, explore_name, round_seed
from fusion.formula import FusionBounds, Params
from fusion.reward import DEFAULT_DWELL_CAP_MINUTES, DEFAULT_WEIGHTS, EVENT_TYPES


class TunerConfig(BaseModel):
    """Tuner configuration (GET/PUT /admin/tuner). Changing algo, population, traffic_share,
    tasks, salt or the reward abandons the open round and starts a new one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = False
    algo: Literal["cem", "es"] = "cem"
    population: int = Field(6, ge=2, le=64, description="exploration buckets per round (ES: even, antithetic pairs)")
    traffic_share: float = Field(0.1, gt=0.0, le=1.0, description="share of users in the experiment (exploration + control)")
    sigma_init: float = Field(0.5, gt=0.0, le=5.0, description="initial σ per task, log|β| units")
    sigma_min: float = Field(0.05, gt=0.0, le=5.0)
    sigma_max: float = Field(1.5, gt=0.0, le=5.0)
    elite_frac: float = Field(0.5, gt=0.0, le=1.0, description="CEM: share of usable buckets kept as elites")
    smoothing: float = Field(0.5, gt=0.0, le=1.0, description="CEM: a in μ ← (1−a)μ + a·mean(elites)")
    extra_noise: float = Field(0.05, ge=0.0, le=1.0, description="CEM: Z added to σ² per round")
    step_size: float = Field(0.3, gt=0.0, le=10.0, description="ES: SGD step on the rank-shaped gradient")
    max_move: float = Field(0.3, gt=0.0, le=5.0, description="cap on |Δμ| per task per round, log|β| units")
    min_impressions: int = Field(2000, ge=1, description="a round closes when every experiment bucket has this many")
    max_round_seconds: float = Field(3600.0, gt=0.0, description="... or after this long")
    min_usable_share: float = Field(0.25, ge=0.0, le=1.0, description="at a timeout, buckets below this × min_impressions are left out")
    rollback_margin: float = Field(0.1, ge=0.0, le=1.0, description="relative drop of the mean's reward below its trailing baseline")
    rollback_z: float = Field(3.0, ge=0.0, le=10.0, description="... that is also this many standard errors")
    baseline_rounds: int = Field(3, ge=1, le=100, description="accepted rounds in the trailing baseline")
    baseline_min_rounds: int = Field(2, ge=1, le=100, description="no rollback check before the baseline has this many")
    rollback_confirm_rounds: int = Field(2, ge=1, le=10, description="consecutive regressed rounds that trigger the rollback (1: the first)")
    sigma_reinit_seconds: float = Field(0.0, ge=0.0, description="re-initialise σ this often (86400: daily; 0: off)")
    tasks: list[str] | None = Field(None, description="tasks whose β is tuned (None: all)")
    reward_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    dwell_cap_minutes: float = Field(DEFAULT_DWELL_CAP_MINUTES, gt=0.0)
    salt: str | None = Field(None, min_length=1, max_length=128, description="bucket hash salt (random when unset)")

    @model_validator(mode="after")
    def _consistent(self) -> "TunerConfig":
        if not (self.sigma_min <= self.sigma_init <= self.sigma_max):
            raise ValueError("need sigma_min <= sigma_init <= sigma_max")
        if self.baseline_min_rounds > self.baseline_rounds:
            raise ValueError("baseline_min_rounds must be <= baseline_rounds")
        if self.algo == "es" and self.population % 2:
            raise ValueError("population must be even for es (antithetic pairs)")
        bad = [k for k in self.reward_weights if k not in EVENT_TYPES]
        if bad:
            raise ValueError(f"reward_weights: unknown event types {bad}; known: {list(EVENT_TYPES)}")
        return self


RESTART_FIELDS = ("algo", "population", "traffic_share", "tasks", "salt", "reward_weights", "dwell_cap_minutes")


# ----------------------------------------------------------------------------- algorithms


def centred_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [−0.5, 0.5] (Salimans et al. 2017); ties get their mean rank."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 2:
        return np.zeros(n)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    for v in np.unique(x):  # tie handling (n is a handful of buckets)
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks / (n - 1) - 0.5


def cem_update(mu: np.ndarray, sigma: np.ndarray, thetas: np.ndarray, fitness: np.ndarray, elite_frac: float,
               smoothing: float, extra_noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CEM step: (new μ, new σ, elite indices into thetas)."""
    n_elite = max(1, int(math.ceil(elite_frac * len(fitness) - 1e-9)))
    elite = np.argsort(-np.asarray(fitness), kind="stable")[:n_elite]
    e = thetas[elite]
    a = smoothing
    new_mu = (1 - a) * mu + a * e.mean(axis=0)
    new_var = (1 - a) * sigma**2 + a * e.var(axis=0) + extra_noise
    return new_mu, np.sqrt(new_var), elite


def es_gradient(eps: np.ndarray, f_plus: np.ndarray, f_minus: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """g = Σ_j (R⁺_j − R⁻_j) ε_j / (2 n σ) with R the centred ranks of all 2n returns;
    zero where σ is zero (untuned tasks)."""
    n = len(eps)
    r = centred_ranks(np.concatenate([f_plus, f_minus]))
    diff = r[:n] - r[n:]
    safe = np.where(sigma > 0, sigma, 1.0)
    return np.where(sigma > 0, (diff[:, None] * eps).sum(axis=0) / (2 * n * safe), 0.0)


# ----------------------------------------------------------------------------- state


def _beta_dict(tasks: list[str], signs: np.ndarray, theta: np.ndarray) -> dict[str, float]:
    return {t: float(s * math.exp(x)) for t, s, x in zip(tasks, signs, theta)}


def init_state(config: TunerConfig, schema: Schema, bounds: FusionBounds, prior: Params, now: float) -> dict:
    """A fresh state: μ = log|β| of the (bounded) prior, σ = sigma_init on tuned tasks."""
    p = bounds.clip(schema, prior)
    tasks = schema.task_names
    tuned = set(config.tasks) if config.tasks is not None else set(tasks)
    mean = [math.log(abs(p[t][1])) for t in tasks]
    return {
        "tasks": tasks,
        "signs": [-1.0 if t.negative else 1.0 for t in schema.tasks],
        "alpha": [p[t][0] for t in tasks],
        "tuned": [t in tuned for t in tasks],
        "mean": mean,
        "sigma": [config.sigma_init if t in tuned else 0.0 for t in tasks],
        "last_good_mean": list(mean),
        "baseline": [],
        "regressed_rounds": 0,
        "round": None,
        "sigma_reset_at": now,
        "rounds_closed": 0,
    }


def open_round(config: TunerConfig, state: dict, bounds: FusionBounds, round_id: int, now: float, salt: str) -> dict:
    """The state with round `round_id` open: its perturbations drawn and stored."""
    lo, hi = bounds.log_beta_range()
    mu = np.array(state["mean"])
    sigma = np.array(state["sigma"])
    rng = np.random.default_rng(round_seed(salt, round_id))
    P = config.population
    buckets: dict[str, list[float]] = {}
    rnd: dict = {"id": int(round_id), "started_at": now, "algo": config.algo, "population": P}
    if config.algo == "es":
        eps = rng.standard_normal((P // 2, len(mu)))
        for j, e in enumerate(eps):
            buckets[explore_name(2 * j)] = np.clip(mu + sigma * e, lo, hi).tolist()
            buckets[explore_name(2 * j + 1)] = np.clip(mu - sigma * e, lo, hi).tolist()
        rnd["eps"] = eps.tolist()
    else:
        eps = rng.standard_normal((P, len(mu)))
        for i, e in enumerate(eps):
            buckets[explore_name(i)] = np.clip(mu + sigma * e, lo, hi).tolist()
    buckets[CONTROL] = mu.tolist()
    rnd["buckets"] = buckets
    return {**state, "round": rnd}


def round_ready(config: TunerConfig, state: dict, stats: dict[str, BucketStats], now: float) -> str | None:
    """Why the open round may close now ("impressions" / "timeout"), or None."""
    rnd = state.get("round")
    if rnd is None:
        return None
    names = experiment_buckets(rnd["population"])
    if all(stats.get(b, BucketStats()).n >= config.min_impressions for b in names):
        return "impressions"
    if now - rnd["started_at"] >= config.max_round_seconds:
        return "timeout"
    return None


def close_round(config: TunerConfig, state: dict, stats: dict[str, BucketStats], bounds: FusionBounds, now: float,
                reason: str, closed_by: str, salt: str) -> tuple[dict, dict]:
    """Close the open round: (history record, new state with the next round open)."""
    rnd = state["round"]
    tasks, signs = state["tasks"], np.array(state["signs"])
    lo, hi = bounds.log_beta_range()
    mu = np.array(state["mean"])
    sigma = np.array(state["sigma"])
    tuned = np.array(state["tuned"], bool)
    P = rnd["population"]
    names = experiment_buckets(P)
    usable_n = max(1, int(math.ceil(config.min_usable_share * config.min_impressions)))
    st = {b: stats.get(b, BucketStats()) for b in names + [MAIN]}
    usable = {b: st[b].n >= usable_n for b in names}
    ctrl = st[CONTROL] + st[MAIN]

    record: dict = {
        "algo": rnd["algo"], "started_at": rnd["started_at"], "closed_at": now, "reason": reason, "closed_by": closed_by,
        "buckets": {
            b: {**st[b].to_dict(), "usable": usable.get(b, True),
                "beta": _beta_dict(tasks, signs, np.array(rnd["buckets"][b] if b in rnd["buckets"] else mu))}
            for b in names + [MAIN]
        },
        "mean_reward": {**ctrl.to_dict(), "usable": ctrl.n >= usable_n},  # control + main: the traffic that serves μ
        "mean_before": _beta_dict(tasks, signs, mu),
        "sigma_before": sigma.tolist(),
    }

    # --- rollback check against the trailing baseline
    baseline = [tuple(x) for x in state["baseline"]]
    regressed = checked = False
    if baseline:
        b_mean = float(np.mean([m for m, _ in baseline]))
        b_se = math.sqrt(sum(s * s for _, s in baseline if s is not None and math.isfinite(s))) / len(baseline)
        record["baseline"] = {"mean": b_mean, "se": b_se, "rounds": len(baseline)}
        if ctrl.n >= usable_n and len(baseline) >= config.baseline_min_rounds:
            checked = True
            drop = b_mean - ctrl.mean
            se = math.sqrt(ctrl.se**2 + b_se**2)
            regressed = drop > config.rollback_margin * abs(b_mean) and drop >= config.rollback_z * se
    prev = int(state.get("regressed_rounds", 0))
    streak = prev + 1 if regressed else (0 if checked else prev)  # a round too thin to check keeps the streak
    rollback = regressed and streak >= config.rollback_confirm_rounds
    record["regressed_rounds"] = streak
    new_state = dict(state)
    new_state["regressed_rounds"] = 0 if rollback else streak
    if rollback:
        new_mu = np.array(state["last_good_mean"])
        new_sigma = np.where(tuned, config.sigma_init, 0.0)
        new_state["baseline"] = []
        update = "rollback"
    elif regressed:  # not confirmed yet: keep serving μ, learn nothing from this round
        new_mu, new_sigma, update = mu, sigma, "hold"
    else:
        if ctrl.n >= usable_n:
            new_state["baseline"] = ([*state["baseline"], [ctrl.mean, ctrl.se]])[-config.baseline_rounds :]
            new_state["last_good_mean"] = mu.tolist()
        new_mu, new_sigma, update = mu, sigma, "skipped"
        if rnd["algo"] == "cem":
            ok = [i for i in range(P) if usable[explore_name(i)]]
            if len(ok) >= 2:
                thetas = np.array([rnd["buckets"][explore_name(i)] for i in ok])
                fit = np.array([st[explore_name(i)].mean for i in ok])
                m, s, elite = cem_update(mu, sigma, thetas, fit, config.elite_frac, config.smoothing, config.extra_noise)
                new_mu, new_sigma = np.where(tuned, m, mu), np.where(tuned, s, 0.0)
                record["elites"] = [explore_name(ok[k]) for k in elite]
                update = "cem"
        else:
            eps = np.array(rnd["eps"])
            ok = [j for j in range(P // 2) if usable[explore_name(2 * j)] and usable[explore_name(2 * j + 1)]]
            if ok:
                fp = np.array([st[explore_name(2 * j)].mean for j in ok])
                fm = np.array([st[explore_name(2 * j + 1)].mean for j in ok])
                g = es_gradient(eps[ok], fp, fm, sigma)
                new_mu = np.where(tuned, mu + config.step_size * g, mu)
                record["gradient"] = g.tolist()
                update = "es"
        move = np.clip(new_mu - mu, -config.max_move, config.max_move)
        record["move_capped"] = bool(np.any(np.abs(new_mu - mu) > config.max_move + 1e-12))
        new_mu = np.clip(mu + move, lo, hi)
    new_sigma = np.where(tuned, np.clip(new_sigma, config.sigma_min, config.sigma_max), 0.0)
    reinit = config.sigma_reinit_seconds > 0 and now - float(state.get("sigma_reset_at", now)) >= config.sigma_reinit_seconds
    if reinit:
        new_sigma = np.where(tuned, config.sigma_init, 0.0)
        new_state["sigma_reset_at"] = now
    new_state["mean"] = new_mu.tolist()
    new_state["sigma"] = new_sigma.tolist()
    new_state["rounds_closed"] = int(state.get("rounds_closed", 0)) + 1
    record.update({
        "update": update, "rollback": rollback, "sigma_reinit": bool(reinit),
        "mean_after": _beta_dict(tasks, signs, new_mu), "sigma_after": new_sigma.tolist(),
    })
    new_state = open_round(config, new_state, bounds, rnd["id"] + 1, now, salt)
    return record, new_state


# ----------------------------------------------------------------------------- the store-backed tuner


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class FusionTuner:
    """The tuner of one scene, its config and state kept in the store (document
    "tuner:<scene>" = {"config": ..., "state": ...}); the served mean is mirrored into the
    scene's fusion parameters ("fusion:<scene>") at every close, so it keeps serving when the
    tuner is switched off."""

    LOCK_TTL_S = 30.0
    SETTLE_S = 1.0  # at most this long for feedback other workers have read but not yet applied

    def __init__(self, store: Store, scene: str, schema: Schema, bounds: FusionBounds, prior: Params,
                 initial_config: TunerConfig | None = None, owner: str | None = None, clock=time.time):
        self.store, self.scene, self.schema, self.bounds = store, scene, schema, bounds
        self.prior = prior
        self.initial_config = initial_config or TunerConfig()
        self.owner = owner or worker_id()
        self.clock = clock
        self.key = f"tuner:{scene}"
        self.fusion_key = f"fusion:{scene}"

    # --- documents

    def load(self) -> Doc:
        """The tuner document, created from the initial config on first use."""
        for _ in range(5):
            doc = self.store.get_doc(self.key)
            if doc is not None:
                return doc
            cfg = self.initial_config
            if cfg.salt is None:
                cfg = cfg.model_copy(update={"salt": secrets.token_hex(8)})
            value = {"config": cfg.model_dump(), "state": None}
            if cfg.enabled:
                value["state"] = self._fresh_state(cfg, round_id=1)
            self.store.commit([DocWrite(self.key, value, expect=0)] + self._mirror(value), [])
        doc = self.store.get_doc(self.key)
        if doc is None:
            raise RuntimeError("tuner document could not be created")
        return doc

    def _scene_prior(self) -> Params:
        doc = self.store.get_doc(self.fusion_key)
        params = dict(self.prior)
        if doc is not None:
            for t, (a, b) in doc.value.get("params", {}).items():
                if t in params:
                    params[t] = (float(a), float(b))
        return params

    def _fresh_state(self, cfg: TunerConfig, round_id: int, prior: Params | None = None) -> dict:
        now = self.clock()
        st = init_state(cfg, self.schema, self.bounds, prior or self._scene_prior(), now)
        return open_round(cfg, st, self.bounds, round_id, now, cfg.salt)

    def _valid_state(self, state: dict | None) -> bool:
        return state is not None and state.get("tasks") == self.schema.task_names

    def mean_params(self, state: dict) -> Params:
        return {t: (a, s * math.exp(x)) for t, a, s, x in zip(state["tasks"], state["alpha"], state["signs"], state["mean"])}

    def _mirror(self, value: dict) -> list[DocWrite]:
        """The fusion-parameter document that mirrors a tuner state's mean."""
        state = value.get("state")
        if not self._valid_state(state):
            return []
        params = {t: list(v) for t, v in self.mean_params(state).items()}
        return [DocWrite(self.fusion_key, {"params": params, "updated_at": self.clock(), "updated_by": "tuner", "source": "tuner"})]

    # --- round closing (called by every worker's poller; exactly one closes a round)

    def maybe_close(self) -> dict | None:
        doc = self.load()
        cfg = TunerConfig.model_validate(doc.value["config"])
        state = doc.value["state"]
        if not cfg.enabled:
            return None
        if not self._valid_state(state):  # first enable on this schema, or the bundle's tasks changed
            self._reinit(doc, cfg, "the bundle's tasks differ from the tuner state's" if state else "first start")
            return None
        rnd = state["round"]
        now = self.clock()
        if round_ready(cfg, state, self.store.bucket_stats(self.scene, rnd["id"]), now) is None:
            return None
        lock = f"tuner:{self.scene}"
        if not self.store.acquire_lock(lock, self.owner, self.LOCK_TTL_S):
            return None
        try:
            doc = self.store.get_doc(self.key)
            cfg = TunerConfig.model_validate(doc.value["config"])
            state = doc.value["state"]
            if not cfg.enabled or not self._valid_state(state) or state["round"]["id"] != rnd["id"]:
                return None  # someone else closed (or reset) it meanwhile
            stats = self.store.bucket_stats(self.scene, rnd["id"], settle_s=self.SETTLE_S)  # under the lock: wait for in-flight feedback
            reason = round_ready(cfg, state, stats, now)
            if reason is None:
                return None
            record, new_state = close_round(cfg, state, stats, self.bounds, now, reason, self.owner, cfg.salt)
            value = {"config": cfg.model_dump(), "state": new_state}
            entry = history_entry(self.scene, "round", rnd["id"], record, ts=now)
            if self.store.commit([DocWrite(self.key, value, expect=doc.version)] + self._mirror(value), [entry]):
                return entry
            return None
        finally:
            self.store.release_lock(lock, self.owner)

    def _reinit(self, doc: Doc, cfg: TunerConfig, why: str) -> bool:
        old = doc.value.get("state") or {}
        next_id = int((old.get("round") or {}).get("id", 0)) + 1
        state = self._fresh_state(cfg, next_id)
        value = {"config": cfg.model_dump(), "state": state}
        entry = history_entry(self.scene, "reinit", next_id, {"why": why, "mean": self.mean_params(state)})
        return self.store.commit([DocWrite(self.key, value, expect=doc.version)] + self._mirror(value), [entry])

    # --- admin operations

    def update_config(self, patch: dict, who: str) -> tuple[TunerConfig, dict]:
        """Merge a config patch (validated: raises pydantic.ValidationError) and apply it:
        a change of RESTART_FIELDS or enabling starts a new round. Returns (config, entry)."""
        for _ in range(10):
            doc = self.load()
            old = TunerConfig.model_validate(doc.value["config"])
            merged = {**old.model_dump(), **patch}
            if merged.get("salt") is None:
                merged["salt"] = old.salt or secrets.token_hex(8)
            new = TunerConfig.model_validate(merged)
            unknown = [t for t in (new.tasks or []) if t not in self.schema.task_names]
            if unknown:
                raise ValueError(f"tasks: unknown tasks {unknown}; the bundle's tasks are {self.schema.task_names}")
            state = doc.value.get("state")
            changed = [k for k in TunerConfig.model_fields if getattr(new, k) != getattr(old, k)]
            restart = new.enabled and (not old.enabled or any(k in RESTART_FIELDS for k in changed) or not self._valid_state(state))
            if new.enabled and (not self._valid_state(state) or new.tasks != old.tasks):
                next_id = int(((state or {}).get("round") or {}).get("id", 0)) + 1
                prior = self.mean_params(state) if self._valid_state(state) else None
                state = self._fresh_state(new, next_id, prior)
            elif restart:
                next_id = int(state["round"]["id"]) + 1 if state.get("round") else 1
                st = dict(state)
                if "algo" in changed:
                    st["sigma"] = [new.sigma_init if t else 0.0 for t in st["tuned"]]
                state = open_round(new, st, self.bounds, next_id, self.clock(), new.salt)
            value = {"config": new.model_dump(), "state": state}
            round_id = state["round"]["id"] if state and state.get("round") else None
            entry = history_entry(self.scene, "config", round_id,
                                  {"who": who, "changed": {k: getattr(new, k) for k in changed if k != "salt"},
                                   "new_round": bool(restart)})
            if self.store.commit([DocWrite(self.key, value, expect=doc.version)], [entry]):
                return new, entry
        raise RuntimeError("tuner config: too many concurrent writers")

    def reset_mean(self, doc: Doc, params: Params) -> DocWrite | None:
        """The tuner document after a manual change of the scene's weights: μ = log|β| of
        `params`, α from them, σ = sigma_init, a new baseline, last good mean = μ, and (when
        enabled) a new round. None when the tuner has no state yet (its prior will be read
        from the new weights when it starts)."""
        cfg = TunerConfig.model_validate(doc.value["config"])
        state = doc.value.get("state")
        if not self._valid_state(state):
            return None
        st = init_state(cfg, self.schema, self.bounds, params, self.clock())
        st["rounds_closed"] = state.get("rounds_closed", 0)
        old_round = state.get("round")
        st["round"] = old_round
        if cfg.enabled:
            st = open_round(cfg, st, self.bounds, (old_round or {"id": 0})["id"] + 1, self.clock(), cfg.salt)
        return DocWrite(self.key, {"config": cfg.model_dump(), "state": st}, expect=doc.version)

    def live(self) -> dict:
        """Config, state and the open round's per-bucket statistics (GET /admin/tuner)."""
        doc = self.load()
        cfg = TunerConfig.model_validate(doc.value["config"])
        state = doc.value.get("state")
        out: dict = {"scene": self.scene, "config": cfg.model_dump(exclude={"salt"}), "state": None, "buckets": {}}
        if not self._valid_state(state):
            return out
        signs, tasks = np.array(state["signs"]), state["tasks"]
        rnd = state.get("round")
        out["state"] = {
            "round": rnd["id"] if rnd else None,
            "round_started_at": rnd["started_at"] if rnd else None,
            "rounds_closed": state.get("rounds_closed", 0),
            "mean": {t: {"alpha": a, "beta": b} for t, (a, b) in self.mean_params(state).items()},
            "sigma": dict(zip(tasks, state["sigma"])),
            "last_good_mean": _beta_dict(tasks, signs, np.array(state["last_good_mean"])),
            "baseline": state["baseline"],
            "tuned_tasks": [t for t, k in zip(tasks, state["tuned"]) if k],
        }
        if rnd and cfg.enabled:
            stats = self.store.bucket_stats(self.scene, rnd["id"], settle_s=self.SETTLE_S)
            for b in experiment_buckets(rnd["population"]) + [MAIN]:
                s = stats.get(b, BucketStats())
                theta = rnd["buckets"].get(b, state["mean"])
                out["buckets"][b] = {**s.to_dict(), "beta": _beta_dict(tasks, signs, np.array(theta)),
                                     "ready": s.n >= cfg.min_impressions if b != MAIN else None}
        return out
