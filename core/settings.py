"""Typed settings: one object, env prefix FUNNEL_, passed in (never read from globals)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
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
    # Bearer token of the admin API. A SecretStr: never shown by repr(settings), logs or errors.
    admin_token: SecretStr | None = None
    log_level: str = "info"

    # Recall: per-source quotas (candidates kept per path before merge) and the merged size
    quota_ann: int = 300
    quota_itemcf: int = 300
    quota_graph: int = 200
    quota_popular: int = 100
    quota_fresh: int = 50
    quota_follow: int = 100
    recall_total: int = 800
    merge_multi_hit: float = 1.0  # merge priority ÷ (1 + this × (paths that found the item − 1))
    # "calibrated": the learned merge (manifest merge_calibration: per-path hit rate per rank and a
    # logistic regression over them, fitted on a validation slice of the training data);
    # "rank": rank/quota. Calibrated falls back to rank for bundles without a calibration.
    merge_mode: Literal["calibrated", "rank"] = "calibrated"
    ann_k: int = 400
    # Item-CF: seeds = the user's last N positive items, weighted by recency
    itemcf_seeds: int = 30
    itemcf_decay: float = 0.9  # weight of the s-th most recent seed = decay**s
    # Graph walks (Pixie-style, over the user-item bipartite graph)
    graph_walkers: int = 400
    graph_steps: int = 4
    graph_restart: float = 0.3
    graph_seeds: int = 20
    # Early stop once this many items have graph_stop_visits visits; 0 = off. Off by default:
    # with 400 walkers x 4 hops it stopped no walk of 300 users on the 100k and 1M synthetic
    # worlds, and its test (a sort of the visits so far) cost 0.07-0.13 ms per request.
    graph_stop_items: int = 0
    graph_stop_visits: int = 4
    follow_per_author: int = 10  # newest items taken per followed author

    # Cascade sizes
    prerank_a_keep: int = 500
    # stage B (bundles with prerank.onnx): what the ranker scores; without stage B the ranker
    # scores all prerank_a_keep. 200, not 150: on the 100k world stage B to 150 kept 0.82 of the
    # ranker's click-head top-20, 200 kept 0.86, for 0.2% of exhaustive-ranking compute
    prerank_b_keep: int = Field(200, ge=1)

    # Fusion: score = prod_k (p_k + alpha_k) ** beta_k. Tasks missing here get defaults from
    # the schema (beta 1 for positive tasks, -1 for negative ones).
    fusion: dict[str, FusionWeight] = Field(default_factory=dict)

    # Rerank (rerank/beam.py, rerank/reward.py): "beam" searches lists of ctx.count items from
    # the top rerank_top_m fused candidates under the list reward; "greedy" is beam width 1;
    # "sort" returns the fused order.
    rerank_mode: Literal["beam", "greedy", "sort"] = "beam"
    rerank_beam_width: int = Field(8, ge=1, le=64)
    rerank_top_m: int = Field(150, ge=1)
    rerank_author_window: int = Field(5, ge=0)  # previous slots checked for the same author
    rerank_author_penalty: float = Field(0.05, ge=0.0, le=1.0)  # share of an item's value lost per same-author item there
    rerank_category_window: int = Field(5, ge=0)
    rerank_category_free: int = Field(1, ge=0)  # same-category items in the window that cost nothing
    rerank_category_penalty: float = Field(0.03, ge=0.0, le=1.0)  # per same-category item beyond the free ones
    rerank_min_author_gap: int = Field(2, ge=0)  # hard: one author's items at least this many slots apart (<= 1: off)
    rerank_max_per_category: int = Field(0, ge=0)  # hard: at most this many of a category per rerank_cap_window slots (0: off)
    rerank_cap_window: int = Field(5, ge=1)
    rerank_next_items: int = Field(5, ge=0)  # best unused items valued as the next page (V_next)
    rerank_next_weight: float = Field(1.0, ge=0.0)
    rerank_continue_task: str = "continue"  # head giving P(continue); without it a proxy from the negative heads
    rerank_continue_base: float = Field(0.9, ge=0.0, le=1.0)  # the proxy's continue rate with no negative feedback

    # Fusion bounds, online tuner and state store (fusion/tuner.py, core/store.py, core/redis_store.py).
    # Bounds hold for manual changes and the tuner alike: alpha in [min, max]; |beta| in
    # [min, max] with beta's sign fixed by the task's polarity.
    fusion_alpha_min: float = Field(0.0, ge=0.0)
    fusion_alpha_max: float = Field(1.0, ge=0.0)
    fusion_beta_min: float = Field(0.01, gt=0.0)
    fusion_beta_max: float = Field(5.0, gt=0.0)
    fusion_cache_seconds: float = Field(1.0, ge=0.0)  # how stale a worker's view of params/tuner may be
    tuner_scene: str = "home"  # the scene the tuner experiments on
    tuner: dict = Field(default_factory=dict)  # initial TunerConfig fields (JSON), used until the store holds a config
    tuner_poll_seconds: float = Field(2.0, ge=0.0)  # each worker checks whether the round can close (0: never)
    redis_url: str | None = None  # set: state in Redis (several workers/hosts); unset: SQLite at db_path
    redis_prefix: str = "funnel:"

    # Runtime
    compute_threads: int = 1
    # threads per worker writing feedback (0: the event loop's default pool); SQLite serialises the writes anyway
    feedback_threads: int = Field(1, ge=0, le=32)
    # The interpreter's GIL switch interval in each worker (sys.setswitchinterval). A worker's
    # event loop, I/O threads and compute thread share one GIL; when the compute thread runs
    # Python between numpy/onnxruntime calls, a request waiting on the loop waits up to this
    # long per hand-off. Python's 5 ms: 1 ms cut p50/p99 on the 5k bundle and made no difference
    # out of the noise at 1M items (README "Overload").
    gil_switch_interval_ms: float = Field(5.0, gt=0.0, le=100.0)
    # ONNX models re-saved with memory-mapped initializers (shared by workers); default: beside db_path
    model_cache_dir: Path | None = None
    served_log_ttl_s: float = 7 * 24 * 3600.0
    history_limit: int = 200  # real-time history events read per request

    # Deadlines (app/pipeline.py "Deadlines and fail-open"). The request budget counts from the
    # request's arrival; an optional stage (rank, rerank) starts only while at least its own
    # budget is left, a recall path returning after recall_path_budget_ms is late and its
    # candidates are dropped, and the expensive recall paths not yet run once the recall
    # stage's budget is spent are skipped (popular and fresh always run).
    request_budget_ms: float = Field(150.0, gt=0)
    recall_budget_ms: float = Field(60.0, gt=0)
    recall_path_budget_ms: float = Field(30.0, gt=0)
    rank_budget_ms: float = Field(50.0, gt=0)
    rerank_budget_ms: float = Field(30.0, gt=0)

    # State store outages (app/resilience.py): after a failed call the store is not asked again
    # on the request path for store_retry_seconds; feedback goes to a local durable spool
    # (SQLite, fsync per commit) of at most spool_max_events events, drained every
    # spool_drain_seconds once the store answers again. Default spool: beside db_path.
    store_timeout_s: float = Field(2.0, gt=0)  # Redis socket timeout
    store_retry_seconds: float = Field(1.0, ge=0)
    spool_path: Path | None = None
    spool_max_events: int = Field(100_000, ge=1)
    spool_drain_seconds: float = Field(1.0, gt=0)

    # Hostile input and overload (app/guard.py)
    max_body_bytes: int = Field(1_048_576, ge=1024)  # larger request bodies get 413
    max_inflight: int = Field(24, ge=1)  # per worker, /v1/* requests being handled; beyond: 503 + Retry-After (README "Overload")
    retry_after_s: int = Field(1, ge=1)  # Retry-After of the 503s
    cors_origins: list[str] = Field(default_factory=list)  # CORS off unless origins are listed
    bundles_dir: Path | None = None  # where POST /admin/bundles/reload looks for versions (default: the bundle's parent)

    def model_cache(self) -> Path:
        return self.model_cache_dir if self.model_cache_dir is not None else Path(self.db_path).parent / "model-cache"

    def spool(self) -> Path:
        return self.spool_path if self.spool_path is not None else Path(self.db_path).parent / "spool.db"

    def bundles_root(self) -> Path:
        return Path(self.bundles_dir) if self.bundles_dir is not None else Path(self.bundle).absolute().parent

    def admin_secret(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token is not None else None

    def quotas(self) -> dict[str, int]:
        return {
            "ann": self.quota_ann,
            "itemcf": self.quota_itemcf,
            "graph": self.quota_graph,
            "popular": self.quota_popular,
            "fresh": self.quota_fresh,
            "follow": self.quota_follow,
        }
