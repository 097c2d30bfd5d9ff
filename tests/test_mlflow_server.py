"""The MLflow tracking server on PostgreSQL, as the deployment runs it, with real processes.

Runs and metrics land in PostgreSQL, artifacts are proxied by the server and refuse `..`, and
neither a PostgreSQL restart nor a stopped-and-restarted MLflow server loses or duplicates data.
The services come from `services.py` (native PostgreSQL, no Docker); without PostgreSQL these
tests skip, and under CI (CI=true) they fail.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from services import (  # noqa: F401  (the fixtures `mlflow_server` and `postgres`)
    MlflowServer,
    PostgresCluster,
    mlflow_server_fixture,
    pid_alive,
    postgres_fixture,
    process_tree,
)

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"

pytestmark = pytest.mark.slow  # every test starts PostgreSQL and an MLflow server


def sql(cluster: PostgresCluster, query: str, *params) -> list[tuple]:
    """Rows of one query on the MLflow database, read directly from PostgreSQL."""
    with contextlib.closing(cluster.connect()) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def new_run(server: MlflowServer, name: str) -> tuple[mlflow.MlflowClient, str, str]:
    client = mlflow.MlflowClient(server.url)
    experiment_id = client.create_experiment(name)
    return client, experiment_id, client.create_run(experiment_id).info.run_id


def raw_request(server: MlflowServer, method: str, path: str, body: bytes | None = None):
    """(status, Location header, body) of one request; `path` is sent as given, not normalised."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Location"), response.read()
    finally:
        conn.close()


def metric_rows(cluster: PostgresCluster, run_id: str, key: str) -> list[tuple[int, float]]:
    return sql(
        cluster,
        "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step, value",
        run_id,
        key,
    )


