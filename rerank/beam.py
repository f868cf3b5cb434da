"""Beam-search reranking over whole lists (DESIGN.md "Rerank"; reward in rerank/reward.py).

The list is built slot by slot from the top-M fused candidates. Every step scores every
candidate for every beam ([B, M]), masks used and infeasible items, and keeps the B best
extensions. The slot loop runs compiled (numba, rerank/beam_kernel.py: per slot, numpy's
fixed cost per call outweighed the arithmetic on these small arrays); the vectorised numpy
loop (`kernel="numpy"`, a Python loop over the T slots only) is its reference.

Scoring an extension of beam b by item i at slot t:
    R'      = R_b + reach_b · (v_i − pen_b(i))             (exact partial reward)
    key     = R' + reach_b · p_i · H_t                       (plus value-to-go)
H_t is a per-request estimate of the value still to come per unit of reach after slot t:
the next-best values in fused order, discounted by the pool's mean continue probability,
ending with the next page (reward.py's V_next). Without it a greedy step would ignore
p_continue altogether; with it an item that keeps the user scrolling is worth its value
plus the value it keeps reachable (for a fixed set without constraints, the best order
sorts by v / (1 − p), ALGORITHM-NOTES "Rerank"; v + p·H is its one-step form).

Row 0 of the beam always follows the greedy path (its best extension), rows 1..B−1 hold
the best other extensions over all rows. B = 1 is exactly greedy, and because the final
choice is the best exact reward R(L) over the final rows (recomputed by
`reward.list_reward`), a beam never returns a worse list than greedy under its reward.
The list sorted by fused score is scored too and kept when it is feasible and better.

Hard constraints (settings): two items of one author at least `min_author_gap` slots apart
(0 or 1: off); at most `max_per_category` items of one category in any `category_window`
consecutive slots (0: off). When a beam has no feasible item left, the softest constraint
is relaxed for that slot only: first the category cap, then the author gap (keeping the
cap), then both. The chosen list's relaxations are reported in ctx.trace_extra["rerank"],
so the debug trace says where and why a constraint was broken. The list is always full
(min(count, candidates) items).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import Schema
from rerank.beam_kernel import beam_slots, list_rewards, top_counts
from rerank.reward import RewardParams, continue_prob, item_values, list_reward, penalty_factor

NEG = -np.inf
RELAX_NAMES = {0: [], 1: ["max_per_category"], 2: ["min_author_gap"], 3: ["max_per_category", "min_author_gap"]}


@dataclass(frozen=True)
class Constraints:
    min_author_gap: int = 0  # same author at least this many slots apart; <= 1: off
    max_per_category: int = 0  # at most this many of one category in any `category_window` consecutive slots; 0: off
    category_window: int = 5


@dataclass
class BeamResult:
    order: np.ndarray  # int64 [T] positions into the pool, slot order
    reward: float  # R(order)
    relaxed: list[dict] = field(default_factory=list)  # [{"slot": t, "constraints": [...]}]
    finals: np.ndarray | None = None  # int64 [K, T]: the final rows (row 0 = greedy path)
    final_rewards: np.ndarray | None = None  # float64 [K]
    picked: str = "beam"  # "beam" or "sort" (the fused order scored better and is feasible)
    reward_sort: float | None = None


def value_to_go(v: np.ndarray, p: np.ndarray, T: int, params: RewardParams) -> np.ndarray:
    """H_t, t = 0..T-1: value expected after slot t per unit of reach (see module doc)."""
    vs = np.sort(v)[::-1]
    p_bar = float(p.mean()) if len(p) else 0.0
    K = int(params.next_items)
    tail = vs[T : T + K] if K > 0 else vs[:0]
    h = params.next_weight * float((tail * p_bar ** np.arange(len(tail))).sum())
    H = np.empty(T)
    H[T - 1] = h
    for t in range(T - 2, -1, -1):  # slots, not candidates
        h = vs[t + 1] + p_bar * h
        H[t] = h
    return H


def top_k(flat: np.ndarray, rows: int, k: int) -> np.ndarray:
    """Positions of the k largest entries of `flat` (0 < k < len(flat); viewed as `rows` equal
    rows), in no particular order. With at least k rows, the k-th largest row maximum bounds
    the k-th largest entry from below (k row maxima reach it), so only the entries at or above
    it are partitioned: 11 of the beam's 1200 at the median (22 at p90), 7.8 µs against 19 µs
    for argpartition over all of them, which had taken about a third of the search."""
    n = len(flat)
    if rows >= k:
        peaks = flat.reshape(rows, -1).max(axis=1)
        floor = np.partition(peaks, rows - k)[rows - k]
        cand = np.flatnonzero(flat >= floor)
        if len(cand) > k:
            cand = cand[np.argpartition(flat[cand], len(cand) - k)[len(cand) - k :]]
        return cand
    return np.argpartition(flat, n - k)[n - k :]


def violation_flags(lists: np.ndarray, author: np.ndarray | None, category: np.ndarray | None, c: Constraints) -> np.ndarray:
    """int8 [K, T] per slot of each list: bit 1 = breaks the category cap, bit 2 = breaks the
    author gap (codes < 0 = unknown never match). Same codes as the relaxation levels."""
    lists = np.atleast_2d(lists)
    K, T = lists.shape
    out = np.zeros((K, T), np.int8)
    if author is not None and c.min_author_gap > 1:
        a = author[lists]
        hit = np.zeros((K, T), bool)
        for lag in range(1, min(c.min_author_gap - 1, T - 1) + 1):
            hit[:, lag:] |= (a[:, lag:] == a[:, :-lag]) & (a[:, lag:] >= 0)
        out |= hit.astype(np.int8) * 2
    if category is not None and c.max_per_category > 0:
        cat = category[lists]
        n = np.zeros((K, T), np.int64)
        for lag in range(1, min(c.category_window, T)):
            n[:, lag:] += (cat[:, lag:] == cat[:, :-lag]) & (cat[:, lag:] >= 0)
        out |= (n + 1 > c.max_per_category).astype(np.int8)
    return out


def violations(order: np.ndarray, author: np.ndarray | None, category: np.ndarray | None, c: Constraints) -> list[dict]:
    """Slots of one list (pool positions in slot order) that break a hard constraint."""
    f = violation_flags(np.asarray(order)[None, :], author, category, c)[0]
    return [{"slot": int(t), "constraints": RELAX_NAMES[int(f[t])]} for t in np.flatnonzero(f)]


_warmed = False


def _warm_once() -> None:
    """Compile (or load from numba's cache) the kernels with the argument types serving uses,
    once per process, so that no request pays for it: a service builds its pipeline, and
    with it the beam, before it reports ready."""
    global _warmed
    if _warmed:
        return
    _warmed = True
    rng = np.random.default_rng(0)
    search = BeamSearch(RewardParams(), Constraints(2, 1, 3), beam=2)
    for author in (rng.integers(0, 3, 8), None):
        search.search(rng.random(8), rng.uniform(0.5, 1.0, 8), author, rng.integers(-1, 3, 8), 4)


class BeamSearch:
    """Beam search over lists for fixed reward parameters and constraints.

    Per request the pool gets an M×M increment matrix; per slot a beam row's state is one
    int32 code per candidate, X = n_a + K_a·(n_c + K_c·(n_g + K_g·n_k)) + BIG·used, with
    n_a / n_c the same-author / same-category counts in the penalty windows, n_g the
    same-author count in the last (gap − 1) slots and n_k the same-category count in the
    last (cap window − 1) slots. Tables indexed by the code give the kept share of the
    value (1 − penalty factor) and the feasibility, so a step is a handful of [B, M] ops:
    gather parents' codes, add the chosen items' increments, subtract the items leaving
    the windows, look up, score, select.
    """

    def __init__(self, params: RewardParams, constraints: Constraints = Constraints(), beam: int = 8,
                 lookahead: bool = True, compare_sort: bool = True, kernel: str = "numba"):
        self.params, self.constraints = params, constraints
        self.beam, self.lookahead, self.compare_sort = max(1, int(beam)), lookahead, compare_sort
        p, c = params, constraints
        # window of each code component (0 = component off)
        self.w_a = int(p.author_window) if p.author_penalty > 0 else 0
        self.w_c = int(p.category_window) if p.category_penalty > 0 else 0
        self.w_g = max(int(c.min_author_gap) - 1, 0)
        self.cap = int(c.max_per_category)
        self.w_k = max(int(c.category_window) - 1, 0) if self.cap > 0 else 0
        if self.cap > 0 and self.w_k == 0:
            self.cap = 0  # a one-slot window never holds two items
        K = [w + 1 for w in (self.w_a, self.w_c, self.w_g, self.w_k)]
        self.stride = np.array([1, K[0], K[0] * K[1], K[0] * K[1] * K[2]], np.int64)
        self.big = int(np.prod(K))
        if self.big > 1_000_000:
            raise ValueError("rerank windows too large: (author_window+1)·(category_window+1)·gap·cap_window must stay <= 1e6")
        code = np.arange(2 * self.big)
        used = code >= self.big
        rest = code % self.big
        n_a, n_c = rest % K[0], (rest // K[0]) % K[1]
        n_g, n_k = (rest // (K[0] * K[1])) % K[2], rest // (K[0] * K[1] * K[2])
        keep = 1.0 - penalty_factor(n_a if self.w_a else 0, n_c if self.w_c else 0, p)
        viol = np.where((self.cap > 0) & (n_k >= max(self.cap, 1)), 1, 0) + np.where(n_g > 0, 2, 0)
        self.flags = np.where(used, 4, viol).astype(np.int8)  # 0 feasible, 1 cap, 2 gap, 3 both, 4 used
        self.keep_feasible = np.where(self.flags == 0, keep, -np.inf)
        self.keep_unused = np.where(used, -np.inf, keep)
        # allowed[level, flag]: level 0 all constraints, 1 no cap, 2 no gap, 3 none
        self.allowed = np.array([[f == 0, f in (0, 1), f in (0, 2), f < 4] for f in range(5)]).T
        self.hard = self.cap > 0 or self.w_g > 0
        if kernel not in ("numba", "numpy"):
            raise ValueError(f"beam kernel must be numba or numpy, not {kernel!r}")
        self.kernel = kernel
        # An entering item's code increment per same-author / same-category match, and per
        # leaving window (ascending) its decrements (see _field_codes).
        ent, leaving = [0, 0], {}
        for w, s, f in ((self.w_a, self.stride[0], 0), (self.w_g, self.stride[2], 0), (self.w_c, self.stride[1], 1), (self.w_k, self.stride[3], 1)):
            if w > 0:
                ent[f] += int(s)
                leaving.setdefault(w, [0, 0])[f] += int(s)
        self._ent = ent
        self._lw = np.array(sorted(leaving), np.int64)
        self._lwa = np.array([leaving[w][0] for w in sorted(leaving)], np.int64)
        self._lwc = np.array([leaving[w][1] for w in sorted(leaving)], np.int64)
        self._zero_w = np.zeros(len(leaving), np.int64)
        self._no_codes = np.zeros(0, np.int64)
        if kernel == "numba":
            _warm_once()

    def _blocked_at_most(self, author, category) -> int:
        """An upper bound on the unused pool items the hard constraints can block at any slot:
        the gap blocks the authors of the last w_g items (≤ w_g authors), the cap the categories
        holding `cap` of the last w_k slots (≤ w_k // cap categories); each blocked code takes
        at most its pool count."""

        blocked = 0 if author is None or self.w_g <= 0 else top_counts(author, self.w_g)
        if self.cap > 0 and category is not None:
            blocked += top_counts(category, self.w_k // self.cap)
        return int(blocked)

    def _field_codes(self, author, category, M):
        """Per field, the pool's codes with unknown ones (< 0) made codes of their own (−1 −
        position), so that equal codes mean "same author/category, or the item itself"; and the
        weight of a match in an entering item's increment and in each leaving window's
        decrement (0 for a field the pool does not have)."""
        own = -1 - np.arange(M, dtype=np.int64)
        a = own if author is None else np.where(author >= 0, author, own)
        c = own if category is None else np.where(category >= 0, category, own)
        ent_a, lwa = (self._ent[0], self._lwa) if author is not None else (0, self._zero_w)
        ent_c, lwc = (self._ent[1], self._lwc) if category is not None else (0, self._zero_w)
        return a, c, ent_a, ent_c, lwa, lwc

    def _increments(self, author, category, M):
        """Per pool item j, as M×M masks (the numpy loop): the code increment its entry adds to
        every candidate (all components + used) and, per leaving window, its decrement."""
        a, c, ent_a, ent_c, lwa, lwc = self._field_codes(author, category, M)
        eq_a, eq_c = a[:, None] == a[None, :], c[:, None] == c[None, :]
        inc = (np.eye(M, dtype=np.int32) * np.int32(self.big) + eq_a * np.int32(ent_a) + eq_c * np.int32(ent_c)).astype(np.int32)
        leave = [(int(w), (eq_a * np.int32(wa) + eq_c * np.int32(wc)).astype(np.int32)) for w, wa, wc in zip(self._lw, lwa, lwc)]
        return inc, leave

    def _slots_numpy(self, v, p, pH, H, author, category, M, T, B, safe):
        """The slot loop in numpy (the reference for beam_kernel.beam_slots): (seq [nb, T],
        relax [nb, T] or None)."""
        inc, leave = self._increments(author, category, M)
        keep_f, keep_u, flags, allowed = self.keep_feasible, self.keep_unused, self.flags, self.allowed
        Hl = H.tolist()
        X = np.zeros((1, M), np.int32)
        seq = np.zeros((1, T), np.int64)
        relax = None  # int8 [nb, T], created at the first relaxation
        R = np.zeros(1)
        reach = np.ones(1)
        for t in range(T):
            key = keep_f.take(X)
            key *= v
            key += pH[t]
            key *= reach[:, None]
            key += R[:, None]
            lvl = None
            if not safe and self.hard and not (key.max(axis=1) > -np.inf).all():
                # some beam has no feasible item: relax, per beam, the softest constraint first
                fx = flags.take(X)
                lvl = np.full(len(R), 3, np.int8)
                for level in (2, 1, 0):
                    lvl[allowed[level].take(fx).any(axis=1)] = level
                key = keep_u.take(X)
                key *= v
                key += pH[t]
                key *= reach[:, None]
                key += R[:, None]
                key[~allowed[lvl[:, None], fx]] = -np.inf
                if relax is None:
                    relax = np.zeros((len(R), T), np.int8)
            flat = key.ravel()
            # row 0 follows the greedy path; the other rows are the best remaining extensions
            g = int(flat[:M].argmax())
            kg = flat[g]
            k = B - 1
            n = len(flat)
            if k > 0 and k < n:
                flat[g] = -np.inf
                # g, then the k best (after g's own slot was emptied)
                sel = np.empty(k + 1, np.int64)
                sel[0] = g
                sel[1:] = top_k(flat, len(R), k)
                ksel = flat[sel]
                ksel[0] = kg
                if not safe:
                    ok = ksel > -np.inf
                    sel, ksel = sel[ok], ksel[ok]
            elif k > 0:
                flat[g] = -np.inf
                rest = np.arange(n)
                rest = rest[flat > -np.inf]  # g's own slot was emptied above
                sel = np.concatenate(([g], rest))
                ksel = flat[sel]
                ksel[0] = kg
            else:
                sel = np.array([g])
                ksel = np.array([kg])
            parent, item = np.divmod(sel, M)
            reach = reach[parent] * p[item]
            R = ksel - reach * Hl[t]  # exact partial reward: key minus the value-to-go term
            seq = seq[parent]
            seq[:, t] = item
            if relax is not None:
                relax = relax[parent]
                if lvl is not None:
                    relax[:, t] = lvl[parent]
            X = X[parent]
            X += inc[item]
            for w, dec in leave:
                if t - w >= 0:
                    X -= dec[seq[:, t - w]]

        return seq, relax

    def _slots_numba(self, v, p, pH, H, author, category, M, B, safe):
        """The slot loop compiled (rerank/beam_kernel.py): (seq [nb, T], relax [nb, T] or None)."""
        a, c, ent_a, ent_c, lwa, lwc = self._field_codes(author, category, M)
        seq, relax, relaxed = beam_slots(v, p, pH, H, a, c, self.keep_feasible, self.keep_unused, self.flags,
                                         self.allowed, self.big, ent_a, ent_c, self._lw, lwa, lwc, B, safe, self.hard)
        return seq, (relax if relaxed else None)

    def _rewards_numba(self, lists, v, p, author, category):
        """list_reward(...)["reward"], compiled (rerank/beam_kernel.py)."""
        pr = self.params
        none = self._no_codes
        return list_rewards(lists, v, p, none if author is None else author, none if category is None else category,
                            author is not None, category is not None, int(pr.author_window), float(pr.author_penalty),
                            int(pr.category_window), float(pr.category_penalty), float(pr.category_free),
                            int(pr.next_items), float(pr.next_weight), float(p.mean()) if len(p) else 0.0)

    def search(self, v: np.ndarray, p: np.ndarray, author: np.ndarray | None, category: np.ndarray | None, T: int) -> BeamResult:
        """Best list of T positions into a pool of M candidates, the pool in descending fused
        order (position 0 = best fused; used for the sort comparison). v, p: float [M];
        author / category: int codes [M] (< 0 unknown) or None."""
        v = np.maximum(np.asarray(v, np.float64), 1e-12)  # floor: v·(−inf) must stay −inf
        p = np.asarray(p, np.float64)
        M = len(v)
        T = int(min(T, M))
        if T <= 0:
            return BeamResult(np.zeros(0, np.int64), 0.0)
        author = None if author is None else np.asarray(author, np.int64)
        category = None if category is None else np.asarray(category, np.int64)
        B = self.beam
        H = value_to_go(v, p, T, self.params) if self.lookahead else np.zeros(T)
        pH = p[None, :] * H[:, None]  # [T, M]

        # A row has at least M − t − blocked feasible items at slot t. When that is >= B at the last
        # slot, no row can run out and the top B extensions are all feasible: the per-slot
        # feasibility check and the filter of infeasible picks (five array ops a slot) are skipped.
        blocked = self._blocked_at_most(author, category) if self.hard else 0
        safe = M - (T - 1) - blocked >= B
        if self.kernel == "numba":
            seq, relax = self._slots_numba(v, p, pH, H, author, category, M, B, safe)
        else:
            seq, relax = self._slots_numpy(v, p, pH, H, author, category, M, T, B, safe)

        lists = seq
        if self.compare_sort:
            lists = np.concatenate([seq, np.arange(T, dtype=np.int64)[None, :]])
        if self.kernel == "numba":
            rw = self._rewards_numba(lists, v, p, author, category)
        else:
            rw = list_reward(lists, v, p, author, category, self.params)["reward"]
        best = int(np.argmax(rw[: len(seq)]))
        res = BeamResult(
            order=seq[best].copy(),
            reward=float(rw[best]),
            relaxed=[] if relax is None else [{"slot": int(s), "constraints": RELAX_NAMES[int(relax[best, s])]} for s in np.flatnonzero(relax[best])],
            finals=seq,
            final_rewards=rw[: len(seq)],
        )
        if self.compare_sort:
            res.reward_sort = float(rw[-1])
            if rw[-1] > res.reward and not violation_flags(lists[-1:], author, category, self.constraints).any():
                res.order, res.reward, res.relaxed, res.picked = lists[-1].copy(), float(rw[-1]), [], "sort"
        return res


def beam_search(
    v: np.ndarray,
    p: np.ndarray,
    author: np.ndarray | None,
    category: np.ndarray | None,
    T: int,
    beam: int,
    params: RewardParams,
    constraints: Constraints = Constraints(),
    lookahead: bool = True,
    compare_sort: bool = True,
    kernel: str = "numba",
) -> BeamResult:
    """One-off `BeamSearch(...).search(...)` (see BeamSearch)."""
    return BeamSearch(params, constraints, beam, lookahead, compare_sort, kernel).search(v, p, author, category, T)


@dataclass(frozen=True)
class RerankConfig:
    beam: int = 8
    top_m: int = 150
    params: RewardParams = RewardParams()
    constraints: Constraints = Constraints()
    continue_task: str = "continue"
    continue_base: float = 0.9
    lookahead: bool = True
    compare_sort: bool = True


class BeamReranker:
    """The rerank stage: top-M fused candidates → the best list of ctx.count items under
    the list reward. Returned Candidates keep their fused score and heads, in slot order."""

    name = "rerank"

    def __init__(self, schema: Schema, item_author: np.ndarray | None, item_category: np.ndarray | None, config: RerankConfig = RerankConfig()):
        """item_author / item_category: int codes per catalog item, 0 = unknown (the bundle's
        item_fields convention), or None when the schema has no such field."""
        self.schema, self.config = schema, config
        self.item_author = None if item_author is None else np.asarray(item_author, np.int64) - 1  # -1 = unknown
        self.item_category = None if item_category is None else np.asarray(item_category, np.int64) - 1
        self.mode = "greedy" if config.beam <= 1 else "beam"
        self.search = BeamSearch(config.params, config.constraints, config.beam, config.lookahead, config.compare_sort)

    @classmethod
    def from_bundle(cls, schema: Schema, item_fields: np.ndarray, config: RerankConfig) -> "BeamReranker":
        names = [f.name for f in schema.item_fields]

        def col(name: str | None) -> np.ndarray | None:
            return None if not name or name not in names else np.asarray(item_fields[:, names.index(name)], np.int64)

        return cls(schema, col(schema.author_field), col(schema.category_field), config)

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        n = len(cands)
        T = min(ctx.count, n)
        if T <= 0 or cands.heads is None:
            return cands.top(T)
        cfg = self.config
        pool = cands.top(min(n, max(cfg.top_m, T)))  # descending fused order
        v = item_values(pool.score)
        p, p_src = continue_prob(pool.heads, self.schema, cfg.continue_task, cfg.continue_base)
        author = None if self.item_author is None else self.item_author[pool.item]
        category = None if self.item_category is None else self.item_category[pool.item]
        res = self.search.search(v, p, author, category, T)
        ctx.trace_extra["rerank"] = {
            "mode": self.mode,
            "beam": cfg.beam,
            "pool": len(pool),
            "slots": T,
            "continue": p_src,
            "reward": round(res.reward, 6),
            "reward_sort": None if res.reward_sort is None else round(res.reward_sort, 6),
            "picked": res.picked,
            "relaxed": res.relaxed,
        }
        return pool.take(res.order)


def config_from_settings(settings, beam: int | None = None) -> RerankConfig:
    """RerankConfig from the typed Settings (core/settings.py, rerank_* fields)."""
    s = settings
    return RerankConfig(
        beam=int(s.rerank_beam_width if beam is None else beam),
        top_m=int(s.rerank_top_m),
        params=RewardParams(
            author_window=s.rerank_author_window,
            author_penalty=s.rerank_author_penalty,
            category_window=s.rerank_category_window,
            category_free=s.rerank_category_free,
            category_penalty=s.rerank_category_penalty,
            next_items=s.rerank_next_items,
            next_weight=s.rerank_next_weight,
        ),
        constraints=Constraints(s.rerank_min_author_gap, s.rerank_max_per_category, s.rerank_cap_window),
        continue_task=s.rerank_continue_task,
        continue_base=s.rerank_continue_base,
    )


def make_reranker(schema: Schema, item_fields: np.ndarray, settings, mode: str | None = None, beam: int | None = None):
    """The rerank stage for `mode` (default settings.rerank_mode): "sort" → FusedSortReranker,
    "greedy" → BeamReranker with width 1, "beam" → width `beam` (default settings)."""
    from rerank.sort import FusedSortReranker

    mode = settings.rerank_mode if mode is None else mode
    if mode == "sort":
        return FusedSortReranker()
    if mode not in ("beam", "greedy"):
        raise ValueError(f"rerank mode must be beam, greedy or sort, not {mode!r}")
    return BeamReranker.from_bundle(schema, item_fields, config_from_settings(settings, 1 if mode == "greedy" else beam))
