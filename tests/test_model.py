"""The best model as an MLflow pyfunc model (orchestrator/model.py): logged from a checkpoint,
registered, loaded back through the registry and sampled."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from lightning_modules.config import load_config
from lightning_modules.diffusion import GaussianDiffusion, SamplingSpec
from lightning_modules.module import DiffusionModule
from lightning_modules.networks import build_network
from lightning_modules.train import fit
from orchestrator.model import (
    DiffusionSampler,
    cell_spec,
    log_sampler_model,
    register_best,
    use_tracking_uri,
)

QUICK = ["diffusion.timesteps=20", "sample.steps=[5]", "train.max_steps=2",
         "train.val_every_n_steps=2", "train.bpd_subset=0", "data.batch_size=16"]  # fmt: skip
MIXTURE = ["data.name=gaussian_mixture", "data.n_train=64", "data.n_val=16", "network.name=mlp",
           "network.hidden_dim=16", "network.num_blocks=1"]  # fmt: skip
DIGITS = ["data.name=digits", "network.model_channels=8", "network.channel_mult=[1]",
          "network.num_res_blocks=1", "network.attention_resolutions=[]"]  # fmt: skip
# The winning eval run's `sample.*` params, as MLflow holds them (strings; not all spec fields).
CELL = {"sample.guidance": "3.0", "sample.variance": "fixed_large", "sample.steps": "5",
        "sample.sampler": "ancestral", "sample.eta": "0.0", "sample.guidance_rescale": "0.0",
        "sample.guidance_interval": "None", "sample.threshold": "auto", "sample.seed": "7",
        "sample.per_class": "10", "sample.batch_size": "512"}  # fmt: skip


def _checkpoint(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    cfg = load_config(None, [*QUICK, *overrides])
    root = tmp_path_factory.mktemp(name)
    return fit(cfg, root, enable_progress_bar=False, enable_model_summary=False).checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite tracking store with a sweep-like experiment: a training run and an eval run."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("sweep", artifact_location=(root / "art").as_uri())
    train = client.create_run(experiment, run_name="train").info.run_id
    client.log_param(train, "diffusion.timesteps", "20")
    for step, value in ((2, 1.0), (4, 0.5)):  # the checkpoint is the one of step 4
        client.log_metric(train, "val/loss_simple", value, step=step)
    client.set_terminated(train)
    evaluation = client.create_run(experiment, run_name="eval w3").info.run_id
    return uri, client, experiment, train, evaluation


@pytest.fixture
def clean_sys_path(monkeypatch):
    # Loading a model with code/ prepends that folder to sys.path, for good.
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_registered_model_loads_and_samples_in_row_order(tmp_path_factory, store, clean_sys_path):
    uri, client, experiment, train, evaluation = store
    # A few big steps without EMA, so the network already depends on the label.
    learnt = ["train.max_steps=4", "train.lr=0.05", "train.warmup_steps=1", "train.ema_decay=0"]
    ckpt = _checkpoint(tmp_path_factory, "mixture", [*MIXTURE, *learnt])
    info = log_sampler_model(
        ckpt,
        name="sampler",
        cell=CELL,
        run_id=train,
        eval_run_id=evaluation,
        tracking_uri=uri,
        metadata={"quality": "eval/w1", "eval/w1": 0.25},
    )
    assert mlflow.get_tracking_uri() != uri  # the process-wide URI is as it was
    version = register_best(uri, info, "ddpm-best", tags={"eval/w1": 0.25}, description="best")
    # The source is the logged model (models:/<model_id>), the run its source run.
    assert (version.source, version.run_id) == (info.model_uri, train)
    assert (version.description, version.tags) == ("best", {"eval/w1": "0.25"})
    again = register_best(client, info.model_uri, "ddpm-best")  # the registered model exists
    assert int(again.version) == int(version.version) + 1
    logged = client.get_logged_model(info.model_id)
    assert (logged.experiment_id, logged.source_run_id, logged.model_type) == (
        experiment,
        train,
        "ddpm-sampler",
    )
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.params["sample.seed"] == "7" and logged.params["data.name"] == "gaussian_mixture"
    assert logged.tags["ddpm_sweep.eval_run_id"] == evaluation
    outputs = client.get_run(train).outputs.model_outputs
    assert (info.model_id, 4) in [(o.model_id, o.step) for o in outputs]
    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("val/loss_simple", 0.5, 4)]

    files = Path(mlflow.artifacts.download_artifacts(logged.artifact_location))
    assert (files / "code" / "lightning_modules" / "module.py").is_file()
    assert (files / "code" / "orchestrator" / "model.py").is_file()
    requirements = (files / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert any(r.startswith("torch==") for r in requirements)
    assert not any("ddpm" in r for r in requirements)
    stored = yaml.safe_load((files / "artifacts" / "config.yaml").read_text())
    assert stored["data"]["name"] == "gaussian_mixture" and stored["diffusion"]["timesteps"] == 20

    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/ddpm-best/{version.version}")
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["label", "guidance"]
    assert [(c.type.name, c.required) for c in signature.inputs.inputs] == [
        ("long", True),
        ("double", True),
    ]
    defaults = {p.name: p.default for p in signature.params.params}
    assert defaults == {"steps": 5, "variance": "fixed_large", "sampler": "ancestral",
                        "eta": 0.0, "seed": 7}  # fmt: skip
    assert model.input_example.to_dict("list") == {"label": [0], "guidance": [3.0]}
    meta = model.metadata.metadata["ddpm_sweep"]
    assert (meta["train_run_id"], meta["eval_run_id"], meta["quality"]) == (
        train,
        evaluation,
        "eval/w1",
    )
    assert meta["cell"]["guidance"] == 3.0 and meta["data_shape"] == [2]

    frame = pd.DataFrame({"label": [0, 1, 2, 1], "guidance": [0.0, 3.0, 3.0, 1.0]})
    x = model.predict(frame, params={"steps": 5})
    assert x.shape == (4, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert len({tuple(row) for row in x}) == 4
    assert np.array_equal(model.predict(frame), x)  # the defaults are the cell: steps 5, seed 7
    # Rows of one guidance weight are drawn together from the seed's noise, in their order:
    # moving rows of different weights around moves their samples with them.
    order = [3, 1, 0, 2]
    moved = model.predict(frame.iloc[order].reset_index(drop=True), params={"steps": 5})
    assert np.array_equal(moved, x[order])
    module = model.unwrap_python_model().module
    spec = SamplingSpec(guidance=3.0, variance="fixed_large", steps=5, threshold="auto", seed=7)
    assert np.array_equal(x[[1, 2]], module.sample(torch.tensor([1, 2]), spec).numpy())
    assert not np.array_equal(model.predict(frame, params={"seed": 8}), x)
    # w = 0 is the unconditional model: the label does not matter (it does at w = 1).
    uncond = [model.predict(pd.DataFrame({"label": [c], "guidance": [0.0]})) for c in (0, 5)]
    assert np.array_equal(*uncond)
    cond = [model.predict(pd.DataFrame({"label": [c], "guidance": [1.0]})) for c in (0, 5)]
    assert not np.array_equal(*cond)

    with pytest.raises(ValueError, match=r"unknown labels \[8\]: .* classes 0\.\.7"):
        model.predict(pd.DataFrame({"label": [0, 8], "guidance": [1.0, 1.0]}))
    with pytest.raises(ValueError, match="unconditional sample, give any class and guidance 0"):
        model.predict(pd.DataFrame({"label": [-1], "guidance": [1.0]}))
    with pytest.raises(MlflowException, match="guidance"):
        model.predict(pd.DataFrame({"label": [0]}))
    with pytest.raises(ValueError, match=r"variance 'bogus': .*\['fixed_small', 'fixed_large'\]"):
        model.predict(frame, params={"variance": "bogus"})
    with pytest.raises(ValueError, match=r"sampling steps must be an integer in \[1, T=20\]"):
        model.predict(frame, params={"steps": 50})
    with pytest.raises(MlflowException, match="steps"):
        model.predict(frame, params={"steps": "five"})


def test_image_model_samples_images(tmp_path_factory, store, clean_sys_path):
    uri, _, experiment, *_ = store
    ckpt = _checkpoint(tmp_path_factory, "digits", DIGITS)
    info = log_sampler_model(
        ckpt,
        name="digits",
        experiment_id=experiment,
        tracking_uri=uri,
        bundle_code=False,
        with_example=False,
    )
    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.metadata.flavors["python_function"]["code"] is None  # no code/ folder
    assert model.metadata.saved_input_example_info is None
    assert model.metadata.metadata["ddpm_sweep"]["cell"]["guidance"] == 0.0  # the config's first
    frame = pd.DataFrame({"label": [3, 0, 9], "guidance": [2.0, 2.0, 0.0]})
    x = model.predict(frame, params={"steps": 3, "sampler": "ddim"})
    assert x.shape == (3, 1, 8, 8) and x.dtype == np.float32
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0  # x0 clipped for images


def test_cell_from_eval_params_and_bad_cells():
    spec = cell_spec(CELL)
    assert spec == SamplingSpec(guidance=3.0, variance="fixed_large", steps=5, threshold="auto",
                                seed=7)  # fmt: skip
    assert cell_spec({"sample.steps": "None", "guidance_interval": "(0.1, 0.9)"}).as_dict() == (
        SamplingSpec(steps=None, guidance_interval=(0.1, 0.9)).as_dict()
    )
    cfg = load_config(None, [*MIXTURE, "sample.guidance=[2,4]", "sample.sampler=ddim"])
    assert cell_spec({"sample.variance": "fixed_large"}, cfg) == SamplingSpec(
        guidance=2.0, variance="fixed_large", steps=50, sampler="ddim", threshold="auto"
    )
    with pytest.raises(ValueError, match=r"sampling cell sample.steps='2.5': not a valid steps"):
        cell_spec({"sample.steps": "2.5"})


def test_inputs_are_checked_before_sampling():
    cfg = load_config(None, [*QUICK, *MIXTURE])
    net = build_network({"name": "mlp", "hidden_dim": 8, "num_blocks": 1, "num_classes": 3})
    conditional = DiffusionModule(net, GaussianDiffusion.from_schedule("linear", 20), cfg, (2,))
    sampler = DiffusionSampler().attach(conditional, SamplingSpec(steps=2))
    with pytest.raises(ValueError, match="no 'label' column: .* classes 0..2"):
        sampler.predict(None, pd.DataFrame({"guidance": [1.0]}))
    with pytest.raises(ValueError, match="no 'guidance' column"):
        sampler.predict(None, pd.DataFrame({"label": [1]}))
    with pytest.raises(ValueError, match=r"labels \[1.5\] are not integers"):
        sampler.predict(None, pd.DataFrame({"label": [1.5], "guidance": [1.0]}))
    with pytest.raises(ValueError, match=r"guidance weights \[nan\] are not finite"):
        sampler.predict(None, pd.DataFrame({"label": [1], "guidance": [np.nan]}))
    with pytest.raises(ValueError, match=r"unknown params \['stpes'\]"):
        sampler.predict(None, pd.DataFrame({"label": [1], "guidance": [1.0]}), {"stpes": 3})
    with pytest.raises(ValueError, match="learned_range needs a network trained for it"):
        sampler.predict(None, {"label": [1], "guidance": [1.0]}, {"variance": "learned_range"})
    with pytest.raises(ValueError, match="param seed=1.5: expected a long"):
        sampler.predict(None, {"label": [1], "guidance": [1.0]}, {"seed": 1.5})
    assert sampler.predict(None, pd.DataFrame({"label": [], "guidance": []})).shape == (0, 2)
    # Integer weights and a dict input are fine without MLflow's schema in front.
    assert sampler.predict(None, {"label": [2, 0], "guidance": [3, 0]}).shape == (2, 2)

    net = build_network({"name": "mlp", "hidden_dim": 8, "num_blocks": 1, "num_classes": 0})
    uncond = DiffusionModule(net, GaussianDiffusion.from_schedule("linear", 20), cfg, (2,))
    sampler = DiffusionSampler().attach(uncond, SamplingSpec(steps=2))
    x = sampler.predict(None, pd.DataFrame({"guidance": [0.0, 1.0, 3.0]}))
    assert x.shape == (3, 2) and np.isfinite(x).all()
    assert sampler.predict(None, pd.DataFrame({"label": [-1, -1]})).shape == (2, 2)
    with pytest.raises(ValueError, match="this model is unconditional"):
        sampler.predict(None, pd.DataFrame({"label": [0]}))


def test_tracking_uri_is_restored(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    with use_tracking_uri(f"sqlite:///{tmp_path / 'b.db'}"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'b.db'}"
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'c.db'}")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'c.db'}"  # nothing pinned
