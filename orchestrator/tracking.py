"""MLflow conventions shared by every command: the default URI, params, tags, metric names."""

from __future__ import annotations

import functools
import getpass
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Commands that only read MLflow (`report`) import this module: it leaves torch and Lightning to
# the functions that need the run config's classes (`lightning_modules` imports them).

# A sqlite file in the working directory: `mlflow ui --backend-store-uri sqlite:///mlflow.db`.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The tags of a searched cell's eval run (orchestrator/sample_search.py); the report reads them.
STUDY_TAG = "ddpm_sweep.search_study"  # its study (the plan cell's key)
NUMBER_TAG = "ddpm_sweep.search_trial"  # its number in the study
VALUES_TAG = "ddpm_sweep.search_params"  # the study's own values for it (JSON)
SEARCHED_TAG = "ddpm_sweep.searched"  # the searched keys, comma-separated
STOPPED_TAG = "ddpm_sweep.stopped"  # why and where a cell stopped early was stopped (KILLED)
PACKAGES = ("ddpm-sweep", "torch", "pytorch-lightning", "mlflow", "ray", "numpy")


def tracking_uri(cli_value: str | None) -> str:
    """The URI to use; a relative sqlite path is made absolute, because Ray runs each trial in
    its own working directory and every process must write to the same file."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def ui_url(uri: str) -> str:
    """Where a user opens the MLflow UI for this store: the tracking server itself, or for a
    database or directory `mlflow ui`'s default address (README: how to open a sweep)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def existing_store(uri: str) -> str:
    """``uri``, refusing a sqlite file that does not exist (MLflow would create an empty one,
    and then say the sweep is not there): commands that only read need an existing store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file():
        raise FileNotFoundError(
            f"{uri}: no MLflow database there (run `ddpm-sweep run` in this directory first, or "
            "pass --tracking-uri)"
        )
    return uri


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Every config value under its YAML key path (`diffusion.schedule`), as MLflow params."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def train_params(cfg: DictConfig) -> dict[str, str]:
    """What a training run records: its dataset's own keys, the network, the diffusion and the
    training settings. Not the sampling lists it is evaluated with (each eval run has its own
    cell) nor the evaluation settings; the full resolved config stays an artifact."""
    from lightning_modules.data.config import DATASET_KEYS

    data = {f"data.{k}" for k in ("name", *DATASET_KEYS.get(cfg.data.name, ()))}
    return {
        k: v
        for k, v in flat_params(cfg).items()
        if k in data or k.split(".", 1)[0] in ("network", "diffusion", "train")
    }


def eval_params(cfg: DictConfig, training: dict, cell_params: dict[str, str]) -> dict[str, str]:
    """What an evaluation run records: the training axes' values of its training (to group and
    filter by), the sampling cell's own values, and the evaluation settings."""
    evaluation = {k: v for k, v in flat_params(cfg).items() if k.startswith("eval.")}
    return {k: str(v) for k, v in training.items()} | cell_params | evaluation


def git_commit(path: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(config_file: str | None = None) -> dict[str, str]:
    """Tags every run carries: the guidance convention, package versions, and MLflow's own
    source tags (commit, source, user), which its UI shows in the run's overview. Computed once
    per process and file (a `git rev-parse` and package lookups: ~6 ms a run otherwise)."""
    return dict(_run_tags(str(config_file) if config_file else None))


@functools.lru_cache(maxsize=16)
def _run_tags(config_file: str | None) -> tuple[tuple[str, str], ...]:
    from lightning_modules.diffusion import GUIDANCE_CONVENTION

    tags = {
        "ddpm_sweep.guidance_convention": GUIDANCE_CONVENTION,
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": str(config_file) if config_file else "ddpm-sweep",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
    }
    if config_file:
        tags["ddpm_sweep.config_file"] = str(config_file)
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return tuple(tags.items())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        return os.environ.get("USER", "unknown")


def cell_suffix(guidance: float, variance: str, steps: int) -> str:
    """The name of one (guidance, variance, steps) cell in metric keys: `w3_fixed_small_50steps`."""
    return f"w{float(guidance):g}_{variance}_{int(steps)}steps"
