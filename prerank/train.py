"""Pre-rank stage B: a small DNN distilled from the ranker (torch, offline only) and its ONNX
export (`prerank.onnx`).

Network. User side: id embedding, profile fields and the mean-pooled recent items →
Linear(3d → d) + ReLU, computed once per request (batch 1, broadcast over the candidates as
in the ranker). Item side: id embedding + field embeddings. [user, item, user⊙item, dense] →
MLP [32] → one logit per task. The id and field tables start from the ranker's (the teacher
has trained them on the same rows; iQiyi's dual DNN shares them outright).

Distillation (Hinton et al. 2015; "Rocket Launching", Zhou et al. AAAI 2018): loss = masked
BCE on the hard labels where a row has them + `soft_weight` × BCE against the ranker's
probabilities on every row. The rows are the ranker's training rows plus rows drawn from what
recall returns (the two-tower's top items for sampled training users): stage B only ever
scores recall's candidates, and those have no label, only the teacher's view of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rank.features import DENSE_FEATURES
from rank.train import export_ranking_onnx, id_table_optimizer, masked_bce, training_tensors
from retrieval.twotower_train import FieldEmbedding, pooled_history, run_epochs


class PrerankNet(nn.Module):
    def __init__(self, n_users, n_items, user_vocabs, item_vocabs, n_tasks, dim=16, hidden=(32,)):
        super().__init__()
        self.n_tasks = n_tasks
        self.user_emb = nn.Embedding(n_users + 1, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=True)
        for e in (self.user_emb, self.item_emb):
            nn.init.normal_(e.weight, std=0.05)
        self.user_fields = FieldEmbedding(user_vocabs, dim)
        self.item_fields = FieldEmbedding(item_vocabs, dim)
        self.user_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU())
        layers, d = [], 3 * dim + len(DENSE_FEATURES)
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(d, n_tasks)

    def init_from(self, teacher: nn.Module) -> None:
        """Start from the teacher's id and field tables where the shapes agree (its item rows
        with their content projection folded in, where the teacher has one)."""
        with torch.no_grad():
            for name in ("user_emb", "item_emb"):
                a, b = getattr(self, name), getattr(teacher, name, None)
                if b is not None and a.weight.shape == b.weight.shape:
                    vectors = getattr(teacher, "item_vectors", None)
                    a.weight.copy_(vectors(torch.arange(b.num_embeddings), grad=False) if name == "item_emb" and vectors else b.weight)
            for name in ("user_fields", "item_fields"):
                a, b = getattr(self, name).state_dict(), getattr(teacher, name, None)
                if b is not None and all(b.state_dict()[k].shape == v.shape for k, v in a.items()):
                    getattr(self, name).load_state_dict(b.state_dict())

    def logits(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        n = item_idx.shape[0]
        h = pooled_history(self.item_emb, hist, False)  # no grads through the history: cheap steps at 1M items
        u = self.user_mlp(torch.cat([self.user_emb(user_idx), self.user_fields(user_fields), h], dim=1)).expand(n, -1)
        i = self.item_emb(item_idx) + self.item_fields(item_fields)
        return self.heads(self.mlp(torch.cat([u, i, u * i, dense], dim=1)))

    def forward(self, user_idx, user_fields, hist, item_idx, item_fields, dense):
        return torch.sigmoid(self.logits(user_idx, user_fields, hist, item_idx, item_fields, dense))


@dataclass
class PrerankResult:
    model: PrerankNet
    train_loss: float


def train_prerank(
    feeds: dict[str, np.ndarray],  # ranker-format feeds, one user row per item row
    labels: np.ndarray,  # float32 [N, T], NaN = undefined (all NaN on recall-sampled rows)
    soft: np.ndarray | None,  # float32 [N, T] the teacher's probabilities; None = hard labels only
    *,
    n_users: int,
    n_items: int,
    user_vocabs: list[int],
    item_vocabs: list[int],
    teacher: nn.Module | None = None,
    soft_weight: float = 1.0,
    epochs: int = 2,
    batch_size: int = 0,
    lr: float = 3e-3,
    seed: int = 0,
    progress=None,
) -> PrerankResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, t = labels.shape
    batch_size = batch_size or int(np.clip(n // 300, 256, 2048))
    model = PrerankNet(n_users, n_items, user_vocabs, item_vocabs, t)
    if teacher is not None:
        model.init_from(teacher)
    opt = id_table_optimizer(model, lr, 1e-6)
    tensors, y, m = training_tensors(feeds, labels)
    w = torch.ones(t)
    s = None if soft is None else torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32))

    def batch_loss(b):
        z = model.logits(*(x[b] for x in tensors))
        loss = masked_bce(z, y[b], m[b], w)
        if s is not None:
            loss = loss + soft_weight * F.binary_cross_entropy_with_logits(z, s[b], reduction="none").mean(0).sum()
        return loss

    model.train()
    last = run_epochs(opt, n, batch_size, epochs, rng, batch_loss, progress)
    model.eval()
    return PrerankResult(model, last)


def export_prerank(model: PrerankNet, n_user_fields: int, n_item_fields: int, history_len: int, path: Path) -> dict:
    return export_ranking_onnx(model, model.n_tasks, n_user_fields, n_item_fields, history_len, path, user_batch=1, item_batch=3)
