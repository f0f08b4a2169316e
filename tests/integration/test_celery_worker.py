"""End to end over real processes: HTTP API -> Postgres -> Redis -> Celery worker -> Postgres."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

TINY_LAYERS = 4  # tiny-random-llama has 4 blocks


def spec(rows: int, batch_size: int = 4) -> dict:
    texts = [{"text": f"sample {i}: " + "the quick brown fox jumps over the lazy dog " * 6} for i in range(rows)]
    return {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": texts, "limit": rows, "max_tokens": 64},
        "stages": {"profile": {"batch_size": batch_size}, "avss": {"plots": False}},
    }


def layer_rows_in_postgres(pg_url: str, analysis_id: str) -> list[tuple]:
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        return conn.execute(
            "SELECT stage, scorer, layer, count(*) FROM layer_scores WHERE analysis_id = %s "
            "GROUP BY stage, scorer, layer ORDER BY 1, 2, 3",
            (analysis_id,),
        ).fetchall()


def test_submit_over_http_runs_on_a_celery_worker(cluster: Cluster, pg_url: str) -> None:
    cluster.start_worker()
    cluster.start_api()
    with cluster.client() as client:
        assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
        resp = client.post("/v1/analyses", json=spec(8))
        assert resp.status_code == 201, resp.text
        job = cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"})
        assert job["state"] == "SUCCEEDED", job
        layers = client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "avss"}).json()["items"]
        assert [r["layer"] for r in layers] == list(range(TINY_LAYERS))
        assert all(r["values"]["avss"] is not None for r in layers)
    rows = layer_rows_in_postgres(pg_url, job["id"])
    assert {(stage, scorer) for stage, scorer, _, _ in rows} == {("profile", "profile"), ("avss", "avss")}
    assert all(count == 1 for *_, count in rows)


def test_kill9_worker_mid_job_a_new_worker_finishes_it_once(cluster: Cluster, pg_url: str) -> None:
    first = cluster.start_worker()
    cluster.start_api()
    with cluster.client() as client:
        analysis_id = client.post("/v1/analyses", json=spec(1500, batch_size=1)).json()["id"]
        job = cluster.wait_for(client, analysis_id, {"RUNNING"})
        while not (job["progress"]["stage"] == "profile" and job["progress"]["done"] > 0):
            time.sleep(0.2)
            job = cluster.wait_for(client, analysis_id, {"RUNNING"})
        first.kill9()
        assert client.get(f"/v1/analyses/{analysis_id}").json()["state"] == "RUNNING"
        cluster.start_worker()
        job = cluster.wait_for(client, analysis_id, {"SUCCEEDED", "FAILED"}, timeout=300)
        assert job["state"] == "SUCCEEDED", job
        assert job["attempt"] == 2
    rows = layer_rows_in_postgres(pg_url, analysis_id)
    assert len(rows) == 2 * TINY_LAYERS and all(count == 1 for *_, count in rows)


def test_redis_down_at_submit_the_job_runs_once_redis_is_back(cluster: Cluster) -> None:
    cluster.start_api()
    cluster.redis.stop()
    with cluster.client() as client:
        resp = client.post("/v1/analyses", json=spec(4))
        assert resp.status_code == 201, resp.text  # accepted and stored although the broker is down
        analysis_id = resp.json()["id"]
        assert client.get("/readyz").status_code == 503
        cluster.redis.start()
        cluster.start_worker()
        job = cluster.wait_for(client, analysis_id, {"SUCCEEDED", "FAILED"})
        assert job["state"] == "SUCCEEDED", job
        assert job["attempt"] == 1
