"""Two-tower training (torch, offline only) and export: user tower -> ONNX, item
embeddings -> numpy (and from there the faiss index).

Loss: in-batch softmax over L2-normalised towers with temperature τ and the log-q
sampling-bias correction of Yi et al. (RecSys 2019): logit(u, j) = <u, v_j>/τ − log p̂_j,
where p̂_j comes from the paper's streaming frequency estimate over the time-ordered
training stream (`streaming_frequency`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FieldEmbedding(nn.Module):
    """Several categorical fields in one table (offsets per field), summed."""

    def __init__(self, vocabs: list[int], dim: int):
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(vocabs)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets))
        self.table = nn.Embedding(int(sum(vocabs)) or 1, dim)
        nn.init.normal_(self.table.weight, std=0.05)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        return self.table(fields + self.offsets).sum(dim=1)


def pooled_history(table: nn.Embedding, ids: torch.Tensor, grad: bool) -> torch.Tensor:
    """Mean of the history's item embeddings. With grad=False the history does not
    back-propagate into the item table (it is trained through the target side): a step
    then touches batch rows instead of batch × history-length rows, which is what keeps
    training on a million-item table fast."""
    if grad:
        return masked_mean(table(ids), ids)
    return masked_mean(F.embedding(ids, table.weight.detach(), padding_idx=0), ids)


def masked_mean(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mask = (ids > 0).unsqueeze(-1).to(emb.dtype)
    return (emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def streaming_frequency(item: np.ndarray, step: np.ndarray, n_items: int, alpha: float = 0.05, n_hash: int = 1 << 22) -> np.ndarray:
    """Yi et al. (RecSys 2019), Algorithm 2: per hashed id, B ← (1−α)B + α(t − A), A ← t;
    p̂ = 1/B, B being the estimated number of steps between two occurrences.

    Computed for the whole time-ordered stream at once, the EMA seeded with a bucket's first
    gap (a fixed initial B would bias every bucket seen fewer than ~1/α times):
    B = (1−α)^(n−2) gap_1 + Σ_{k≥2} α(1−α)^(n−1−k) gap_k over its n−1 gaps. A bucket seen
    once gets B = the stream length. Returns p̂ per item (float64 [n_items])."""
    h = item % n_hash
    order = np.lexsort((step, h))
    hs, ts = h[order], step[order].astype(np.float64)
    uniq, start, counts = np.unique(hs, return_index=True, return_counts=True)
    n_steps = float(step.max() - step.min() + 1) if len(step) else 1.0
    gap = np.diff(ts, prepend=np.nan)  # gap to the previous occurrence in the same bucket
    rank = np.arange(len(hs)) - np.repeat(start, counts)  # 0 = first occurrence (no gap)
    n = np.repeat(counts, counts)
    w = np.where(rank == 1, (1 - alpha) ** (n - 2.0), alpha * (1 - alpha) ** (n - 1.0 - rank))
    w[rank == 0] = 0.0
    ema = np.bincount(np.repeat(np.arange(len(uniq)), counts), weights=np.nan_to_num(gap) * w, minlength=len(uniq))
    b = np.where(counts > 1, ema, n_steps)
    p_bucket = 1.0 / np.maximum(b, 1.0)
    p = np.full(n_items, 1.0 / n_steps)
    items_h = np.arange(n_items) % n_hash
    pos = np.searchsorted(uniq, items_h)
    found = (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == items_h)
    p[found] = p_bucket[pos[found]]
    return p


def run_epochs(opt, n: int, batch_size: int, epochs: int, rng: np.random.Generator, batch_loss, progress=None,
               rows: np.ndarray | None = None, after_epoch=None) -> float:
    """Shuffled minibatch epochs: `batch_loss(idx)` returns the loss of one batch of row
    indices (of `rows` if given, else of range(n)); returns the last epoch's mean loss.
    `after_epoch(ep)` returning True stops early. Shared by every offline trainer."""
    last = 0.0
    for ep in range(epochs):
        perm = torch.from_numpy(rng.permutation(n if rows is None else rows))
        total, steps = 0.0, 0
        for s in range(0, len(perm), batch_size):
            loss = batch_loss(perm[s : s + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        last = total / max(steps, 1)
        if progress is not None:
            progress(ep + 1, epochs, last)
        if after_epoch is not None and after_epoch(ep + 1):
            break
    return last


class ItemInput(nn.Module):
    """An item's input vector: its id embedding plus, where the dataset has content vectors
    (synthetic world: a noisy view of the item's latent factors), a linear projection of
    them. Items with few interactions have barely trained id rows; the content term still
    puts them near the items they resemble, for the item tower and in users' histories."""

    def __init__(self, n_items: int, dim: int, item_dense: np.ndarray | None = None):
        super().__init__()
        # sparse: only the rows in a batch are updated (RowAdam), which keeps large catalogs cheap
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        self.content = None
        if item_dense is not None and item_dense.shape[1] > 0:
            dense = np.concatenate([np.zeros((1, item_dense.shape[1]), np.float32), np.asarray(item_dense, np.float32)])
            self.register_buffer("dense", torch.from_numpy(dense), persistent=False)  # row 0 = padding
            self.content = nn.Linear(item_dense.shape[1], dim, bias=False)

    def forward(self, ids: torch.Tensor, id_grad: bool = True) -> torch.Tensor:
        e = self.item_emb(ids) if id_grad else F.embedding(ids, self.item_emb.weight.detach(), padding_idx=0)
        if self.content is not None:
            e = e + self.content(self.dense[ids])
        return e

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """[I+1, dim]: every item's input vector (row 0 = padding, zero), for export."""
        t = self.item_emb.weight.detach().clone()
        if self.content is not None:
            t += self.content(self.dense)
        t[0] = 0.0
        return t


class UserTower(nn.Module):
    def __init__(self, n_users: int, n_items: int, user_vocabs: list[int], dim: int, item_input: ItemInput, hist_grad: bool = False):
        super().__init__()
        self.hist_grad = hist_grad
        # sparse: only the rows in a batch are updated (RowAdam), which keeps large catalogs cheap
        self.user_emb = nn.Embedding(n_users + 1, dim, sparse=True)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        self.fields = FieldEmbedding(user_vocabs, dim)
        self.hist_input = item_input  # shared with the item tower: history moves the query
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, user_idx, user_fields, hist):
        # Without history gradients the id rows are trained through the target side only (a
        # step touches batch rows, not batch × history rows: fast on million-item tables).
        pooled = masked_mean(self.hist_input(hist, id_grad=self.hist_grad and self.training), hist)
        x = torch.cat([self.user_emb(user_idx), self.fields(user_fields), pooled], dim=1)
        return F.normalize(self.mlp(x), dim=1)


