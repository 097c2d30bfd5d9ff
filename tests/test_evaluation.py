"""Evaluation: classifier + cache, image metrics, 2-D point metrics, grids."""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_helpers import StandInMixture, balanced_labels
from omegaconf import OmegaConf
from PIL import Image

from lightning_modules.evaluation import (
    classifier as classifier_module,
)
from lightning_modules.evaluation import (
    classifier_accuracy,
    classifier_cache_path,
    default_cache_dir,
    energy_distance,
    evaluate_images,
    evaluate_points,
    fid_in_classifier_features,
    grid_filename,
    guided_accuracy,
    load_or_train_classifier,
    mode_coverage_per_class,
    precision_recall,
    save_points_plot,
    save_sample_grid,
    sliced_wasserstein,
    train_classifier,
)

EVALUATION_DIR = Path(__file__).resolve().parents[1] / "lightning_modules" / "evaluation"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["stand_in", "data_package"])
def truth(request):
    """The metrics are written against a duck type: check them on both implementations."""
    if request.param == "stand_in":
        return StandInMixture()
    data = pytest.importorskip("lightning_modules.data")  # written in parallel; may be absent
    return data.GaussianMixture2D.ring(8, radius=2.0, std=0.1)


# --------------------------------------------------------------------------- classifier


def test_classifier_reaches_95_percent_on_unseen_digits(digits, trained):
    _, _, x_b, y_b = digits
    assert trained.heldout_accuracy >= 0.95
    assert classifier_accuracy(trained.model, x_b, y_b) >= 0.95
    assert trained.model.features(x_b[:5]).shape == (5, trained.model.num_features)
    assert trained.model(x_b[:5]).shape == (5, 10)


def _tiny_train_args(digits):
    x_a, y_a, _, _ = digits
    return x_a[:200], y_a[:200], 10


def test_cache_hit_loads_without_retraining(digits, tmp_path, monkeypatch):
    x, y, k = _tiny_train_args(digits)
    first = load_or_train_classifier("digits", x, y, k, seed=1, cache_dir=tmp_path, epochs=1)
    assert not first.loaded_from_cache
    assert first.path == tmp_path / "classifier-digits-seed1.pt" and first.path.exists()
    mtime = first.path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("cache hit must not retrain")

    monkeypatch.setattr(classifier_module, "train_classifier", fail)
    second = load_or_train_classifier("digits", x, y, k, seed=1, cache_dir=tmp_path, epochs=1)
    assert second.loaded_from_cache
    assert first.path.stat().st_mtime_ns == mtime
    assert second.heldout_accuracy == first.heldout_accuracy
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name])
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temp file behind"


def test_training_is_deterministic_per_seed(digits):
    x, y, k = _tiny_train_args(digits)
    a, b = (train_classifier(x, y, k, seed=3, epochs=1) for _ in range(2))
    c = train_classifier(x, y, k, seed=4, epochs=1)
    weight = "head.1.weight"
    assert torch.equal(a.model.state_dict()[weight], b.model.state_dict()[weight])
    assert not torch.equal(a.model.state_dict()[weight], c.model.state_dict()[weight])