def test_runs_go_into_postgres_and_artifacts_come_back_over_http(mlflow_server, postgres, tmp_path):
    client, experiment_id, run_id = new_run(mlflow_server, "postgres-roundtrip")
    client.log_param(run_id, "schedule", "cosine")
    client.log_param(run_id, "guidance", "2.5")
    client.set_tag(run_id, "stage", "sample")
    for step, fid in enumerate([31.5, 20.25, 12.125]):
        client.log_metric(run_id, "fid", fid, step=step)
    grid = tmp_path / "grid.bin"
    grid.write_bytes(bytes(range(256)) * 40)  # binary, not text: the bytes must survive as-is
    client.log_artifact(run_id, str(grid), artifact_path="samples")

    assert sql(postgres, "SELECT experiment_id, status FROM runs WHERE run_uuid = %s", run_id) == [
        (int(experiment_id), "RUNNING")
    ]
    assert metric_rows(postgres, run_id, "fid") == [(0, 31.5), (1, 20.25), (2, 12.125)]
    params = sql(postgres, "SELECT key, value FROM params WHERE run_uuid = %s", run_id)
    assert sorted(params) == [("guidance", "2.5"), ("schedule", "cosine")]
    assert ("stage", "sample") in sql(
        postgres, "SELECT key, value FROM tags WHERE run_uuid = %s", run_id
    )

    # Proxied: the run's artifact root is the server's, and the bytes sit in its destination.
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    relative = f"{experiment_id}/{run_id}/artifacts/samples/grid.bin"
    assert (mlflow_server.artifacts_dir / relative).read_bytes() == grid.read_bytes()
    downloaded = client.download_artifacts(run_id, "samples/grid.bin", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes() == grid.read_bytes()
    with urllib.request.urlopen(f"{mlflow_server.url}{ARTIFACTS_API}/{relative}") as response:
        assert response.read() == grid.read_bytes()


# Raw paths after the artifacts route, sent as they are; none climbs more than four levels.
TRAVERSALS = [
    "../../etc/passwd",
    "%2E%2E/%2E%2E/etc/passwd",
    "%2e%2e%2f%2e%2e%2fescape.txt",
    "..%2F..%2Fescape.txt",
    "%252E%252E/%252E%252E/escape.txt",  # double-encoded
    "1/run/artifacts/../../../../escape.txt",  # climbs out of the destination by one
    "1/%2E%2E/%2E%2E/escape.txt",
    "..",
    "/etc/passwd",  # the route then holds `//etc/passwd`
    "%2Fetc%2Fpasswd",
    "/../escape.txt",
    "%2F..%2Fescape.txt",
]


@pytest.fixture
def deep_server(postgres, tmp_path):
    """A server whose artifact destination is four levels below tmp_path: every path in
    TRAVERSALS would resolve inside tmp_path, where the test looks for escaped files."""
    destination = tmp_path / "a" / "b" / "c" / "artifacts"
    with MlflowServer(postgres.uri, destination, tmp_path / "mlflow") as server:
        yield server


def test_artifact_paths_with_dot_dot_are_refused(deep_server, tmp_path):
    server = deep_server
    client, _, run_id = new_run(server, "traversal")
    destination = server.artifacts_dir
    passwd = Path("/etc/passwd").read_bytes()
    local = tmp_path / "f.txt"
    local.write_text("payload")
    before = {p for p in tmp_path.rglob("*") if destination not in p.parents}

    for path in TRAVERSALS:
        for method, body in (("PUT", b"escaped"), ("GET", None), ("DELETE", None)):
            url = f"{ARTIFACTS_API}/{path}"
            status, location, answer = raw_request(server, method, url, body)
            if status == 308:
                # Only DELETE goes through Flask's slash merging: a path that starts with `/` is
                # redirected to the same path without it, i.e. relative to the destination.
                merged = urllib.parse.unquote(path).lstrip("/")
                assert (method, location) == ("DELETE", f"{server.url}{ARTIFACTS_API}/{merged}")
                status, _, answer = raw_request(
                    server, method, urllib.parse.urlsplit(location).path
                )
                if ".." not in merged.split("/"):
                    assert status == 200, (method, path, answer)  # deletes nothing: no such file
                    continue
            assert status == 400, (method, path, status, answer)
            assert b"Invalid path" in answer, (method, path, answer)
    for path in ("../..", "%2E%2E"):  # the listing endpoint takes the path as a query parameter
        status, _, _ = raw_request(server, "GET", f"{ARTIFACTS_API}?path={path}")
        assert status == 400, path

    # The client refuses before sending anything.
    for artifact_path in ("..", "../..", "samples/../../x", "/abs"):
        with pytest.raises(MlflowException, match="Invalid artifact path"):
            client.log_artifact(run_id, str(local), artifact_path=artifact_path)

    # A backslash is no separator on POSIX: `..\..\x` is one odd file name inside the destination.
    status, _, _ = raw_request(server, "PUT", f"{ARTIFACTS_API}/..\\..\\odd.txt", b"odd")
    assert status == 200
    assert (destination / "..\\..\\odd.txt").read_bytes() == b"odd"

    after = {p for p in tmp_path.rglob("*") if destination not in p.parents}
    assert after - before == set()
    assert Path("/etc/passwd").read_bytes() == passwd
    assert sorted(p.name for p in destination.rglob("*") if p.is_file()) == ["..\\..\\odd.txt"]


def test_postgres_restart_under_a_running_server_loses_nothing(
    mlflow_server, postgres, monkeypatch
):
    client, _, run_id = new_run(mlflow_server, "postgres-restart")
    client.log_param(run_id, "schedule", "linear")
    expected: dict[int, float] = {}

    def log(step: int) -> None:
        expected[step] = 1.0 / (step + 1)
        client.log_metric(run_id, "loss", expected[step], step=step)

    for step in range(10):
        log(step)

    # A restart: pg_ctl waits until PostgreSQL is back, and the server's SQLAlchemy pool pings
    # each connection before use, so even the first request after it succeeds, with no retry.
    postmaster = postgres.pid
    old_tree = process_tree(postmaster)
    postgres.restart()
    assert postgres.pid != postmaster
    assert not [pid for pid in old_tree if pid_alive(pid)]
    with monkeypatch.context() as no_retries:
        no_retries.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        for step in range(10, 20):
            log(step)

    # An outage: while PostgreSQL is down the server answers 503 and the client retries with
    # back-off, so a write issued during a short outage lands once PostgreSQL is back.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # MLflow's defaults, pinned
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    postgres.stop()
    status, _, _ = raw_request(mlflow_server, "GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    assert status == 503
    restarter = threading.Timer(3.0, postgres.start)
    restarter.start()
    started = time.monotonic()
    log(20)
    restarter.join()
    assert time.monotonic() - started >= 3.0  # it really waited out the outage
    assert postgres.running
    for step in range(21, 30):
        log(step)

    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == sorted(expected.items())
    assert metric_rows(postgres, run_id, "loss") == sorted(expected.items())  # each exactly once
    run = client.get_run(run_id)
    assert run.data.params == {"schedule": "linear"}
    assert run.data.metrics == {"loss": expected[29]}
    client.set_terminated(run_id, "FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_server_stopped_then_started_on_the_same_port_keeps_everything(
    mlflow_server, postgres, tmp_path, monkeypatch
):
    server = mlflow_server
    client, experiment_id, run_id = new_run(server, "server-restart")
    for step in range(5):
        client.log_metric(run_id, "fid", 50.0 - step, step=step)
    artifact = tmp_path / "note.txt"
    artifact.write_text("before the stop")
    client.log_artifact(run_id, str(artifact))

    port, pids = server.port, server.processes()
    assert len(pids) >= 2  # the CLI and uvicorn: stop() must end the whole tree
    server.stop()
    assert server.processes() == []
    assert [pid for pid in pids if pid_alive(pid)] == []
    server.stop()  # a second stop is a no-op

    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"{server.url}/health", timeout=5)
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    with monkeypatch.context() as no_retries:  # fail now, not after minutes of back-off
        no_retries.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(MlflowException, match="Connection refused"):
            client.log_metric(run_id, "fid", 0.0, step=99)

    server.start()
    assert server.port == port
    history = client.get_metric_history(run_id, "fid")
    assert sorted((m.step, m.value) for m in history) == [(s, 50.0 - s) for s in range(5)]
    for step in range(5, 10):
        client.log_metric(run_id, "fid", 50.0 - step, step=step)
    assert metric_rows(postgres, run_id, "fid") == [(s, 50.0 - s) for s in range(10)]
    [info] = client.list_artifacts(run_id)
    assert info.path == "note.txt"
    downloaded = client.download_artifacts(run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == "before the stop"
    assert client.get_experiment(experiment_id).name == "server-restart"
    client.set_terminated(run_id, "FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"
