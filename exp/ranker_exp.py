"""One ranker variant on the cached 100k synthetic data (see ranker_prep.py).

usage: ranker_exp.py name [key=value ...]
  opt=sparseadam|adagrad|sgd   sparse id-embedding optimizer (baseline: SparseAdam, as the build at 100k)
  emb_lr=<float>               its learning rate (default: the ranker lr, 2e-3)
  init_std=<float>             id embedding init (baseline 0.05)
  emb_l2=<float>               L2 penalty on the id rows a batch touches (per occurrence)
  n_neg=<int> neg=pop75|uniform  catalog-sampled negatives per positive... per logged row (click=0, others NaN)
  neg_per=row|pos              negatives per logged row or per positive (click) row
  content=1                    item content vectors (projected) added to the item id embedding
  epochs=<int>                 default: epoch_budget(6, rows, 9M) as the build
Trains the ranker exactly as rank/train.py otherwise; prints and appends a JSON line to
/tmp/exp-ranker/results.jsonl.
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from app.build import epoch_budget, head_metrics  # noqa: E402
from core.schema import Schema  # noqa: E402
from rank.features import ItemTable, ranker_inputs  # noqa: E402
from core.offline_metrics import auc, logloss  # noqa: E402
from rank.train import INPUT_NAMES, MultiTaskRanker  # noqa: E402
from retrieval.twotower_train import MultiOptimizer, run_epochs  # noqa: E402

name = sys.argv[1]
cfg = dict(a.split("=", 1) for a in sys.argv[2:])
opt_name = cfg.get("opt", "sparseadam")
lr = 2e-3
emb_lr = float(cfg.get("emb_lr", lr))
init_std = float(cfg.get("init_std", 0.05))
emb_l2 = float(cfg.get("emb_l2", 0.0))
n_neg = int(cfg.get("n_neg", 0))
neg_kind = cfg.get("neg", "pop75")
neg_per = cfg.get("neg_per", "row")
content = cfg.get("content", "0") == "1"
seed = int(cfg.get("seed", 0))

t0 = time.time()
D = np.load("/tmp/exp-ranker/data.npz")
n_users, n_items = int(D["n_users"]), int(D["n_items"])
user_fields, item_fields = D["user_fields"], D["item_fields"]
table = ItemTable(item_fields, D["item_pop"], int(D["category_col"]))
tr_u, tr_i, tr_h, tr_y = D["tr_u"], D["tr_i"], D["tr_h"].astype(np.int64), D["tr_y"]
te_u, te_i, te_h, te_y = D["te_u"], D["te_i"], D["te_h"].astype(np.int64), D["te_y"]
rng = np.random.default_rng(seed)
if n_neg:
    pop = D["pop"].astype(np.float64)
    p = (pop + 1.0) ** 0.75 if neg_kind == "pop75" else np.ones(n_items)
    p /= p.sum()
    base = np.arange(len(tr_u)) if neg_per == "row" else np.flatnonzero(tr_y[:, 0] == 1)
    src = np.repeat(base, n_neg)
    nu = tr_u[src]
    ni = rng.choice(n_items, size=len(src), p=p)
    ok = ~np.isin(nu * n_items + ni, D["log_pairs"])
    nl = np.full((len(src), tr_y.shape[1]), np.nan, np.float32)
    nl[:, 0] = 0.0
    tr_u = np.concatenate([tr_u, nu[ok]])
    tr_i = np.concatenate([tr_i, ni[ok]])
    tr_h = np.concatenate([tr_h, tr_h[src[ok]]])
    tr_y = np.concatenate([tr_y, nl[ok]])
feeds = ranker_inputs(table, tr_u, user_fields[tr_u], tr_h, tr_i)
n, t = tr_y.shape
epochs = int(cfg.get("epochs", epoch_budget(6, n, 9_000_000)))
print(name, cfg, "rows", n, "epochs", epochs, "prep", round(time.time() - t0, 1), flush=True)


class ContentRanker(MultiTaskRanker):
    """Item input = id embedding + linear projection of the item's content vector."""

    def __init__(self, *a, item_dense=None, **kw):
        super().__init__(*a, **kw)
        dense = np.concatenate([np.zeros((1, item_dense.shape[1]), np.float32), item_dense.astype(np.float32)])
        self.register_buffer("cvec", torch.from_numpy(dense), persistent=False)
        self.content = nn.Linear(item_dense.shape[1], self.item_emb.embedding_dim, bias=False)

    def logits(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        from retrieval.twotower_train import masked_mean

        u = self.user_emb(user_idx)
        i = self.item_emb(item_idx) + self.content(self.cvec[item_idx])
        if self.hist_grad and self.training:
            he = self.item_emb(hist)
        else:
            he = F.embedding(hist, self.item_emb.weight.detach(), padding_idx=0)
        h = masked_mean(he + self.content(self.cvec[hist]), hist)
        x = torch.cat([u, self.user_fields(user_fields), i, self.item_fields(item_fields), h, i * h, dense], dim=1)
        return self.heads(self.bottom(x))


torch.manual_seed(seed)
uv, iv = D["user_vocabs"].tolist(), D["item_vocabs"].tolist()
if content:
    model = ContentRanker(n_users, n_items, uv, iv, t, hist_grad=True, item_dense=D["item_dense"])
else:
    model = MultiTaskRanker(n_users, n_items, uv, iv, t, hist_grad=True)
if init_std != 0.05:
    for e in (model.user_emb, model.item_emb):
        nn.init.normal_(e.weight, std=init_std)
        if e.padding_idx is not None:
            with torch.no_grad():
                e.weight[e.padding_idx] = 0
sparse = [model.user_emb.weight, model.item_emb.weight]
dense_p = [p for p in model.parameters() if all(p is not q for q in sparse)]
if opt_name == "sparseadam":
    eopt = torch.optim.SparseAdam(sparse, lr=emb_lr)
elif opt_name == "adagrad":
    eopt = torch.optim.Adagrad(sparse, lr=emb_lr)
elif opt_name == "sgd":
    eopt = torch.optim.SGD(sparse, lr=emb_lr)
else:
    raise ValueError(opt_name)
opt = MultiOptimizer(torch.optim.Adam(dense_p, lr=lr, weight_decay=1e-6), eopt)
tensors = [torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in INPUT_NAMES]
mask = ~np.isnan(tr_y)
y = torch.from_numpy(np.nan_to_num(tr_y, nan=0.0).astype(np.float32))
m = torch.from_numpy(mask.astype(np.float32))
batch_size = int(np.clip(n // 300, 256, 2048))


def batch_loss(b):
    x = [v[b] for v in tensors]
    z = model.logits(*x)
    per = F.binary_cross_entropy_with_logits(z, y[b], reduction="none") * m[b]
    loss = (per.sum(0) / m[b].sum(0).clamp(min=1.0)).sum()
    if emb_l2:
        # per occurrence in the batch: frequent rows are pulled back in proportion to their use
        loss = loss + emb_l2 * (model.user_emb(x[0]).pow(2).sum(1).mean() + model.item_emb(x[3]).pow(2).sum(1).mean())
    return loss


def predict(f, batch=16384):
    out = []
    with torch.no_grad():
        for s in range(0, len(f["item_idx"]), batch):
            out.append(model(*(torch.from_numpy(np.ascontiguousarray(f[k][s : s + batch])) for k in INPUT_NAMES)).numpy())
    return np.concatenate(out)


def evaluate(epochs, last, train_s):
    model.eval()
    probs = predict(ranker_inputs(table, te_u, user_fields[te_u], te_h, te_i))
    task_names = ["click", "long_view", "like", "share", "follow", "dislike", "continue"]

    held = {}
    for k, tn in enumerate(task_names):
        mk = ~np.isnan(te_y[:, k])
        held[tn] = (round(auc(te_y[mk, k], probs[mk, k]), 4), round(logloss(te_y[mk, k], probs[mk, k]), 4))

    U = np.load("/tmp/exp-ranker/users.npz")
    res = {k: [] for k in ["top_pclick", "agree800", "agree1000", "m800_top_pclick", "top_poprank", "true_in_m800", "top_plong", "mean_pred_top"]}
    pop_rank = np.empty(n_items, np.int64)
    pop_rank[np.argsort(-D["item_pop"], kind="stable")] = np.arange(n_items)
    for j in range(len(U["users"])):
        cand = np.flatnonzero(~U["blocked_mask"][j])
        nc = len(cand)
        f = ranker_inputs(table, np.full(nc, U["uidx"][j], np.int64), np.broadcast_to(U["ufields"][j], (nc, len(U["ufields"][j]))),
                          np.broadcast_to(U["hist"][j], (nc, U["hist"].shape[1])), cand)
        pr = predict(f, 65536)
        sc = pr[:, 0]
        top = cand[np.argsort(-sc)[:20]]
        pc = U["pclick"][j]
        res["top_pclick"].append(pc[top].mean())
        res["top_plong"].append(U["plong"][j][top].mean())
        res["agree800"].append(U["m800"][j][top].mean())
        res["agree1000"].append(U["m1000"][j][top].mean())
        res["top_poprank"].append(np.median(pop_rank[top]))
        res["mean_pred_top"].append(np.sort(sc)[-20:].mean())
        inm = U["m800"][j][cand]
        mc, ms = cand[inm], sc[inm]
        res["m800_top_pclick"].append(pc[mc[np.argsort(-ms)[:20]]].mean())
        true_top = cand[np.argsort(-pc[cand])[:20]]
        res["true_in_m800"].append(U["m800"][j][true_top].mean())
    summary = {
        "name": name, "cfg": cfg, "epochs": epochs, "rows": n, "train_s": round(train_s), "loss": round(last, 4),
        "click_auc": held["click"][0], "click_ll": held["click"][1], "long_auc": held["long_view"][0],
        "dislike_auc": held["dislike"][0], "continue_auc": held["continue"][0],
        **{k: round(float(np.mean(v)), 4) for k, v in res.items()},
        "mean_pred_click_test": round(float(probs[:, 0].mean()), 4),
    }
    print(json.dumps(summary), flush=True)
    with open("/tmp/exp-ranker/results.jsonl", "a") as fh:
        fh.write(json.dumps(summary) + "\n")
    model.train()


if cfg.get("impl", "0") == "1":
    # the committed code path: rank.train.train_ranker + app.build.catalog_negatives
    from app.build import catalog_negatives
    from rank.train import train_ranker

    k_neg = int(cfg.get("cat_neg", 2))
    extra = catalog_negatives(table, user_fields, tr_u, tr_h, n_items, k_neg, t, np.random.default_rng(seed + 2)) if k_neg else None
    epochs = int(cfg.get("epochs", epoch_budget(6, n * (1 + k_neg), 9_000_000)))
    t1 = time.time()
    rk = train_ranker(feeds, tr_y, n_users=n_users, n_items=n_items, user_vocabs=uv, item_vocabs=iv, epochs=epochs, seed=seed,
                      hist_grad=True, extra_rows=extra, extra_per_row=k_neg)
    model = rk.model
    evaluate(epochs, rk.train_loss, time.time() - t1)
    sys.exit(0)
eval_every = int(cfg.get("eval_every", 0))
model.train()
t1 = time.time()


def prog(e, k, l):
    print(f"  epoch {e}/{k} loss {l:.4f} {time.time() - t1:.0f}s", flush=True)
    if eval_every and e % eval_every == 0 and e < k:
        evaluate(e, l, time.time() - t1)


last = run_epochs(opt, n, batch_size, epochs, rng, batch_loss, prog)
train_s = time.time() - t1
evaluate(epochs, last, train_s)
