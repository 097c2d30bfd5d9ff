"""Uncertainty on the metrics: bootstrap replicates equal the metric of the resample they stand
for, the intervals cover, paired comparisons are tighter, and the real data's noise floor."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import StandInMixture, balanced_labels
from omegaconf import OmegaConf

from lightning_modules.evaluate import EvalContext, eval_labels, evaluate_group, noise_floor
from lightning_modules.evaluation import (
    RealReference,
    energy_distance,
    evaluate_images,
    evaluate_points,
    image_metrics,
    point_metrics,
    sliced_wasserstein,
)
from lightning_modules.evaluation.bootstrap import (
    Resamples,
    interval,
    paired_difference,
    resample_counts,
    weighted_mean,
    with_intervals,
)
from lightning_modules.evaluation.classifier import batched_apply
from lightning_modules.evaluation.points_metrics import (
    BOOTSTRAP_PROJECTIONS,
    _true_reference,
    energy_distance_replicates,
    sliced_wasserstein_replicates,
)


def _index_draws(counts: torch.Tensor) -> list[torch.Tensor]:
    """Each resample's counts as the indices it draws (each item as often as counted)."""
    return [torch.arange(len(c)).repeat_interleave(c.long()) for c in counts]


def test_resamples_draw_n_within_each_class_and_repeat_for_the_same_seed():
    labels = balanced_labels(4, 5)
    counts = resample_counts(20, 50, seed=3, strata=labels)
    assert counts.shape == (50, 20) and (counts.sum(dim=1) == 20).all()
    per_class = counts.reshape(50, 4, 5).sum(dim=2)
    assert (per_class == 5).all()  # every resample keeps the class balance
    assert torch.equal(counts, resample_counts(20, 50, seed=3, strata=labels))
    assert not torch.equal(counts, resample_counts(20, 50, seed=4, strata=labels))
    assert counts.std() > 0.5  # draws repeat some items and leave others out
    plain = resample_counts(20, 50, seed=3)
    assert (plain.sum(dim=1) == 20).all() and plain.reshape(50, 4, 5).sum(dim=2).std() > 0


def test_image_replicates_are_the_metrics_of_the_resampled_sets(digits, trained):
    """Each replicate of FID, precision and guided accuracy is the metric of the samples its
    counts draw; each replicate of recall that of the real points its real counts draw."""
    x_a, _, x_b, y_b = digits
    fake, labels, real = x_b[:120], y_b[:120], x_a[:150]
    reference = RealReference.from_images(real, trained.model)
    resamples = Resamples.draw(len(fake), 3, seed=0, labels=labels)
    metrics, reps = image_metrics(
        fake, labels, real, trained.model, reference=reference, resamples=resamples
    )
    assert metrics == evaluate_images(fake, labels, real, trained.model)
    assert set(reps) == {"fid", "precision", "recall", "guided_accuracy"}
    fake_f = batched_apply(trained.model.features, fake)
    _, real_in = reference.manifold_indicators(fake_f)
    real_draws = _index_draws(resamples.real(len(real)))
    for b, idx in enumerate(_index_draws(resamples.samples)):
        assert reps["fid"][b] == pytest.approx(reference.fid(fake_f[idx]), rel=1e-8)
        again = evaluate_images(fake[idx], labels[idx], real, trained.model)
        assert reps["precision"][b] == pytest.approx(again["precision"], abs=1e-12)
        assert reps["guided_accuracy"][b] == pytest.approx(again["guided_accuracy"], abs=1e-12)
        assert reps["recall"][b] == pytest.approx(real_in[real_draws[b]].double().mean().item())


