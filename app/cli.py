"""The `funnel` command."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Funnel: multi-stage recommendation serving.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="dataset name: ml-100k")],
    data_dir: Annotated[Path, typer.Option(help="where datasets live")] = Path("data"),
) -> None:
    """Download a dataset (ml-100k: from the recbole==1.2.1 wheel on the package index)."""
    if name != "ml-100k":
        raise typer.BadParameter(f"unknown dataset {name!r}; known: ml-100k", param_hint="name")
    from sim.ml100k import fetch_ml100k

    folder = fetch_ml100k(data_dir)
    typer.echo(f"ml-100k ready in {folder}")


def ablation_tasks(spec: str, tasks: list[str]) -> tuple[str, ...]:
    """`--rank-ablation`: '' (none), 'all', or comma-separated task names of the dataset."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return tuple(tasks)
    unknown = [t for t in names if t not in tasks]
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {unknown}; this dataset has {tasks}", param_hint="--rank-ablation")
    return tuple(names)


def parse_task_weights(spec: str, tasks: list[str]) -> dict[str, float]:
    """`--task-weights`: 'task=weight,...' over the dataset's tasks, weights >= 0."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in tasks:
            raise typer.BadParameter(f"unknown task {name!r}; this dataset has {tasks}", param_hint="--task-weights")
        try:
            out[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r}: expected task=number", param_hint="--task-weights") from None
        if not out[name] >= 0:
            raise typer.BadParameter(f"{part!r}: a weight must be >= 0", param_hint="--task-weights")
    return out


@app.command()
def build(
    dataset: Annotated[str, typer.Option(help="ml-100k or synthetic")] = "ml-100k",
    out: Annotated[Path, typer.Option(help="bundle directory, e.g. bundles/v1")] = Path("bundles/v1"),
    data_dir: Annotated[Path, typer.Option(help="where datasets live")] = Path("data"),
    items: Annotated[int, typer.Option(help="synthetic: catalog size")] = 5000,
    users: Annotated[int, typer.Option(help="synthetic: users (default: items / 2.5)")] = 0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    epochs_tt: Annotated[int, typer.Option(help="two-tower epochs")] = 8,
    epochs_rank: Annotated[int, typer.Option(help="ranker epochs")] = 6,
    link: Annotated[Optional[Path], typer.Option(help="also point this symlink (e.g. bundles/current) at the bundle")] = None,
    prerank: Annotated[bool, typer.Option(help="train and ship pre-rank stage B (prerank.onnx)")] = True,
    prerank_hard_baseline: Annotated[bool, typer.Option(help="also train stage B on hard labels only and report its held-out AUC (ablation)")] = False,
    prerank_distill: Annotated[bool, typer.Option(help="--no-prerank-distill ships stage B trained on hard labels only (ablation bundle)")] = True,
    task_weights: Annotated[str, typer.Option(help="ranker loss weight per task, e.g. 'click=3,like=1' (unlisted: the build's defaults, click 3, others 1)")] = "",
    task_experts: Annotated[int, typer.Option(help="CGC: experts owned by each task beside the 4 shared (0: MMoE)")] = 0,
    rank_ablation: Annotated[str, typer.Option(help="also train the ranker without attention and, per listed task (comma-separated, or 'all'), a single-task model; held-out AUCs go to metrics.ranker_ablation")] = "",
    ablation_seeds: Annotated[int, typer.Option(help="with --rank-ablation: train the ranker and its ablations under this many seeds (same rows) and report per-seed and mean AUCs")] = 1,
    recall_distill: Annotated[bool, typer.Option(help="fine-tune the two-tower on the ranker's scores of sampled pools, so recall finds what the ranker ranks on top (--no-recall-distill: the two-tower as trained on the log)")] = True,
) -> None:
    """Train and export a bundle (needs the `train` extra: torch)."""
    try:
        from app.build import build_bundle
    except ImportError as e:
        typer.echo(f"building needs the training extra: pip install -e '.[train]' ({e})", err=True)
        raise typer.Exit(2)
    if dataset == "ml-100k":
        from sim.ml100k import fetch_ml100k, load_ml100k

        folder = fetch_ml100k(data_dir)
        ds = load_ml100k(folder)
        source = {"dataset": "ml-100k", "path": str(folder.resolve()), "test_frac": 0.2}
    elif dataset == "synthetic":
        from dataclasses import asdict

        from sim.synthetic import SyntheticWorld, WorldConfig

        cfg = WorldConfig(n_items=items, n_users=users or max(200, int(items / 2.5)), seed=seed)
        ds = SyntheticWorld(cfg).generate_log()
        source = {"dataset": "synthetic", "world": asdict(cfg)}
    else:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; known: ml-100k, synthetic", param_hint="--dataset")
    manifest = build_bundle(ds, source, out, epochs_tt=epochs_tt, epochs_rank=epochs_rank, seed=seed, prerank=prerank,
                            prerank_hard_baseline=prerank_hard_baseline, prerank_distill=prerank_distill,
                            rank_ablation=ablation_tasks(rank_ablation, ds.schema.task_names),
                            task_weights=parse_task_weights(task_weights, ds.schema.task_names), task_experts=task_experts,
                            ablation_seeds=ablation_seeds, recall_distill=recall_distill)
    if link is not None:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(link.name + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(out.resolve())
        os.replace(tmp, link)
    typer.echo(json.dumps({"bundle": str(out), "version": manifest["version"], "metrics": manifest["metrics"]}, indent=2))


@app.command()
def serve(
    bundle: Annotated[Optional[Path], typer.Option(help="bundle directory (default FUNNEL_BUNDLE or bundles/current)")] = None,
    host: Annotated[Optional[str], typer.Option()] = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option()] = None,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    from core.bundle import MANIFEST
    from core.settings import Settings

    overrides = {k: v for k, v in {"bundle": bundle, "host": host, "port": port, "workers": workers}.items() if v is not None}
    settings = Settings(**overrides)
    if not (Path(settings.bundle) / MANIFEST).exists():
        typer.echo(
            f"no bundle at {settings.bundle}. Build one first, e.g.:\n"
            f"  funnel build --dataset ml-100k --out bundles/ml-100k --link {settings.bundle}",
            err=True,
        )
        raise typer.Exit(2)
    # Settings reach worker processes through the environment.
    for k, v in overrides.items():
        os.environ[f"FUNNEL_{k.upper()}"] = str(v)
    options = dict(
        host=settings.host, port=settings.port, workers=settings.workers,
        log_level=settings.log_level, http="httptools", loop="uvloop",
        # uvicorn builds every access line's arguments before its logger filters by level
        access_log=settings.log_level in ("trace", "debug", "info"),
    )
    if settings.workers > 1:
        # uvicorn's supervisor, with workers that keep their open-connection counts even (app/balance.py)
        from app.balance import run_workers

        run_workers(uvicorn.Config("app.asgi:app", **options))
    else:
        uvicorn.run("app.asgi:app", **options)


@app.command("eval")
def eval_cmd(
    bundle: Annotated[Path, typer.Option(help="bundle directory")] = Path("bundles/current"),
    k: Annotated[int, typer.Option(help="cut-off K")] = 20,
    max_users: Annotated[int, typer.Option(help="sample at most this many held-out users")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Offline metrics on the bundle's held-out split."""
    from app.evaluate import evaluate

    report = evaluate(bundle, k=k, max_users=max_users)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['bundle']} ({report['dataset']}), {report['users']} held-out users")
    t.add_column("path")
    t.add_column(f"recall@{k}", justify="right")
    t.add_column(f"ndcg@{k}", justify="right")
    for name, m in list(report["recall"].items()) + [("pipeline", report["pipeline"])]:
        t.add_row(name, f"{m[f'recall@{k}']:.4f}", f"{m[f'ndcg@{k}']:.4f}")
    c = Console()
    c.print(t)
    c.print({t: v for t, v in report["ranker_auc"].items()}, "ranker AUC per task")