class _ExportUserTower(nn.Module):
    """The user tower with its history input folded into one table (id embedding + content
    projection precomputed per item), so the ONNX model holds a single [I+1, dim] table."""

    def __init__(self, tower: UserTower):
        super().__init__()
        self.user_emb, self.fields, self.mlp = tower.user_emb, tower.fields, tower.mlp
        self.hist_table = nn.Embedding.from_pretrained(tower.hist_input.table(), freeze=True, padding_idx=0)

    def forward(self, user_idx, user_fields, hist):
        pooled = masked_mean(self.hist_table(hist), hist)
        x = torch.cat([self.user_emb(user_idx), self.fields(user_fields), pooled], dim=1)
        return F.normalize(self.mlp(x), dim=1)


class ItemTower(nn.Module):
    def __init__(self, n_items: int, item_vocabs: list[int], dim: int, item_dense: np.ndarray | None = None):
        super().__init__()
        self.input = ItemInput(n_items, dim, item_dense)
        self.fields = FieldEmbedding(item_vocabs, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, item_idx, item_fields):
        x = torch.cat([self.input(item_idx), self.fields(item_fields)], dim=1)
        return F.normalize(self.mlp(x), dim=1)


class RowAdam:
    """Adam for sparse-gradient embeddings, updating only the rows a batch touched ("lazy"
    Adam, as SparseAdam) with plain gathers/scatters: torch's SparseAdam spends most of a
    step in sparse_mask / sparse add_ over million-row tables."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        # state as numpy arrays; updates go through numpy views of the parameters
        self.m = [np.zeros(tuple(p.shape), np.float32) for p in self.params]
        self.v = [np.zeros(tuple(p.shape), np.float32) for p in self.params]
        self.t = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad.coalesce()
            idx, val = g.indices()[0].numpy(), g.values().numpy()
            if len(idx) == 0:
                continue
            w = p.data.numpy()
            m_rows = self.b1 * m[idx] + (1 - self.b1) * val
            v_rows = self.b2 * v[idx] + (1 - self.b2) * val * val
            m[idx] = m_rows
            v[idx] = v_rows
            w[idx] -= self.lr * (m_rows / c1) / (np.sqrt(v_rows / c2) + self.eps)


def embedding_optimizer(params, lr: float):
    """torch's SparseAdam for small tables, RowAdam for large ones: SparseAdam's
    sparse_mask / sparse add_ scale with the table (slow at 1M rows), while RowAdam's numpy
    row updates were measured far slower than SparseAdam on ml-100k-sized tables with
    history gradients (a 25 s build took 15 min)."""
    params = list(params)
    if max(p.shape[0] for p in params) > 200_000:
        return RowAdam(params, lr=lr)
    return torch.optim.SparseAdam(params, lr=lr)


class MultiOptimizer:
    """Dense Adam for the networks, row-wise Adam for the id embeddings, stepped together."""

    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


@dataclass
class TwoTowerResult:
    user_tower: UserTower
    item_tower: ItemTower
    item_fields: torch.Tensor  # int64 [I, Fi]: the item tower's field input
    item_emb: np.ndarray  # float32 [I, D], L2-normalised
    train_loss: float


def _optimizer(item_tower: ItemTower, user_tower: UserTower, lr: float):
    sparse = [item_tower.input.item_emb.weight, user_tower.user_emb.weight]
    dense = [p for p in list(item_tower.parameters()) + list(user_tower.parameters()) if all(p is not q for q in sparse)]
    dense = list({id(p): p for p in dense}.values())  # the history input is the item input: count it once
    return MultiOptimizer(torch.optim.Adam(dense, lr=lr), embedding_optimizer(sparse, lr))


def item_embeddings(item_tower: ItemTower, item_fields: torch.Tensor, chunk: int = 65536) -> np.ndarray:
    """float32 [I, D]: every item through the item tower (eval mode)."""
    item_tower.eval()
    n_items = len(item_fields)
    with torch.no_grad():
        embs = [item_tower(idx + 1, item_fields[idx]).numpy() for idx in (torch.arange(s, min(s + chunk, n_items)) for s in range(0, n_items, chunk))]
    return np.concatenate(embs).astype(np.float32)


def train_two_tower(
    *,
    n_users: int,
    n_items: int,
    user_vocabs: list[int],
    item_vocabs: list[int],
    item_fields: np.ndarray,
    row_user: np.ndarray,  # int64 [N] user index
    row_user_fields: np.ndarray,  # int64 [N, Fu]
    row_hist: np.ndarray,  # int64 [N, L] model ids (0 pad)
    row_item: np.ndarray,  # int64 [N] positive item index
    row_ts: np.ndarray | None = None,  # float [N] event time, for the streaming frequency estimate
    item_dense: np.ndarray | None = None,  # float32 [I, Dc] item content vectors, if the dataset has them
    dim: int = 32,
    temperature: float = 0.05,
    epochs: int = 8,
    batch_size: int = 1024,
    lr: float = 3e-3,
    user_dropout: float = 0.2,
    seed: int = 0,
    hist_grad: bool = False,
    progress=None,
) -> TwoTowerResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    item_tower = ItemTower(n_items, item_vocabs, dim, item_dense)
    user_tower = UserTower(n_users, n_items, user_vocabs, dim, item_tower.input, hist_grad)
    opt = _optimizer(item_tower, user_tower, lr)
    # log-q: streaming frequency estimate over the time-ordered positives
    order = np.argsort(row_ts if row_ts is not None else np.arange(len(row_item)), kind="stable")
    step = np.empty(len(row_item), np.int64)
    step[order] = np.arange(len(row_item))  # one tick per event: no saturation for items in every batch
    p_hat = streaming_frequency(row_item, step, n_items)
    log_q = torch.from_numpy(np.log(p_hat).astype(np.float32))
    t_fields = torch.from_numpy(np.ascontiguousarray(item_fields, dtype=np.int64))
    u_all = torch.from_numpy(row_user + 1)
    uf_all = torch.from_numpy(np.ascontiguousarray(row_user_fields, dtype=np.int64))
    h_all = torch.from_numpy(np.ascontiguousarray(row_hist, dtype=np.int64))
    i_all = torch.from_numpy(row_item.astype(np.int64))
    def batch_loss(b):
        uid = u_all[b].clone()
        # Drop the user id sometimes so the tower also works from history + profile alone (cold users).
        uid[torch.from_numpy(rng.random(len(b)) < user_dropout)] = 0
        items = i_all[b]
        u = user_tower(uid, uf_all[b], h_all[b])
        v = item_tower(items + 1, t_fields[items])
        logits = u @ v.T / temperature - log_q[items][None, :]
        # Same item twice in a batch is not a negative for itself.
        dup = (items[:, None] == items[None, :]) & ~torch.eye(len(b), dtype=torch.bool)
        return F.cross_entropy(logits.masked_fill(dup, -1e9), torch.arange(len(b)))

    last = run_epochs(opt, len(row_item), batch_size, epochs, rng, batch_loss, progress)
    user_tower.eval()
    return TwoTowerResult(user_tower, item_tower, t_fields, item_embeddings(item_tower, t_fields), last)


def distill_two_tower(
    tt: TwoTowerResult,
    *,
    user_idx: np.ndarray,  # int64 [U]
    user_fields: np.ndarray,  # int64 [U, Fu]
    hist: np.ndarray,  # int64 [U, L] model ids (0 pad)
    pools: np.ndarray,  # int64 [U, P] item indices the teacher scored for each user
    teacher: np.ndarray,  # float32 [U, P] the ranker's click logit per pool item
    temperature: float = 0.05,
    teacher_temperature: float = 0.5,
    epochs: int = 3,
    batch_users: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> TwoTowerResult:
    """Fine-tune both towers so the dot product ranks each user's pool as the ranker does:
    listwise cross-entropy between softmax(teacher / teacher_temperature) and
    softmax(u·v / temperature) over the pool. Recall then finds what the ranker would put on
    top (funnel consistency) instead of only what the user clicked in the log. The towers
    keep their architecture, so the exported user tower, item table and index are as before."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    user_tower, item_tower = tt.user_tower, tt.item_tower
    user_tower.train()
    item_tower.train()
    opt = _optimizer(item_tower, user_tower, lr)
    u_all = torch.from_numpy(np.asarray(user_idx, np.int64) + 1)
    uf_all = torch.from_numpy(np.ascontiguousarray(user_fields, dtype=np.int64))
    h_all = torch.from_numpy(np.ascontiguousarray(hist, dtype=np.int64))
    pool_all = torch.from_numpy(np.ascontiguousarray(pools, dtype=np.int64))
    target_all = torch.softmax(torch.from_numpy(np.asarray(teacher, np.float32)) / teacher_temperature, dim=1)

    def batch_loss(b):
        u = user_tower(u_all[b], uf_all[b], h_all[b])  # [b, d]
        items = pool_all[b]  # [b, P]
        flat, inv = torch.unique(items, return_inverse=True)  # one item-tower pass per distinct item
        v = item_tower(flat + 1, tt.item_fields[flat])[inv]  # [b, P, d]
        logits = torch.einsum("bd,bpd->bp", u, v) / temperature
        return -(target_all[b] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    last = run_epochs(opt, len(u_all), batch_users, epochs, rng, batch_loss, progress)
    user_tower.eval()
    return TwoTowerResult(user_tower, item_tower, tt.item_fields, item_embeddings(item_tower, tt.item_fields), last)


def user_embeddings(tower: UserTower, user_idx, user_fields, hist, batch: int = 8192) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(user_idx), batch):
            out.append(
                tower(
                    torch.from_numpy(np.asarray(user_idx[s : s + batch], np.int64) + 1),
                    torch.from_numpy(np.ascontiguousarray(user_fields[s : s + batch], dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(hist[s : s + batch], dtype=np.int64)),
                ).numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, tower.mlp[-1].out_features), np.float32)


def export_user_tower(tower: UserTower, n_user_fields: int, history_len: int, path: Path) -> dict:
    """Export to ONNX with a dynamic batch axis; returns the signature for the manifest."""
    tower.eval()
    export = _ExportUserTower(tower).eval()
    example = (
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, n_user_fields, dtype=torch.int64),
        torch.zeros(2, history_len, dtype=torch.int64),
    )
    torch.onnx.export(
        export,
        example,
        str(path),
        input_names=["user_idx", "user_fields", "hist"],
        output_names=["user_emb"],
        dynamic_axes={"user_idx": {0: "batch"}, "user_fields": {0: "batch"}, "hist": {0: "batch"}, "user_emb": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    dim = tower.mlp[-1].out_features
    return {
        "inputs": {"user_idx": [None], "user_fields": [None, n_user_fields], "hist": [None, history_len]},
        "outputs": {"user_emb": [None, dim]},
    }
