"""Multi-task ranker training (torch, offline only) and ONNX export.

First version: shared-bottom network over user/item ids, profile and item fields, the
mean-pooled recent-item sequence and the dense match features, one sigmoid head per task.
Labels that are undefined for a row (NaN, e.g. like where not clicked) are masked out of
that task's loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.offline_metrics import auc
from rank.features import DENSE_FEATURES
from retrieval.twotower_train import FieldEmbedding, MultiOptimizer, embedding_optimizer, pooled_history, run_epochs


class MultiTaskRanker(nn.Module):
    def __init__(self, n_users, n_items, user_vocabs, item_vocabs, n_tasks, dim=16, hidden=(128, 64), hist_grad=False):
        super().__init__()
        self.hist_grad = hist_grad
        # sparse: only a batch's rows are updated (RowAdam), which keeps 1M-item catalogs cheap
        self.user_emb = nn.Embedding(n_users + 1, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=True)
        for e in (self.user_emb, self.item_emb):
            nn.init.normal_(e.weight, std=0.05)
        self.user_fields = FieldEmbedding(user_vocabs, dim)
        self.item_fields = FieldEmbedding(item_vocabs, dim)
        n_dense = len(DENSE_FEATURES)
        in_dim = 5 * dim + dim + n_dense  # ids, fields, pooled history, item⊙history, dense
        layers, d = [], in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.bottom = nn.Sequential(*layers)
        self.heads = nn.Linear(d, n_tasks)

    def logits(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        # User-side inputs have one row per item row (training, evaluation) or a single row
        # shared by all items (serving one user): the user side is embedded and the history
        # pooled once, then broadcast, instead of gathering candidates × history rows.
        n = item_idx.shape[0]
        i = self.item_emb(item_idx)
        u = self.user_emb(user_idx).expand(n, -1)
        uf = self.user_fields(user_fields).expand(n, -1)
        h = pooled_history(self.item_emb, hist, self.hist_grad and self.training).expand(n, -1)
        x = torch.cat([u, uf, i, self.item_fields(item_fields), h, i * h, dense], dim=1)
        return self.heads(self.bottom(x))

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
    val_auc: list[float] | None = None  # validation click AUC per epoch


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
    extra_rows=None,
    extra_per_row: int = 0,
    val_frac: float = 0.05,
    patience: int = 1,
    progress=None,
) -> RankerResult:
    """`extra_rows(idx)`, if given, returns (feeds, labels) of `extra_per_row` more rows per
    row in `idx` (e.g. sampled negatives), drawn afresh for each batch and trained with it:
    no [N × extra, history] arrays in memory. The default batch size then counts them."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, t = labels.shape
    per_row = 1 + (extra_per_row if extra_rows is not None else 0)
    batch_size = batch_size or max(1, int(np.clip(n * per_row // 300, 256, 2048)) // per_row)
    model = MultiTaskRanker(n_users, n_items, user_vocabs, item_vocabs, t, hist_grad=hist_grad)
    opt = id_table_optimizer(model, lr, weight_decay)
    tensors, y, m = training_tensors(feeds, labels)
    mask = ~np.isnan(labels)
    w = torch.from_numpy(np.ones(t, np.float32) if task_weights is None else task_weights.astype(np.float32))
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
    # The validation rows where click is labelled, sliced once: their feeds and click labels.
    val_rows = val[mask[val, 0]]
    val_feeds = {k: feeds[k][val_rows] for k in INPUT_NAMES}
    val_clicks = labels[val_rows, 0]
    best = {"auc": -1.0, "epoch": 0, "state": None}
    history: list[float] = []

    def after_epoch(ep: int) -> bool:
        if len(val_rows) == 0:
            return False
        model.eval()
        score = auc(val_clicks, predict(model, val_feeds)[:, 0])
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
    return RankerResult(model, last, best_epoch=best["epoch"] or epochs, val_auc=history)


def predict(model: MultiTaskRanker, feeds: dict[str, np.ndarray], batch: int = 16384) -> np.ndarray:
    out = []
    n = len(feeds["item_idx"])
    with torch.no_grad():
        for s in range(0, n, batch):
            out.append(model(*(torch.from_numpy(np.ascontiguousarray(feeds[k][s : s + batch])) for k in INPUT_NAMES)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.heads.out_features), np.float32)


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
        dynamic_axes={k: {0: "user_batch" if k in USER_INPUTS else "batch"} for k in INPUT_NAMES + ["probs"]},
        opset_version=17,
        dynamo=False,
    )
    return {
        "inputs": {
            "user_idx": [None],
            "user_fields": [None, n_user_fields],
            "hist": [None, history_len],
            "item_idx": [None],
            "item_fields": [None, n_item_fields],
            "dense": [None, len(DENSE_FEATURES)],
        },
        "outputs": {"probs": [None, n_tasks]},
        "user_broadcast": True,  # user inputs may have batch 1 (rank/ranker.py, prerank/cascade.py feed them so)
    }


def export_ranker(model: MultiTaskRanker, n_user_fields: int, n_item_fields: int, history_len: int, path: Path) -> dict:
    return export_ranking_onnx(model, model.heads.out_features, n_user_fields, n_item_fields, history_len, path, user_batch=2, item_batch=2)
