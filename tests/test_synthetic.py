"""The synthetic world: determinism, behaviour model properties, respond/expected
consistency and the generated training log."""
from __future__ import annotations


import numpy as np
import pytest

from sim.dataset import Dataset, sort_events
from sim.synthetic import (
    DEFAULT_REWARD_WEIGHTS,
    TASKS,
    SyntheticWorld,
    WorldConfig,
    make_world,
)

N_ITEMS, N_USERS = 2000, 500
POSITIVE = {k: w for k, w in DEFAULT_REWARD_WEIGHTS.items() if w > 0}
PROB_KEYS = ("click", "long_view", "like", "share", "follow", "dislike", "continue", "reach")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return make_world(N_ITEMS, N_USERS, seed=3)


@pytest.fixture(scope="module")
def world_nofat() -> SyntheticWorld:
    return make_world(N_ITEMS, N_USERS, seed=3, fatigue=False)


@pytest.fixture(scope="module")
def log(world) -> Dataset:
    return world.generate_log()


def _world_arrays(w: SyntheticWorld) -> dict[str, np.ndarray]:
    names = ("item_category", "item_author", "item_content", "item_latent", "item_quality",
             "item_created", "user_latent", "user_fields", "follow_indptr", "follow_authors")
    return {n: getattr(w, n) for n in names}


def _distinct_author_category_list(w: SyntheticWorld, n: int, rng) -> np.ndarray:
    """n items with pairwise distinct authors and categories."""
    cats = rng.permutation(w.n_categories)
    out = []
    used_a = set()
    for c in cats:  # loop over a handful of categories, test-only
        cand = np.flatnonzero((w.item_category == c) & ~np.isin(w.item_author, list(used_a)))
        if len(cand):
            i = int(rng.choice(cand))
            out.append(i)
            used_a.add(int(w.item_author[i]))
        if len(out) == n:
            return np.array(out, np.int64)
    raise AssertionError("not enough categories")


# ----------------------------------------------------------------------------- world


def test_deterministic_for_seed():
    a, b, c = make_world(N_ITEMS, N_USERS, seed=7), make_world(N_ITEMS, N_USERS, seed=7), make_world(N_ITEMS, N_USERS, seed=8)
    for name, arr in _world_arrays(a).items():
        np.testing.assert_array_equal(arr, getattr(b, name), err_msg=name)
    assert not np.array_equal(a.item_latent, c.item_latent)
    assert not np.array_equal(a.user_fields, c.user_fields)
    la, lb = a.generate_log(), b.generate_log()
    np.testing.assert_array_equal(la.ev_item, lb.ev_item)
    np.testing.assert_array_equal(la.ev_ts, lb.ev_ts)
    np.testing.assert_array_equal(la.labels, lb.labels)
    other = a.generate_log(rng_seed=1)
    assert len(other.ev_item) != len(la.ev_item) or not np.array_equal(other.ev_item, la.ev_item)


def test_world_is_independent_of_fatigue_flag(world, world_nofat):
    for name, arr in _world_arrays(world).items():
        np.testing.assert_array_equal(arr, getattr(world_nofat, name), err_msg=name)


def test_shapes_and_dtypes(world):
    I, U = N_ITEMS, N_USERS
    C, A = world.n_categories, world.n_authors
    d, cd = world.config.latent_dim, world.config.content_dim
    expect = {
        "item_category": (np.int64, (I,)), "item_author": (np.int64, (I,)),
        "item_content": (np.float32, (I, cd)), "item_latent": (np.float32, (I, d)),
        "item_quality": (np.float32, (I,)), "item_created": (np.float64, (I,)),
        "user_latent": (np.float32, (U, d)), "user_fields": (np.int64, (U, 4)),
        "follow_indptr": (np.int64, (U + 1,)),
    }
    for name, (dt, shape) in expect.items():
        arr = getattr(world, name)
        assert arr.dtype == dt and arr.shape == shape, name
    assert world.follow_authors.dtype == np.int64
    assert 8 <= C <= 500 and A >= C
    assert world.item_category.min() >= 0 and world.item_category.max() < C
    assert world.item_author.min() >= 0 and world.item_author.max() < A
    assert len(np.unique(world.item_category)) == C  # every category has items
    # fields: codes >= 1 and inside the schema vocab
    vocab = np.array([f.vocab for f in world.schema.user_fields])
    assert (world.user_fields >= 1).all() and (world.user_fields < vocab).all()
    # quality ~ N(0, 0.5)
    assert abs(float(world.item_quality.mean())) < 0.1 and 0.4 < float(world.item_quality.std()) < 0.6
    # creation times straddle the window start
    t0, span = world.config.t0, world.config.days * 86400
    assert world.item_created.min() >= t0 - span and world.item_created.max() <= t0 + span
    assert 0.3 < np.mean(world.item_created > t0) < 0.7
    # follow graph: CSR, sorted unique authors per user, 3..15 per user
    deg = np.diff(world.follow_indptr)
    assert world.follow_indptr[0] == 0 and world.follow_indptr[-1] == len(world.follow_authors)
    assert deg.min() >= 3 and deg.max() <= 15
    fu = np.repeat(np.arange(U), deg)
    key = fu * A + world.follow_authors
    assert (np.diff(key) > 0).all()
    assert world.is_following(fu, world.follow_authors).all()


