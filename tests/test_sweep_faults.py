"""Fault tests with real processes, really killed: a trial's worker and the sweep's driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sweep_helpers import assert_complete, runs_of, wait_for

SWEEP = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
ARGS = [
    "base.train.max_steps=300",
    "base.train.val_every_n_steps=50",
    "base.eval.num_samples=80",
    "tune.max_concurrent_trials=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def client_for(tmp_path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def start_sweep(tmp_path, name):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(SWEEP), *ARGS, "--name", name]
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_ray():
    """Stop the Ray processes a killed driver may leave behind (CI runs nothing else on Ray)."""
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
        capture_output=True,
        timeout=120,
        env=ENV,
    )


@pytest.mark.slow
def test_killed_trial_worker_resumes_in_the_same_run(tmp_path):
    client = client_for(tmp_path)
    proc = start_sweep(tmp_path, "worker-kill")
    try:

        def training_mid_run():
            for r in runs_of(client, "worker-kill"):
                history = client.get_metric_history(r.info.run_id, "val/loss_simple")
                if r.data.tags.get("ddpm_sweep.role") == "train" and len(history) >= 2:
                    return r

        victim = wait_for(training_mid_run, proc)
        pid = int(victim.data.tags["ddpm_sweep.pid"])
        os.kill(pid, signal.SIGKILL)  # the Ray worker running the trial, mid-training
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_ray()
    trains = assert_complete(client, "worker-kill", max_steps=300, val_every=50)
    again = next(r for r in trains if r.info.run_id == victim.info.run_id)  # same run re-attached
    assert int(again.data.tags["ddpm_sweep.pid"]) != pid


@pytest.mark.slow
def test_killed_driver_then_resume_completes_without_rerunning(tmp_path):
    client = client_for(tmp_path)
    proc = start_sweep(tmp_path, "driver-kill")
    try:

        def one_done_one_training():
            runs = [
                r
                for r in runs_of(client, "driver-kill")
                if r.data.tags.get("ddpm_sweep.role") == "train"
            ]
            done = [r for r in runs if r.info.status == "FINISHED"]
            busy = [
                r
                for r in runs
                if r.info.status == "RUNNING"
                and client.get_metric_history(r.info.run_id, "val/loss_simple")
            ]
            return (done[0], busy[0]) if done and busy else None

        finished, _ = wait_for(one_done_one_training, proc)
        history_before = client.get_metric_history(finished.info.run_id, "train/loss")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_ray()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", "ddpm_sweep_runs/driver-kill"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    stop_ray()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_complete(client, "driver-kill", max_steps=300, val_every=50)
    # The finished trial was not rerun: its history is exactly what it was before the kill.
    after = client.get_metric_history(finished.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in after] == [(m.step, m.value) for m in history_before]


def test_resume_of_a_directory_that_is_no_sweep_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", str(tmp_path)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "not a ddpm-sweep experiment directory" in out.stderr
