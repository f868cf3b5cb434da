"""A seeded, deterministic synthetic world: catalog, users, follow graph, behaviour model.

Two roles:
1. `SyntheticWorld.generate_log()` writes training logs as a `sim.dataset.Dataset`
   (impressions of a mixed logging policy with their sampled outcomes).
2. The world is the environment that answers served lists with feedback:
   `expected[_batch]` gives per-position probabilities, `respond[_batch]` samples one
   session, `session_reward[_batch]` scores a whole list. Used by the online fusion tuner,
   the reranker simulation and load tests.

Everything is numpy and vectorised over items, users, sessions and impressions; the only
Python loops run over a handful of positions/lags, logging sources or user chunks. One
exception: `respond` (a single session, what load-test users call once a feed) is one compiled
pass over the positions (sim/session_kernel.py), held by a test to `respond_batch`'s draws.

World model (all hidden state is public so tests and simulations can inspect it):
- Categories have unit-norm centroids in a d-dim latent space and Zipf-like sizes.
- Authors have a home category (every category gets at least one author when A >= C), a
  productivity weight (lognormal), a latent style offset and a small quality bias.
- Items: author drawn by productivity (every author gets >= 1 item when I >= A); category is
  the author's home category with prob. 0.9, else a random one;
  item_latent = centroid[category] + author offset + noise; item_content = fixed random
  projection of item_latent + noise (the observable, noisy proxy of the latent);
  item_quality ~ N(0, 0.5) (author bias + item noise); popularity prior is Zipf over a
  quality-correlated rank; item_created ~ U[t0 - days, t0 + days] so items appear during
  the log window.
- Users: mixture of 1-3 preferred category centroids + demographic offsets (age, gender) +
  noise; fields age (1..8), gender (1..3), region (1..12), activity (1..6); activity scales
  the session rate; a small per-user click bias.
- Follow graph: 3-15 authors per user, ~75% drawn from the user's preferred categories.

Behaviour (per impression at 0-based position t of a list shown to user u):
    aff     = AFF_SCALE * <user_latent[u], item_latent[i]>
    fat_a/c = number of the previous FATIGUE_WINDOW items with the same author / category
    click   ~ sigmoid(CLICK_BASE + aff + quality + user_bias - POS_BIAS*log1p(t)
                      + FOLLOW_BOOST*[u follows author] - fatigue)
    dwell | click ~ lognormal(mu = DWELL_MU0 + DWELL_AFF*aff + DWELL_Q*quality, DWELL_SIGMA)
    long_view = dwell >= LONG_VIEW_S (so P(long_view | click) = Phi((mu - ln 30) / sigma))
    like / share / follow | click ~ sigmoid(base + a*aff + q*quality) (follow = 0 if already
                      following the author)
    dislike (impression level, independent of click) ~ sigmoid(DISLIKE_BASE - a*aff
                      - q*quality + fatigue)
    continue | outcomes ~ sigmoid(CONT_BASE + CONT_AFF*aff + activity term
                      + CONT_CLICK*click + CONT_LONG*long_view + CONT_DISLIKE*dislike - fatigue)
Fatigue depends only on the items shown (not on outcomes), so outcomes at different
positions are independent given the list, and reach[t] = prod_{s<t} P(continue at s)
exactly; `expected` returns the marginal continue probability (summed over the six
click/long_view/dislike outcome cells) and `respond` samples the same model.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import ndtr

from core.schema import FieldSpec, Schema, TaskSpec
from sim.dataset import Dataset, sort_events, temporal_split
from sim.session_kernel import respond_session

# ----------------------------------------------------------------------------- constants

TASKS = ("click", "long_view", "like", "share", "follow", "dislike", "continue")
GIVEN_CLICK = ("long_view", "like", "share", "follow")

# Default weights of `session_reward`: expected events, weighted, summed over reach.
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {
    "click": 1.0,
    "long_view": 1.0,
    "like": 2.0,
    "share": 3.0,
    "follow": 3.0,
    "dislike": -5.0,
}

# user fields: (name, number of codes); codes are 1..n, 0 = unknown
USER_FIELDS = (("age", 8), ("gender", 3), ("region", 12), ("activity", 6))
_AGE_P = np.array([0.06, 0.16, 0.22, 0.19, 0.14, 0.10, 0.08, 0.05])
_GENDER_P = np.array([0.48, 0.48, 0.04])
_ACTIVITY_P = np.array([0.10, 0.20, 0.25, 0.20, 0.15, 0.10])
_ACTIVITY_MULT = np.array([0.3, 0.55, 0.8, 1.1, 1.5, 2.2])
_ACTIVITY_MULT = _ACTIVITY_MULT / float(_ACTIVITY_P @ _ACTIVITY_MULT)  # mean multiplier 1

# catalog / users geometry (latent noise scales are per-vector norms)
CATEGORY_ZIPF = 0.7  # category size weights ~ rank^-0.7
ITEM_ZIPF = 0.9  # item popularity prior ~ rank^-0.9
AUTHOR_NOISE = 0.45
ITEM_NOISE = 0.40
USER_NOISE = 0.35
CONTENT_NOISE = 0.30
AGE_OFFSET = 0.25
GENDER_OFFSET = 0.20
HOME_CATEGORY_P = 0.9
FOLLOW_PREF_P = 0.75

# behaviour model (see module docstring)
AFF_SCALE = 2.6
CLICK_BASE = -4.2
POS_BIAS = 0.15
FOLLOW_BOOST = 0.8
USER_BIAS_SD = 0.25
FATIGUE_WINDOW = 5
FAT_CLICK = (0.6, 0.2)  # per earlier same-author / same-category item in the window
FAT_DISLIKE = (0.5, 0.15)
FAT_CONT = (0.35, 0.1)
DWELL_MU0 = math.log(10.0)
DWELL_AFF = 0.30
DWELL_Q = 0.40
DWELL_SIGMA = 0.9
LONG_VIEW_S = 30.0
LIKE = (-2.0, 0.35, 0.6)  # (base, affinity, quality) logit coefficients, given click
SHARE = (-3.9, 0.35, 0.6)
FOLLOW = (-3.9, 0.45, 0.4)
DISLIKE = (-3.5, 0.7, 0.8)  # logit = base - a*aff - q*quality + fatigue
CONT_BASE = 2.0
CONT_AFF = 0.15
CONT_ACTIVITY = 0.12  # per activity code step around the middle
CONT_CLICK = 0.3
CONT_LONG = 0.5
CONT_DISLIKE = -2.0
SESSION_STEP_S = 2.0  # seconds spent on each viewed position on top of the dwell
# sim/session_kernel.respond_session's constants, in its order
_SESSION_CONSTANTS = np.array([
    CLICK_BASE, POS_BIAS, FOLLOW_BOOST, *FAT_CLICK, DWELL_MU0, DWELL_AFF, DWELL_Q, DWELL_SIGMA, LONG_VIEW_S, *LIKE, *SHARE, *FOLLOW,
    *DISLIKE, *FAT_DISLIKE, CONT_BASE, CONT_AFF, CONT_ACTIVITY, *FAT_CONT, CONT_CLICK, CONT_LONG, CONT_DISLIKE,
], np.float64)

# logging policy sources and their shares
SRC_PREF, SRC_POPULAR, SRC_FOLLOW, SRC_UNIFORM = 0, 1, 2, 3
POLICY_MIX = np.array([0.4, 0.3, 0.2, 0.1])
PREF_TEMPERATURE = 3.0  # category softmax over PREF_TEMPERATURE * AFF_SCALE * <u, centroid>
LOG_CHUNK_USERS = 16384  # fixed: the log depends on it, so never derive it from memory


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf(n: int, a: float) -> np.ndarray:
    w = (np.arange(n, dtype=np.float64) + 1.0) ** -a
    return w / w.sum()


def _cum_before(w: np.ndarray) -> np.ndarray:
    """[0, w0, w0+w1, ...] (len n+1), float64."""
    out = np.zeros(len(w) + 1)
    np.cumsum(w, out=out[1:])
    return out


def _draw_from(cum: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from the distribution with prefix sums `cum` (len k+1)."""
    x = rng.random(n) * cum[-1]
    return np.clip(np.searchsorted(cum, x, side="right") - 1, 0, len(cum) - 2)