def test_follow_graph_prefers_preferred_categories(world):
    deg = np.diff(world.follow_indptr)
    fu = np.repeat(np.arange(N_USERS), deg)
    acat = world.author_category[world.follow_authors]
    hit = (acat[:, None] == world.user_pref_categories[fu]) & (world.user_pref_weights[fu] > 0)
    frac = hit.any(axis=1).mean()
    # random authors would land in a preferred category far less often
    rand_cat = world.author_category[np.random.default_rng(0).integers(0, world.n_authors, len(fu))]
    base = ((rand_cat[:, None] == world.user_pref_categories[fu]) & (world.user_pref_weights[fu] > 0)).any(axis=1).mean()
    assert frac > 0.5 and frac > 2 * base


def test_content_is_a_noisy_proxy_of_latent(world):
    # nearest neighbours in content space share the category far more than chance
    x = world.item_content[:300].astype(np.float64)
    y = world.item_content.astype(np.float64)
    sims = x @ y.T / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(y, axis=1)[None, :]
    sims[np.arange(300), np.arange(300)] = -np.inf
    nn = sims.argmax(axis=1)
    same = np.mean(world.item_category[nn] == world.item_category[:300])
    assert same > 0.3


# ----------------------------------------------------------------------------- expected / respond


def test_expected_probabilities_and_reach(world):
    rng = np.random.default_rng(0)
    users = rng.integers(0, N_USERS, 64)
    items = rng.integers(0, N_ITEMS, (64, 30))
    e = world.expected_batch(users, items)
    for k in PROB_KEYS:
        assert e[k].shape == (64, 30) and e[k].dtype == np.float64, k
        assert np.all((e[k] >= 0) & (e[k] <= 1)), k
    assert np.all(e["reach"][:, 0] == 1.0)
    assert np.all(np.diff(e["reach"], axis=1) <= 0)
    np.testing.assert_allclose(e["reach"][:, 1:], np.cumprod(e["continue"][:, :-1], axis=1))
    assert np.all(e["dwell"] > 0)
    for k in ("long_view", "like", "share", "follow"):
        assert np.all(e[k] <= e["click"] + 1e-15), k
    # single-list form agrees with the batch
    one = world.expected(int(users[5]), items[5])
    for k in PROB_KEYS + ("dwell",):
        np.testing.assert_allclose(one[k], e[k][5])
    # degenerate lengths
    assert world.expected(0, np.zeros(0, np.int64))["click"].shape == (0,)
    assert world.expected(0, np.array([1]))["reach"].tolist() == [1.0]
    with pytest.raises(ValueError):
        world.expected(0, np.array([N_ITEMS]))


def test_respond_invariants(world):
    rng = np.random.default_rng(1)
    users = rng.integers(0, N_USERS, 3000)
    items = rng.integers(0, N_ITEMS, (3000, 20))
    r = world.respond_batch(users, items, np.random.default_rng(2))
    for k in ("viewed", "click", "long_view", "like", "share", "follow", "dislike", "continue"):
        assert r[k].dtype == bool and r[k].shape == (3000, 20), k
        if k != "viewed":
            assert not np.any(r[k] & ~r["viewed"]), k
    assert r["viewed"][:, 0].all()
    # viewed stops after the first failed continue
    np.testing.assert_array_equal(r["viewed"][:, 1:], r["viewed"][:, :-1] & r["continue"][:, :-1])
    for k in ("long_view", "like", "share", "follow"):
        assert not np.any(r[k] & ~r["click"]), k
    assert np.all((r["dwell"] > 0) == r["click"])
    np.testing.assert_array_equal(r["long_view"], r["click"] & (r["dwell"] >= 30.0))
    assert r["viewed"].mean() < 0.9 and r["viewed"][:, -1].any()
    # no follow of an already-followed author
    fol = r["follow"]
    assert not world.is_following(np.broadcast_to(users[:, None], items.shape)[fol], world.item_author[items][fol]).any()
    # same generator state -> same outcomes; single form works
    r2 = world.respond_batch(users, items, np.random.default_rng(2))
    for k in r:
        np.testing.assert_array_equal(r[k], r2[k])
    one = world.respond(0, items[0], np.random.default_rng(3))
    assert one["viewed"].shape == (20,) and one["dwell"].dtype == np.float64