@app.command("bench")
def bench_cmd(
    bundle: Annotated[Path, typer.Option(help="bundle directory")] = Path("bundles/current"),
    requests: Annotated[int, typer.Option(help="timed requests")] = 2000,
    warmup: Annotated[int, typer.Option(help="untimed warm-up requests")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    recent_events: Annotated[int, typer.Option(min=0, help="real-time events each request carries, as a user's feedback adds them (0: build-time history only)")] = 0,
) -> None:
    """In-process latency per stage, per recall path and end to end (p50/p95/p99)."""
    from app.bench import bench

    report = bench(bundle, requests=requests, warmup=warmup, recent_events=recent_events)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['bundle']}: {report['items']} items, {report['requests']} requests, {report['threads']} thread(s)")
    for col in ("stage", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    rows = [("end to end", report["end_to_end_ms"])] + list(report["stages_ms"].items()) + [(f"  recall/{k}", v) for k, v in report["recall_paths_ms"].items()]
    for name, m in rows:
        t.add_row(name, f"{m['p50']:.3f}", f"{m['p95']:.3f}", f"{m['p99']:.3f}")
    c = Console()
    c.print(t)
    c.print(f"peak RSS {report['peak_rss_mb']} MB, bundle {report['bundle_bytes'] / 1e6:.1f} MB, load {report['bundle_load_s']} s")


@app.command("loadtest")
def loadtest_cmd(
    bundle: Annotated[Path, typer.Option(help="bundle the server loads (synthetic: feedback from its world)")] = Path("bundles/current"),
    out: Annotated[Path, typer.Option(help="directory for locust CSV stats and summary.json")] = Path("loadtest-out"),
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 2,
    users: Annotated[int, typer.Option(help="concurrent locust users")] = 100,
    spawn_rate: Annotated[float, typer.Option(help="users started per second")] = 50.0,
    duration: Annotated[float, typer.Option(help="seconds of load per run (or per step)")] = 60.0,
    think_min: Annotated[float, typer.Option(help="think time lower bound, s")] = 0.5,
    think_max: Annotated[float, typer.Option(help="think time upper bound, s")] = 1.5,
    feedback: Annotated[float, typer.Option(help="share of feeds answered with feedback")] = 1.0,
    step_users: Annotated[Optional[str], typer.Option(help="step-load mode: comma-separated user counts, e.g. 50,100,200,300")] = None,
    p99_ms: Annotated[float, typer.Option(help="step-load bound on recommend p99")] = 50.0,
    redis: Annotated[bool, typer.Option("--redis/--sqlite", help="state in a throwaway local redis-server instead of SQLite")] = False,
    warmup: Annotated[float, typer.Option(help="untimed locust warm-up before the measured run, s")] = 10.0,
    recovery_users: Annotated[int, typer.Option(help="fixed mode: then this many users on the same server (does it recover at once?)")] = 0,
    recovery_duration: Annotated[float, typer.Option(help="seconds of the recovery run")] = 30.0,
) -> None:
    """Start the server on 127.0.0.1 with W workers, run locust headless for a bounded time, write CSV + summary.json."""
    from loadtest.run import run_loadtest

    steps = [int(x) for x in step_users.split(",")] if step_users else None
    summary = run_loadtest(bundle, out, workers=workers, users=users, spawn_rate=spawn_rate, duration=duration, think_min=think_min,
                           think_max=think_max, feedback=feedback, step_users=steps, p99_ms=p99_ms, redis=redis,
                           warmup=warmup, recovery_users=recovery_users, recovery_duration=recovery_duration, show=lambda m: typer.echo(m, err=True))
    brief = {k: summary.get(k) for k in ("workers", "users", "items", "rps", "recommend_rps", "error_rate", "max_rps_p99_ok")}
    brief["endpoints"] = {k: {m: v.get(m) for m in ("rps", "p50_ms", "p95_ms", "p99_ms", "failures")} for k, v in summary.get("endpoints", {}).items()}
    brief["server_pss_mb"] = summary.get("server_memory_mb", {}).get("pss")
    typer.echo(json.dumps(brief, indent=2))
    typer.echo(f"wrote {out / 'summary.json'}", err=True)


@app.command("rerank-sim")
def rerank_sim(
    bundle: Annotated[Optional[Path], typer.Option(help="synthetic bundle to serve (default: build/reuse bundles/rerank-sim-<items>-s<seed>-f<fatigue>)")] = None,
    fatigue: Annotated[bool, typer.Option("--fatigue/--no-fatigue", help="world whose users tire of repeated authors/categories")] = True,
    items: Annotated[int, typer.Option(help="catalog size of the world built when no --bundle is given")] = 20_000,
    seed: Annotated[int, typer.Option(help="world seed (when building) and user sample seed")] = 0,
    sessions: Annotated[int, typer.Option(help="simulated users, one feed each")] = 1000,
    count: Annotated[int, typer.Option(help="list length")] = 20,
    bundle_dir: Annotated[Path, typer.Option(help="where a built simulation bundle is cached")] = Path("bundles"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Sort-by-fused vs greedy vs beam (B=4, 8) reranking, scored by the synthetic world's true model."""
    from app.rerank_sim import run_rerank_sim
    from core.settings import Settings

    report = run_rerank_sim(bundle, items=items, seed=seed, fatigue=fatigue, sessions=sessions, count=count,
                            bundle_dir=bundle_dir, settings=Settings(), show=not as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    w = report["world"]
    t = Table(title=f"rerank-sim: {report['sessions']} users, top {count}, world fatigue={w['fatigue']} ({w['items']} items)")
    for col in ("reranker", "reward", "vs sort (± se)", "viewed", "authors", "categories", "ms"):
        t.add_column(col, justify="left" if col == "reranker" else "right")
    for m, r in report["results"].items():
        t.add_row(m, f"{r['session_reward']:.4f}", f"{r.get('reward_vs_sort_pct', 0):+.2f}% ± {r.get('reward_vs_sort_se_pct', 0):.2f}",
                  f"{r['items_viewed']:.3f}", f"{r['distinct_authors']:.2f}", f"{r['distinct_categories']:.2f}", f"{r['rerank_ms_mean']:.2f}")
    Console(width=max(100, Console().width)).print(t)


@app.command("tune-sim")
def tune_sim(
    algo: Annotated[str, typer.Option(help="cem or es")] = "cem",
    rounds: Annotated[int, typer.Option(help="tuner rounds to run")] = 40,
    bundle: Annotated[Optional[Path], typer.Option(help="synthetic bundle (default: build one in a temp dir)")] = None,
    save_bundle: Annotated[Optional[Path], typer.Option(help="build the bundle here (reused when it exists) instead of a temp dir")] = None,
    items: Annotated[int, typer.Option(help="world catalog size when building")] = 3000,
    users: Annotated[int, typer.Option(help="world users when building (many: users should outnumber sessions)")] = 60000,
    seed: Annotated[int, typer.Option(help="world seed (when building) and simulation seed")] = 0,
    population: Annotated[int, typer.Option(help="exploration buckets per round")] = 6,
    traffic_share: Annotated[float, typer.Option(help="share of users in the experiment")] = 1.0,
    min_impressions: Annotated[int, typer.Option(help="impressions per bucket that close a round")] = 2000,
    sigma: Annotated[float, typer.Option(help="initial σ (log|β| units)")] = 0.5,
    rerank: Annotated[str, typer.Option(help="served rerank mode: sort, greedy or beam")] = "sort",
    flip_at: Annotated[Optional[int], typer.Option(help="fault run: the world's preferences flip before this round")] = None,
    tuner: Annotated[Optional[str], typer.Option(help="extra tuner config as JSON, e.g. '{\"step_size\": 0.2}'")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="run the server on a Redis store instead of SQLite")] = None,
    eval_users: Annotated[int, typer.Option(help="users whose expected reward measures prior, final, oracle and each round")] = 1500,
    oracle_users: Annotated[int, typer.Option(help="other users the oracle is searched on")] = 1000,
    oracle_iters: Annotated[Optional[int], typer.Option(help="oracle CEM iterations (default 25 with --rerank sort, else 6)")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of reward per round (default tune-sim-<algo>.png; needs matplotlib)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The online fusion tuner against the synthetic world: simulated users over the HTTP API."""
    from app.tune_sim import run_tune_sim

    report = run_tune_sim(
        algo=algo, rounds=rounds, bundle=bundle, save_bundle=save_bundle, items=items, users=users, seed=seed,
        population=population, traffic_share=traffic_share, min_impressions=min_impressions, sigma=sigma, rerank=rerank,
        flip_at=flip_at, tuner=json.loads(tuner) if tuner else None, redis_url=redis_url, eval_users=eval_users,
        oracle_users=oracle_users, oracle_iters=oracle_iters,
        plot=plot or Path(f"tune-sim-{algo}.png"), show=True,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{report['algo'].upper()} {report['rounds']} rounds, {report['sessions']} sessions: reward per impression "
        f"prior {report['reward_prior']:.4f} → final {report['reward_final']:.4f} ({report['gain_pct']:+.1f}%), "
        f"oracle {report['reward_oracle']:.4f} ({report['gap_to_oracle_pct']:.1f}% gap); rollbacks {report['rollback_rounds']}; "
        f"plot {report.get('plot')}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