class _Groups:
    """Members grouped by a key, with weight prefix sums for weighted draws inside a group."""

    def __init__(self, key: np.ndarray, n_groups: int, weight: np.ndarray):
        self.order = np.argsort(key, kind="stable")
        self.start = np.zeros(n_groups + 1, np.int64)
        np.cumsum(np.bincount(key, minlength=n_groups), out=self.start[1:])
        self.cum = _cum_before(weight[self.order])

    def size(self, g: np.ndarray) -> np.ndarray:
        return self.start[g + 1] - self.start[g]

    def draw(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One weighted member per group in `g`; -1 for empty groups."""
        lo, hi = self.start[g], self.start[g + 1]
        clo, chi = self.cum[lo], self.cum[hi]
        x = clo + rng.random(len(g)) * (chi - clo)
        j = np.searchsorted(self.cum, x, side="right") - 1
        j = np.clip(j, lo, np.maximum(hi - 1, lo))
        return np.where(hi > lo, self.order[np.minimum(j, len(self.order) - 1)], -1)


@dataclass
class WorldConfig:
    n_items: int = 5000
    n_users: int = 2000
    n_categories: int = 0  # 0 -> auto: max(8, round(sqrt(n_items)/2)) capped at 500
    n_authors: int = 0  # 0 -> auto: max(n_categories, round(n_items/20))
    latent_dim: int = 16
    content_dim: int = 16
    seed: int = 0
    fatigue: bool = True  # repeated author/category inside a short window lowers continue and click prob
    sessions_per_user: int = 8
    list_len: int = 10
    t0: float = 1.7e9  # start of the log window (unix seconds)
    days: float = 30.0


class SyntheticWorld:
    """See the module docstring. Building the world draws nothing that depends on
    `fatigue`, `list_len` or the log window, so worlds that differ only there share
    the same catalog, users and follow graph."""

    def __init__(self, config: WorldConfig):
        cfg = self.config = config
        I, U = int(cfg.n_items), int(cfg.n_users)
        if I < 1 or U < 1:
            raise ValueError("n_items and n_users must be >= 1")
        C = int(cfg.n_categories) or min(500, max(8, round(math.sqrt(I) / 2)))
        A = int(cfg.n_authors) or max(C, round(I / 20))
        d, cd = int(cfg.latent_dim), int(cfg.content_dim)
        self.n_items, self.n_users, self.n_categories, self.n_authors = I, U, C, A
        ss = np.random.SeedSequence([int(cfg.seed), 0x5EED])
        r_cat, r_item, r_user, r_follow = (np.random.default_rng(s) for s in ss.spawn(4))
        span = cfg.days * 86400.0

        # --- categories
        cat_w = _zipf(C, CATEGORY_ZIPF)[r_cat.permutation(C)]
        cent = r_cat.standard_normal((C, d))
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        self.category_weight = cat_w
        self.category_centroids = cent.astype(np.float32)
        cat_cum = _cum_before(cat_w)

        # --- authors
        a_cat = _draw_from(cat_cum, A, r_cat)
        k = min(A, C)
        a_cat[:k] = r_cat.permutation(C)[:k]  # every category gets an author when A >= C
        a_cat = a_cat[r_cat.permutation(A)]
        a_w = r_cat.lognormal(0.0, 1.0, A)
        a_off = r_cat.standard_normal((A, d)) * (AUTHOR_NOISE / math.sqrt(d))
        a_q = r_cat.normal(0.0, 0.25, A)
        self.author_category = a_cat.astype(np.int64)
        self.author_weight = a_w / a_w.sum()

        # --- items
        item_author = _draw_from(_cum_before(a_w), I, r_item)
        k = min(A, I)
        item_author[:k] = r_item.permutation(A)[:k]  # every author gets an item when I >= A
        item_author = item_author[r_item.permutation(I)]
        item_cat = a_cat[item_author].copy()
        off_home = r_item.random(I) >= HOME_CATEGORY_P
        item_cat[off_home] = _draw_from(cat_cum, int(off_home.sum()), r_item)
        lat = cent[item_cat] + a_off[item_author]
        lat += r_item.standard_normal((I, d)) * (ITEM_NOISE / math.sqrt(d))
        proj = r_item.standard_normal((d, cd)) / math.sqrt(d)
        content = lat @ proj
        content += r_item.standard_normal((I, cd)) * (CONTENT_NOISE / math.sqrt(cd))
        quality = a_q[item_author] + r_item.normal(0.0, 0.43, I)
        rank = np.empty(I, np.int64)
        rank[np.argsort(-(quality + r_item.normal(0.0, 0.5, I)), kind="stable")] = np.arange(I)
        pop = _zipf(I, ITEM_ZIPF)[rank]
        created = (cfg.t0 - span) + r_item.random(I) * (2.0 * span)

        self.item_category = item_cat.astype(np.int64)
        self.item_author = item_author.astype(np.int64)
        self.item_latent = lat.astype(np.float32)
        self.item_content = content.astype(np.float32)
        self.item_quality = quality.astype(np.float32)
        self.item_created = created.astype(np.float64)
        self.item_popularity = pop  # float64 [I], sums to 1
        del lat, content

        # --- users
        pref = _draw_from(cat_cum, U * 3, r_user).reshape(U, 3)
        n_pref = 1 + _draw_from(_cum_before(np.array([0.4, 0.4, 0.2])), U, r_user)
        pw = r_user.gamma(1.0, 1.0, (U, 3))
        pw[np.arange(3)[None, :] >= n_pref[:, None]] = 0.0
        pw /= pw.sum(axis=1, keepdims=True)
        age = 1 + _draw_from(_cum_before(_AGE_P), U, r_user)
        gender = 1 + _draw_from(_cum_before(_GENDER_P), U, r_user)
        region = 1 + _draw_from(_cum_before(_zipf(12, 0.6)), U, r_user)
        activity = 1 + _draw_from(_cum_before(_ACTIVITY_P), U, r_user)
        age_vec = r_user.standard_normal((9, d)) * (AGE_OFFSET / math.sqrt(d))
        gender_vec = r_user.standard_normal((4, d)) * (GENDER_OFFSET / math.sqrt(d))
        ul = np.einsum("uk,ukd->ud", pw, cent[pref])
        ul += age_vec[age] + gender_vec[gender]
        ul += r_user.standard_normal((U, d)) * (USER_NOISE / math.sqrt(d))
        age_bias = r_user.normal(0.0, 0.15, 9)
        self.user_latent = ul.astype(np.float32)
        self.user_fields = np.stack([age, gender, region, activity], axis=1).astype(np.int64)
        self.user_pref_categories = pref.astype(np.int64)  # [U, 3]; weight 0 = unused slot
        self.user_pref_weights = pw  # float64 [U, 3], rows sum to 1
        self.user_bias = (age_bias[age] + r_user.normal(0.0, USER_BIAS_SD, U)).astype(np.float32)
        self.user_session_rate = (
            cfg.sessions_per_user * _ACTIVITY_MULT[activity - 1] * r_user.gamma(4.0, 0.25, U)
        )
        del ul

        # --- follow graph: 3..15 authors per user, mostly from the preferred categories
        want = np.minimum(np.clip(3 + r_follow.poisson(4.0, U), 3, 15), A)
        m = 2 * want + 2  # oversample, dedupe, keep the first `want` distinct ones (in draw order)
        f_user = np.repeat(np.arange(U, dtype=np.int64), m)
        n = len(f_user)
        authors_by_cat = _Groups(a_cat, C, a_w)
        slot = (r_follow.random(n)[:, None] > np.cumsum(pw[f_user], axis=1)).sum(axis=1)
        f_cat = pref[f_user, np.minimum(slot, 2)]
        f_auth = authors_by_cat.draw(f_cat, r_follow)
        # the last `want` draws of each user are global: they fill in when the preferred
        # categories have too few distinct authors
        rank_in_user = np.arange(n) - np.repeat(np.cumsum(m) - m, m)
        tail = rank_in_user >= np.repeat(m - want, m)
        glob = (r_follow.random(n) >= FOLLOW_PREF_P) | (f_auth < 0) | tail
        f_auth[glob] = _draw_from(_cum_before(a_w), int(glob.sum()), r_follow)
        key = f_user * A + f_auth
        _, first = np.unique(key, return_index=True)  # first occurrence in draw order
        first.sort()
        fu, fa = f_user[first], f_auth[first]
        ustart = np.searchsorted(fu, np.arange(U))
        keep = (np.arange(len(fu)) - ustart[fu]) < want[fu]
        fu, fa = fu[keep], fa[keep]
        o = np.lexsort((fa, fu))
        fu, fa = fu[o], fa[o]
        self.follow_indptr = np.zeros(U + 1, np.int64)
        np.cumsum(np.bincount(fu, minlength=U), out=self.follow_indptr[1:])
        self.follow_authors = fa.astype(np.int64)
        self._follow_keys = fu * A + fa  # sorted: membership by searchsorted
        del f_user, f_cat, f_auth, key, slot

        # --- sampling tables for the logging policy
        self._items_by_cat = _Groups(self.item_category, C, pop)
        self._items_by_author = _Groups(self.item_author, A, pop)
        self._pop_cum = _cum_before(pop)
        old = np.flatnonzero(created <= cfg.t0)
        if len(old) == 0:
            old = np.array([int(np.argmin(created))])
        self._old_items = old
        self._old_cum = _cum_before(pop[old])
        self._cat_nonempty = self._items_by_cat.size(np.arange(C)) > 0

        self.schema = Schema(
            dataset="synthetic",
            tasks=(
                TaskSpec("click"),
                TaskSpec("long_view", given="click"),
                TaskSpec("like", given="click"),
                TaskSpec("share", given="click"),
                TaskSpec("follow", given="click"),
                TaskSpec("dislike", negative=True),
                TaskSpec("continue"),
            ),
            user_fields=tuple(FieldSpec(name, n + 1) for name, n in USER_FIELDS),
            item_fields=(FieldSpec("category", C + 1), FieldSpec("author", A + 1)),
            history_len=50,
            emb_dim=32,
            author_field="author",
            category_field="category",
        )

    # ------------------------------------------------------------------ small helpers

    @property
    def item_fields(self) -> np.ndarray:
        """int64 [I, 2]: category + 1, author + 1 (0 = unknown), as in the schema."""
        return np.stack([self.item_category + 1, self.item_author + 1], axis=1)

    def is_following(self, users: np.ndarray, authors: np.ndarray) -> np.ndarray:
        """Elementwise: does users[k] follow authors[k]? (broadcasting)"""
        key = np.asarray(users, np.int64) * self.n_authors + np.asarray(authors, np.int64)
        fk = self._follow_keys
        if len(fk) == 0:
            return np.zeros(key.shape, bool)
        j = np.minimum(np.searchsorted(fk, key), len(fk) - 1)
        return fk[j] == key

    def user_category_affinity(self, users: np.ndarray) -> np.ndarray:
        """float64 [B, C]: AFF_SCALE * <user_latent, category centroid>."""
        ul = self.user_latent[np.asarray(users, np.int64)].astype(np.float64)
        return AFF_SCALE * (ul @ self.category_centroids.T.astype(np.float64))

    def _check(self, users, items) -> tuple[np.ndarray, np.ndarray]:
        users = np.asarray(users, np.int64).reshape(-1)
        items = np.asarray(items, np.int64)
        if items.ndim != 2 or items.shape[0] != users.shape[0]:
            raise ValueError(f"items must be [B, n] with B = len(users); got {items.shape} for {users.shape}")
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError("item index out of range")
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise ValueError("user index out of range")
        return users, items

    def _fatigue(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts of earlier items in the last FATIGUE_WINDOW positions with the same
        author / category, float64 [B, n]. Zero when fatigue is disabled."""
        n_a = np.zeros(items.shape)
        n_c = np.zeros(items.shape)
        if not self.config.fatigue:
            return n_a, n_c
        au, ca = self.item_author[items], self.item_category[items]
        for lag in range(1, min(FATIGUE_WINDOW, items.shape[1] - 1) + 1):
            n_a[:, lag:] += au[:, lag:] == au[:, :-lag]
            n_c[:, lag:] += ca[:, lag:] == ca[:, :-lag]
        return n_a, n_c

    def _model(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """All per-impression model quantities, float64 [B, n]."""
        B, n = items.shape
        ul = self.user_latent[users]
        aff = np.einsum("bd,bnd->bn", ul, self.item_latent[items]).astype(np.float64) * AFF_SCALE
        q = self.item_quality[items].astype(np.float64)
        followed = self.is_following(users[:, None], self.item_author[items])
        n_a, n_c = self._fatigue(items)
        pos = -POS_BIAS * np.log1p(np.arange(n, dtype=np.float64))
        click_logit = (
            CLICK_BASE + aff + q + self.user_bias[users].astype(np.float64)[:, None] + pos[None, :]
            + FOLLOW_BOOST * followed - (FAT_CLICK[0] * n_a + FAT_CLICK[1] * n_c)
        )
        mu = DWELL_MU0 + DWELL_AFF * aff + DWELL_Q * q
        act = (self.user_fields[users, 3].astype(np.float64) - 3.5)[:, None]
        cont_logit = (
            CONT_BASE + CONT_AFF * np.clip(aff, -3.0, 3.0) + CONT_ACTIVITY * act
            - (FAT_CONT[0] * n_a + FAT_CONT[1] * n_c)
        )
        return {
            "p_click": _sigmoid(click_logit),
            "mu": mu,
            "p_long_c": ndtr((mu - math.log(LONG_VIEW_S)) / DWELL_SIGMA),
            "p_like_c": _sigmoid(LIKE[0] + LIKE[1] * aff + LIKE[2] * q),
            "p_share_c": _sigmoid(SHARE[0] + SHARE[1] * aff + SHARE[2] * q),
            "p_follow_c": np.where(followed, 0.0, _sigmoid(FOLLOW[0] + FOLLOW[1] * aff + FOLLOW[2] * q)),
            "p_dislike": _sigmoid(
                DISLIKE[0] - DISLIKE[1] * aff - DISLIKE[2] * q + FAT_DISLIKE[0] * n_a + FAT_DISLIKE[1] * n_c
            ),
            "cont_logit": cont_logit,
        }

    # ------------------------------------------------------------------ environment API

    def expected_batch(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Batched `expected`: users int64 [B], items int64 [B, n] -> dict of float64 [B, n].

        'click','long_view','like','share','follow','dislike' are per-impression marginal
        probabilities given that the user views the position (like = P(click)·P(like|click)).
        'continue' = P(continue past this position | viewed it); 'reach' = P(viewing it);
        'dwell' = E[dwell seconds | click]. The conditional heads are also returned as
        'long_view_given_click', 'like_given_click', 'share_given_click', 'follow_given_click'.
        """
        users, items = self._check(users, items)
        m = self._model(users, items)
        pc, pl, pd = m["p_click"], m["p_long_c"], m["p_dislike"]
        b = m["cont_logit"]

        def cont(shift: float) -> np.ndarray:
            return (1.0 - pd) * _sigmoid(b + shift) + pd * _sigmoid(b + shift + CONT_DISLIKE)

        p_cont = (1.0 - pc) * cont(0.0) + pc * ((1.0 - pl) * cont(CONT_CLICK) + pl * cont(CONT_CLICK + CONT_LONG))
        reach = np.ones_like(p_cont)
        if items.shape[1] > 1:
            np.cumprod(p_cont[:, :-1], axis=1, out=reach[:, 1:])
        return {
            "click": pc,
            "long_view": pc * pl,
            "like": pc * m["p_like_c"],
            "share": pc * m["p_share_c"],
            "follow": pc * m["p_follow_c"],
            "dislike": pd,
            "continue": p_cont,
            "reach": reach,
            "dwell": np.exp(m["mu"] + 0.5 * DWELL_SIGMA**2),
            "long_view_given_click": pl,
            "like_given_click": m["p_like_c"],
            "share_given_click": m["p_share_c"],
            "follow_given_click": m["p_follow_c"],
        }

    def expected(self, user: int, items: np.ndarray) -> dict[str, np.ndarray]:
        """Per-position probabilities for the ordered list `items` shown to `user`
        (see `expected_batch` for the keys); float64 [n]."""
        out = self.expected_batch(np.array([user], np.int64), np.asarray(items, np.int64)[None, :])
        return {k: v[0] for k, v in out.items()}

    def respond_batch(self, users: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Batched `respond`: arrays [B, n] (bool, 'dwell' float64)."""
        users, items = self._check(users, items)
        m = self._model(users, items)
        shape = items.shape
        click = rng.random(shape) < m["p_click"]
        dwell = np.exp(m["mu"] + DWELL_SIGMA * rng.standard_normal(shape))
        long_view = click & (dwell >= LONG_VIEW_S)
        like = click & (rng.random(shape) < m["p_like_c"])
        share = click & (rng.random(shape) < m["p_share_c"])
        follow = click & (rng.random(shape) < m["p_follow_c"])
        dislike = rng.random(shape) < m["p_dislike"]
        p_cont = _sigmoid(
            m["cont_logit"] + CONT_CLICK * click + CONT_LONG * long_view + CONT_DISLIKE * dislike
        )
        cont = rng.random(shape) < p_cont
        viewed = np.ones(shape, bool)
        if shape[1] > 1:
            np.logical_and.accumulate(cont[:, :-1], axis=1, out=viewed[:, 1:])
        out = {"viewed": viewed}
        for k, v in (("click", click), ("long_view", long_view), ("like", like), ("share", share),
                     ("follow", follow), ("dislike", dislike), ("continue", cont)):
            out[k] = v & viewed
        out["dwell"] = np.where(out["click"], dwell, 0.0)
        return out

    def respond(self, user: int, items: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Sample one session's outcomes for the ordered list; arrays [n]. 'viewed' is True up
        to and including the first position whose continue failed; every event is False where
        not viewed; long_view/like/share/follow only where clicked; 'dwell' is 0 unless clicked.
        Draws the same numbers as `respond_batch` for one user and returns the same session,
        compiled (sim/session_kernel.py): the load test's users call this once a feed."""
        users, batch = self._check(np.array([user], np.int64), np.asarray(items, np.int64)[None, :])
        it = batch[0]
        n = len(it)
        aff = np.einsum("bd,bnd->bn", self.user_latent[users], self.item_latent[batch]).astype(np.float64)[0] * AFF_SCALE
        authors = self.item_author[it]
        followed = self.is_following(users, authors)
        # the draws in respond_batch's order: click uniforms, dwell normals, then like, share,
        # follow, dislike and continue uniforms (consecutive draws of one generator concatenate)
        u_click = rng.random(n)
        z_dwell = rng.standard_normal(n)
        u_rest = rng.random(5 * n)
        flags, cont, dwell = respond_session(
            aff, self.item_quality[it].astype(np.float64), authors, self.item_category[it], followed,
            float(self.user_bias[users[0]]), float(self.user_fields[users[0], 3]), FATIGUE_WINDOW if self.config.fatigue else 0,
            u_click, z_dwell, u_rest, _SESSION_CONSTANTS,
        )
        out = dict(zip(("viewed", "click", "long_view", "like", "share", "follow", "dislike"), flags))
        out["continue"] = cont
        out["dwell"] = dwell
        return out

    def session_reward_batch(self, users, items, weights: dict[str, float] | None = None) -> np.ndarray:
        """float64 [B]: sum_t reach[t] * sum_k weights[k] * expected[k][t]."""
        w = DEFAULT_REWARD_WEIGHTS if weights is None else weights
        e = self.expected_batch(users, items)
        mix = np.zeros_like(e["reach"])
        for k, wk in w.items():
            mix += wk * e[k]
        return (e["reach"] * mix).sum(axis=1)

    def session_reward(self, user, items, weights: dict[str, float] | None = None) -> float:
        """Expected engagement of the whole list: sum_t reach[t] * (weighted mix of the expected
        events at t); default weights DEFAULT_REWARD_WEIGHTS (click 1, long_view 1, like 2,
        share 3, follow 3, dislike -5). Weights may name any key of `expected`."""
        items = np.asarray(items, np.int64)[None, :]
        return float(self.session_reward_batch(np.array([user], np.int64), items, weights)[0])

    # ------------------------------------------------------------------ logging policy

    def _draw(self, src: np.ndarray, users: np.ndarray, pref_cum: np.ndarray, uloc: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        """One item per slot from the logging source `src` (flat arrays). `pref_cum` holds
        per-user category CDFs, row-major [n_local_users * C] offset by row index; `uloc`
        maps each slot to its row."""
        out = np.empty(len(src), np.int64)
        C = self.n_categories
        for code in (SRC_PREF, SRC_POPULAR, SRC_FOLLOW, SRC_UNIFORM):
            m = np.flatnonzero(src == code)
            if len(m) == 0:
                continue
            if code == SRC_PREF:
                r = uloc[m]
                x = r + rng.random(len(m)) * (pref_cum[r * C + C - 1] - r)
                cat = np.searchsorted(pref_cum, x, side="left") - r * C
                got = self._items_by_cat.draw(np.clip(cat, 0, C - 1), rng)
            elif code == SRC_POPULAR:
                got = _draw_from(self._pop_cum, len(m), rng)
            elif code == SRC_FOLLOW:
                u = users[m]
                lo, deg = self.follow_indptr[u], self.follow_indptr[u + 1] - self.follow_indptr[u]
                j = lo + np.minimum(np.floor(rng.random(len(m)) * deg).astype(np.int64), deg - 1)
                got = np.full(len(m), -1, np.int64)
                has = deg > 0  # users without follows fall back to uniform below
                got[has] = self._items_by_author.draw(self.follow_authors[j[has]], rng)
            else:
                got = rng.integers(0, self.n_items, len(m))
            bad = got < 0
            if bad.any():
                got[bad] = rng.integers(0, self.n_items, int(bad.sum()))
            out[m] = got
        return out

    def policy_lists(self, users: np.ndarray, ts: np.ndarray, rng: np.random.Generator,
                     list_len: int | None = None) -> np.ndarray:
        """The logging policy, vectorised over sessions: int64 [S, list_len] item lists for
        sessions (users[s], ts[s]). Slots mix preference-driven (category from the user's
        affinity softmax, then item by popularity), popular, followed-author and uniform
        draws (POLICY_MIX); only items created by ts; duplicates inside a list are redrawn
        (twice; rare leftovers are kept)."""
        users = np.asarray(users, np.int64)
        ts = np.asarray(ts, np.float64)
        L = int(self.config.list_len if list_len is None else list_len)
        S, C = len(users), self.n_categories
        uniq, uloc = np.unique(users, return_inverse=True)
        logits = PREF_TEMPERATURE * self.user_category_affinity(uniq)
        logits[:, ~self._cat_nonempty] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        pref_cum = (np.cumsum(p, axis=1) + np.arange(len(uniq))[:, None]).reshape(-1)
        del logits, p

        src = np.searchsorted(np.cumsum(POLICY_MIX)[:-1], rng.random(S * L), side="right")
        slot_user = np.repeat(users, L)
        slot_loc = np.repeat(uloc, L)
        slot_ts = np.repeat(ts, L)
        items = self._draw(src, slot_user, pref_cum, slot_loc, rng)
        for _ in range(3):
            grid = items.reshape(S, L)
            o = np.argsort(grid, axis=1, kind="stable")
            sg = np.take_along_axis(grid, o, axis=1)
            dup_sorted = np.zeros((S, L), bool)
            dup_sorted[:, 1:] = sg[:, 1:] == sg[:, :-1]
            dup = np.zeros((S, L), bool)
            np.put_along_axis(dup, o, dup_sorted, axis=1)
            bad = np.flatnonzero(dup.reshape(-1) | (self.item_created[items] > slot_ts))
            if len(bad) == 0:
                break
            items[bad] = self._draw(src[bad], slot_user[bad], pref_cum, slot_loc[bad], rng)
        late = np.flatnonzero(self.item_created[items] > slot_ts)
        if len(late):  # fallback: popular among the items that exist before the window
            items[late] = self._old_items[_draw_from(self._old_cum, len(late), rng)]
        return items.reshape(S, L)

    # ------------------------------------------------------------------ training log

    def generate_log(self, rng_seed: int | None = None, show: Callable[[str], None] | bool | None = None) -> Dataset:
        """Simulate the logging policy for every user and return the viewed impressions
        as a Dataset (sorted by (user, ts), per-user temporal 80/20 split).

        rng_seed: seed of the log (None = 0), independent of the world seed's other uses.
        show: optional progress callback receiving one line of text per chunk of users
        (True = print to stderr).
        Generated in chunks of LOG_CHUNK_USERS users for bounded memory; the result does
        not depend on anything but the config and rng_seed."""
        cfg = self.config
        if show is True:
            show = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        log_seed = 0 if rng_seed is None else int(rng_seed)
        U, L, span = self.n_users, int(cfg.list_len), cfg.days * 86400.0
        T = len(TASKS)
        given_click = np.array([t in GIVEN_CLICK for t in TASKS])
        parts: list[tuple[np.ndarray, ...]] = []
        n_chunks = (U + LOG_CHUNK_USERS - 1) // LOG_CHUNK_USERS
        total = 0
        for ci in range(n_chunks):
            rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x106, log_seed, ci]))
            users = np.arange(ci * LOG_CHUNK_USERS, min(U, (ci + 1) * LOG_CHUNK_USERS), dtype=np.int64)
            ns = np.maximum(1, rng.poisson(self.user_session_rate[users]))
            s_user = np.repeat(users, ns)
            s_ts = cfg.t0 + rng.random(len(s_user)) * span
            items = self.policy_lists(s_user, s_ts, rng, L)
            out = self.respond_batch(s_user, items, rng)
            step = np.where(out["viewed"], SESSION_STEP_S + out["dwell"], 0.0)
            ts = np.empty_like(step)
            ts[:, 0] = s_ts
            if L > 1:
                ts[:, 1:] = s_ts[:, None] + np.cumsum(step[:, :-1], axis=1)
            v = out["viewed"]
            ev_user = np.broadcast_to(s_user[:, None], v.shape)[v]
            ev_item = items[v]
            ev_ts = ts[v]
            labels = np.empty((len(ev_user), T), np.float32)
            for j, t in enumerate(TASKS):
                labels[:, j] = out[t][v]
            clicked = labels[:, 0] > 0
            labels[np.ix_(~clicked, given_click)] = np.nan
            o = sort_events(ev_user, ev_ts)  # chunks are increasing user ranges: concat stays sorted
            parts.append((ev_user[o], ev_item[o], ev_ts[o], labels[o]))
            total += len(o)
            del out, items, step, ts, v
            if show:
                show(f"synthetic log: users {users[-1] + 1}/{U}, sessions {len(s_user)}, events {total}")

        ev_user = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        ev_item = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        ev_ts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
        labels = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, T), np.float32)
        del parts
        width = len(str(max(U, self.n_items) - 1))
        user_ids = np.char.add("u", np.arange(U).astype(f"U{width}"))
        item_ids = np.char.add("i", np.arange(self.n_items).astype(f"U{width}"))
        return Dataset(
            schema=self.schema,
            user_ids=user_ids,
            item_ids=item_ids,
            user_fields=self.user_fields.copy(),
            item_fields=self.item_fields,
            item_created=self.item_created.copy(),
            ev_user=ev_user,
            ev_item=ev_item,
            ev_ts=ev_ts,
            labels=labels,
            positive=labels[:, 0] > 0,
            test=temporal_split(ev_user, ev_ts, 0.2),
            implicit_negatives=False,
            follow_indptr=self.follow_indptr.copy(),
            follow_authors=self.follow_authors.copy(),
            item_dense=self.item_content,
        )


def make_world(n_items: int = 5000, n_users: int = 2000, seed: int = 0, **kw) -> SyntheticWorld:
    """Shorthand: SyntheticWorld(WorldConfig(n_items=..., n_users=..., seed=..., **kw))."""
    return SyntheticWorld(WorldConfig(n_items=n_items, n_users=n_users, seed=seed, **kw))