@pytest.mark.parametrize("fatigue", [True, False])
def test_respond_one_session_is_respond_batch(world, world_nofat, fatigue):
    """The compiled single-session path (sim/session_kernel.py) draws the same numbers and
    returns the same session as respond_batch, fatigue (repeated authors) and edge lengths included."""
    w = world if fatigue else world_nofat
    rng = np.random.default_rng(11)
    clicks = 0
    for k in range(600):
        n = int(rng.integers(0, 25)) if k % 10 else int(k % 20 == 0)  # empty and one-item lists too
        items = rng.integers(0, N_ITEMS, n)
        if n > 4:
            items[3] = items[1]  # same author and category two positions apart
        user = int(rng.integers(N_USERS))
        seed = int(rng.integers(1 << 30))
        gen = np.random.default_rng(seed)
        one = w.respond(user, items, gen)
        after = gen.random()  # the generator advanced by exactly as much as respond_batch's
        ref_gen = np.random.default_rng(seed)
        ref = {key: v[0] for key, v in w.respond_batch(np.array([user]), items[None, :], ref_gen).items()}
        assert one.keys() == ref.keys()
        for key in ref:
            assert one[key].shape == (n,) and one[key].dtype == ref[key].dtype
            if key == "dwell":
                np.testing.assert_allclose(one[key], ref[key], rtol=1e-12, atol=0)
            else:
                np.testing.assert_array_equal(one[key], ref[key], err_msg=key)
        assert after == ref_gen.random()
        clicks += int(one["click"].sum())
    assert clicks > 20  # the comparison saw sessions with clicks, not only empty ones


def test_respond_matches_expected(world):
    rng = np.random.default_rng(4)
    n_lists, n_rep, n = 4, 20000, 12
    users = rng.integers(0, N_USERS, n_lists)
    items = rng.integers(0, N_ITEMS, (n_lists, n))
    items[:, 3] = items[:, 2]  # a repeat, so fatigue enters
    e = world.expected_batch(users, items)
    r = world.respond_batch(np.repeat(users, n_rep), np.repeat(items, n_rep, axis=0), np.random.default_rng(5))
    for k in ("viewed", "click", "like", "long_view", "dislike", "continue"):
        emp = r[k].reshape(n_lists, n_rep, n).mean(axis=1)
        p = e["reach"] * (1.0 if k == "viewed" else e[k])
        tol = 4.5 * np.sqrt(p * (1 - p) / n_rep) + 1e-3
        assert np.all(np.abs(emp - p) <= tol), (k, np.max(np.abs(emp - p) - tol))
    clicks = r["click"].reshape(n_lists, n_rep, n)
    dwell = r["dwell"].reshape(n_lists, n_rep, n)
    mean_dwell = dwell.sum(axis=1) / np.maximum(clicks.sum(axis=1), 1)
    ok = clicks.sum(axis=1) > 400
    np.testing.assert_allclose(mean_dwell[ok], e["dwell"][ok], rtol=0.2)


def test_position_bias(world_nofat):
    w = world_nofat
    rng = np.random.default_rng(6)
    B = 400
    users = rng.integers(0, N_USERS, B)
    target = rng.integers(0, N_ITEMS, B)
    filler = rng.integers(0, N_ITEMS, (B, 10))
    first = np.concatenate([target[:, None], filler], axis=1)
    last = np.concatenate([filler, target[:, None]], axis=1)
    p0 = w.expected_batch(users, first)["click"][:, 0]
    p10 = w.expected_batch(users, last)["click"][:, 10]
    assert np.all(p10 < p0)
    assert p10.mean() < 0.85 * p0.mean()


