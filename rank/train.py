"""Multi-task ranker training (torch, offline only) and ONNX export.

MMoE (Ma et al., KDD 2018: y_k = tower_k(sum_e softmax(W_k x)_e f_e(x))) over
- user / item id embeddings, profile and item field embeddings,
- the recent-item sequence pooled by DIN-style target attention (Zhou et al., KDD 2018: an
  MLP over [q, k, q-k, q*k] gives one weight per behaviour, padding masked; here the
  weights are softmax-normalised over the valid behaviours), or by a plain mean
  (`attention=False`, the ablation),
- the dense match features of `rank.features`.
One expert mixture (gate) and tower per task. Labels that are undefined for a row (NaN, e.g.
like where not clicked) are masked out of that task's loss; each task's loss has a weight (a
one-hot weight trains the single-task ablation on the same network).

The experts' first layers are one matmul side by side, their second layers and the towers
batched matmuls (bmm), so the ONNX graph is a handful of MatMuls whatever the expert count.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.offline_metrics import auc
from rank.features import DENSE_FEATURES
from retrieval.twotower_train import FieldEmbedding, MultiOptimizer, embedding_optimizer, masked_mean, run_epochs


class TargetAttention(nn.Module):
    """DIN activation unit over the history keys k [M, L, d] for the candidates q [N, d]
    (M = N, or M = 1: one user's history shared by every candidate). The first layer over
    [q, k, q-k, q*k] is split by linearity into q(Wq+Wd) + k(Wk-Wd) + (q*k)Wp, so the
    [N, L, 4d] concatenation is never built and the keys' part is computed once per user."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(4 * dim, hidden)
        self.out = nn.Linear(hidden, 1)
        self.blocked = False  # export: the same function as matrix products (forward_blocked)

    def _first_layer(self) -> tuple[torch.Tensor, ...]:
        """fc's weight [H, 4d] split by its input blocks [q, k, q-k, q*k]."""
        d, w = self.dim, self.fc.weight
        return w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            return self.forward_blocked(q, k, mask)
        wq, wk, wd, wp = self._first_layer()
        a = (q @ (wq + wd).T + self.fc.bias).unsqueeze(1) + k @ (wk - wd).T + (q.unsqueeze(1) * k) @ wp.T  # [N, L, H]
        s = self.out(torch.relu(a)).squeeze(-1).masked_fill(~mask, -1e9)  # [N, L]
        p = torch.softmax(s, dim=1) * mask.to(s.dtype)  # a user without history pools to zero
        return (p.unsqueeze(-1) * k).sum(1)

    def forward_blocked(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """forward as the exported graph computes it. The first layer at history slot l is
        [q, 1] @ B_l, B_l = [(Wq+Wd)^T + diag(k_l) Wp^T ; b + k_l (Wk-Wd)^T] ([d+1, H]), so all L
        slots are one product [N, d+1] @ [M, d+1, L*H], and the pooling is p @ k. Serving feeds
        one user (M = 1): onnxruntime then runs two plain matrix products where forward
        broadcasts [N, L, d] and [N, L, H] tensors through five elementwise ops (0.67 -> 0.20 ms
        at 200 candidates x 50 slots). The blocks cost M x (d+1) x L x H floats: feed large
        batches of distinct users in slices."""
        d = self.dim
        wq, wk, wd, wp = self._first_layer()
        m, slots, h = k.shape[0], k.shape[1], wq.shape[0]
        top = (wq + wd).T + k.unsqueeze(-1) * wp.T  # [M, L, d, H]
        bottom = (k @ (wk - wd).T + self.fc.bias).unsqueeze(2)  # [M, L, 1, H]
        blocks = torch.cat([top, bottom], dim=2).permute(0, 2, 1, 3).reshape(m, d + 1, slots * h)
        q1 = torch.cat([q, torch.ones_like(q[:, :1])], dim=1).unsqueeze(1)  # [N, 1, d+1]
        a = torch.relu(torch.matmul(q1, blocks)).reshape(q.shape[0], slots, h)  # [N, L, H]
        s = ((a @ self.out.weight.T).squeeze(-1) + self.out.bias).masked_fill(~mask, -1e9)  # [N, L]
        p = torch.softmax(s, dim=1) * mask.to(s.dtype)
        return torch.matmul(p.unsqueeze(1), k).squeeze(1)


class MultiTaskRanker(nn.Module):
    def __init__(self, n_users, n_items, user_vocabs, item_vocabs, n_tasks, item_fields: np.ndarray | None = None, dim=16,
                 n_experts=4, expert_hidden=(64, 32), tower=16, attention=True, att_hidden=16, hist_grad=False,
                 task_experts=0, item_dense: np.ndarray | None = None):
        super().__init__()
        # task_experts > 0: CGC (PLE's single level): besides the n_experts shared experts each
        # task owns task_experts experts, and a task's gate sees only its own and the shared ones.
        E = n_experts + n_tasks * task_experts
        self.hist_grad, self.n_tasks, self.n_experts = hist_grad, n_tasks, E
        kind = ("cgc" if task_experts else "mmoe") + ("+din" if attention else "+mean")
        self.config = dict(kind=kind, dim=dim, n_experts=n_experts, task_experts=task_experts,
                           expert_hidden=list(expert_hidden), tower=tower, att_hidden=att_hidden if attention else 0,
                           item_content=0 if item_dense is None else int(item_dense.shape[1]))
        # sparse: only a batch's rows are updated (RowAdam), which keeps 1M-item catalogs cheap
        self.user_emb = nn.Embedding(n_users + 1, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=True)
        for e in (self.user_emb, self.item_emb):
            nn.init.normal_(e.weight, std=0.05)
        self.user_fields = FieldEmbedding(user_vocabs, dim)
        self.item_fields = FieldEmbedding(item_vocabs, dim)
        # The history items' field codes (row 0 = padding), so the attention keys carry
        # category and author as the query does, not only the (sparse, tail-noisy) item id.
        codes = None if item_fields is None else np.concatenate([np.zeros((1, item_fields.shape[1]), np.int64), np.asarray(item_fields, np.int64)])
        self.register_buffer("item_codes", None if codes is None else torch.from_numpy(codes), persistent=False)
        # Item content vectors (where the dataset has them): a linear projection added to the id
        # embedding of candidates and history keys alike. Tail items' id rows are barely trained;
        # content places them by what they are, which is what catalog-wide scoring leans on.
        # Folded into the id table at export (`folded`), so the ONNX model holds one table.
        dense = None
        if item_dense is not None and item_dense.shape[1] > 0:
            dense = torch.from_numpy(np.concatenate([np.zeros((1, item_dense.shape[1]), np.float32), np.asarray(item_dense, np.float32)]))
        self.register_buffer("content", dense, persistent=False)
        if dense is not None:
            self.content_proj = nn.Linear(item_dense.shape[1], dim, bias=False)
        self.att = TargetAttention(dim, att_hidden) if attention else None
        n_dense = len(DENSE_FEATURES)
        self.in_dim = 6 * dim + n_dense  # user, profile, item, sequence, item*sequence, |item-sequence|, dense
        (h1, h2), T = expert_hidden, n_tasks
        allow = np.ones((T, E), bool)
        if task_experts:
            allow[:, n_experts:] = np.kron(np.eye(T, dtype=bool), np.ones((1, task_experts), bool))
        self.register_buffer("gate_bias", torch.from_numpy(np.where(allow, 0.0, -1e9).astype(np.float32)), persistent=False)
        # Per-task Platt scaling of the logits (identity while training; `calibrate` fits it on
        # the validation slice): catalog negatives and loss weights shift the raw heads, while
        # fusion multiplies probabilities, so each head should mean what its rate is.
        self.register_buffer("calib_scale", torch.ones(T))
        self.register_buffer("calib_shift", torch.zeros(T))
        self.h1 = h1
        self.dense_norm = nn.LayerNorm(n_dense)
        self.w1 = nn.Parameter(torch.empty(self.in_dim, E * h1))  # experts' first layers side by side
        self.b1 = nn.Parameter(torch.zeros(E * h1))
        self.w2 = nn.Parameter(torch.empty(E, h1, h2))
        self.b2 = nn.Parameter(torch.zeros(E, 1, h2))
        self.gate = nn.Linear(self.in_dim, T * E)
        self.t1 = nn.Parameter(torch.empty(T, h2, tower))
        self.tb1 = nn.Parameter(torch.zeros(T, 1, tower))
        self.t2 = nn.Parameter(torch.empty(T, tower, 1))
        self.tb2 = nn.Parameter(torch.zeros(T, 1, 1))
        for e in range(E):  # each expert initialised as its own nn.Linear would be
            nn.init.kaiming_uniform_(self.w1.data[:, e * h1 : (e + 1) * h1].T, a=5 ** 0.5)
        for p in (self.w2, self.t1, self.t2):
            for k in range(p.shape[0]):
                nn.init.kaiming_uniform_(p.data[k].T, a=5 ** 0.5)

    def item_vectors(self, ids: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """Id embedding (+ content projection) of item ids (0 = padding)."""
        e = self.item_emb(ids) if grad else F.embedding(ids, self.item_emb.weight.detach(), padding_idx=0)
        if self.content is not None:
            e = e + self.content_proj(self.content[ids])
        return e

    @torch.no_grad()
    def folded(self) -> "MultiTaskRanker":
        """A copy for export whose id table already holds id embedding + content projection
        and whose attention runs as matrix products (TargetAttention.forward_blocked)."""
        m = copy.deepcopy(self)
        if m.content is not None:
            table = m.item_vectors(torch.arange(m.item_emb.num_embeddings), grad=False)
            table[0] = 0.0
            m.item_emb.weight.copy_(table)
            m.content = None
        if m.att is not None:
            m.att.blocked = True
        return m

    def item_keys(self, ids: torch.Tensor, grad: bool) -> torch.Tensor:
        """Key vectors of item ids [U] (0 = padding): id embedding (+ its fields' embeddings)."""
        k = self.item_vectors(ids, grad)
        if self.item_codes is not None:
            k = k + self.item_fields(self.item_codes[ids])
        return k

    def history_keys(self, hist: torch.Tensor) -> torch.Tensor:
        if self.training:
            # A batch's histories repeat items: embed each distinct item once and gather, so
            # the lookups and the sparse gradient cover distinct items, not batch × length
            # rows (ml-100k: 56 -> ~20 ms per step).
            uniq, inv = torch.unique(hist, return_inverse=True)
            return self.item_keys(uniq, self.hist_grad)[inv]
        return self.item_keys(hist.reshape(-1), False).reshape(*hist.shape, -1)

    def features(self, user_idx, user_fields, hist, item_idx, item_fields, dense) -> torch.Tensor:
        # User-side inputs have one row per item row (training, evaluation) or a single row
        # shared by all items (serving one user): the user side is embedded and the history's
        # keys computed once, then broadcast against the candidates.
        n = item_idx.shape[0]
        q = self.item_vectors(item_idx) + self.item_fields(item_fields)
        k = self.history_keys(hist)  # [M, L, d]
        s = self.att(q, k, hist > 0) if self.att is not None else masked_mean(k, hist).expand(n, -1)
        u = self.user_emb(user_idx).expand(n, -1)
        uf = self.user_fields(user_fields).expand(n, -1)
        return torch.cat([u, uf, q, s, q * s, (q - s).abs(), self.dense_norm(dense)], dim=1)

    def logits(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        x = self.features(user_idx, user_fields, hist, item_idx, item_fields, dense)
        E, T = self.n_experts, self.n_tasks
        h = torch.relu(x @ self.w1 + self.b1).reshape(-1, E, self.h1).transpose(0, 1)  # [E, N, h1]
        f = torch.relu(torch.bmm(h, self.w2) + self.b2)  # [E, N, h2]
        g = torch.softmax(self.gate(x).reshape(-1, T, E) + self.gate_bias, dim=-1)  # [N, T, E]: one gate per task
        mix = torch.bmm(g, f.transpose(0, 1))  # [N, T, h2]
        t = torch.relu(torch.bmm(mix.transpose(0, 1), self.t1) + self.tb1)  # [T, N, tower]
        z = (torch.bmm(t, self.t2) + self.tb2).squeeze(-1).transpose(0, 1)  # [N, T]
        return z * self.calib_scale + self.calib_shift

    def forward(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        return torch.sigmoid(self.logits(user_idx, user_fields, hist, item_idx, item_fields, dense))


INPUT_NAMES = ["user_idx", "user_fields", "hist", "item_idx", "item_fields", "dense"]
USER_INPUTS = ("user_idx", "user_fields", "hist")  # batch 1 (one user, broadcast) or one row per item


def id_table_optimizer(model: nn.Module, lr: float, weight_decay: float):
    """Adam on the dense weights, the row-wise optimizer on the sparse id tables
    (`model.user_emb`, `model.item_emb`): a step touches only a batch's rows."""
    sparse = [model.user_emb.weight, model.item_emb.weight]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    return MultiOptimizer(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay), embedding_optimizer(sparse, lr))


def training_tensors(feeds: dict[str, np.ndarray], labels: np.ndarray):
    """(input tensors in INPUT_NAMES order, labels with NaN as 0, label mask) for training."""
    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in INPUT_NAMES]
    y = torch.from_numpy(np.nan_to_num(labels, nan=0.0).astype(np.float32))
    m = torch.from_numpy((~np.isnan(labels)).astype(np.float32))
    return tensors, y, m


def masked_bce(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-task mean BCE over the rows where the task's label is defined (m), then the
    task-weighted sum."""
    per = F.binary_cross_entropy_with_logits(z, y, reduction="none") * m
    return ((per.sum(0) / m.sum(0).clamp(min=1.0)) * w).sum()


@dataclass
class RankerResult:
    model: MultiTaskRanker
    train_loss: float
    best_epoch: int = 0  # the epoch whose weights were kept (early stopping)
    val_auc: list[float] | None = None  # validation AUC of the selecting task (click) per epoch
    calibration: dict[int, list[float]] | None = None  # task index -> Platt (scale, shift) fitted on the validation slice


def train_ranker(
    feeds: dict[str, np.ndarray],
    labels: np.ndarray,  # float32 [N, T], NaN = undefined
    *,
    n_users: int,
    n_items: int,
    user_vocabs: list[int],
    item_vocabs: list[int],
    task_weights: np.ndarray | None = None,
    epochs: int = 4,
    batch_size: int = 0,  # 0: scale to the data, ~300 steps per epoch within [256, 2048]
    lr: float = 2e-3,
    weight_decay: float = 1e-6,
    seed: int = 0,
    hist_grad: bool = False,
    item_fields: np.ndarray | None = None,
    item_dense: np.ndarray | None = None,  # float32 [I, Dc] item content vectors, if the dataset has them
    attention: bool = True,
    extra_rows=None,
    extra_per_row: int = 0,
    val_frac: float = 0.05,
    patience: int = 1,
    select_task: int = 0,
    calibrate_heads: bool = True,
    progress=None,
    **arch,
) -> RankerResult:
    """`extra_rows(idx)`, if given, returns (feeds, labels) of `extra_per_row` more rows per
    row in `idx` (e.g. sampled negatives), drawn afresh for each batch and trained with it:
    no [N × extra, history] arrays in memory. The default batch size then counts them.
    `select_task`: the task whose validation AUC picks the epoch kept (click; a single-task
    ablation model is picked by its own task)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, t = labels.shape
    per_row = 1 + (extra_per_row if extra_rows is not None else 0)
    batch_size = batch_size or max(1, int(np.clip(n * per_row // 300, 256, 2048)) // per_row)
    model = MultiTaskRanker(n_users, n_items, user_vocabs, item_vocabs, t, item_fields, hist_grad=hist_grad, attention=attention,
                            item_dense=item_dense, **arch)
    opt = id_table_optimizer(model, lr, weight_decay)
    tensors, y, m = training_tensors(feeds, labels)
    mask = ~np.isnan(labels)
    w = torch.from_numpy(np.ones(t, np.float32) if task_weights is None else np.asarray(task_weights, np.float32))

    def batch_loss(b):
        xs, yb, mb = [x[b] for x in tensors], y[b], m[b]
        if extra_rows is not None:
            f, lab = extra_rows(b.numpy())
            xs = [torch.cat([x, torch.from_numpy(np.ascontiguousarray(f[k]))]) for x, k in zip(xs, INPUT_NAMES)]
            yb = torch.cat([yb, torch.from_numpy(np.nan_to_num(lab, nan=0.0).astype(np.float32))])
            mb = torch.cat([mb, torch.from_numpy((~np.isnan(lab)).astype(np.float32))])
        return masked_bce(model.logits(*xs), yb, mb, w)

    # Early stopping on a validation slice of the training rows (never the evaluation split),
    # by the first task's (click) AUC, the order the funnel ranks by: on logged impressions the
    # ranker overfits its id embeddings within a few epochs (100k world: held-out click AUC
    # 0.713 after 1 epoch, 0.703 after 3, 0.696 after 5, and its exhaustive top-20 drifts into
    # the tail), so the weights of the best validation epoch are kept. (Validation log-loss
    # stopped ml-100k at epoch 4 of 6 and cost 0.027 of pipeline recall@20: AUC is the target.)
    order = rng.permutation(n)
    n_val = int(n * val_frac) if n * val_frac >= 1000 else 0
    val, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    # The validation rows where the selecting task is labelled, sliced once: feeds and labels.
    val_rows = val[mask[val, select_task]]
    val_feeds = {k: feeds[k][val_rows] for k in INPUT_NAMES}
    val_labels = labels[val_rows, select_task]
    best = {"auc": -1.0, "epoch": 0, "state": None}
    history: list[float] = []

    def after_epoch(ep: int) -> bool:
        if len(val_rows) == 0:
            return False
        model.eval()
        score = auc(val_labels, predict(model, val_feeds)[:, select_task])
        model.train()
        history.append(round(score, 5))
        if score > best["auc"]:
            best.update(auc=score, epoch=ep, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            return False
        return ep - best["epoch"] >= patience

    model.train()
    last = run_epochs(opt, len(train_rows), batch_size, epochs, rng, batch_loss, progress, rows=train_rows, after_epoch=after_epoch)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    # Calibrated on the validation slice: logged rows like the held-out ones, no catalog
    # negatives (which teach the ranking of unlogged items and pull every head down).
    calib = calibrate(model, {k: feeds[k][val] for k in INPUT_NAMES}, labels[val]) if calibrate_heads and n_val else {}
    return RankerResult(model, last, best_epoch=best["epoch"] or epochs, val_auc=history, calibration=calib)


def fit_platt(z: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) minimising the log-loss of sigmoid(a·z + b) against labels y: logistic
    regression on one feature by Newton's method (a tiny ridge keeps the 2×2 step defined)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    w = np.array([1.0, 0.0])
    X = np.stack([z, np.ones_like(z)], 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -500.0, 500.0)))  # same p, without exp overflowing on separable data
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-6 * np.eye(2)
        step = np.linalg.solve(H, X.T @ (p - y))
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


@torch.no_grad()
def calibrate(model: MultiTaskRanker, feeds: dict[str, np.ndarray], labels: np.ndarray, min_rows: int = 200) -> dict[int, list[float]]:
    """Fits each head's Platt scaling on rows the model did not train on (`labels` NaN where
    a task is undefined) and stores it in the model, so the export carries it. Heads with
    fewer than `min_rows` labelled rows, or one class only, stay uncalibrated."""
    model.calib_scale.fill_(1.0)
    model.calib_shift.fill_(0.0)
    z = _batched(model.logits, feeds, model.n_tasks)
    fitted = {}
    for k in range(labels.shape[1]):
        m = ~np.isnan(labels[:, k])
        yk = labels[m, k]
        if m.sum() < min_rows or yk.min() == yk.max():
            continue
        a, b = fit_platt(z[m, k], yk)
        if a <= 0:  # a head that anti-ranks on these rows: keep its order rather than flip it
            continue
        model.calib_scale[k], model.calib_shift[k] = a, b
        fitted[k] = [round(a, 4), round(b, 4)]
    return fitted


def _batched(fn, feeds: dict[str, np.ndarray], n_tasks: int, batch: int = 16384) -> np.ndarray:
    """fn (the model, or its logits) over the ranker feeds in row batches, concatenated [N, n_tasks]."""
    n = len(feeds["item_idx"])
    with torch.no_grad():
        out = [fn(*(torch.from_numpy(np.ascontiguousarray(feeds[k][s : s + batch])) for k in INPUT_NAMES)).numpy() for s in range(0, n, batch)]
    return np.concatenate(out) if out else np.zeros((0, n_tasks), np.float32)


def predict(model: MultiTaskRanker, feeds: dict[str, np.ndarray], batch: int = 16384) -> np.ndarray:
    return _batched(model, feeds, model.n_tasks, batch)


def export_ranking_onnx(model: nn.Module, n_tasks: int, n_user_fields: int, n_item_fields: int, history_len: int, path: Path,
                        user_batch: int, item_batch: int) -> dict:
    """Export a model with the ranker's inputs (INPUT_NAMES) and a `probs` output to ONNX, the
    user inputs on their own dynamic axis (batch 1 when serving one user, broadcast in the
    graph); the example shapes are the traced ones. Returns the manifest signature."""
    model.eval()
    example = (
        torch.zeros(user_batch, dtype=torch.int64),
        torch.zeros(user_batch, n_user_fields, dtype=torch.int64),
        torch.zeros(user_batch, history_len, dtype=torch.int64),
        torch.ones(item_batch, dtype=torch.int64),
        torch.zeros(item_batch, n_item_fields, dtype=torch.int64),
        torch.zeros(item_batch, len(DENSE_FEATURES), dtype=torch.float32),
    )
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=INPUT_NAMES,
        output_names=["probs"],
        # the history's length is dynamic too: serving feeds only the user's actual history
        # (padding is masked out of the pooling, so a trimmed history scores the same)
        dynamic_axes={k: {0: "user_batch" if k in USER_INPUTS else "batch", **({1: "history"} if k == "hist" else {})}
                      for k in INPUT_NAMES + ["probs"]},
        opset_version=17,
        dynamo=False,
    )
    return {
        "inputs": {
            "user_idx": [None],
            "user_fields": [None, n_user_fields],
            "hist": [None, None],  # at most history_len
            "item_idx": [None],
            "item_fields": [None, n_item_fields],
            "dense": [None, len(DENSE_FEATURES)],
        },
        "outputs": {"probs": [None, n_tasks]},
        "user_broadcast": True,  # user inputs may have batch 1 (rank/ranker.py, prerank/cascade.py feed them so)
        "history_trim": True,  # hist may be shorter than history_len (serving feeds the user's actual history)
    }


def export_ranker(model: MultiTaskRanker, n_user_fields: int, n_item_fields: int, history_len: int, path: Path) -> dict:
    sig = export_ranking_onnx(model.folded(), model.n_tasks, n_user_fields, n_item_fields, history_len, path, user_batch=2, item_batch=2)
    return {**sig, "architecture": model.config}
