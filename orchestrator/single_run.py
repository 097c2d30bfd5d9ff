"""`ddpm-sweep train` and `ddpm-sweep sample`: one run, no Ray."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.config import (
    SampleConfig,
    config_error,
    load_config,
    sampling_specs,
    to_yaml,
    validate_sample_config,
)
from lightning_modules.data import build_datamodule
from lightning_modules.evaluate import EvalResult, evaluate_module
from lightning_modules.module import DiffusionModule
from lightning_modules.train import build_experiment, fit

from .plan import cell_problem
from .tracking import cell_suffix, flat_params, run_tags, tracking_uri

log = logging.getLogger(__name__)
TABLE_KEYS = (
    "fid",
    "guided_accuracy",
    "precision",
    "recall",
    "sliced_wasserstein",
    "energy_distance",
    "mode_coverage",
    "label_accuracy",
)


def format_rows(results: list[EvalResult]) -> str:
    """One line per cell: each metric with its interval (`1.234 [0.98, 1.61]`)."""
    keys = [k for k in TABLE_KEYS if any(k in r.metrics for r in results)]
    head = f"{'w':>5} {'variance':<13} {'steps':>5} " + " ".join(f"{k:>26}" for k in keys)
    lines = [head]
    for r in results:
        spec = r.spec
        vals = " ".join(f"{_with_interval(r.metrics, k):>26}" for k in keys)
        lines.append(f"{spec.guidance:>5g} {spec.variance:<13} {spec.steps:>5} {vals}")
    return "\n".join(lines)


def _with_interval(m: dict[str, float], key: str) -> str:
    if key not in m:
        return "-"
    if f"{key}_ci_low" not in m:
        return f"{m[key]:.4f}"
    return f"{m[key]:.4f} [{m[f'{key}_ci_low']:.3g}, {m[f'{key}_ci_high']:.3g}]"


def train_command(
    config_file: str,
    overrides: list[str],
    uri: str | None,
    out: str | None,
    run_eval: bool,
    progress: bool = True,
) -> int:
    from pytorch_lightning.loggers import MLFlowLogger

    cfg = load_config(config_file, overrides)
    try:  # network/data mismatches and missing datasets surface here, before anything is logged
        experiment = build_experiment(cfg)
    except ValueError as err:  # DatasetNotFoundError is a FileNotFoundError: it passes through
        raise ValueError(f"{config_file}: {err}") from None
    out_dir = Path(out or tempfile.mkdtemp(prefix="ddpm-sweep-train-"))
    logger = MLFlowLogger(
        experiment_name=cfg.name,
        tracking_uri=tracking_uri(uri),
        tags=run_tags(config_file),
        log_model=False,
    )
    logger.log_hyperparams(flat_params(cfg))
    client, run_id = logger.experiment, logger.run_id
    (out_dir / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    client.log_artifact(run_id, str(out_dir / "config.yaml"))
    try:
        result = fit(
            cfg, out_dir, logger=logger, experiment=experiment, enable_progress_bar=progress
        )
        client.log_artifact(run_id, str(result.checkpoint), "checkpoints")
        if run_eval:
            rows = evaluate_module(
                result.module, result.datamodule, cfg.sample, cfg.eval, out_dir / "samples"
            )
            step = result.trainer.global_step
            now = int(time.time() * 1000)
            for r in rows:
                suffix = cell_suffix(r.spec.guidance, r.spec.variance, r.spec.steps)
                metrics = r.logged_metrics().items()
                batch = [Metric(f"eval/{k}/{suffix}", v, now, step) for k, v in metrics]
                client.log_batch(run_id, metrics=batch)
                client.log_artifact(run_id, str(r.image), "samples")
            eval_json = [r.as_dict() for r in rows]
            (out_dir / "eval.json").write_text(json.dumps(eval_json, indent=2))
            client.log_artifact(run_id, str(out_dir / "eval.json"))
            print(format_rows(rows))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    print(
        f"run {run_id} in {tracking_uri(uri)} (experiment {cfg.name!r}); checkpoint "
        f"{result.checkpoint}\nbrowse: mlflow ui --backend-store-uri {tracking_uri(uri)}"
    )
    return 0


def sample_command(
    checkpoint: str,
    guidance: list[float] | None,
    variance: list[str] | None,
    steps: list[int] | None,
    out: str,
    run_eval: bool,
    overrides: list[str],
) -> int:
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: is a file; expected a directory (new or existing)")
    module = DiffusionModule.from_checkpoint(checkpoint)
    cfg = module.cfg
    try:  # the checkpoint's sample section, as the structured SampleConfig: unknown keys refused
        sample_cfg = OmegaConf.merge(
            OmegaConf.structured(SampleConfig),
            cfg.sample,
            {
                k: v
                for k, v in (("guidance", guidance), ("variance", variance), ("steps", steps))
                if v
            },
            OmegaConf.from_dotlist(list(overrides)),
        )
    except OmegaConfBaseException as err:
        fields = list(SampleConfig.__dataclass_fields__)
        raise config_error(err, "ddpm-sweep sample", "", fields) from None
    validate_sample_config(sample_cfg, module.process.num_timesteps, where=checkpoint)
    for spec in sampling_specs(sample_cfg):
        problem = cell_problem(spec, cfg)
        if problem and problem[0] == "variance":  # steps are checked above; guidance is allowed
            raise ValueError(f"{checkpoint}: {problem[1]}")
    datamodule = build_datamodule(cfg.data)
    rows = evaluate_module(module, datamodule, sample_cfg, cfg.eval, out, with_metrics=run_eval)
    Path(out, "samples.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    print(format_rows(rows) if run_eval else "\n".join(str(r.image) for r in rows))
    return 0
