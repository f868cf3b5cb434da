"""The beam's slot loop compiled with numba (`BeamSearch(kernel="numba")`, the default).

Same search as the numpy loop in rerank/beam.py, step for step and with the same float
operations in the same order, so both return the same lists (tests/test_rerank.py compares
them). Why compiled: the numpy loop is ~20 array calls per slot on [B, M] = [8, 150] arrays;
on this 2-core machine each call's fixed cost outweighs its arithmetic, and `funnel bench`
measured the search at 1.7-2.6 ms of a 7.5-8 ms request. Here a slot is one pass over the
rows, and the per-request M×M increment masks are not built at all: an item's increment to
a row's codes is computed from the pool's author and category codes as it is applied.

Differences, none of which changes a list when keys are distinct:
- among equal keys the earlier position (row-major) is taken; the numpy loop's selection
  takes any of them, so rows can come out in another order;
- a NaN key (reach 0 times an infeasible −inf) is never selected; numpy's argmax would.
"""
from __future__ import annotations

import numpy as np
from numba import njit

NEG = -np.inf


@njit(cache=True, nogil=True)
def top_counts(codes, n):
    """The summed counts of the n most frequent known codes (>= 0) of `codes`."""
    known = np.sort(codes[codes >= 0])
    if len(known) == 0 or n <= 0:
        return 0
    counts = np.empty(len(known), np.int64)
    m = 0
    for q in range(len(known)):
        if q == 0 or known[q] != known[q - 1]:
            counts[m] = 0
            m += 1
        counts[m - 1] += 1
    top = np.sort(counts[:m])[::-1]
    return top[:n].sum()


@njit(cache=True, nogil=True)
def _groups(codes):
    """Positions grouped by code: `order` lists them code by code, and position j's group is
    order[lo[j]:hi[j]] (j included)."""
    M = codes.shape[0]
    order = np.argsort(codes, kind="mergesort")
    lo = np.empty(M, np.int64)
    hi = np.empty(M, np.int64)
    s = 0
    for q in range(1, M + 1):
        if q == M or codes[order[q]] != codes[order[s]]:
            for u in range(s, q):
                lo[order[u]] = s
                hi[order[u]] = q
            s = q
    return order, lo, hi


