"""Offline training guards: the ranker keeps the weights of its best validation epoch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rank.features import DENSE_FEATURES  # noqa: E402
from rank.train import predict, train_ranker  # noqa: E402


def _rows(n, n_users, n_items, rng):
    return {
        "user_idx": rng.integers(1, n_users + 1, n),
        "user_fields": rng.integers(0, 3, (n, 2)),
        "hist": rng.integers(0, n_items + 1, (n, 5)),
        "item_idx": rng.integers(1, n_items + 1, n),
        "item_fields": rng.integers(0, 4, (n, 2)),
        "dense": rng.random((n, len(DENSE_FEATURES))).astype(np.float32),
    }


def test_ranker_stops_at_its_best_validation_epoch_on_labels_it_can_only_memorise():
    """Pure-noise labels: nothing generalises, so the validation click AUC stops improving at
    once; training must stop one epoch after its best and keep that epoch's weights."""
    rng = np.random.default_rng(0)
    n, n_users, n_items = 40_000, 300, 400
    feeds = _rows(n, n_users, n_items, rng)
    labels = (rng.random((n, 2)) < 0.3).astype(np.float32)
    labels[rng.random(n) < 0.5, 1] = np.nan  # a masked second task
    res = train_ranker(feeds, labels, n_users=n_users, n_items=n_items, user_vocabs=[3, 3], item_vocabs=[4, 4],
                       epochs=12, lr=1e-2, seed=0)
    assert res.val_auc and len(res.val_auc) < 12, "training ran every epoch without improving on validation"
    assert res.best_epoch == int(np.argmax(res.val_auc)) + 1
    assert len(res.val_auc) - res.best_epoch == 1  # patience 1: one epoch past the best
    # the kept weights are the best epoch's: near the base rate, not the memorised last epoch
    p = predict(res.model, _rows(5000, n_users, n_items, np.random.default_rng(1)))
    assert abs(float(p[:, 0].mean()) - 0.3) < 0.05
