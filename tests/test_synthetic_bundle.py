"""A bundle built from the synthetic world: seven task heads, author/category fields,
explicit impressions (no sampled negatives), served end to end."""
import numpy as np
import pytest

from app.build import build_bundle
from app.pipeline import Pipeline
from core.bundle import Bundle
from core.settings import Settings
from sim.synthetic import SyntheticWorld, WorldConfig


@pytest.fixture(scope="module")
def synthetic_bundle(tmp_path_factory):
    from dataclasses import asdict

    cfg = WorldConfig(n_items=2000, n_users=800, seed=5)
    ds = SyntheticWorld(cfg).generate_log()
    out = tmp_path_factory.mktemp("bundles") / "synth"
    manifest = build_bundle(ds, {"dataset": "synthetic", "world": asdict(cfg)}, out, epochs_tt=3, epochs_rank=2,
                            rank_ablation=("long_view",), ablation_seeds=2,
                            calibrate=False, distill_users=300, prerank_users=300)  # built small: the merge's and the distillations' own tests are elsewhere
    return out, manifest


def test_synthetic_bundle_serves_every_task(synthetic_bundle):
    path, manifest = synthetic_bundle
    b = Bundle.load(path)
    assert b.schema.task_names == ["click", "long_view", "like", "share", "follow", "dislike", "continue"]
    heads = manifest["metrics"]["ranker_heldout"]
    # Learned something real on held-out impressions (not a constant predictor).
    assert heads["click"]["auc"] > 0.6
    p = Pipeline(b, Settings())
    user = str(b.user_ids[7])
    ctx = p.context(request_id="r", user_id=user, count=20, scene="home", exclude_item_ids=[], events=[], seed=1)
    out, _ = p.run(ctx)
    assert len(out) == 20 and len(np.unique(out.item)) == 20
    assert out.heads.shape == (20, 7)
    assert not np.isin(out.item, b.user_history(7)[0]).any()


def test_ranker_is_mmoe_din_and_the_build_reports_its_ablation(synthetic_bundle):
    path, manifest = synthetic_bundle
    arch = manifest["models"]["ranker"]["architecture"]
    assert arch["kind"] == "mmoe+din" and arch["n_experts"] >= 2
    ab = manifest["metrics"]["ranker_ablation"]
    # the no-attention variant is scored on every head, the single-task model on its own task
    assert set(ab["no_attention"]) == set(manifest["metrics"]["ranker_heldout"])
    assert set(ab["single_task"]) == {"long_view"}
    for m in [*ab["no_attention"].values(), ab["single_task"]["long_view"]]:
        assert 0.0 <= m["auc"] <= 1.0 and m["n"] > 0
    # the variant learned its main task (tiny world: the rare heads may sit near 0.5)
    assert ab["no_attention"]["click"]["auc"] > 0.6
    assert ab["single_task"]["long_view"]["n"] == manifest["metrics"]["ranker_heldout"]["long_view"]["n"]
    # a second seed: the first is the served ranker's run, the mean is over both
    seeds = ab["seeds"]
    assert seeds["seeds"] == [0, 1] and len(seeds["auc"]) == 2
    first, second = seeds["auc"]
    assert first["ranker"]["click"] == manifest["metrics"]["ranker_heldout"]["click"]["auc"]
    assert first["single_task"]["long_view"] == ab["single_task"]["long_view"]["auc"]
    assert set(second["single_task"]) == {"long_view"} and set(second["no_attention"]) == set(first["ranker"])
    assert second["ranker"] != first["ranker"]  # another seed trains another model
    for variant in ("ranker", "no_attention"):
        for task, mean in seeds["mean_auc"][variant].items():
            assert mean == pytest.approx((first[variant][task] + second[variant][task]) / 2, abs=1e-4)


def test_eval_on_synthetic_bundle(synthetic_bundle):
    from app.evaluate import evaluate

    path, _ = synthetic_bundle
    r = evaluate(path, k=20, max_users=100)
    assert r["dataset"] == "synthetic" and r["users"] == 100
    assert set(r["recall"]) == {"ann", "itemcf", "graph", "popular", "fresh", "follow"}
    assert set(r["unique_share"]) == set(r["recall"])
    assert r["ranker_agreement@20"]["users"] > 0
    # each stage only cuts what the one before handed it, so the ranker's top-20 (either order)
    # can only be lost along recall -> prerank A -> prerank B
    fc = r["funnel_consistency@20"]
    for order in ("kept", "kept_click_head"):
        assert 1 >= fc[f"{order}_after_recall"] >= fc[f"{order}_after_a"] >= fc[order] >= 0
    assert fc["kept_click_head_after_recall"] == r["ranker_agreement@20"]["serving_800"]
    assert set(r["ranker_auc"]) == {"click", "long_view", "like", "share", "follow", "dislike", "continue"}
    assert 0 <= r["pipeline"]["recall@20"] <= 1


def test_ranker_sees_whether_the_user_follows_the_author(synthetic_bundle):
    """The `author_followed` feature served (one user, bundle's follow graph) equals the one
    trained on (a user per row, the dataset's graph) and the world's own follow relation."""
    from app.build import _table
    from rank.features import DENSE_FEATURES, pad_history, ranker_inputs

    path, manifest = synthetic_bundle
    col = DENSE_FEATURES.index("author_followed")
    b = Bundle.load(path)
    world = SyntheticWorld(WorldConfig(**manifest["source"]["world"]))
    ds = world.generate_log()
    offline_table = _table(ds, np.zeros(ds.n_items, np.float32))
    p = Pipeline(b, Settings())
    rng = np.random.default_rng(3)
    seen = 0
    for u in rng.choice(world.n_users, 30, replace=False):
        # items of the authors the user follows, and others
        followed = world.is_following(np.full(world.n_items, u), world.item_author)
        items = np.concatenate([rng.choice(np.flatnonzero(followed), 5), rng.choice(np.flatnonzero(~followed), 5)])
        ctx = p.context(request_id="f", user_id=str(b.user_ids[u]), count=10, scene="home", exclude_item_ids=[], events=[], seed=0)
        online = ranker_inputs(p.stage("rank").table, np.array([ctx.user_idx]), ctx.user_fields.reshape(1, -1),
                               pad_history(ctx.history, b.schema.history_len).reshape(1, -1), items)["dense"][:, col]
        offline = ranker_inputs(offline_table, np.full(10, u), ds.user_fields[np.full(10, u)], np.zeros((10, 4), np.int64), items)["dense"][:, col]
        np.testing.assert_array_equal(online, followed[items].astype(np.float32))
        np.testing.assert_array_equal(offline, online)
        seen += int(online.sum())
    assert seen == 150  # five followed-author items per user, all flagged
    # an unknown user follows nobody
    ctx = p.context(request_id="g", user_id="nobody-here", count=10, scene="home", exclude_item_ids=[], events=[], seed=0)
    assert ranker_inputs(p.stage("rank").table, np.array([ctx.user_idx]), ctx.user_fields.reshape(1, -1),
                         pad_history(ctx.history, b.schema.history_len).reshape(1, -1), np.arange(50))["dense"][:, col].sum() == 0
