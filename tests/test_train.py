"""Offline training guards: the ranker keeps the weights of its best validation epoch, and its
heads come out calibrated on logged rows however many extra negatives it trained with."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rank.features import DENSE_FEATURES  # noqa: E402
from core.offline_metrics import auc, calibration_error  # noqa: E402
from rank.train import fit_platt, predict, train_ranker  # noqa: E402


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


def test_platt_fit_recovers_the_scale_and_shift_of_the_true_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=100_000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-(2.0 * z - 1.0)))).astype(np.float64)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)


def _logged(n, rng):
    """Rows whose click rate depends on the item's first field (0.05 .. 0.35), the second
    task defined only where clicked."""
    feeds = _rows(n, 300, 400, rng)
    p = 0.05 + 0.1 * feeds["item_fields"][:, 0]
    labels = np.full((n, 2), np.nan, np.float32)
    labels[:, 0] = rng.random(n) < p
    clicked = labels[:, 0] == 1
    labels[clicked, 1] = rng.random(clicked.sum()) < 0.6
    return feeds, labels


def test_ranker_heads_are_calibrated_on_logged_rows_despite_catalog_negatives():
    """Three extra click = 0 rows per logged row (the catalog negatives of the synthetic
    world) pull the raw click head far below the logged click rate; the Platt scaling fitted
    on the validation slice brings it back, without changing the order (AUC)."""
    rng = np.random.default_rng(0)
    feeds, labels = _logged(30_000, rng)

    def extra_rows(idx):
        f = _rows(len(idx) * 3, 300, 400, rng)
        lab = np.full((len(f["item_idx"]), 2), np.nan, np.float32)
        lab[:, 0] = 0.0
        return f, lab

    test_feeds, test_labels = _logged(20_000, np.random.default_rng(1))
    y = test_labels[:, 0]
    kw = dict(n_users=300, n_items=400, user_vocabs=[3, 3], item_vocabs=[4, 4], epochs=2, lr=1e-2, seed=0,
              extra_rows=extra_rows, extra_per_row=3)
    raw = predict(train_ranker(feeds, labels, calibrate_heads=False, **kw).model, test_feeds)
    res = train_ranker(feeds, labels, **kw)
    cal = predict(res.model, test_feeds)
    assert 0 in res.calibration and res.calibration[0][1] > 0  # the click head is shifted up
    assert raw[:, 0].mean() < y.mean() - 0.05  # the raw head under-predicts the logged rate
    assert abs(cal[:, 0].mean() - y.mean()) < 0.02
    assert calibration_error(y, cal[:, 0]) < 0.5 * calibration_error(y, raw[:, 0])
    assert auc(y, cal[:, 0]) > 0.6  # the head still ranks by the item field
