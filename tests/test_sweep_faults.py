"""Fault tests with real processes, really killed: a trial's worker and the sweep's driver."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_nodes import kill_processes_with
from sweep_helpers import assert_complete, runs_of, wait_for

SWEEP = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
ARGS = [
    "base.train.max_steps=300",
    "base.train.val_every_n_steps=50",
    "base.train.log_every_n_steps=10",  # many training metrics in flight at any moment
    "base.eval.num_samples=400",
    "tune.max_concurrent_trials=1",
    "tune.max_failures=3",
]


@dataclass
class SweepEnv:
    """The sweep's environment: its own Ray temp dir (so the local Ray it starts is its own) and
    a mark that every process of that Ray inherits, so the test stops those and nothing else
    (never `ray stop`, which would stop every Ray on the machine)."""

    vars: dict
    mark: str

    def stop_ray(self) -> None:
        kill_processes_with(self.mark)


@pytest.fixture
def env():
    ray_tmp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths
    key, value = "DDPM_SWEEP_FAULT_TEST", secrets.token_hex(8)
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sweep_env = SweepEnv(
        {**inherited, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp, key: value},
        f"{key}={value}",
    )
    yield sweep_env
    sweep_env.stop_ray()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def client_for(tmp_path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def start_sweep(tmp_path, name, env, sweep=SWEEP, args=ARGS):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(sweep), *args, "--name", name]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env.vars,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def diagnose(tmp_path, name) -> str:
    """The sweep's own output and Tune's error files, for a failure message."""
    out = [(tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]]
    for error in sorted((tmp_path / "ddpm_sweep_runs").glob("*/*/error.txt")):
        out.append(f"--- {error}\n{error.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def steps(client, run, key):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def role(run):
    return run.data.tags.get("ddpm_sweep.role")


@pytest.mark.slow
def test_trial_workers_killed_at_three_points_resume_in_the_same_runs_losing_nothing(tmp_path, env):
    """One sweep, three SIGKILLs of the Ray worker running a trial: just after a validation,
    mid-training (between validations), and during evaluation. Every retry resumes in the same
    MLflow runs, and in the end every metric of every step and every cell is there, once."""
    client = client_for(tmp_path)
    proc = start_sweep(tmp_path, "worker-kill", env)
    killed: list[int] = []

    def kill(run) -> int:
        pid = int(run.data.tags["ddpm_sweep.pid"])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return pid

    def alive(run) -> bool:  # its trial is running in a process not killed yet
        return int(run.data.tags.get("ddpm_sweep.pid", 0)) not in killed

    try:
        # 1. Just after a validation: the second one has reached MLflow.
        def after_validation():
            for r in runs_of(client, "worker-kill"):
                if role(r) == "train" and len(steps(client, r, "val/loss_simple")) >= 2:
                    return r

        victim = wait_for(after_validation, proc, poll=0.1)
        kill(victim)
        logged_before = len(steps(client, victim, "train/loss"))

        # 2. Mid-training: its retry, re-attached to the same run, has trained on past what
        # was logged before, and is between two validations.
        def mid_training():
            r = client.get_run(victim.info.run_id)
            if alive(r) and r.info.status == "RUNNING":
                train = steps(client, r, "train/loss")
                val = steps(client, r, "val/loss_simple")
                if len(train) > logged_before + 1 and train[-1] % 50 != 49 and train[-1] > val[-1]:
                    return r

        kill(wait_for(mid_training, proc, poll=0.05))

        # 3. During evaluation: a cell's run is open (sampling, measuring) in a live trial.
        def evaluating():
            for r in runs_of(client, "worker-kill"):
                if role(r) == "eval" and r.info.status == "RUNNING" and alive(r):
                    return r

        half_done = wait_for(evaluating, proc, poll=0.02)
        kill(half_done)
        assert proc.wait(timeout=600) == 0, diagnose(tmp_path, "worker-kill")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    trains = assert_complete(client, "worker-kill", max_steps=300, val_every=50, log_every=10)
    again = next(r for r in trains if r.info.run_id == victim.info.run_id)  # same run re-attached
    assert int(again.data.tags["ddpm_sweep.pid"]) not in killed
    # The cell killed half-way was redone in its own run, not recorded a second time.
    redone = client.get_run(half_done.info.run_id)
    assert redone.info.status == "FINISHED" and "sample_seconds" in redone.data.metrics
    assert "grid.png" in [a.path for a in client.list_artifacts(redone.info.run_id)]


@pytest.mark.slow
def test_killed_driver_then_resume_completes_without_rerunning(tmp_path, env):
    client = client_for(tmp_path)
    proc = start_sweep(tmp_path, "driver-kill", env)
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
        env.stop_ray()  # what of the killed driver's Ray outlived it
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", "ddpm_sweep_runs/driver-kill"],
        cwd=tmp_path,
        env=env.vars,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_complete(client, "driver-kill", max_steps=300, val_every=50, log_every=10)
    # The finished trial was not rerun: its history is exactly what it was before the kill.
    after = client.get_metric_history(finished.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in after] == [(m.step, m.value) for m in history_before]


SEARCHED = """
name: searched
base:
  data: {name: gaussian_mixture, batch_size: 256, n_train: 2048}
  network: {name: mlp, hidden_dim: 64, num_blocks: 2}
  diffusion: {timesteps: 100, prediction: v}
  train: {max_steps: 150, lr: 3.0e-3, p_uncond: 0.2, val_every_n_steps: 50, bpd_subset: 0}
  sample: {sampler: ddim, variance: [fixed_small]}
  eval: {num_samples: 200}
