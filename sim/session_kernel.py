"""One user's session answered by the behaviour model, compiled with numba
(`SyntheticWorld.respond`, a single session; `respond_batch` stays numpy).

Why: the load test's locust users draw every feed's feedback from the world, one session at
a time. Through `respond_batch` that is ~80 numpy calls on [1, 20] arrays, ~0.45 ms of CPU a
feed on this 2-core machine, where locust shares the cores with the server it measures.
Here it is one pass over the positions.

Same model, same draws: the caller takes the random numbers from the generator in the order
`respond_batch` does (click uniforms, dwell normals, then like / share / follow / dislike /
continue uniforms) and the affinities by the same einsum, and every float expression below
keeps numpy's operand order, so both return the same session (tests/test_synthetic.py); `exp`
may differ from numpy's in the last bit, which moves an outcome only if a uniform lands within
that bit of its probability.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(cache=True, nogil=True)
def respond_session(aff, q, authors, categories, followed, user_bias, activity, fatigue_window, u_click, z_dwell, u_rest, c):
    """aff, q float64 [n]; authors, categories int64 [n]; followed bool [n]; user_bias float64;
    activity float64 (the user's activity code); fatigue_window 0 = no fatigue; u_click,
    z_dwell float64 [n]; u_rest float64 [5n] (like, share, follow, dislike, continue uniforms);
    c float64 [32] the model's constants (sim.synthetic._SESSION_CONSTANTS, in this order).
    Returns (bool [7, n]: viewed, click, long_view, like, share, follow, dislike; bool [n]
    continue; float64 [n] dwell), each False / 0 past the last viewed position."""
    (click_base, pos_bias, follow_boost, fat_click_a, fat_click_c, dwell_mu0, dwell_aff, dwell_q, dwell_sigma, long_view_s,
     like0, like1, like2, share0, share1, share2, follow0, follow1, follow2, dislike0, dislike1, dislike2, fat_dislike_a,
     fat_dislike_c, cont_base, cont_aff, cont_activity, fat_cont_a, fat_cont_c, cont_click, cont_long, cont_dislike) = (
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15], c[16], c[17],
        c[18], c[19], c[20], c[21], c[22], c[23], c[24], c[25], c[26], c[27], c[28], c[29], c[30], c[31])
    n = len(aff)
    out = np.zeros((7, n), np.bool_)
    cont = np.zeros(n, np.bool_)
    dwell_out = np.zeros(n, np.float64)
    act = activity - 3.5
    lags = min(fatigue_window, n - 1)
    viewed = True
    for t in range(n):
        n_a = 0.0
        n_c = 0.0
        for lag in range(1, lags + 1):
            if t >= lag:
                n_a += authors[t] == authors[t - lag]
                n_c += categories[t] == categories[t - lag]
        a, qt, f = aff[t], q[t], followed[t]
        pos = -pos_bias * math.log1p(float(t))
        click_logit = click_base + a + qt + user_bias + pos + follow_boost * f - (fat_click_a * n_a + fat_click_c * n_c)
        mu = dwell_mu0 + dwell_aff * a + dwell_q * qt
        cont_logit = cont_base + cont_aff * min(max(a, -3.0), 3.0) + cont_activity * act - (fat_cont_a * n_a + fat_cont_c * n_c)
        p_like = _sigmoid(like0 + like1 * a + like2 * qt)
        p_share = _sigmoid(share0 + share1 * a + share2 * qt)
        p_follow = 0.0 if f else _sigmoid(follow0 + follow1 * a + follow2 * qt)
        p_dislike = _sigmoid(dislike0 - dislike1 * a - dislike2 * qt + fat_dislike_a * n_a + fat_dislike_c * n_c)
        click = u_click[t] < _sigmoid(click_logit)
        dwell = math.exp(mu + dwell_sigma * z_dwell[t])
        long_view = click and dwell >= long_view_s
        like = click and u_rest[t] < p_like
        share = click and u_rest[n + t] < p_share
        follow = click and u_rest[2 * n + t] < p_follow
        dislike = u_rest[3 * n + t] < p_dislike
        p_cont = _sigmoid(cont_logit + cont_click * click + cont_long * long_view + cont_dislike * dislike)
        go_on = u_rest[4 * n + t] < p_cont
        if viewed:
            out[0, t] = True
            out[1, t] = click
            out[2, t] = long_view
            out[3, t] = like
            out[4, t] = share
            out[5, t] = follow
            out[6, t] = dislike
            cont[t] = go_on
            if click:
                dwell_out[t] = dwell
        viewed = viewed and go_on
    return out, cont, dwell_out
