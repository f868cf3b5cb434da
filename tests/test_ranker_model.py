"""The ranker network's structure: target attention, per-task gates, task-owned experts."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rank.features import DENSE_FEATURES  # noqa: E402
from rank.train import INPUT_NAMES, MultiTaskRanker, TargetAttention, masked_bce  # noqa: E402


def _inputs(n=6, n_users=20, n_items=40, hist_len=5, seed=0):
    r = np.random.default_rng(seed)
    hist = r.integers(1, n_items + 1, (n, hist_len))
    hist[:, 3:] = 0  # padding
    return [
        torch.from_numpy(r.integers(1, n_users + 1, n)),
        torch.from_numpy(r.integers(0, 3, (n, 2))),
        torch.from_numpy(hist),
        torch.from_numpy(r.integers(1, n_items + 1, n)),
        torch.from_numpy(r.integers(0, 4, (n, 2))),
        torch.from_numpy(r.normal(size=(n, len(DENSE_FEATURES))).astype(np.float32)),
    ]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    fields = np.random.default_rng(seed).integers(0, 4, (40, 2))
    m = MultiTaskRanker(20, 40, [3, 3], [4, 4], 3, fields, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def test_target_attention_weighs_history_per_candidate_and_ignores_padding():
    torch.manual_seed(0)
    att = TargetAttention(4, 8)
    k = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, True, False, False]])
    q = torch.randn(3, 4)
    out = att(q, k, mask)
    # a convex combination of the valid keys, different per candidate
    assert out.shape == (3, 4)
    assert not torch.allclose(out[0], out[1])
    k2 = k.clone()
    k2[0, 3:] = 100.0  # padded slots: whatever they hold, they get no weight
    torch.testing.assert_close(att(q, k2, mask), out)
    # no history at all pools to zero
    assert torch.all(att(q, k, torch.zeros_like(mask)) == 0)


def test_blocked_attention_is_the_same_function():
    """The export's matrix-product form (one user's history shared by every candidate, and a
    history per row) agrees with the broadcasting form, padding and empty histories included."""
    torch.manual_seed(1)
    att = TargetAttention(4, 8)
    with torch.no_grad():
        for p in att.parameters():
            p.add_(0.5 * torch.randn_like(p))
    q = torch.randn(6, 4)
    for k, mask in (
        (torch.randn(1, 7, 4), torch.tensor([[True] * 5 + [False] * 2])),
        (torch.randn(6, 7, 4), torch.rand(6, 7) > 0.4),
        (torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool)),
    ):
        want = att(q, k, mask)
        att.blocked = True
        got = att(q, k, mask)
        att.blocked = False
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_model_differs_from_mean_pooling_only_in_the_pooling():
    x = _inputs()
    din, mean = _model(attention=True), _model(attention=False)
    assert din.config["kind"] == "mmoe+din" and mean.config["kind"] == "mmoe+mean"
    with torch.no_grad():
        a, b = din(*x), mean(*x)
    assert a.shape == b.shape == (6, 3) and not torch.allclose(a, b)


def test_cgc_gate_keeps_a_task_off_other_tasks_experts():
    """task_experts=1: task 0's output must not move when task 1's own expert changes, and
    must move when a shared expert or its own expert changes."""
    m = _model(task_experts=1)
    assert m.config["kind"] == "cgc+din" and m.n_experts == 4 + 3
    x = _inputs()
    h1 = m.h1
    with torch.no_grad():
        base = m(*x)

        def bumped(e):
            w = m.w1.data.clone()
            m.w1.data[:, e * h1 : (e + 1) * h1] += 1.0
            out = m(*x)
            m.w1.data.copy_(w)
            return out

        other = bumped(4 + 1)  # task 1's own expert
        own = bumped(4 + 0)  # task 0's own expert
        shared = bumped(0)
    torch.testing.assert_close(other[:, 0], base[:, 0])
    assert not torch.allclose(other[:, 1], base[:, 1])
    assert not torch.allclose(own[:, 0], base[:, 0])
    assert not torch.allclose(shared[:, 0], base[:, 0])


def test_one_hot_task_weight_trains_that_task_only():
    """The single-task ablation: with loss weight only on task 0, no other task's tower
    gets a gradient."""
    m = _model()
    m.train()
    x = _inputs()
    y = torch.ones(6, 3)
    loss = masked_bce(m.logits(*x), y, torch.ones(6, 3), torch.tensor([1.0, 0.0, 0.0]))
    loss.backward()
    assert m.t2.grad[0].abs().sum() > 0
    assert m.t2.grad[1:].abs().sum() == 0 and m.t1.grad[1:].abs().sum() == 0


def test_input_names_are_the_forward_signature():
    import inspect

    assert list(inspect.signature(MultiTaskRanker.forward).parameters)[1:] == INPUT_NAMES
