"""The docker-compose topology, natively: PostgreSQL, `mlflow server` on it, a Ray head and a
Ray worker node as real processes on this machine; sweeps run against it with `ddpm-sweep run
--address ... --tracking-uri ...`, and the faults the deployment must survive are real: the Ray
head killed, the MLflow server stopped mid-sweep, a storage path a node cannot see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from ray_nodes import LocalRayCluster
from services import mlflow_server_fixture, postgres_fixture  # noqa: F401  (fixtures)
from sweep_helpers import assert_complete, train_runs, wait_for

MIXTURE = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
MAX_STEPS, VAL_EVERY, LOG_EVERY = 800, 200, 25
OUTAGE_S = 15
CELLS = 2  # sampling configurations per training: both variances at w = 3


def write_sweep(tmp_path: Path) -> Path:
    """mixture_quick.yaml, longer training (so faults land mid-training), fewer evaluations,
    and one `trial_slot` per trial: with one slot and one CPU per node, two trials at once must
    run on different nodes."""
    spec = yaml.safe_load(MIXTURE.read_text())
    spec["base"]["train"] |= {
        "max_steps": MAX_STEPS,
        "val_every_n_steps": VAL_EVERY,
        "log_every_n_steps": LOG_EVERY,
    }
    spec["base"]["eval"] = {"num_samples": 80}
    spec["search"] |= {"sample.guidance": [3]}
    spec["tune"] |= {"max_concurrent_trials": 2, "resources_per_trial": {"trial_slot": 1}}
    path = tmp_path / "cluster_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SLOT = {"trial_slot": 1}


def start_cli(cluster: LocalRayCluster, tmp_path: Path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "cli.log", "ab")  # noqa: SIM115  (the child owns it)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=cluster.env,  # the cluster's Ray auth token, one thread per trial
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 900) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "cli.log").read_text(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    return out


def two_nodes(cluster: LocalRayCluster, worker_wrapper=()) -> set[str]:
    cluster.start_head(num_cpus=1, resources=SLOT)
    cluster.add_worker(num_cpus=1, resources=SLOT, wrapper=worker_wrapper)
    return {n["node_id"] for n in cluster.wait_for_nodes(2)}


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


@pytest.mark.slow
def test_sweep_on_two_ray_nodes_tracked_in_mlflow_on_postgres(postgres, mlflow_server, tmp_path):
    """Trials run on both nodes; every run is a row in the server's PostgreSQL; artifacts come
    back over HTTP. Midway the MLflow server is stopped for a while: training goes on, the
    metrics logged meanwhile arrive once it is back, every run ends FINISHED."""
    client = mlflow.MlflowClient(mlflow_server.url)
    with LocalRayCluster() as cluster:
        nodes = two_nodes(cluster)
        proc = start_cli(
            cluster, tmp_path, "run", str(write_sweep(tmp_path)), "--name", "native-cluster",
            "--address", cluster.address, "--tracking-uri", mlflow_server.url,
            "--storage-path", str(tmp_path / "storage"),
        )  # fmt: skip
        try:
            wait_for(
                lambda: [
                    r
                    for r in train_runs(client, "native-cluster")
                    if client.get_metric_history(r.info.run_id, "train/loss")
                ][1:],  # both trainings have logged
                proc,
            )
            down = time.time()
            mlflow_server.stop()
            time.sleep(OUTAGE_S)
            mlflow_server.start()  # same port, same database
            up = time.time()
        finally:
            out = finish(proc, tmp_path)

    trains = assert_complete(
        client, "native-cluster", max_steps=MAX_STEPS, val_every=VAL_EVERY, cells=CELLS
    )
    # Both nodes trained: the node each trial reported, and the tag on its MLflow run.
    assert {r.data.tags["ddpm_sweep.node_id"] for r in trains} == nodes
    (parent,) = [
        r
        for r in client.search_runs(
            [trains[0].info.experiment_id], "tags.`ddpm_sweep.role` = 'sweep'"
        )
    ]
    summary = json.loads(
        http_get(
            f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/"
            f"{parent.info.experiment_id}/{parent.info.run_id}/artifacts/summary.json"
        )
    )
    assert {t["node_id"] for t in summary["trials"]} == nodes
    assert summary["cluster"]["nodes"] == 2
    # Training did not stall while the server was away: steps were logged in the outage, and
    # those metrics reached the server after it came back.
    for run in trains:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        during = [m for m in history if down * 1000 <= m.timestamp <= up * 1000]
        assert during, f"no train/loss logged during the outage in {run.info.run_name}"
        assert len(history) == MAX_STEPS // LOG_EVERY  # and nothing was lost
    # Every run is a row in the server's PostgreSQL database.
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "select status, count(*) from runs where experiment_id = %s group by status",
            (int(parent.info.experiment_id),),
        )
        assert dict(cur.fetchall()) == {"FINISHED": 1 + 2 + 2 * CELLS}
    # The best checkpoint downloads over HTTP and is a real Lightning checkpoint.
    best = http_get(
        f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/"
        f"{parent.info.experiment_id}/{parent.info.run_id}/artifacts/best/last.ckpt"
    )
    (tmp_path / "best.ckpt").write_bytes(best)
    import torch

    ckpt = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS and "state_dict" in ckpt
    assert "best: eval " in out


@pytest.mark.slow
def test_ray_head_killed_mid_sweep_then_resumed_on_a_new_cluster(tmp_path):
    """The head node dies (and the driver with it, as on a real head machine); a new cluster
    comes up; `ddpm-sweep resume` completes the sweep from the storage path: same parent run,
    every run once, no step logged twice."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    storage = tmp_path / "storage"
    with LocalRayCluster() as first:
        two_nodes(first)
        proc = start_cli(
            first, tmp_path, "run", str(write_sweep(tmp_path)), "--name", "head-kill",
            "--address", first.address, "--tracking-uri", tracking,
            "--storage-path", str(storage),
        )  # fmt: skip
        try:

            def both_checkpointed():
                """Both training runs, once each has reported two validations (checkpoints)."""
                runs = train_runs(client, "head-kill")
                history = {
                    r.info.run_id: client.get_metric_history(r.info.run_id, "val/loss_simple")
                    for r in runs
                }
                return (
                    runs if len(runs) == 2 and all(len(h) >= 2 for h in history.values()) else None
                )

            mid = wait_for(both_checkpointed, proc)
            first.head.kill()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver ran on the head machine
                proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert any(r.info.status == "RUNNING" for r in train_runs(client, "head-kill"))
    before = {
        r.info.run_id: client.get_metric_history(r.info.run_id, "val/loss_simple") for r in mid
    }

    with LocalRayCluster() as second:
        two_nodes(second)
        proc = start_cli(
            second, tmp_path, "resume", str(storage / "head-kill"), "--address", second.address
        )
        finish(proc, tmp_path)

    trains = assert_complete(
        client, "head-kill", max_steps=MAX_STEPS, val_every=VAL_EVERY, cells=CELLS
    )
    assert {r.info.run_id for r in trains} == set(before)  # re-attached, no new training runs
    for run_id, history in before.items():
        after = client.get_metric_history(run_id, "val/loss_simple")
        assert [(m.step, m.value) for m in after[: len(history)]] == [
            (m.step, m.value) for m in history
        ]


