"""MovieLens-100k: fetch (from the recbole==1.2.1 wheel on the package index) and load.

Reads two layouts: RecBole atomic files (`ml-100k.inter/.item/.user`, tab-separated with
typed headers) and the GroupLens zip layout (`u.data`, `u.item`, `u.user`).
Tasks: click (rated vs. sampled unrated), like (rating >= 4), dislike (rating <= 2);
like and dislike are defined given a click (a rating).
"""
from __future__ import annotations

import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from core.schema import FieldSpec, Schema, TaskSpec
from sim.dataset import Dataset, sort_events, temporal_split

RECBOLE_WHEEL = "recbole==1.2.1"
_MEMBER_PREFIX = "recbole/dataset_example/ml-100k/"


def fetch_ml100k(data_dir: Path) -> Path:
    """Download the recbole wheel with --no-deps and unpack its ml-100k atomic files.
    Returns the dataset folder. Idempotent."""
    out = Path(data_dir) / "ml-100k"
    if (out / "ml-100k.inter").exists() or (out / "u.data").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, RECBOLE_WHEEL]
        subprocess.run(cmd, check=True)
        wheels = glob.glob(str(Path(tmp) / "recbole-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {RECBOLE_WHEEL} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(_MEMBER_PREFIX) and not m.endswith("/")]
            for m in members:
                (out / Path(m).name).write_bytes(zf.read(m))
    if not (out / "ml-100k.inter").exists():
        raise RuntimeError(f"{RECBOLE_WHEEL} wheel did not contain {_MEMBER_PREFIX}ml-100k.inter")
    return out


def _read_tsv(path: Path, sep: str, header: bool, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, errors="replace") as f:
        lines = f.read().splitlines()
    if header:
        lines = lines[1:]
    return [ln.split(sep) for ln in lines if ln.strip()]


GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _load_raw(folder: Path):
    """-> (ratings [(u, i, r, ts)], items {id: (year, [genres])}, users {id: (age, gender, occupation)})"""
    folder = Path(folder)
    if (folder / "ml-100k.inter").exists():
        inter = _read_tsv(folder / "ml-100k.inter", "\t", True)
        ratings = [(r[0], r[1], float(r[2]), float(r[3])) for r in inter]
        items = {}
        for r in _read_tsv(folder / "ml-100k.item", "\t", True):
            year = r[2] if len(r) > 2 else ""
            genres = r[3].split(" ") if len(r) > 3 else []
            items[r[0]] = (year, genres)
        users = {r[0]: (r[1], r[2], r[3]) for r in _read_tsv(folder / "ml-100k.user", "\t", True)}
    elif (folder / "u.data").exists():
        ratings = [(r[0], r[1], float(r[2]), float(r[3])) for r in _read_tsv(folder / "u.data", "\t", False)]
        items = {}
        for r in _read_tsv(folder / "u.item", "|", False, encoding="latin-1"):
            date = r[2] if len(r) > 2 else ""
            year = date[-4:] if len(date) >= 4 else ""
            flags = r[5:24]
            genres = [g for g, f in zip(GENRES, flags) if f == "1"]
            items[r[0]] = (year, genres)
        users = {r[0]: (r[1], r[2], r[3]) for r in _read_tsv(folder / "u.user", "|", False)}
    else:
        raise FileNotFoundError(
            f"no MovieLens-100k files in {folder}: run `funnel data fetch ml-100k` (expects ml-100k.inter or u.data)"
        )
    return ratings, items, users


def _codes(values: list[str]) -> tuple[np.ndarray, int]:
    """Category codes starting at 1 (0 = unknown); returns (codes, vocab size)."""
    vocab = {v: k + 1 for k, v in enumerate(sorted(set(v for v in values if v)))}
    return np.array([vocab.get(v, 0) for v in values], np.int64), len(vocab) + 1


def load_ml100k(folder: Path, test_frac: float = 0.2) -> Dataset:
    ratings, items, users = _load_raw(Path(folder))
    user_ids = np.array(sorted({r[0] for r in ratings} | set(users), key=lambda s: (len(s), s)))
    item_ids = np.array(sorted({r[1] for r in ratings} | set(items), key=lambda s: (len(s), s)))
    uix = {u: k for k, u in enumerate(user_ids)}
    iix = {i: k for k, i in enumerate(item_ids)}
    ev_user = np.array([uix[r[0]] for r in ratings], np.int64)
    ev_item = np.array([iix[r[1]] for r in ratings], np.int64)
    rating = np.array([r[2] for r in ratings], np.float32)
    ev_ts = np.array([r[3] for r in ratings], np.float64)
    order = sort_events(ev_user, ev_ts)
    ev_user, ev_item, rating, ev_ts = ev_user[order], ev_item[order], rating[order], ev_ts[order]

    # user fields: age bucket, gender, occupation
    prof = [users.get(u, ("", "", "")) for u in user_ids]
    ages = []
    for p in prof:
        try:
            a = int(p[0])
            ages.append(str(min(a // 10, 7)))
        except ValueError:
            ages.append("")
    age_c, age_v = _codes(ages)
    gen_c, gen_v = _codes([p[1] for p in prof])
    occ_c, occ_v = _codes([p[2] for p in prof])
    user_fields = np.stack([age_c, gen_c, occ_c], axis=1)

    # item fields: first genre as the category, release decade
    info = [items.get(i, ("", [])) for i in item_ids]
    cat_c, cat_v = _codes([g[1][0] if g[1] else "" for g in info])
    dec_c, dec_v = _codes([(g[0][:3] + "0") if g[0][:3].isdigit() else "" for g in info])
    item_fields = np.stack([cat_c, dec_c], axis=1)

    # an item "enters the catalog" at its first rating
    first = np.full(len(item_ids), np.inf)
    np.minimum.at(first, ev_item, ev_ts)
    first[~np.isfinite(first)] = ev_ts.max() if len(ev_ts) else 0.0

    # click = 1 for every rating; like/dislike given click
    labels = np.stack([np.ones_like(rating), (rating >= 4).astype(np.float32), (rating <= 2).astype(np.float32)], 1)
    schema = Schema(
        dataset="ml-100k",
        tasks=(TaskSpec("click"), TaskSpec("like", given="click"), TaskSpec("dislike", negative=True, given="click")),
        user_fields=(FieldSpec("age", age_v), FieldSpec("gender", gen_v), FieldSpec("occupation", occ_v)),
        item_fields=(FieldSpec("category", cat_v), FieldSpec("decade", dec_v)),
        history_len=50,
        emb_dim=32,
        category_field="category",
    )
    return Dataset(
        schema=schema,
        user_ids=user_ids,
        item_ids=item_ids,
        user_fields=user_fields,
        item_fields=item_fields,
        item_created=first,
        ev_user=ev_user,
        ev_item=ev_item,
        ev_ts=ev_ts,
        labels=labels.astype(np.float32),
        positive=np.ones(len(ev_user), bool),
        test=temporal_split(ev_user, ev_ts, test_frac),
        implicit_negatives=True,
    )