def test_cache_path_depends_on_key_and_seed(tmp_path, monkeypatch):
    base = classifier_cache_path("digits", 0, tmp_path)
    assert classifier_cache_path("digits", 1, tmp_path) != base
    assert classifier_cache_path("mnist", 0, tmp_path) != base
    assert classifier_cache_path("a/b c", 0, tmp_path).parent == tmp_path  # key made file-safe
    monkeypatch.setenv("DDPM_SWEEP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert classifier_cache_path("digits", 0, None) == base


def test_other_seed_trains_its_own_file_and_corrupt_cache_retrains(digits, tmp_path):
    x, y, k = _tiny_train_args(digits)
    load_or_train_classifier("digits", x, y, k, seed=1, cache_dir=tmp_path, epochs=1)
    other = load_or_train_classifier("digits", x, y, k, seed=2, cache_dir=tmp_path, epochs=1)
    assert not other.loaded_from_cache
    assert len(list(tmp_path.glob("classifier-digits-seed*.pt"))) == 2
    other.path.write_bytes(b"not a checkpoint")
    again = load_or_train_classifier("digits", x, y, k, seed=2, cache_dir=tmp_path, epochs=1)
    assert not again.loaded_from_cache
    assert load_or_train_classifier(
        "digits", x, y, k, seed=2, cache_dir=tmp_path, epochs=1
    ).loaded_from_cache


def test_classifier_and_metrics_run_on_64px_rgb():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 64, 64, generator=gen) * 2 - 1
    y = torch.arange(12) % 3
    model = train_classifier(x, y, num_classes=3, seed=0, epochs=1, heldout_fraction=0.25).model
    metrics = evaluate_images(x[:6], y[:6], x[6:], model)
    assert all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- image metrics


