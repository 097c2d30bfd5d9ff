"""The sweep's best model as an MLflow model: a pyfunc sampler around a ddpm-sweep checkpoint.

:class:`DiffusionSampler` is the pyfunc model: it rebuilds the Lightning module from the
checkpoint (EMA weights, config, noise schedule) and draws samples for a DataFrame of
``label`` / ``guidance`` rows, with the sampling cell the model won with as its default params.
:func:`log_sampler_model` logs it as an MLflow 3 LoggedModel (signature, input example, config,
the training and evaluation runs it came from); :func:`register_best` makes it a version of a
registered model. Loading needs ``lightning_modules`` and this module: both are copied into the
model (``code/``), so it loads where the ddpm-sweep package is not installed.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from omegaconf import OmegaConf

from lightning_modules.diffusion import (
    GUIDANCE_CONVENTION,
    SAMPLERS,
    SAMPLING_SPEC_KEYS,
    VARIANCES,
    SamplingSpec,
    get_variance,
)

# The params a request may set (MLflow's params schema); every other SamplingSpec field
# (guidance_rescale, guidance_interval, threshold) is the winning cell's, fixed in the model.
PARAM_TYPES = {"steps": "long", "variance": "string", "sampler": "string", "eta": "double",
               "seed": "long"}  # fmt: skip
MODEL_TYPE = "ddpm-sampler"
METADATA_KEY = "ddpm_sweep"
# The distributions the sampler imports (beside mlflow, which MLflow pins itself, and the
# ddpm-sweep code, which travels in the model's `code/`), pinned to the versions that logged it.
REQUIREMENTS = ("torch", "pytorch-lightning", "omegaconf", "numpy", "pandas", "cloudpickle")


class DiffusionSampler(mlflow.pyfunc.PythonModel):
    """Samples a ddpm-sweep checkpoint. Input: a DataFrame with one row per sample, columns
    ``label`` (a class; absent or -1 for an unconditional model) and ``guidance`` (w; w=0
    unconditional, w=1 conditional, >1 extrapolates: ``GUIDANCE_CONVENTION``). Params (all
    optional, defaults the winning cell's): ``steps``, ``variance``, ``sampler``, ``eta``,
    ``seed``. Output: float32 samples (N, C, H, W) for images in [-1, 1], (N, D) for points,
    in the input's row order.

    Rows with the same guidance weight are drawn together, as one ``module.sample`` call, from
    the noise of ``seed`` (as the sweep draws its cells): the same request gives the same
    samples (on one device), and a row's sample depends on its label, its weight and its
    position among the rows of that weight, not on the rows of other weights.
    """

    def __init__(self, device: str | None = None):
        self.device = device  # None: CUDA when available, else the CPU
        self.module = None
        self.defaults: SamplingSpec | None = None

    def load_context(self, context) -> None:
        from lightning_modules.module import DiffusionModule

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        module = DiffusionModule.from_checkpoint(context.artifacts["checkpoint"])
        info = json.loads(Path(context.artifacts["sampler"]).read_text())
        self.attach(module.to(device), cell_spec(info["cell"]))

    def attach(self, module, defaults: SamplingSpec) -> DiffusionSampler:
        """Use ``module`` (a DiffusionModule) with ``defaults``: what ``load_context`` does."""
        self.module, self.defaults = module.eval(), defaults
        return self

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        module = self.module
        if module is None:
            raise RuntimeError("DiffusionSampler.predict before load_context: load the model")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        spec = self.request_spec(params)
        n = len(frame)
        out = np.empty((n, *module.data_shape), dtype=np.float32)
        if n == 0:
            return out
        kw = {"batch_size": int(module.cfg.sample.batch_size),
              "precision": str(module.cfg.sample.precision)}  # fmt: skip
        if module.null_label is None:
            _check_unconditional(frame)
            out[:] = module.sample(None, spec, num_samples=n, **kw).numpy()
            return out
        labels = _labels(frame, module.num_classes)
        weights = _weights(frame)
        for w in dict.fromkeys(weights.tolist()):  # the weights in order of first appearance
            rows = np.flatnonzero(weights == w)
            samples = module.sample(torch.from_numpy(labels[rows]), replace(spec, guidance=w), **kw)
            out[rows] = samples.numpy()
        return out

    def request_spec(self, params: Mapping[str, Any] | None) -> SamplingSpec:
        """The defaults with a request's params, checked (ValueError with what is accepted)."""
        module, values = self.module, self.defaults.as_dict()
        unknown = sorted(set(params or {}) - set(PARAM_TYPES))
        if unknown:
            raise ValueError(f"unknown params {unknown}: expected some of {list(PARAM_TYPES)}")
        for key, value in (params or {}).items():
            if value is not None:
                values[key] = _param(key, value)
        allowed = [v for v in VARIANCES if module.variance.learned or not VARIANCES[v].learned]
        if values["variance"] not in allowed:
            why = (
                "" if module.variance.learned else " (learned_range needs a network trained for it)"
            )
            raise ValueError(f"variance {values['variance']!r}: expected one of {allowed}{why}")
        if values["sampler"] not in SAMPLERS:
            raise ValueError(f"sampler {values['sampler']!r}: expected one of {list(SAMPLERS)}")
        return SamplingSpec(**values).check(module.process)


def _param(key: str, value: Any) -> Any:
    kind = PARAM_TYPES[key]
    ok = {
        "long": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
        "double": lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
    }[kind](value)
    if not ok:
        raise ValueError(f"param {key}={value!r}: expected a {kind}")
    return {"long": int, "double": float, "string": str}[kind](value)


def _check_unconditional(frame: pd.DataFrame) -> None:
    if "label" in frame and not (frame["label"] == -1).all():
        raise ValueError(
            "this model is unconditional: leave out the 'label' column or set it to -1"
        )


def _labels(frame: pd.DataFrame, num_classes: int) -> np.ndarray:
    classes = f"this model is class-conditional, with classes 0..{num_classes - 1}"
    if "label" not in frame:
        raise ValueError(f"model input has no 'label' column: {classes}, one per row")
    values = pd.to_numeric(frame["label"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        bad = frame["label"][~np.isfinite(values) | (values != np.round(values))].tolist()
        raise ValueError(f"labels {bad[:5]} are not integers: {classes}")
    labels = values.astype(np.int64)
    unknown = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
    if unknown:
        hint = (
            " (for an unconditional sample, give any class and guidance 0)" if -1 in unknown else ""
        )
        raise ValueError(f"unknown labels {unknown[:5]}: {classes}{hint}")
    return labels


def _weights(frame: pd.DataFrame) -> np.ndarray:
    if "guidance" not in frame:
        raise ValueError(
            "model input has no 'guidance' column: one guidance weight w per row "
            f"({GUIDANCE_CONVENTION})"
        )
    weights = pd.to_numeric(frame["guidance"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(weights).all():
        bad = frame["guidance"][~np.isfinite(weights)].tolist()
        raise ValueError(f"guidance weights {bad[:5]} are not finite numbers")
    return weights + 0.0  # -0.0 is 0.0


# -- the winning cell ---------------------------------------------------------------------------
def cell_spec(cell: Mapping[str, Any] | None, cfg=None) -> SamplingSpec:
    """The SamplingSpec of a sampling cell given as an eval run's params (``sample.guidance``:
    ``'3.0'``, ...: every ``sample.*`` param of the run may be passed, those that are not spec
    fields are ignored) or as ``SamplingSpec.as_dict()``. Fields it leaves out are the config's
    (its first cell), or SamplingSpec's defaults without a config."""
    from lightning_modules.config import sampling_specs

    values = sampling_specs(cfg.sample)[0].as_dict() if cfg is not None else {}
    for key, raw in (cell or {}).items():
        field = key.removeprefix("sample.")
        if field in SAMPLING_SPEC_KEYS:
            try:
                values[field] = _cell_value(field, raw)
            except (TypeError, ValueError, SyntaxError):
                raise ValueError(f"sampling cell {key}={raw!r}: not a valid {field}") from None
    return SamplingSpec(**values)


def _cell_value(field: str, raw: Any) -> Any:
    if isinstance(raw, str) and raw.strip() in ("None", "null", ""):
        raw = None
    if field in ("guidance", "eta", "guidance_rescale"):
        return float(raw)
    if field == "seed" or (field == "steps" and raw is not None):
        value = float(raw)
        if value != int(value):
            raise ValueError(raw)
        return int(value)
    if field == "guidance_interval" and raw is not None:
        lo, hi = ast.literal_eval(raw) if isinstance(raw, str) else raw
        return (float(lo), float(hi))
    return raw if raw is None or field in ("steps", "guidance_interval") else str(raw)


def _jsonable(spec: SamplingSpec) -> dict[str, Any]:
    values = spec.as_dict()
    if values["guidance_interval"] is not None:
        values["guidance_interval"] = list(values["guidance_interval"])
    return values


# -- logging and registering --------------------------------------------------------------------
@contextmanager
def use_tracking_uri(uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then as it was (both
    the module-level value and the MLFLOW_TRACKING_URI variable ``set_tracking_uri`` exports).
    ``Model.log`` and the sqlite registry's ``models:/`` lookups only use the global URI."""
    if uri is None:
        yield
        return
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = getattr(utils, "_tracking_uri", None)  # None: unset, the env var decides
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def sampler_signature(module, defaults: SamplingSpec) -> ModelSignature:
    """Inputs ``label`` (long) and ``guidance`` (double), required for a class-conditional
    model; output (-1, *data_shape) float32; params with the winning cell as defaults."""
    conditional = module.null_label is not None
    inputs = Schema([ColSpec("long", "label", required=conditional),
                     ColSpec("double", "guidance", required=conditional)])  # fmt: skip
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *module.data_shape))])
    defaults = defaults.as_dict() | {"steps": defaults.steps or module.process.num_timesteps}
    params = ParamSchema(
        [ParamSpec(k, kind, _param(k, defaults[k])) for k, kind in PARAM_TYPES.items()]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """REQUIREMENTS pinned to the installed versions (local labels such as +cpu dropped), with
    no requirement inference: MLflow would load the model in a subprocess to find them."""
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_sampler_model(
    checkpoint_path: str | Path,
    *,
    name: str,
    cell: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    eval_run_id: str | None = None,
    experiment_id: str | None = None,
    tracking_uri: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    bundle_code: bool = True,
    with_example: bool = True,
) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a :class:`DiffusionSampler` LoggedModel named ``name``; returns
    its ModelInfo (``model_uri`` is ``models:/<model_id>``, for :func:`register_best`).

    ``cell``: the winning sampling cell (the eval run's ``sample.*`` params, see
    :func:`cell_spec`): the default params. ``run_id``: the run that produced the model (the
    training run): the model is linked to it and lives in its experiment (else in
    ``experiment_id``, else MLflow's current one). ``eval_run_id``: the evaluation it won.
    ``metadata`` joins the ``ddpm_sweep`` metadata, ``tags`` the LoggedModel's tags; its
    params are the config and the cell, as the eval run's params.
    ``bundle_code``: copy ``lightning_modules`` and ``orchestrator`` into the model, so it
    loads without ddpm-sweep installed (no package index has it) and with the code that wrote
    the checkpoint; False relies on the loading environment's package. ``with_example``: log
    a one-row input example, which MLflow samples once (the cell's steps) to check it.
    """
    import lightning_modules
    import orchestrator
    from lightning_modules.module import DiffusionModule
    from orchestrator.tracking import flat_params

    module = DiffusionModule.from_checkpoint(checkpoint_path)
    # The training step it was saved at: the model's step in its run, so the run's metrics
    # logged at that step (the last validation) are linked to it in MLflow's Models tab.
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    step = int(ckpt.get("global_step", 0))
    del ckpt
    spec = cell_spec(cell, module.cfg).check(module.process)
    if get_variance(spec.variance).learned and not module.variance.learned:
        raise ValueError(f"cell variance {spec.variance!r}: the network is not trained for it")
    config = OmegaConf.to_container(module.cfg, resolve=True)
    info = {
        "train_run_id": run_id,
        "eval_run_id": eval_run_id,
        "cell": _jsonable(spec),
        "data": str(module.cfg.data.name),
        "data_shape": list(module.data_shape),
        "num_classes": module.num_classes,
        "timesteps": module.process.num_timesteps,
        "prediction": str(module.cfg.diffusion.prediction),
        "guidance_convention": GUIDANCE_CONVENTION,
        "ddpm_sweep_version": orchestrator.__version__,
    }
    # One sample: MLflow samples the example once while logging (its serving-input check),
    # one chain of the cell's steps.
    example = pd.DataFrame(
        {"label": np.array([0 if module.null_label is not None else -1], dtype=np.int64),
         "guidance": [spec.guidance]}
    ) if with_example else None  # fmt: skip
    code_paths = None
    if bundle_code:
        code_paths = [str(Path(p.__file__).parent) for p in (lightning_modules, orchestrator)]
    model_params = flat_params(module.cfg) | {
        f"sample.{k}": str(v) for k, v in spec.as_dict().items()
    }
    model_tags = {
        f"{METADATA_KEY}.train_run_id": run_id,
        f"{METADATA_KEY}.eval_run_id": eval_run_id,
        **(tags or {}),
    }
    with use_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (Path(tmp) / "sampler.json").write_text(json.dumps(info, indent=2))
        if run_id is not None:
            experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
        # Created here rather than by Model.log: without an active run, that one files the
        # model under MLflow's current (default) experiment, not the experiment of `run_id`.
        logged = mlflow.initialize_logged_model(
            name=name,
            source_run_id=run_id,
            tags={k: str(v) for k, v in model_tags.items() if v is not None},
            params={k: v[:6000] for k, v in model_params.items()},
            model_type=MODEL_TYPE,
            experiment_id=experiment_id,
        )
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            step=step,
            python_model=DiffusionSampler(),
            artifacts={
                "checkpoint": str(checkpoint_path),
                "config": str(Path(tmp) / "config.yaml"),
                "sampler": str(Path(tmp) / "sampler.json"),
            },
            code_paths=code_paths,
            signature=sampler_signature(module, spec),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata={METADATA_KEY: info | dict(metadata or {})},
        )


def register_best(
    client: mlflow.MlflowClient | str,
    model: mlflow.models.model.ModelInfo | str,
    registered_name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    registered_description: str | None = None,
):
    """A new version of ``registered_name`` (created, with ``registered_description``, if
    missing) whose source is the logged ``model`` (ModelInfo or ``models:/<model_id>``) and
    whose run is the model's source run. Returns the ModelVersion."""
    client = mlflow.MlflowClient(client) if isinstance(client, str) else client
    uri = model if isinstance(model, str) else model.model_uri
    model_id = uri.removeprefix("models:/")
    if not uri.startswith("models:/") or not model_id or "/" in model_id:
        raise ValueError(f"{uri}: expected a logged model's URI, models:/<model_id>")
    with use_tracking_uri(client.tracking_uri):
        try:
            client.create_registered_model(registered_name, description=registered_description)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        run_id = client.get_logged_model(model_id).source_run_id
        return client.create_model_version(
            registered_name,
            source=uri,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            description=description,
            model_id=model_id,
        )
