"""Typed settings: one object, env prefix FUNNEL_, passed in (never read from globals)."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FusionWeight(BaseModel):
    alpha: float = Field(0.01, ge=0.0, le=10.0)
    beta: float = Field(1.0, ge=-10.0, le=10.0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FUNNEL_", env_nested_delimiter="__", extra="ignore")

    # Where things live
    bundle: Path = Path("bundles/current")
    data_dir: Path = Path("data")
    db_path: Path = Path("state/funnel.db")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    admin_token: str | None = None
    log_level: str = "info"

    # Recall: per-source quotas (candidates kept per path before merge) and the merged size
    quota_ann: int = 300
    quota_itemcf: int = 300
    quota_graph: int = 200
    quota_popular: int = 100
    quota_fresh: int = 50
    recall_total: int = 800
    ann_k: int = 400
    # Item-CF: seeds = the user's last N positive items, weighted by recency
    itemcf_seeds: int = 30
    itemcf_decay: float = 0.9  # weight of the s-th most recent seed = decay**s
    # Graph walks (Pixie-style, over the user-item bipartite graph)
    graph_walkers: int = 400
    graph_steps: int = 4
    graph_restart: float = 0.3
    graph_seeds: int = 20

    # Cascade sizes
    prerank_a_keep: int = 500
    rank_keep: int = 150

    # Fusion: score = prod_k (p_k + alpha_k) ** beta_k. Tasks missing here get defaults from
    # the schema (beta 1 for positive tasks, -1 for negative ones).
    fusion: dict[str, FusionWeight] = Field(default_factory=dict)

    # Runtime
    compute_threads: int = 1
    served_log_ttl_s: float = 7 * 24 * 3600.0
    history_limit: int = 200  # real-time history events read per request

    def quotas(self) -> dict[str, int]:
        return {
            "ann": self.quota_ann,
            "itemcf": self.quota_itemcf,
            "graph": self.quota_graph,
            "popular": self.quota_popular,
            "fresh": self.quota_fresh,
        }