def test_point_replicates_are_the_metrics_of_the_resampled_sets():
    truth = StandInMixture()
    labels = balanced_labels(8, 25)
    samples, _ = truth.sample(len(labels), labels, torch.Generator().manual_seed(0))
    samples[:10] += 1.0  # some samples off their modes: coverage and accuracy below 1
    counts = resample_counts(len(labels), 4, seed=1, strata=labels)
    metrics, reps = point_metrics(samples, labels, truth, counts=counts)
    assert metrics == evaluate_points(samples, labels, truth)
    reference = _true_reference(truth, labels, len(labels), 4, 0)  # as point_metrics draws it
    for b, idx in enumerate(_index_draws(counts)):
        again = evaluate_points(samples[idx], labels[idx], truth)
        for key in ("modes_hit", "mode_coverage", "label_accuracy"):
            assert reps[key][b] == pytest.approx(again[key], abs=1e-12), key
        sw = sliced_wasserstein(samples[idx], reference, BOOTSTRAP_PROJECTIONS)
        assert reps["sliced_wasserstein"][b] == pytest.approx(sw, rel=1e-9)
        assert reps["energy_distance"][b] == pytest.approx(again["energy_distance"], abs=1e-12)
    # With every count 1, the replicates are the metrics themselves.
    ones = torch.ones(1, len(labels), dtype=torch.float64)
    _, same = point_metrics(samples, labels, truth, counts=ones)
    sw = sliced_wasserstein(samples, reference, BOOTSTRAP_PROJECTIONS)
    assert same["sliced_wasserstein"].item() == pytest.approx(sw)
    assert same["energy_distance"].item() == pytest.approx(metrics["energy_distance"])


def test_sliced_wasserstein_intervals_from_32_directions_match_those_from_256():
    """The replicates use 32 of the metric's 256 directions: on 2-D points the interval is as
    wide (within 15 %), at an eighth of the cost."""
    truth = StandInMixture()
    labels = balanced_labels(8, 50)
    reference = _true_reference(truth, labels, len(labels), 4, 0)
    counts = resample_counts(len(labels), 300, seed=0, strata=labels)
    for shift in (0.0, 0.05, 0.2):
        x, _ = truth.sample(len(labels), labels, torch.Generator().manual_seed(1))
        x = x + shift
        estimate = sliced_wasserstein(x, reference)
        widths = []
        for directions in (256, BOOTSTRAP_PROJECTIONS):
            reps = sliced_wasserstein_replicates(x, reference, counts, directions)
            low, high = interval(estimate, reps)
            assert low < estimate < high
            widths.append(high - low)
        assert widths[1] == pytest.approx(widths[0], rel=0.15), shift


def test_distances_replicates_match_direct_metrics_on_uneven_sets():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 2, generator=gen), torch.randn(91, 2, generator=gen) + 0.3
    counts = resample_counts(37, 5, seed=2)
    sw = sliced_wasserstein_replicates(x, y, counts, chunk=2)
    ed = energy_distance_replicates(x, y, counts, chunk_size=8)
    for b, idx in enumerate(_index_draws(counts)):
        assert sw[b] == pytest.approx(sliced_wasserstein(x[idx], y), rel=1e-9)
        assert ed[b] == pytest.approx(energy_distance(x[idx], y), abs=1e-12)


def test_intervals_cover_the_true_value_about_as_often_as_they_claim():
    """The mean of 60 draws of N(0, 1), 300 times: its 90 % interval holds 0 in 80-97 % of
    them (a wrong width or centre falls outside: half the width covers ~58 %)."""
    gen = torch.Generator().manual_seed(0)
    counts = resample_counts(60, 400, seed=0)
    hits = 0
    for _ in range(300):
        x = torch.randn(60, generator=gen, dtype=torch.float64)
        low, high = interval(x.mean().item(), weighted_mean(x, counts), confidence=0.9)
        hits += low <= 0 <= high
    assert 0.80 <= hits / 300 <= 0.97


def test_fid_interval_holds_its_estimate_despite_the_bootstraps_bias(digits, trained):
    """A resample repeats about a third of its samples, which inflates FID: unshifted, most
    replicates lie above the estimate (not half); the interval is shifted back around it."""
    x_a, _, x_b, y_b = digits
    metrics, reps = image_metrics(
        x_b[:100], y_b[:100], x_a, trained.model, resamples=Resamples.draw(100, 200, 0, y_b[:100])
    )
    assert (reps["fid"] > metrics["fid"]).double().mean() > 0.75  # the bias the shift removes
    low, high = interval(metrics["fid"], reps["fid"])
    assert low < metrics["fid"] < high
    out = with_intervals(metrics, reps)
    assert (out["fid_ci_low"], out["fid_ci_high"]) == (low, high)
    assert "fid_inception_ci_low" not in out


