import numpy as np

from sim.ml100k import load_ml100k


def _to_grouplens(src, dst):
    """Rewrite RecBole atomic files into the GroupLens u.data/u.item/u.user layout."""
    dst.mkdir()
    inter = [ln.split("\t") for ln in (src / "ml-100k.inter").read_text().splitlines()[1:]]
    (dst / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{int(float(t))}\n" for u, i, r, t in inter))
    from sim.ml100k import GENRES

    rows = []
    for ln in (src / "ml-100k.item").read_text().splitlines()[1:]:
        iid, title, year, genre = ln.split("\t")
        flags = ["1" if g == genre else "0" for g in GENRES]
        rows.append("|".join([iid, title, f"01-Jan-{year}", "", "http://x"] + flags))
    (dst / "u.item").write_text("\n".join(rows) + "\n")
    users = [ln.split("\t") for ln in (src / "ml-100k.user").read_text().splitlines()[1:]]
    (dst / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in users))


def test_atomic_and_grouplens_layouts_agree(ml_folder, tmp_path):
    a = load_ml100k(ml_folder)
    _to_grouplens(ml_folder, tmp_path / "gl")
    b = load_ml100k(tmp_path / "gl")
    assert a.user_ids.tolist() == b.user_ids.tolist() and a.item_ids.tolist() == b.item_ids.tolist()
    np.testing.assert_array_equal(a.ev_user, b.ev_user)
    np.testing.assert_array_equal(a.ev_item, b.ev_item)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.item_fields[:, 0] > 0, b.item_fields[:, 0] > 0)


def test_ml100k_schema_labels_and_split(ml_folder):
    d = load_ml100k(ml_folder)
    assert d.schema.task_names == ["click", "like", "dislike"]
    assert d.schema.tasks[2].negative
    assert d.implicit_negatives and d.positive.all()
    assert (d.labels[:, 0] == 1).all()
    # sorted by (user, ts) and every user keeps training events
    assert np.all(np.diff(d.ev_user) >= 0)
    for u in np.unique(d.ev_user)[:20]:
        rows = d.ev_user == u
        assert (~d.test[rows]).any()
        if d.test[rows].any():
            assert d.ev_ts[rows & ~d.test].max() <= d.ev_ts[rows & d.test].min()
    assert 0.15 < d.test.mean() < 0.25
