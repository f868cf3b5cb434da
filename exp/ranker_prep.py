"""Cache for the ranker experiments on the 100k synthetic bundle (run once).

- /tmp/exp-ranker/data.npz: the ranker's training / held-out rows exactly as app/build.py
  builds them for the synthetic world (no implicit negatives), plus what the negative-
  sampling variants need (log pairs, popularity, item content vectors).
- /tmp/exp-ranker/users.npz: for N held-out users, the serving context (user idx, fields,
  padded history, blocked items), the serving merged recall (800) and the merged-1000 set,
  and the world's TRUE click probability of every item (position 0, no fatigue).
"""
import sys
import time
from pathlib import Path

import numpy as np

from app.build import _table, cap_rows, history_ids, load_dataset, ranker_rows
from app.evaluate import _eval_settings
from app.pipeline import Pipeline
from core.bundle import Bundle
from core.candidates import Candidates
from core.settings import Settings
from rank.features import pad_history
from retrieval.popular import build_popular

BP = "/work/main/bundles/syn-100k"
OUT = Path("/tmp/exp-ranker")
OUT.mkdir(exist_ok=True)
N_USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 60

t0 = time.time()
b = Bundle.load(BP, threads=1)
ds = load_dataset(b.manifest["source"])
print("dataset", round(time.time() - t0, 1), "s", ds.n_users, ds.n_items, len(ds.ev_user), flush=True)
seed = 0
train = ~ds.test
train_pos = train & ds.positive
rng = np.random.default_rng(seed)
rk_rows = cap_rows(np.flatnonzero(train), 3_000_000, rng)
ev_rows = cap_rows(np.flatnonzero(ds.test), 500_000, np.random.default_rng(seed + 1))
pop = build_popular(ds.ev_item[train_pos], ds.ev_ts[train_pos], ds.n_items)
item_pop = np.log1p(pop).astype(np.float32)
assert np.allclose(item_pop, b.item_pop), "item_pop differs from the bundle"
tr_u, tr_i, tr_h, tr_y = ranker_rows(ds, rk_rows, history_ids(ds, rk_rows), rng, 2, None)
te_u, te_i, te_h, te_y = ranker_rows(ds, ev_rows, history_ids(ds, ev_rows), np.random.default_rng(seed + 1), 2, None)
print("rows", len(tr_u), len(te_u), round(time.time() - t0, 1), flush=True)
np.savez(
    OUT / "data.npz",
    tr_u=tr_u, tr_i=tr_i, tr_h=tr_h.astype(np.int32), tr_y=tr_y,
    te_u=te_u, te_i=te_i, te_h=te_h.astype(np.int32), te_y=te_y,
    user_fields=ds.user_fields, item_fields=ds.item_fields, item_pop=item_pop, pop=pop,
    item_dense=ds.item_dense if ds.item_dense is not None else np.zeros((ds.n_items, 0), np.float32),
    log_pairs=np.unique(ds.ev_user * ds.n_items + ds.ev_item),
    category_col=np.array([f.name for f in ds.schema.item_fields].index(ds.schema.category_field)),
    user_vocabs=np.array([f.vocab for f in ds.schema.user_fields]), item_vocabs=np.array([f.vocab for f in ds.schema.item_fields]),
    n_users=np.array(ds.n_users), n_items=np.array(ds.n_items),
)
print("saved data", round(time.time() - t0, 1), flush=True)

# ---- users: serving context, merged recall sets, world truth
from sim.synthetic import SyntheticWorld, WorldConfig

world = SyntheticWorld(WorldConfig(**b.manifest["source"]["world"]))
s = Settings()
serving = Pipeline(b, s)
_, merge_s = _eval_settings(s, 1000)
merging = Pipeline(b, merge_s)
urng = np.random.default_rng(0)
test_pos = ds.test & ds.positive
users = urng.choice(np.unique(ds.ev_user[test_pos]), N_USERS, replace=False)
out = {"users": users, "uidx": [], "ufields": [], "hist": [], "blocked_mask": [], "m800": [], "m1000": [], "pclick": [], "plong": []}
for u in users:
    ctx = serving.context(request_id="x", user_id=str(b.user_ids[u]), count=20, scene="eval", exclude_item_ids=[], events=[], seed=int(u))
    serving.stages[0](ctx, Candidates.empty())
    m = serving.stages[1](ctx, Candidates.empty())
    m1 = merging.stages[1](ctx, Candidates.empty())
    mask = np.zeros(b.n_items, bool)
    mask[ctx.blocked()] = True
    out["uidx"].append(ctx.user_idx)
    out["ufields"].append(ctx.user_fields)
    out["hist"].append(pad_history(ctx.history, b.schema.history_len))
    out["blocked_mask"].append(mask)
    m8 = np.zeros(b.n_items, bool); m8[m.item] = True
    m10 = np.zeros(b.n_items, bool); m10[m1.item] = True
    out["m800"].append(m8)
    out["m1000"].append(m10)
    e = world.expected_batch(np.full(b.n_items, u, np.int64), np.arange(b.n_items)[:, None])
    out["pclick"].append(e["click"][:, 0].astype(np.float32))
    out["plong"].append(e["long_view"][:, 0].astype(np.float32))
np.savez(OUT / "users.npz", **{k: np.asarray(v) for k, v in out.items()})
print("saved users", round(time.time() - t0, 1), flush=True)