def test_preference_signal(world):
    rng = np.random.default_rng(7)
    users = np.arange(N_USERS)
    top = world.user_pref_categories[users, np.argmax(world.user_pref_weights, axis=1)]
    # one item of the user's main category per user (vectorised: random member by sort order)
    order = np.argsort(world.item_category, kind="stable")
    start = np.searchsorted(world.item_category[order], top)
    size = np.bincount(world.item_category, minlength=world.n_categories)[top]
    pref_items = order[start + (rng.random(N_USERS) * size).astype(np.int64)]
    rand_items = rng.integers(0, N_ITEMS, N_USERS)
    p_pref = world.expected_batch(users, pref_items[:, None])["click"][:, 0]
    p_rand = world.expected_batch(users, rand_items[:, None])["click"][:, 0]
    assert p_pref.mean() > 1.5 * p_rand.mean()
    assert np.mean(p_pref > p_rand) > 0.65
    r_pref = world.session_reward_batch(users, pref_items[:, None])
    r_rand = world.session_reward_batch(users, rand_items[:, None])
    assert r_pref.mean() > r_rand.mean()


def test_fatigue_lowers_reward_and_continue(world, world_nofat):
    rng = np.random.default_rng(8)
    n = 8
    counts = np.bincount(world.item_author, minlength=world.n_authors)
    authors = np.flatnonzero(counts >= n)[:20]
    assert len(authors) >= 5
    users = rng.integers(0, N_USERS, len(authors))
    same = np.stack([rng.permutation(np.flatnonzero(world.item_author == a))[:n] for a in authors])
    distinct = np.stack([_distinct_author_category_list(world, n, rng) for _ in authors])
    for u, s, dlist in zip(users, same, distinct):  # a handful of lists, test-only loop
        eT, eF = world.expected(u, s), world_nofat.expected(u, s)
        # like-for-like: the same list, with and without fatigue (positive weights: with a
        # negative dislike weight a lower reach can also *raise* the reward of a bad list)
        assert world.session_reward(u, s, POSITIVE) < 0.9 * world_nofat.session_reward(u, s, POSITIVE)
        assert np.all(eT["continue"][1:] < eF["continue"][1:])
        assert np.all(eT["click"][1:] < eF["click"][1:])
        assert np.all(eT["dislike"][1:] > eF["dislike"][1:])
        np.testing.assert_allclose(eT["continue"][0], eF["continue"][0])
        # distinct authors and categories: fatigue has nothing to act on
        np.testing.assert_allclose(world.session_reward(u, dlist), world_nofat.session_reward(u, dlist))
        dT = world.expected(u, dlist)
        np.testing.assert_allclose(dT["continue"], world_nofat.expected(u, dlist)["continue"])
    # with fatigue a one-author list keeps fewer users than a diverse one; without, no such gap
    reachT_same = world.expected_batch(users, same)["reach"][:, -1].mean()
    reachT_dist = world.expected_batch(users, distinct)["reach"][:, -1].mean()
    reachF_same = world_nofat.expected_batch(users, same)["reach"][:, -1].mean()
    reachF_dist = world_nofat.expected_batch(users, distinct)["reach"][:, -1].mean()
    assert reachT_same < reachT_dist
    assert reachT_same / reachT_dist < 0.8 * (reachF_same / reachF_dist)
    rT = world.session_reward_batch(users, same, POSITIVE) / world.session_reward_batch(users, distinct, POSITIVE)
    rF = world_nofat.session_reward_batch(users, same, POSITIVE) / world_nofat.session_reward_batch(users, distinct, POSITIVE)
    assert np.all(rT < rF)
    # default weights (dislike -5): on average fatigue still costs reward
    gap_T = world.session_reward_batch(users, same) - world.session_reward_batch(users, distinct)
    gap_F = world_nofat.session_reward_batch(users, same) - world_nofat.session_reward_batch(users, distinct)
    assert gap_T.mean() < gap_F.mean()


def test_session_reward_weights(world):
    items = np.arange(10)
    e = world.expected(1, items)
    manual = float(np.sum(e["reach"] * sum(w * e[k] for k, w in DEFAULT_REWARD_WEIGHTS.items())))
    assert world.session_reward(1, items) == pytest.approx(manual)
    assert world.session_reward(1, items, {"click": 1.0}) == pytest.approx(float(np.sum(e["reach"] * e["click"])))
    assert DEFAULT_REWARD_WEIGHTS["dislike"] < 0


# ----------------------------------------------------------------------------- log


