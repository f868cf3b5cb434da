"""Fixtures shared by the store, tuner and admin tests: the same tests run against the
SQLite store and the Redis store (Redis at FUNNEL_TEST_REDIS_URL, default
redis://127.0.0.1:6379/15; each test gets its own key prefix, deleted afterwards).
No tests here."""
from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("FUNNEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BACKENDS = ["sqlite", "redis"]


def redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0).ping()
        return True
    except Exception:
        return False


def make_store(kind: str, tmp_path, prefix: str | None = None, served_ttl_s: float = 7 * 24 * 3600.0):
    if kind == "sqlite":
        from core.store import SQLiteStore

        return SQLiteStore(tmp_path / "state" / "funnel.db", served_ttl_s)
    if not redis_available():
        pytest.skip(f"no Redis at {REDIS_URL}")
    from core.redis_store import RedisStore

    return RedisStore(REDIS_URL, prefix=prefix or f"funnel-test:{uuid.uuid4().hex}:", served_ttl_s=served_ttl_s)


def settings_for(kind: str, tmp_path, prefix: str, **kw):
    """Settings that make create_app open this backend (SQLite under tmp_path or Redis with the prefix)."""
    from core.settings import Settings

    if kind == "redis":
        if not redis_available():
            pytest.skip(f"no Redis at {REDIS_URL}")
        kw.update(redis_url=REDIS_URL, redis_prefix=prefix)
    return Settings(db_path=tmp_path / "state" / "funnel.db", **kw)


def flush_redis_prefix(prefix: str) -> None:
    if not redis_available():
        return
    from core.redis_store import RedisStore

    s = RedisStore(REDIS_URL, prefix=prefix)
    s.flush_prefix()
    s.close()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture()
def store(backend, tmp_path):
    prefix = f"funnel-test:{uuid.uuid4().hex}:"
    s = make_store(backend, tmp_path, prefix)
    yield s
    if backend == "redis":
        s.flush_prefix()
    s.close()


@pytest.fixture()
def redis_prefix():
    prefix = f"funnel-test:{uuid.uuid4().hex}:"
    yield prefix
    flush_redis_prefix(prefix)


def metric(c, name: str, **labels) -> float:
    """One sample from the app's /metrics (labels sorted by name, as the metrics declare them); 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