search:
  sample.guidance: {uniform: [0, 5]}
  sample.eta: {uniform: [0, 1]}
  sample.steps: {randint: [2, 30]}
sample_search: {cells: 6, chunks: 3, seed: 1}
tune: {max_failures: 3}
"""


@pytest.mark.slow
def test_trial_killed_mid_study_resumes_the_study_and_samples_no_cell_twice(tmp_path, env):
    """A searched sweep's worker SIGKILLed inside the study's third cell: the retried trial
    restores the checkpoint at the end of training, rebuilds the study from MLflow, redoes the
    half-done cell in its own run and spends the rest of the budget; the report plots the
    searched cells and the best is registered."""
    from orchestrator.tracking import NUMBER_TAG, STOPPED_TAG, VALUES_TAG

    client = client_for(tmp_path)
    (tmp_path / "searched.yaml").write_text(SEARCHED)
    proc = start_sweep(tmp_path, "searched", env, tmp_path / "searched.yaml", [])
    try:

        def in_third_cell():
            for r in runs_of(client, "searched"):
                if role(r) == "eval" and r.info.status == "RUNNING":
                    if int(r.data.tags.get(NUMBER_TAG, -1)) == 2:
                        return r

        victim = wait_for(in_third_cell, proc, poll=0.02)
        os.kill(int(victim.data.tags["ddpm_sweep.pid"]), signal.SIGKILL)
        # What the killed process left: the cells it ended, and the one it was in (the third,
        # or a later one if the third ended between the poll and the kill). Its retry needs
        # seconds to start, so nothing has touched them yet.
        left = [r for r in runs_of(client, "searched") if role(r) == "eval"]
        before = {r.data.tags[NUMBER_TAG]: r for r in left if r.info.status != "RUNNING"}
        running = [r for r in left if r.info.status == "RUNNING"]  # none: between two cells
        assert proc.wait(timeout=600) == 0, diagnose(tmp_path, "searched")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    k = len(before)
    assert k >= 2 and set(before) == {str(n) for n in range(k)}
    assert [int(r.data.tags[NUMBER_TAG]) for r in running] in ([k], [])
    runs = runs_of(client, "searched")
    evals = {r.data.tags[NUMBER_TAG]: r for r in runs if role(r) == "eval"}
    assert len([r for r in runs if role(r) == "eval"]) == 6 and set(evals) == set("012345")
    for number, r in before.items():  # done before the kill: not sampled again
        again = evals[number]
        assert again.info.run_id == r.info.run_id and again.info.end_time == r.info.end_time
    for half_done in running:  # redone in its own run, with the values it had
        redone = evals[str(k)]
        assert redone.info.run_id == half_done.info.run_id
        assert redone.data.tags["ddpm_sweep.pid"] != half_done.data.tags["ddpm_sweep.pid"]
        assert redone.data.tags[VALUES_TAG] == half_done.data.tags[VALUES_TAG]
    for r in evals.values():
        assert r.info.status == ("KILLED" if STOPPED_TAG in r.data.tags else "FINISHED")
        finished = r.info.status == "FINISHED"
        assert (r.data.metrics["samples"] == 200) is finished  # a stopped cell: fewer
    (train,) = [r for r in runs if role(r) == "train"]
    assert train.info.status == "FINISHED"
    report = tmp_path / "reports" / "searched"
    assert (report / "search_axes.png").is_file() and (report / "search_map.png").is_file()
    (parent,) = [r for r in runs if role(r) == "sweep"]
    assert parent.data.params["sweep.sample_search.cells"] == "6"
    assert parent.data.params["sweep.sample_search.metric"] == "sliced_wasserstein"  # resolved
    best = parent.data.metrics["best/sliced_wasserstein"]
    finished = [r for r in evals.values() if r.info.status == "FINISHED"]
    assert best == min(r.data.metrics["sliced_wasserstein"] for r in finished)


def test_resume_of_a_directory_that_is_no_sweep_is_a_clear_error(tmp_path, env):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resume", str(tmp_path)],
        cwd=tmp_path,
        env=env.vars,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "not a ddpm-sweep experiment directory" in out.stderr