def test_a_paired_comparison_tells_apart_what_independent_intervals_cannot():
    """Two cells from the same starting points, the second shifted by a little: their own
    intervals overlap, yet the paired difference excludes 0; shuffled out of pairing, it
    does not."""
    truth = StandInMixture()
    labels = balanced_labels(8, 25)
    a, _ = truth.sample(len(labels), labels, torch.Generator().manual_seed(0))
    b = a + torch.tensor([0.02, 0.0])
    counts = resample_counts(len(labels), 300, seed=0, strata=labels)
    ma, ra = point_metrics(a, labels, truth, counts=counts)
    mb, rb = point_metrics(b, labels, truth, counts=counts)
    key = "sliced_wasserstein"
    a_low, a_high = interval(ma[key], ra[key])
    b_low, b_high = interval(mb[key], rb[key])
    assert a_low < b_high and b_low < a_high  # the intervals overlap
    diff, low, high = paired_difference(mb[key], ma[key], rb[key], ra[key])
    assert diff > 0 and low > 0  # ... but b is worse, beyond noise
    other = resample_counts(len(labels), 300, seed=9, strata=labels)
    _, rb_unpaired = point_metrics(b, labels, truth, counts=other)
    _, low, high = paired_difference(mb[key], ma[key], rb_unpaired[key], ra[key])
    assert low < 0 < high


def test_noise_floor_scores_real_data_of_the_cells_size(digits, trained):
    x_a, y_a, x_b, y_b = digits
    labels = eval_labels(10, 100, 10)
    ctx = EvalContext("image", 10, classifier=trained.model, real_x=x_b, real_train=(x_a, y_a))
    floor = noise_floor(ctx, labels, len(labels), draws=4)
    assert {"fid_floor", "fid_floor_sd", "guided_accuracy_floor", "recall_floor_sd"} <= set(floor)
    assert floor["fid_floor"] > 0 and floor["fid_floor_sd"] > 0  # real data's own bias, noise
    assert floor["guided_accuracy_floor"] > 0.9
    bigger = noise_floor(ctx, eval_labels(10, 400, 10), 400, draws=4)
    assert bigger["fid_floor"] < floor["fid_floor"]  # FID's bias falls with n
    # A cell of other real images, class for class, scores about the floor; noise far above.
    other = torch.cat([x_a[y_a == c][-10:] for c in range(10)])
    real_cell = ctx.measure(other, labels)[0]["fid"]
    noise = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert real_cell < floor["fid_floor"] + 4 * floor["fid_floor_sd"]
    assert ctx.measure(noise, labels)[0]["fid"] > floor["fid_floor"] + 10 * floor["fid_floor_sd"]


def test_noise_floor_of_points_draws_from_the_truth():
    truth = StandInMixture()
    ctx = EvalContext("points", 8, truth=truth)
    labels = balanced_labels(8, 50)
    floor = noise_floor(ctx, labels, len(labels), draws=3)
    assert floor["mode_coverage_floor"] > 0.95 and floor["label_accuracy_floor"] == 1.0
    assert 0 < floor["sliced_wasserstein_floor"] < 0.1
    assert not any(k.startswith("mode_coverage_class_") for k in floor)


def test_an_evaluated_cell_carries_its_intervals_floor_and_replicates(tmp_path):
    """Through evaluate_group, as a trial calls it: every quality metric with its interval
    around it, the floor, and the replicates bootstrap.json carries."""
    from lightning_modules.config import ExperimentConfig
    from lightning_modules.diffusion import SamplingSpec
    from lightning_modules.train import build_experiment

    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.data.name, cfg.network = "gaussian_mixture", {"name": "mlp"}
    cfg.diffusion.timesteps = 20
    cfg.eval.num_samples, cfg.eval.bootstrap, cfg.eval.floor_draws = 80, 50, 3
    datamodule, module = build_experiment(cfg)  # untrained: the numbers need not be good
    specs = [SamplingSpec(guidance=w, variance="fixed_small", steps=10) for w in (0.0, 1.0)]
    results = evaluate_group(module, datamodule, specs, cfg.eval, tmp_path)
    for r in results:
        m = r.metrics
        for key in ("sliced_wasserstein", "mode_coverage", "label_accuracy"):
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
            assert m[f"{key}_floor_sd"] >= 0
        saved = r.replicates_json()
        assert saved["resamples"] == 50 and saved["seed"] == specs[0].seed
        assert len(saved["metrics"]["sliced_wasserstein"]) == 50
    off = OmegaConf.merge(cfg.eval, {"bootstrap": 0, "floor_draws": 0})
    plain = evaluate_group(module, datamodule, specs[:1], off, tmp_path)[0]
    assert not any(k.endswith(("_ci_low", "_floor")) for k in plain.metrics)
    assert plain.metrics["sliced_wasserstein"] == results[0].metrics["sliced_wasserstein"]
