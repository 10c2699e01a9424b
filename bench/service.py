"""Service benchmarks, run by hand: ``.venv/bin/python bench/service.py``.

- submissions: 2,000 jobs POSTed by 64 concurrent clients to a running uvicorn
  (``trainq api``); throughput and p50/p99 latency;
- claims: 4 dispatcher processes draining 10,000 queued jobs; no job lost or
  claimed twice;
- metrics: ingestion through the dispatcher's write path (``queue.write_metrics``)
  in points/s, and reading one 100,000-point series in full and downsampled to
  1,000 points.

Each runs on SQLite and, when reachable, PostgreSQL
(``TRAINQ_BENCH_DATABASE_URL``, default a ``trainq_bench`` database on 127.0.0.1).
MLflow 3.17's figures, measured on this machine with SQLite, are printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import queue  # noqa: E402
from service.auth import create_token  # noqa: E402
from service.context import ServiceContext  # noqa: E402
from service.datasets import register_builtins  # noqa: E402
from service.db import make_engine, make_sessionmaker  # noqa: E402
from service.migrate import downgrade, upgrade  # noqa: E402
from service.models import Job, JobStatus, Team  # noqa: E402
from service.results import read_series  # noqa: E402
from service.settings import Settings  # noqa: E402

POSTGRES_URL = os.environ.get(
    "TRAINQ_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/trainq_bench"
)
SPEC = {
    "name": "bench",
    "dataset": {"name": "digits"},
    "model": {
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": 32},
            {"type": "relu"},
            {"type": "dense", "units": 10},
        ],
        "loss": "softmax_cross_entropy",
    },
    "optimizer": {"type": "adam", "lr": 0.001},
    "training": {"epochs": 1},
}
#: The rate at which the open-loop run offers submissions (the target throughput).
OFFERED_RATE = 500.0
MLFLOW = {
    "ingest_points_per_s": 4_900,
    "read_full_100k_s": 5.05,
    "read_sampled_s": 0.4,
    "create_per_s": 67,
    "create_p99_ms": 4000,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fresh(url: str) -> ServiceContext:
    if url.startswith("postgresql"):
        admin = make_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        name = url.rsplit("/", 1)[1]
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    downgrade(url, "base")
    upgrade(url)
    home = Path(tempfile.mkdtemp(prefix="trainq-bench-"))
    return ServiceContext.from_settings(
        Settings(home=home, database_url=url, artifact_dir=home / "artifacts")
    )


# --- submissions over HTTP ----------------------------------------------------------------


async def _submit_all(
    url: str, token: str, total: int, concurrency: int, rate_per_s: float | None = None
) -> list[float]:
    """POST ``total`` jobs from ``concurrency`` clients; with ``rate_per_s`` the requests
    are offered at that rate (open loop), else each client sends as fast as it can.
    The client is aiohttp: a lighter client leaves more of the 2 cores to the server."""
    import aiohttp

    latencies: list[float] = []
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as client:
        started = time.perf_counter()

        async def one_client() -> None:
            for i in counter:
                if rate_per_s is not None:
                    due = started + i / rate_per_s
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                sent = time.perf_counter()
                async with client.post("/api/v1/jobs", json={**SPEC, "name": f"bench-{i}"}) as r:
                    body = await r.read()
                latencies.append(time.perf_counter() - sent)
                if r.status != 201:
                    raise RuntimeError(body.decode())

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


def bench_submissions(
    context: ServiceContext, *, total: int, concurrency: int, api_workers: int
) -> dict[str, float]:
    with context.session_factory() as session:
        register_builtins(session=session)
        _, token = create_token(session=session, team_name="bench")
    port = _free_port()
    env = os.environ | {
        "TRAINQ_DATABASE_URL": context.settings.resolved_database_url(),
        "TRAINQ_HOME": str(context.settings.home),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "api",
            "--port",
            str(port),
            "--workers",
            str(api_workers),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open("/tmp/bench-api.log", "w"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)
        asyncio.run(_submit_all(url, token, 100, concurrency))  # warm-up
        started = time.perf_counter()
        latencies = asyncio.run(_submit_all(url, token, total, concurrency))
        elapsed = time.perf_counter() - started
        offered = sorted(
            asyncio.run(_submit_all(url, token, total, concurrency, rate_per_s=OFFERED_RATE))
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    with context.session_factory() as session:
        stored = session.query(Job).count()
    assert stored == 2 * total + 100, f"{stored} jobs stored, {2 * total + 100} sent"
    return {
        "per_s": total / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "offered_p50_ms": 1000 * statistics.median(offered),
        "offered_p99_ms": 1000 * _percentile(offered, 0.99),
    }


# --- claims -----------------------------------------------------------------------------


def _claimer(url: str, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    factory = make_sessionmaker(make_engine(url))
    claimed = []
    start.wait()
    while job := queue.claim_next_job(session_factory=factory, owner="b", lease_s=600):
        claimed.append(job.id)
    out.put(claimed)


def bench_claims(context: ServiceContext, *, total: int, dispatchers: int) -> dict[str, float]:
    with context.session_factory() as session:
        session.execute(text("DELETE FROM attempts"))
        session.execute(text("DELETE FROM jobs"))
        team = session.query(Team).first()
        assert team is not None
        session.bulk_insert_mappings(
            Job,
            [
                {
                    "team_id": team.id,
                    "name": f"c{i}",
                    "status": JobStatus.queued,
                    "spec": SPEC,
                    "dataset_name": "digits",
                    "dataset_version": 1,
                    "priority": i % 5,
                    "max_retries": 0,
                }
                for i in range(total)
            ],
        )
        session.commit()
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(dispatchers + 1)
    out: mp.Queue = ctx.Queue()
    url = context.settings.resolved_database_url()
    procs = [ctx.Process(target=_claimer, args=(url, start, out)) for _ in range(dispatchers)]
    for p in procs:
        p.start()
    start.wait()
    started = time.perf_counter()
    claimed = [job_id for _ in procs for job_id in out.get()]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    assert len(claimed) == total and len(set(claimed)) == total, "a job lost or claimed twice"
    return {"per_s": total / elapsed}


# --- metrics ----------------------------------------------------------------------------


def bench_metrics(context: ServiceContext, *, points: int, batch: int) -> dict[str, float]:
    factory = context.session_factory
    with factory() as session:
        session.execute(text("DELETE FROM metrics"))
        session.execute(text("DELETE FROM attempts"))
        session.execute(text("DELETE FROM jobs"))
        team = session.query(Team).first()
        assert team is not None
        job = Job(
            team_id=team.id, name="metrics", spec=SPEC, dataset_name="digits", dataset_version=1
        )
        session.add(job)
        session.commit()
        job_id = job.id
    claimed = queue.claim_next_job(session_factory=factory, owner="b", lease_s=600)
    assert claimed is not None
    started = time.perf_counter()
    for first in range(0, points, batch):
        rows = [("loss", step, 1.0 / (step + 1)) for step in range(first, first + batch)]
        queue.write_metrics(
            session_factory=factory, job_id=job_id, attempt=claimed.attempt, rows=rows
        )
    ingest = points / (time.perf_counter() - started)
    with factory() as session:
        stored = session.get(Job, job_id)
        assert stored is not None
        full_times, sampled_times = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            series = read_series(session=session, job=stored, names=["loss"])
            full_times.append(time.perf_counter() - t0)
            assert len(series["loss"]) == points
            t0 = time.perf_counter()
            series = read_series(session=session, job=stored, names=["loss"], max_points=1000)
            sampled_times.append(time.perf_counter() - t0)
            assert len(series["loss"]) <= 1000
    return {
        "ingest_per_s": ingest,
        "read_full_s": min(full_times),
        "read_sampled_s": min(sampled_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--claim-jobs", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=100_000)
    args = parser.parse_args()
    urls = {"sqlite": f"sqlite:///{tempfile.mkdtemp(prefix='trainq-bench-')}/bench.db"}
    try:
        make_engine(POSTGRES_URL.rsplit("/", 1)[0] + "/postgres").connect().close()
        urls["postgresql"] = POSTGRES_URL
    except Exception as exc:  # reported: the benchmark runs on what is there
        print(f"PostgreSQL not reachable ({type(exc).__name__}); SQLite only")
    rows = []
    for name, url in urls.items():
        context = _fresh(url)
        sub = bench_submissions(
            context, total=args.jobs, concurrency=args.concurrency, api_workers=args.api_workers
        )
        claims = bench_claims(context, total=args.claim_jobs, dispatchers=4)
        metrics = bench_metrics(context, points=args.points, batch=1000)
        rows.append((name, sub, claims, metrics))
        context.engine.dispose()
    print()
    print(
        "| database | submissions/s (64 clients) | p50 / p99 ms | p50 / p99 ms at 500/s "
        "| claims/s (4 dispatchers) | metric points/s | 100k series full s "
        "| downsampled to 1k s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, sub, claims, metrics in rows:
        print(
            f"| {name} | {sub['per_s']:.0f} | {sub['p50_ms']:.1f} / {sub['p99_ms']:.1f} | "
            f"{sub['offered_p50_ms']:.1f} / {sub['offered_p99_ms']:.1f} | "
            f"{claims['per_s']:.0f} | {metrics['ingest_per_s']:,.0f} | "
            f"{metrics['read_full_s']:.3f} | {metrics['read_sampled_s']:.3f} |"
        )
    print(
        f"| MLflow 3.17 (SQLite) | {MLFLOW['create_per_s']} (runs) | - / "
        f"{MLFLOW['create_p99_ms']} | | | {MLFLOW['ingest_points_per_s']:,} | "
        f"{MLFLOW['read_full_100k_s']} | {MLFLOW['read_sampled_s']} (320 points) |"
    )
    print()
    for name, sub, _, metrics in rows:
        targets = [
            ("submissions >= 500/s", sub["per_s"] >= 500),
            ("p99 < 50 ms at 500/s", sub["offered_p99_ms"] < 50),
            ("ingestion >= 50,000 points/s", metrics["ingest_per_s"] >= 50_000),
            ("downsampled <= 50 ms", metrics["read_sampled_s"] <= 0.05),
            ("full series <= 0.5 s", metrics["read_full_s"] <= 0.5),
        ]
        print(name + ": " + ", ".join(f"{t} {'met' if ok else 'MISSED'}" for t, ok in targets))


if __name__ == "__main__":
    main()