def _can_hide_directories() -> str | None:
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return (
        None
        if probe.returncode == 0
        else f"unshare --mount is not permitted here: {probe.stderr!r}"
    )


@pytest.mark.slow
def test_a_storage_path_a_worker_cannot_see_is_refused_before_anything_starts(tmp_path):
    why = _can_hide_directories()
    if why:
        pytest.skip(why)
    storage = tmp_path / "storage"
    storage.mkdir()
    # The worker node runs in a mount namespace where the storage path is an empty tmpfs: the
    # same directory name, other contents, like a local disk on another machine.
    hide = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs ddpm-sweep-test "{storage}" && exec "$@"', "sh",
    ]  # fmt: skip
    tracking = tmp_path / "mlflow.db"
    with LocalRayCluster() as cluster:
        two_nodes(cluster, worker_wrapper=hide)
        out = subprocess.run(
            [
                sys.executable, "-m", "orchestrator.cli", "run", str(MIXTURE),
                "--name", "blind", "--address", cluster.address,
                "--tracking-uri", f"sqlite:///{tracking}", "--storage-path", str(storage),
            ],
            cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 of 2 Ray node(s) cannot see it" in out.stderr
    assert "s3://" in out.stderr and "--storage-path" in out.stderr
    # Refused before anything was recorded: no MLflow run, no sweep state, no leftover probe.
    assert not tracking.exists() or not mlflow.MlflowClient(f"sqlite:///{tracking}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tracking}").search_experiments()]
    )
    assert list(storage.iterdir()) == []