def _scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_real_vs_real_much_smaller_than_real_vs_noise(digits, trained):
    x_a, _, x_b, _ = digits
    noise = torch.rand(x_b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_real = fid_in_classifier_features(x_b, x_a, trained.model)
    fid_noise = fid_in_classifier_features(noise, x_a, trained.model)
    assert 0.0 <= fid_real < 0.1 * fid_noise


def test_fid_matches_scipy_frechet_distance(digits, trained):
    x_a, y_a, x_b, _ = digits
    fake = x_a[y_a < 5]  # a clearly different distribution, so the FID is far from 0
    with torch.no_grad():
        f_real = trained.model.features(x_b).double().numpy()
        f_fake = trained.model.features(fake).double().numpy()
    expected = _scipy_frechet(f_fake, f_real)
    assert fid_in_classifier_features(fake, x_b, trained.model) == pytest.approx(
        expected, rel=1e-4, abs=1e-6
    )


def test_precision_recall_identical_disjoint_and_half_coverage(digits, trained):
    x_a, y_a, _, _ = digits
    with torch.no_grad():
        feats = trained.model.features(x_a)
    assert precision_recall(feats, feats) == (1.0, 1.0)
    assert precision_recall(feats + 1e3, feats) == (0.0, 0.0)
    # Samples from half of the classes: all realistic (precision ~1), half the data missing.
    precision, recall = precision_recall(feats[y_a < 5], feats)
    assert precision > 0.95
    assert 0.3 < recall < 0.7


def test_guided_accuracy_true_vs_shuffled_labels(digits, trained):
    _, _, x_b, y_b = digits
    shuffled = y_b[torch.randperm(len(y_b), generator=torch.Generator().manual_seed(0))]
    assert guided_accuracy(x_b, y_b, trained.model) == pytest.approx(
        classifier_accuracy(trained.model, x_b, y_b)
    )
    assert abs(guided_accuracy(x_b, shuffled, trained.model) - 0.1) < 0.05


def test_evaluate_images_keys_and_values(digits, trained):
    x_a, _, x_b, y_b = digits
    metrics = evaluate_images(x_b, y_b, x_a, trained.model)
    assert set(metrics) == {"fid", "precision", "recall", "guided_accuracy"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["guided_accuracy"] >= 0.95
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8
    assert "guided_accuracy" not in evaluate_images(x_b[:50], None, x_a[:50], trained.model)


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed"
)
def test_inception_fid_without_torch_fidelity_says_what_to_install(digits, trained, tmp_path):
    x_a, y_a, _, _ = digits
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        evaluate_images(x_a[:20], y_a[:20], x_a[:20], trained.model, inception_weights_path=weights)


# --------------------------------------------------------------------------- 2-D points


def test_point_distances_near_zero_for_truth_and_large_when_shifted(truth):
    gen = torch.Generator().manual_seed(1)
    labels = balanced_labels(8, 100)
    samples, _ = truth.sample(len(labels), labels=labels, generator=gen)
    good = evaluate_points(samples, labels, truth)
    shifted = evaluate_points(samples + torch.tensor([0.5, 0.0]), labels, truth)
    assert good["sliced_wasserstein"] < 0.05
    assert abs(good["energy_distance"]) < 0.01
    assert shifted["sliced_wasserstein"] > 0.25
    assert shifted["energy_distance"] > 0.1


def test_sliced_wasserstein_of_a_translation_and_chunked_energy():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([3.0, 4.0])
    assert sliced_wasserstein(x, x) == 0.0
    # For a translation by v in 2-D, SW2² = E_θ (θ·v)² = |v|² / 2.
    assert sliced_wasserstein(x, x + shift, num_projections=2000) == pytest.approx(
        5 / math.sqrt(2), rel=0.05
    )
    y = x[:300] * 2
    d = lambda a, b: torch.cdist(a.double(), b.double())  # noqa: E731
    n, m = len(x), len(y)
    naive = 2 * d(x, y).mean() - d(x, x).sum() / (n * (n - 1)) - d(y, y).sum() / (m * (m - 1))
    assert energy_distance(x, y, chunk_size=7) == pytest.approx(naive.item(), rel=1e-9)


def test_mode_coverage_full_for_truth_and_half_when_modes_dropped(truth):
    gen = torch.Generator().manual_seed(2)
    labels = balanced_labels(8, 100)
    samples, _ = truth.sample(len(labels), labels=labels, generator=gen)
    good = evaluate_points(samples, labels, truth)
    assert good["mode_coverage"] > 0.97 and good["label_accuracy"] > 0.99
    assert good["modes_hit"] == 1.0
    # Mode collapse: requests for classes 4..7 come out at modes 0..3.
    collapsed, _ = truth.sample(len(labels), labels=labels % 4, generator=gen)
    bad = evaluate_points(collapsed, labels, truth)
    assert bad["modes_hit"] == 0.5
    assert bad["mode_coverage"] == pytest.approx(0.5, abs=0.02)
    assert bad["label_accuracy"] == pytest.approx(0.5, abs=0.02)
    assert bad["mode_coverage_class_7"] == 0.0 and bad["mode_coverage_class_0"] > 0.95
    per_class = mode_coverage_per_class(collapsed[:400], labels[:400], truth)
    assert per_class[:4].gt(0.95).all() and per_class[4:].isnan().all()


# --------------------------------------------------------------------------- grids and plots


def test_sample_grid_size_and_one_class_per_row(tmp_path):
    n_classes, per_class = 3, 4
    # Class c images are uniformly grey at level -1, 0, +1, so each row has one intensity.
    levels = torch.tensor([-1.0, 0.0, 1.0]).repeat_interleave(per_class)
    samples = levels[:, None, None, None].expand(-1, 1, 8, 8)
    path = save_sample_grid(samples, tmp_path / "g.png", nrow=per_class, padding=2)
    image = np.asarray(Image.open(path))
    assert image.shape == (n_classes * 32 + 4 * 2, per_class * 32 + 5 * 2)  # 8px -> 32px
    cell = 32 + 2  # image side plus padding
    for row, expected in enumerate([0, 128, 255]):
        for col in range(per_class):
            top, left = 2 + row * cell, 2 + col * cell
            assert (image[top : top + 32, left : left + 32] == expected).all(), (row, col)


def test_rgb_grid_is_rgb(tmp_path):
    samples = -torch.ones(2, 3, 16, 16)
    samples[:, 0] = 1.0  # pure red
    with Image.open(save_sample_grid(samples, tmp_path / "rgb.png", nrow=2, padding=1)) as im:
        assert im.mode == "RGB" and im.size == (2 * 32 + 3, 32 + 2)
        assert im.getpixel((10, 10)) == (255, 0, 0)


def test_grid_filename_is_stable_and_readable():
    assert grid_filename(3, "fixed_small", 50) == "grid_w3_fixed_small_50steps.png"
    assert grid_filename(3.0, "fixed_small", 50) == grid_filename(3, "fixed_small", 50)
    assert grid_filename(1.5, "learned_range", 1000) == "grid_w1.5_learned_range_1000steps.png"


def test_points_plot_writes_png(tmp_path, truth):
    labels = balanced_labels(8, 10)
    samples, _ = truth.sample(len(labels), labels=labels)
    path = save_points_plot(samples, labels, tmp_path / "points.png", truth=truth)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


# --------------------------------------------------------------------------- architecture


def test_evaluation_never_imports_ray_mlflow_or_orchestrator():
    forbidden = {"ray", "mlflow", "orchestrator"}
    for source in EVALUATION_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, source.name


def test_sampling_moves_to_the_gpu_when_there_is_one(monkeypatch):
    """Lightning returns a fitted module on the CPU; evaluation after a GPU trial must sample on
    the GPU again, unless the run was pinned to the CPU."""
    from lightning_modules.config import load_config
    from lightning_modules.evaluate import sampling_device

    cfg = load_config(None, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sampling_device(cfg) == torch.device("cuda")
    assert sampling_device(load_config(None, ["train.accelerator=cpu"])) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sampling_device(cfg) == torch.device("cpu")


# --------------------------------------------------------------------------- evaluation context


def test_prepare_context_puts_the_classifier_on_the_sampling_device(trained, monkeypatch):
    """Samples come from the GPU: their features must be computed there, not on the CPU. The
    meta device stands in for CUDA: a classifier left where it was loaded stays on the CPU."""
    from lightning_modules import evaluate

    monkeypatch.setattr(evaluate, "load_or_train_classifier", lambda *a: copy.deepcopy(trained))
    x = torch.zeros(4, 1, 8, 8)
    datamodule = SimpleNamespace(
        kind="image",
        num_classes=10,
        name="stand_in",
        train_tensors=lambda: (x, torch.zeros(4, dtype=torch.int64)),
        val_tensors=lambda: (x, torch.zeros(4, dtype=torch.int64)),
    )
    eval_cfg = OmegaConf.create({"classifier_seed": 0, "cache_dir": None})
    ctx = evaluate.prepare_context(datamodule, eval_cfg, device="meta")
    assert {p.device.type for p in ctx.classifier.parameters()} == {"meta"}
    ctx = evaluate.prepare_context(datamodule, eval_cfg)
    assert {p.device.type for p in ctx.classifier.parameters()} == {"cpu"}


def test_cells_of_one_context_see_the_real_images_once_and_measure_as_before(digits, trained):
    """The real images' features, k-NN radii and FID statistics are computed for the first cell
    and reused; every cell's metrics are those of the uncached functions."""
    from lightning_modules.evaluate import EvalContext

    x_a, _, x_b, y_b = digits
    real_x = x_a.clone()
    real_x[0] = 0.5  # a marker no sample has: counts how often the real images are featurised
    seen_marker = []
    spied = copy.deepcopy(trained.model)
    features = spied.features

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen_marker.append(int((x.flatten(1) == 0.5).all(dim=1).sum()))
        return features(x)

    spied.features = spy
    ctx = EvalContext("image", 10, classifier=spied, real_x=real_x)
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cells = [(x_b[:300], y_b[:300]), (x_b[300:600], y_b[300:600]), (noise, y_b[:300])]
    for fake, labels in cells:
        measured = ctx.measure(fake, labels)[0]
        fake_f = classifier_module.batched_apply(trained.model.features, fake)
        real_f = classifier_module.batched_apply(trained.model.features, real_x)
        precision, recall = precision_recall(fake_f, real_f)
        fid = fid_in_classifier_features(fake, real_x, trained.model)
        assert measured["fid"] == pytest.approx(fid, rel=1e-12, abs=1e-12)
        assert (measured["precision"], measured["recall"]) == (precision, recall)
        assert measured["guided_accuracy"] == guided_accuracy(fake, labels, trained.model)
    assert sum(seen_marker) == 1
