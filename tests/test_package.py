"""The package's promises: the import direction, the CLI entry point, the public math API."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lightning_modules
from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]

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


# What a lent GPU machine has: torch, Lightning (which brings torchmetrics and PyYAML) and numpy,
# plus the omegaconf we bring; no matplotlib, scikit-learn, scipy or Pillow.
GPU_MACHINE_PACKAGES = ("torch", "pytorch-lightning", "numpy", "omegaconf")

TRAIN_SAMPLE_MEASURE = """
import importlib.util, sys
import torch
import lightning_modules.evaluate, lightning_modules.module, lightning_modules.train
from lightning_modules.config import load_config
from lightning_modules.data import TensorDataModule
from lightning_modules.diffusion import SamplingSpec
from lightning_modules.evaluation import ClassifierArch, EvalClassifier, evaluate_images
from lightning_modules.train import build_experiment, fit

assert not any(importlib.util.find_spec(m) for m in ("matplotlib", "sklearn", "scipy", "PIL"))

class Synthetic(TensorDataModule):
    def load_splits(self):
        x = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8)
        y = torch.arange(96) % 10
        return (x[:32], y[:32]), (x[32:], y[32:])

cfg = load_config(None, [
    "network.model_channels=16", "network.attention_resolutions=[4]", "network.num_heads=1",
    "diffusion.timesteps=20", "sample.steps=[10]", "train.bpd_subset=4", "train.accelerator=cpu",
])
_, module = build_experiment(cfg)  # the digits' U-Net; the digits themselves are never read
data = Synthetic(name="synthetic", dataset="synthetic", num_classes=10, data_shape=(1, 8, 8),
                 class_names=tuple("0123456789"), batch_size=16)
fit(cfg, sys.argv[1], experiment=(data, module), fast_dev_run=True, enable_progress_bar=False)
labels = torch.arange(10).repeat_interleave(2)
x = module.sample(labels, SamplingSpec(guidance=2.0, steps=3))
classifier = EvalClassifier(ClassifierArch(1, 10))
print(sorted(evaluate_images(x, labels, data.val_tensors()[0], classifier)))
"""


def _installed_with(packages: tuple[str, ...]) -> list[Path]:
    """The top-level files and folders of `packages` and of everything they require."""
    todo, seen, paths = list(packages), set(), []
    while todo:
        try:
            dist = importlib.metadata.distribution(todo.pop())
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform dependency (CUDA libraries) not installed here
        if canonicalize_name(dist.metadata["Name"]) in seen:
            continue
        seen.add(canonicalize_name(dist.metadata["Name"]))
        tops = {f.parts[0] for f in dist.files or ()} - {"..", "__pycache__"}
        paths += [dist.locate_file(top) for top in tops]
        for req in map(Requirement, dist.requires or ()):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return paths


def test_trains_samples_and_measures_with_only_what_a_gpu_machine_has(tmp_path):
    """A site-packages of torch, Lightning, numpy and omegaconf alone (linked into tmp_path): the
    model, training and evaluation modules import, a U-Net trains and samples, and the image
    metrics run, without matplotlib, scikit-learn, scipy or Pillow (imported only to draw
    pictures and to load the digits or an image folder)."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for path in _installed_with(GPU_MACHINE_PACKAGES):
        (site / path.name).symlink_to(path)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-S", "-c", TRAIN_SAMPLE_MEASURE, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(
        ["fid", "guided_accuracy", "precision", "recall"]
    )


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