@njit(cache=True, nogil=True)
def beam_slots(v, p, pH, H, a, c, keep_f, keep_u, flags, allowed, big, ent_a, ent_c, lw, lwa, lwc, B, safe, hard):
    """The slot loop of BeamSearch.search. v, p: float64 [M]; pH: float64 [T, M] (p · H_t);
    H: float64 [T]; a, c: int64 [M] author / category codes, unknown ones replaced by a code
    of their own (−1 − position) so that equal codes mean "same author/category, or the item
    itself"; keep_f / keep_u / flags / allowed: BeamSearch's tables; big: the `used` stride;
    ent_a / ent_c: an entering item's code increment per same-author / same-category match;
    lw, lwa, lwc: per leaving window its length and decrements. Returns (seq [nb, T] pool
    positions, relax [nb, T] relaxation level per slot, whether any slot relaxed)."""
    M = v.shape[0]
    T = pH.shape[0]
    L = lw.shape[0]
    a_ord, a_lo, a_hi = _groups(a)
    c_ord, c_lo, c_hi = _groups(c)
    X = np.zeros((B, M), np.int64)
    X2 = np.zeros((B, M), np.int64)
    seq = np.zeros((B, T), np.int64)
    seq2 = np.zeros((B, T), np.int64)
    relax = np.zeros((B, T), np.int8)
    relax2 = np.zeros((B, T), np.int8)
    R = np.zeros(B)
    R2 = np.zeros(B)
    reach = np.ones(B)
    reach2 = np.ones(B)
    lvl = np.zeros(B, np.int8)
    key = np.empty(B * M)
    k = B - 1
    topv = np.empty(max(k, 1))
    topi = np.empty(max(k, 1), np.int64)
    sel = np.empty(B * M + 1, np.int64)
    ksel = np.empty(B * M + 1)
    nb = 1
    any_relax = False
    for t in range(T):
        for b in range(nb):
            rr = reach[b]
            Rb = R[b]
            for j in range(M):
                key[b * M + j] = (keep_f[X[b, j]] * v[j] + pH[t, j]) * rr + Rb
        use_lvl = False
        if (not safe) and hard:
            for b in range(nb):
                ok = False
                for j in range(M):
                    if key[b * M + j] > NEG:
                        ok = True
                        break
                if not ok:
                    use_lvl = True
                    break
        if use_lvl:
            # some beam has no feasible item: relax, per beam, the softest constraint first
            any_relax = True
            for b in range(nb):
                level = 3
                for cand in (2, 1, 0):
                    for j in range(M):
                        if allowed[cand, flags[X[b, j]]]:
                            level = cand
                            break
                lvl[b] = level
                rr = reach[b]
                Rb = R[b]
                for j in range(M):
                    x = X[b, j]
                    if allowed[level, flags[x]]:
                        key[b * M + j] = (keep_u[x] * v[j] + pH[t, j]) * rr + Rb
                    else:
                        key[b * M + j] = NEG
        n = nb * M
        # row 0 follows the greedy path; the other rows are the best remaining extensions
        g = 0
        kg = key[0]
        for j in range(1, M):
            if key[j] > kg:
                kg = key[j]
                g = j
        sel[0] = g
        ksel[0] = kg
        ns = 1
        if k > 0 and k < n:
            key[g] = NEG
            cnt = 0
            for i in range(n):
                x = key[i]
                if cnt == k and not (x > topv[k - 1]):
                    continue
                # insert, descending; equal keys keep position order
                pos = cnt if cnt < k else k - 1
                while pos > 0 and x > topv[pos - 1]:
                    if pos < k:
                        topv[pos] = topv[pos - 1]
                        topi[pos] = topi[pos - 1]
                    pos -= 1
                topv[pos] = x
                topi[pos] = i
                if cnt < k:
                    cnt += 1
            for r in range(cnt):
                if safe or topv[r] > NEG:
                    sel[ns] = topi[r]
                    ksel[ns] = topv[r]
                    ns += 1
            if not safe and not (kg > NEG):
                for r in range(ns - 1):  # drop g itself
                    sel[r] = sel[r + 1]
                    ksel[r] = ksel[r + 1]
                ns -= 1
        elif k > 0:
            key[g] = NEG
            for i in range(n):
                if key[i] > NEG:
                    sel[ns] = i
                    ksel[ns] = key[i]
                    ns += 1
        for r in range(ns):
            par = sel[r] // M
            it = sel[r] - par * M
            reach2[r] = reach[par] * p[it]
            R2[r] = ksel[r] - reach2[r] * H[t]
            for s in range(t):
                seq2[r, s] = seq[par, s]
                relax2[r, s] = relax[par, s]
            seq2[r, t] = it
            relax2[r, t] = lvl[par] if use_lvl else 0
            # the parent's codes plus the entering item's increments minus the leaving items'
            # decrements; only the items sharing a code with them change
            for j in range(M):
                X2[r, j] = X[par, j]
            X2[r, it] += big
            if ent_a:
                for q in range(a_lo[it], a_hi[it]):
                    X2[r, a_ord[q]] += ent_a
            if ent_c:
                for q in range(c_lo[it], c_hi[it]):
                    X2[r, c_ord[q]] += ent_c
            for l in range(L):
                if t - lw[l] >= 0:
                    out = seq2[r, t - lw[l]]
                    if lwa[l]:
                        for q in range(a_lo[out], a_hi[out]):
                            X2[r, a_ord[q]] -= lwa[l]
                    if lwc[l]:
                        for q in range(c_lo[out], c_hi[out]):
                            X2[r, c_ord[q]] -= lwc[l]
        X, X2 = X2, X
        seq, seq2 = seq2, seq
        relax, relax2 = relax2, relax
        R, R2 = R2, R
        reach, reach2 = reach2, reach
        nb = ns
    return seq[:nb].copy(), relax[:nb].copy(), any_relax


@njit(cache=True, nogil=True)
def list_rewards(lists, v, p, a, c, has_a, has_c, w_a, lam_a, w_c, lam_c, free_c, next_items, next_weight, p_bar):
    """R(L) per row of `lists` [K, T] (pool positions), as rerank.reward.list_reward defines it
    (same terms; sums run slot by slot, so a reward can differ from list_reward's in the last
    bits). a, c: int64 [M] codes, < 0 unknown (never matches); has_a / has_c: False when the
    schema has no such field (that penalty off)."""
    K, T = lists.shape
    M = v.shape[0]
    out = np.empty(K)
    order = np.argsort(-v, kind="mergesort")
    used = np.zeros(M, np.bool_)
    for k in range(K):
        reach = 1.0
        value = 0.0
        penalty = 0.0
        for t in range(T):
            it = lists[k, t]
            n_a = 0
            if has_a and w_a > 0 and a[it] >= 0:
                for s in range(max(0, t - w_a), t):
                    if a[lists[k, s]] == a[it]:
                        n_a += 1
            n_c = 0
            if has_c and w_c > 0 and c[it] >= 0:
                for s in range(max(0, t - w_c), t):
                    if c[lists[k, s]] == c[it]:
                        n_c += 1
            f = min(lam_a * n_a + lam_c * max(n_c - free_c, 0.0), 1.0)
            vt = v[it]
            value += reach * vt
            penalty += reach * (vt * f)
            reach *= p[it]
        nxt = 0.0
        if next_items > 0 and next_weight != 0.0:
            for t in range(T):
                used[lists[k, t]] = True
            r = 0
            for q in range(M):
                j = order[q]
                if used[j]:
                    continue
                nxt += p_bar ** float(r) * v[j]
                r += 1
                if r == next_items:
                    break
            for t in range(T):
                used[lists[k, t]] = False
            nxt *= next_weight
        out[k] = value - penalty + reach * nxt
    return out
