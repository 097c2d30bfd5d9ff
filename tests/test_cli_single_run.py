"""`ddpm-sweep train` and `ddpm-sweep sample` end to end: MLflow content, PNGs, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from PIL import Image

TINY = [
    "data.n_train=1024",
    "data.n_val=256",
    "data.batch_size=128",
    "diffusion.timesteps=50",
    "train.max_steps=40",
    "train.val_every_n_steps=20",
    "train.bpd_subset=8",
    "network.hidden_dim=64",
    "network.num_blocks=2",
    "sample.guidance=[0,1,3]",
    "sample.variance=[fixed_small,fixed_large]",
    "sample.steps=[10]",
    "eval.num_samples=80",
]


@pytest.mark.slow
def test_train_logs_a_complete_run_and_sample_reuses_the_checkpoint(tmp_path):
    import mlflow

    config = Path(__file__).parents[1] / "sweeps" / "mixture_single.yaml"
    out = run_cli(
        "train",
        str(config),
        *TINY,
        "name=cli-test",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()  # the default tracking URI: sqlite in the cwd
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["diffusion.timesteps"] == "50"
    assert run.data.params["sample.guidance"] == "[0.0, 1.0, 3.0]"
    assert "w=0 unconditional" in run.data.tags["ddpm_sweep.guidance_convention"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 1 and len({m.step for m in history}) == len(history)
    assert "val/loss_simple" in run.data.metrics and "val/bpd" in run.data.metrics
    for w in ("0", "1", "3"):
        assert f"eval/label_accuracy/w{w}_fixed_small_10steps" in run.data.metrics
        assert f"eval/sliced_wasserstein/w{w}_fixed_large_10steps" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "samples", "config.yaml", "eval.json"} <= artifacts
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/grid_w3_fixed_large_10steps.png" in samples and len(samples) == 6

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = run_cli(
        "sample",
        str(ckpt),
        "--guidance",
        "0,2",
        "--variance",
        "fixed_large",
        "--steps",
        "5,10",
        "--out",
        str(tmp_path / "s"),
        "--eval",
        "sampler=ddim",
        "eta=0.5",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert {(r["guidance"], r["steps"]) for r in rows} == {(0.0, 5), (0.0, 10), (2.0, 5), (2.0, 10)}
    assert all("sliced_wasserstein" in r and Path(r["image"]).exists() for r in rows)
    Image.open(rows[0]["image"]).verify()

    bad = run_cli("sample", str(ckpt), "--steps", "500", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "sample.steps[0] = 500" in bad.stderr


def test_train_rejects_a_bad_config_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("diffusion:\n  variance: wide\n")
    out = run_cli("train", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert f"{bad}: diffusion.variance = 'wide' is invalid: expected one of" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded
