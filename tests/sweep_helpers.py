"""What the sweep tests that drive `ddpm-sweep` in a subprocess share: finding a sweep's MLflow
runs, waiting on a running sweep, and checking a finished sweep's MLflow content."""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path


def plan_and_fit(root: Path, text: str):
    """A one-training sweep file's plan, that training's config and its fitted result, as a
    trial has them before it evaluates its cells."""
    from lightning_modules.train import fit
    from orchestrator.plan import build_plan

    (root / "sweep.yaml").write_text(text)
    plan = build_plan(root / "sweep.yaml")
    (training,) = plan.trainings
    return plan, training.config, fit(training.config, root, enable_progress_bar=False)


def setup_trial(tmp_path, plan, name: str):
    """What a trial of ``plan`` records into, without Ray: a sqlite MLflow with the sweep's
    experiment, its parent run and the trial's training run. (client, TrialContext, run id)."""
    import mlflow

    from orchestrator.trial import TrialContext, _create_run

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment(name)
    parent = client.create_run(experiment_id).info.run_id
    ctx = TrialContext(plan, client.tracking_uri, experiment_id, parent)
    train_run = _create_run(client, ctx, "train t", "train", {})
    return client, ctx, train_run


def eval_runs(client, ctx) -> list:
    """The evaluation runs a trial recorded."""
    return [
        r
        for r in client.search_runs([ctx.experiment_id])
        if r.data.tags.get("ddpm_sweep.role") == "eval"
    ]


def runs_of(client, name):
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=500)


def train_runs(client, name):
    return [r for r in runs_of(client, name) if r.data.tags.get("ddpm_sweep.role") == "train"]


def wait_for(predicate, proc, timeout=400, poll=1.0):
    """Poll ``predicate`` until it returns something truthy; fail if the sweep exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited early with {proc.returncode}")
        try:
            found = predicate()
        except Exception:  # the database may be mid-migration, locked, or the server away
            found = None
        if found:
            return found
        time.sleep(poll)
    raise AssertionError("timed out waiting for the sweep")


def assert_complete(
    client, name, *, max_steps, val_every, log_every=None, trainings=2, cells=6
) -> list:
    """One parent, every training and evaluation run once, all FINISHED with their metrics and
    PNG, no step logged twice, every validation (and, given ``log_every``, every logged training
    step) to the end of training present. Returns the training runs."""
    runs = runs_of(client, name)
    roles = Counter(r.data.tags["ddpm_sweep.role"] for r in runs)
    assert roles == {"sweep": 1, "train": trainings, "eval": trainings * cells}, roles
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    evals = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "eval"]
    pairs = Counter(
        (r.data.tags["ddpm_sweep.train_run_id"], r.data.tags["ddpm_sweep.cell"]) for r in evals
    )
    assert len(pairs) == trainings * cells and set(pairs.values()) == {1}  # none twice
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names  # unique: every run tells itself apart
    (parent,) = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "sweep"]
    summary = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "summary.json", tempfile.mkdtemp())
        ).read_text()
    )
    # Every trial's final result carries the training metrics, resumed ones too.
    assert all("val/loss_simple" in t["metrics"] for t in summary["trials"]), summary["trials"]
    trains = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "train"]
    for r in trains:
        for key in ("val/loss_simple", "train/loss"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{key} logged a step twice: {steps}"
        val = [m.step for m in client.get_metric_history(r.info.run_id, "val/loss_simple")]
        # One value per validation, to the end, none missing.
        assert sorted(val) == list(range(val_every - 1, max_steps, val_every)), val
        if log_every:
            train = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
            assert sorted(train) == list(range(log_every - 1, max_steps, log_every)), train
    for r in runs:
        role = r.data.tags["ddpm_sweep.role"]
        if role == "eval":  # a FINISHED cell is a complete cell: params, metrics, PNG
            assert "sample.guidance" in r.data.params, r.info.run_name
            assert "sample_seconds" in r.data.metrics, r.info.run_name
            assert "grid.png" in [a.path for a in client.list_artifacts(r.info.run_id)], (
                r.info.run_name
            )
        if role == "train":
            assert "diffusion.schedule" in r.data.params, r.info.run_name
    return trains
