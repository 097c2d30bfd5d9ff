"""The package's promises: the import direction, the CLI entry point, the public math API."""

import subprocess
import sys

import lightning_modules
from orchestrator.cli import main

BLOCK_RAY_MLFLOW = """
import importlib, pkgutil, sys
for name in ("ray", "mlflow", "orchestrator"):
    sys.modules[name] = None  # any import of these now raises ImportError
import lightning_modules
for mod in pkgutil.walk_packages(lightning_modules.__path__, "lightning_modules."):
    importlib.import_module(mod.name)
print("ok")
"""


def test_lightning_modules_imports_neither_ray_nor_mlflow():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY_MLFLOW], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api_exposes_the_math():
    for name in (
        "GaussianDiffusion",
        "get_betas",
        "sample",
        "guided_output",
        "bits_per_dim",
        "training_losses",
        "rescale_zero_terminal_snr",
        "VARIANCES",
        "SCHEDULES",
    ):
        assert hasattr(lightning_modules, name), name
    assert set(lightning_modules.VARIANCES) == {"fixed_small", "fixed_large", "learned_range"}


def test_cli_version_and_demo(capsys):
    assert main(["demo", "--steps", "20", "--samples", "200", "--timesteps", "100"]) == 0
    table = capsys.readouterr().out
    assert "fixed_small" in table and "fixed_large" in table
    assert main(["demo", "--schedule", "nope"]) == 2
    assert "unknown noise schedule 'nope'" in capsys.readouterr().err
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("ddpm-sweep ")