def test_generate_log_is_a_valid_dataset(world, log):
    ds = log
    s = world.schema
    assert s.dataset == "synthetic" and s.task_names == list(TASKS)
    assert [t.given for t in s.tasks] == [None, "click", "click", "click", "click", None, None]
    assert [t.negative for t in s.tasks] == [False] * 5 + [True, False]
    assert [(f.name, f.vocab) for f in s.user_fields] == [("age", 9), ("gender", 4), ("region", 13), ("activity", 7)]
    assert [(f.name, f.vocab) for f in s.item_fields] == [("category", world.n_categories + 1), ("author", world.n_authors + 1)]
    assert s.author_field == "author" and s.category_field == "category" and s.history_len == 50 and s.emb_dim == 32
    assert ds.schema == s
    N = len(ds.ev_user)
    assert N > 10 * N_USERS
    assert ds.ev_user.dtype == np.int64 and ds.ev_item.dtype == np.int64 and ds.ev_ts.dtype == np.float64
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (N, len(TASKS))
    assert ds.positive.dtype == bool and ds.test.dtype == bool
    np.testing.assert_array_equal(sort_events(ds.ev_user, ds.ev_ts), np.arange(N))
    # ids, fields, follow, dense features
    assert ds.n_users == N_USERS and ds.n_items == N_ITEMS
    assert ds.user_ids[0] == "u0" and ds.user_ids[-1] == f"u{N_USERS - 1}"
    assert ds.item_ids[7] == "i7" and len(set(ds.item_ids.tolist())) == N_ITEMS
    np.testing.assert_array_equal(ds.item_fields[:, 0], world.item_category + 1)
    np.testing.assert_array_equal(ds.item_fields[:, 1], world.item_author + 1)
    np.testing.assert_array_equal(ds.user_fields, world.user_fields)
    assert ds.item_dense.shape == (N_ITEMS, world.config.content_dim)
    np.testing.assert_array_equal(ds.follow_indptr, world.follow_indptr)
    assert not ds.implicit_negatives
    # label NaN pattern follows `given`
    click = ds.labels[:, 0]
    assert not np.isnan(click).any()
    for j, t in enumerate(s.tasks):
        col = ds.labels[:, j]
        if t.given == "click":
            np.testing.assert_array_equal(np.isnan(col), click == 0)
            assert set(np.unique(col[~np.isnan(col)])) <= {0.0, 1.0}
        else:
            assert not np.isnan(col).any() and set(np.unique(col)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ds.positive, click == 1)
    # time: inside the window, items exist when shown
    t0, span = world.config.t0, world.config.days * 86400
    assert ds.ev_ts.min() >= t0 and ds.ev_ts.max() < t0 + span + 3600
    assert np.all(world.item_created[ds.ev_item] <= ds.ev_ts)
    # split
    assert 0.1 < ds.test.mean() < 0.25
    assert ds.test.any() and (~ds.test).any()
    # every test row of a user comes after all of that user's train rows
    last_train = np.full(N_USERS, -np.inf)
    np.maximum.at(last_train, ds.ev_user[~ds.test], ds.ev_ts[~ds.test])
    assert np.all(ds.ev_ts[ds.test] >= last_train[ds.ev_user[ds.test]])


def test_log_event_rates(log):
    L = log.labels
    rate = {t: float(np.nanmean(L[:, j])) for j, t in enumerate(TASKS)}
    assert 0.05 <= rate["click"] <= 0.15, rate
    assert 0.30 <= rate["long_view"] <= 0.50, rate
    assert 0.20 <= rate["like"] <= 0.35, rate
    assert 0.03 <= rate["share"] <= 0.08, rate
    assert 0.01 <= rate["follow"] <= 0.05, rate
    assert 0.01 <= rate["dislike"] <= 0.04, rate
    assert 0.80 <= rate["continue"] <= 0.95, rate


def test_log_policy_mix(world, log):
    # items shown skew popular but the catalog is broadly covered; few in-list repeats
    shown = np.bincount(log.ev_item, minlength=N_ITEMS)
    assert (shown > 0).mean() > 0.8
    top = np.argsort(-world.item_popularity)[: N_ITEMS // 100]
    assert shown[top].sum() / shown.sum() > 0.05
    # followed authors appear more than their share of the catalog
    fol = world.is_following(log.ev_user, world.item_author[log.ev_item])
    share = np.diff(world.follow_indptr).mean() / world.n_authors
    assert fol.mean() > 3 * share
