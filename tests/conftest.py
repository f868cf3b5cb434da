"""Shared fixtures: a small MovieLens-shaped dataset with real preference structure, in
RecBole's atomic layout, and a bundle built from it once per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from core.settings import Settings

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_fake_ml100k(folder: Path, n_users: int = 300, n_items: int = 400, per_user: int = 40, seed: int = 0) -> Path:
    """Users prefer one or two genres; ratings are higher in preferred genres."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_genre = rng.integers(0, len(GENRES), n_items)
    pop = rng.zipf(1.6, n_items).astype(float)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        fav = rng.choice(len(GENRES), 2, replace=False)
        w = pop * np.where(np.isin(item_genre, fav), 8.0, 1.0)
        items = rng.choice(n_items, per_user, replace=False, p=w / w.sum())
        ts = 880000000 + np.sort(rng.integers(0, 10_000_000, per_user))
        for i, t in zip(items, ts):
            r = int(np.clip(rng.normal(4.0 if item_genre[i] in fav else 2.5, 0.8), 1, 5))
            lines.append(f"{u}\t{i + 1}\t{r}\t{t}")
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i + 1}\tMovie {i + 1}\t{1950 + (i % 50)}\t{GENRES[item_genre[i]]}" for i in range(n_items)]
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n")
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += [f"{u}\t{18 + u % 50}\t{'MF'[u % 2]}\t{['student', 'engineer', 'artist'][u % 3]}\t{10000 + u}" for u in range(1, n_users + 1)]
    (folder / "ml-100k.user").write_text("\n".join(users) + "\n")
    return folder


@pytest.fixture(scope="session")
def ml_folder(tmp_path_factory) -> Path:
    return write_fake_ml100k(tmp_path_factory.mktemp("data") / "ml-100k")


@pytest.fixture(scope="session")
def ml_bundle(ml_folder, tmp_path_factory) -> Path:
    from app.build import build_bundle
    from sim.ml100k import load_ml100k

    out = tmp_path_factory.mktemp("bundles") / "fake-ml"
    source = {"dataset": "ml-100k", "path": str(ml_folder), "test_frac": 0.2}
    build_bundle(load_ml100k(ml_folder), source, out, epochs_tt=3, epochs_rank=2)
    return out


@pytest.fixture()
def settings(ml_bundle, tmp_path) -> Settings:
    return Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db")


@pytest.fixture()
def client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings, background_load=False)) as c:
        yield c


@pytest.fixture(scope="session")
def loaded_bundle(ml_bundle):
    from core.bundle import Bundle

    return Bundle.load(ml_bundle)


@pytest.fixture(scope="session")
def pipeline(loaded_bundle):
    from app.pipeline import Pipeline

    return Pipeline(loaded_bundle, Settings())
