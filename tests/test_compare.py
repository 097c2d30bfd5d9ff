"""Comparisons with the best, read back from MLflow: configurations within noise, replicates
grouped, and what the report, the summary and the registered model say of them."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.compare import (
    REPLICATES_ARTIFACT,
    artifact_loader,
    compare,
    config_key,
    contrasts,
)
from orchestrator.report import write_report

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SWEEP = "compare-demo"
B = 400


def _cell(rng, center: float, noise: np.ndarray, own: float = 0.0) -> tuple[float, np.ndarray]:
    """A cell's FID and its replicates: ``noise`` is the part every cell of one seed shares
    (the same starting points, resampled with the same counts), ``own`` the cell's own."""
    reps = center + noise + own * rng.standard_normal(B)
    return float(center), reps


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep's eval runs as trials log them (metrics, intervals, floor, bootstrap.json):
    w=1 best; w=2 0.05 worse (within the shared noise, but paired: within noise too, the gap
    is smaller than its own noise); w=4 far worse; w=0 worse by 0.3 with a tight pairing (its
    own interval overlaps the best's, the paired one does not); and at w=3 three seeds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(SWEEP, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="parent", tags={"ddpm_sweep.role": "sweep"})
    parent = parent.info.run_id
    train = client.create_run(
        exp, run_name="train", tags={"mlflow.parentRunId": parent, "ddpm_sweep.role": "train"}
    ).info.run_id
    client.log_param(train, "diffusion.schedule", "cosine")
    client.set_terminated(train)
    rng = np.random.default_rng(0)
    shared = {seed: rng.standard_normal(B) * 0.4 for seed in range(3)}  # one per train seed
    cells = [  # (guidance, train seed, center, own noise)
        (1.0, 0, 2.0, 0.05),
        (2.0, 0, 2.05, 0.05),
        (4.0, 0, 9.0, 0.05),
        (0.0, 0, 2.3, 0.02),
        (3.0, 0, 3.6, 0.05),
        (3.0, 1, 3.7, 0.05),
        (3.0, 2, 3.5, 0.05),
    ]
    runs = {}
    for w, seed, center, own in cells:
        name = f"eval w={w:g} seed={seed}"
        run = client.create_run(
            exp,
            run_name=name,
            tags={
                "mlflow.parentRunId": parent,
                "ddpm_sweep.role": "eval",
                "ddpm_sweep.train_run_id": train,
            },
        ).info.run_id
        params = {
            "diffusion.schedule": "cosine",
            "train.seed": seed,
            "sample.guidance": w,
            "sample.variance": "fixed_small",
            "sample.steps": 25,
            "eval.num_samples": 200,
            "eval.confidence": 0.95,
        }
        for k, v in params.items():
            client.log_param(run, k, v)
        fid, reps = _cell(rng, center, shared[seed], own)
        shift = reps.mean() - fid
        low, high = np.quantile(reps, [0.025, 0.975]) - shift
        metrics = {
            "fid": fid,
            "fid_ci_low": low,
            "fid_ci_high": high,
            "fid_floor": 1.9,
            "fid_floor_sd": 1.4,
            "guided_accuracy": 0.9,
        }
        for k, v in metrics.items():
            client.log_metric(run, k, float(v))
        client.log_dict(run, {"resamples": B, "seed": 0, "metrics": {"fid": reps.tolist()}},
                        REPLICATES_ARTIFACT)  # fmt: skip
        client.set_terminated(run)
        runs[name] = run
    return {"uri": uri, "client": client, "exp": exp, "parent": parent, "runs": runs}


def _evals(store):
    client = store["client"]
    return client.search_runs([store["exp"]], "tags.`ddpm_sweep.role` = 'eval'", max_results=1000)


def test_replicates_group_by_everything_but_the_seeds(store):
    evals = _evals(store)
    keys = {config_key(r.data.params) for r in evals}
    assert len(keys) == 5  # seven runs, five configurations (w=3 has three seeds)
    comparison = compare(evals, "fid", True, lambda run: None)
    w3 = next(c for c in comparison.configurations if c.n == 3)
    assert w3.mean == pytest.approx(3.6) and w3.sd == pytest.approx(0.1)
    assert [r.data.params["train.seed"] for r in w3.runs] == ["2", "0", "1"]  # best first


def test_paired_comparison_marks_what_is_within_noise_of_the_best(store):
    evals = _evals(store)
    client = store["client"]
    read = []
    load = artifact_loader(client)

    def counting(run):
        read.append(run.data.params["sample.guidance"])
        return load(run)

    comparison = compare(evals, "fid", True, counting)
    by_w = {c.best_run.data.params["sample.guidance"]: c for c in comparison.configurations}
    assert comparison.best is by_w["1.0"] and by_w["1.0"].verdict == "best"
    assert by_w["2.0"].verdict == "within noise"
    assert by_w["2.0"].diff_low < 0 < by_w["2.0"].diff_high
    # w=0: its own interval overlaps the best's; the paired difference excludes 0.
    w0 = by_w["0.0"]
    assert w0.ci_low < by_w["1.0"].ci_high
    assert w0.verdict == "worse" and w0.diff_low > 0
    # w=4 is told apart by its logged interval alone: its replicates are never read.
    assert by_w["4.0"].verdict == "worse" and "4.0" not in read
    # w=3, three seeds, each with its own noise: the mean of three is steadier than one.
    w3 = by_w["3.0"]
    assert w3.n == 3 and w3.verdict == "worse"
    assert w3.ci_low < w3.mean < w3.ci_high
    assert w3.ci_high - w3.ci_low < by_w["2.0"].ci_high - by_w["2.0"].ci_low
    # Its replicates are held seed by seed (to pair with another config's seeds), not in its
    # runs' best-first order (seed 2, 0, 1).
    assert [r.data.params["train.seed"] for r in w3.runs] == ["2", "0", "1"]
    assert [seed for seed, _ in w3.seeds] == ["0", "1", "2"]
    assert w3.replicates.mean(axis=1) == pytest.approx([3.6, 3.7, 3.5], abs=0.1)
    assert comparison.ties == [by_w["2.0"]]
    text = comparison.sentence()
    assert text.startswith("1 configuration is within noise of the best by fid")
    assert "eval w=2 seed=0" in text


def test_without_replicates_the_verdicts_are_left_open(store):
    comparison = compare(_evals(store), "fid", True, lambda run: None)
    assert {c.verdict for c in comparison.configurations} == {""}
    assert "not known" in comparison.sentence()
    single = [c for c in comparison.configurations if c.n == 1]
    assert all(math.isfinite(c.ci_low) for c in single)  # the logged intervals still show


def test_report_shows_intervals_ties_replicates_and_the_floor(store, tmp_path):
    md = write_report(SWEEP, store["uri"], tmp_path).read_text()
    assert "1 configuration is within noise of the best by fid" in md
    assert "Real data of the cells' size (n = 200) scores fid 1.9 ± 1.4" in md
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    for column in ("fid [95 % CI]", "| n |", "| sd |", "Δ vs best [CI]", "vs best"):
        assert column in header
    assert "train.seed" not in header  # a replicate, not an axis
    rows = [line for line in md.splitlines() if line.startswith("| eval w=")]
    assert len(rows) == 5  # one per configuration
    assert "| within noise |" in rows[1] and "| best |" in rows[0]
    w3 = next(r for r in rows if r.startswith("| eval w=3"))
    assert "| 3 | 0.1 |" in w3
    html = (tmp_path / "report.html").read_text()
    assert html.count('<tr class="within-noise">') == 1 and 'class="best"' in html


def _plan_output(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(SWEEPS / "mixture_quick.yaml"), *args]) == 0
    return out.getvalue()


def _resolution(text: str) -> float:
    return float(re.search(r"differ by chance up to ~([0-9.e-]+)", text).group(1))


def test_plan_says_what_the_sample_size_resolves_and_warns_below_min_effect():
    """Real data of the cells' size scored as a cell is: its spread, the difference two cells
    must show, and a warning with the n that would do when eval.min_effect is below it."""
    out = _plan_output()
    (line,) = [x for x in out.splitlines() if x.startswith("noise:")]
    assert "real data of eval.num_samples = 400 scores sliced_wasserstein" in line
    assert "warning" not in out
    more = _plan_output("base.eval.num_samples=1600")
    assert _resolution(more) < 0.7 * _resolution(out)  # the spread falls as n grows
    warned = _plan_output("base.eval.min_effect=0.0005")
    (warning,) = [x for x in warned.splitlines() if x.startswith("warning:")]
    assert "eval.num_samples = 400 is too small for eval.min_effect = 0.0005" in warning
    needed = int(
        re.search(r"about eval.num_samples = ([0-9,]+)", warning).group(1).replace(",", "")
    )
    assert needed == pytest.approx(400 * (_resolution(out) / 0.0005) ** 2, rel=0.1)
    assert "warning" not in _plan_output(f"base.eval.min_effect={2 * _resolution(out)}")
    assert "noise:" not in _plan_output("base.eval.floor_draws=0")


def _run(params: dict, fid: float, i: int) -> SimpleNamespace:
    return SimpleNamespace(
        data=SimpleNamespace(params={k: str(v) for k, v in params.items()}, metrics={"fid": fid}),
        info=SimpleNamespace(run_id=f"r{i}", run_name=f"run {i}", start_time=i),
    )


@pytest.mark.parametrize("seed_key", ["train.seed", "sample.seed"])
def test_replicates_pair_seed_for_seed_across_configurations(seed_key):
    """Two configurations over the same three seeds (of training, or of sampling), the second
    0.3 worse at every seed, with seeds that differ by far more than that: paired seed for seed,
    the difference stands out; seeds that do not match (another seed list) are compared
    unpaired and it does not."""
    rng = np.random.default_rng(0)
    seed_effect = {0: -1.0, 1: 0.0, 2: 1.2}  # a seed's model is better or worse for both
    noise = {s: rng.standard_normal(B) * 0.05 for s in seed_effect}
    runs, replicates = [], {}
    for i, (w, seed) in enumerate((w, s) for w in (1, 2) for s in seed_effect):
        fid = 3.0 + seed_effect[seed] + 0.3 * (w == 2)
        run = _run({"sample.guidance": w, seed_key: seed}, fid, i)
        runs.append(run)
        replicates[run.info.run_id] = {"metrics": {"fid": (fid + noise[seed]).tolist()}}
    comparison = compare(runs, "fid", True, lambda r: replicates[r.info.run_id])
    best, other = comparison.configurations
    assert best.n == other.n == 3 and other.diff == pytest.approx(0.3)
    assert other.verdict == "worse" and other.diff_low > 0.2
    # The same runs under other seeds for the second configuration: nothing to pair with.
    for run, seed in zip(runs[3:], (5, 6, 7)):
        run.data.params[seed_key] = str(seed)
    comparison = compare(runs, "fid", True, lambda r: replicates[r.info.run_id])
    assert comparison.configurations[1].verdict == "within noise"


def test_contrast_pairs_each_configuration_with_its_twin_at_the_baseline(store, tmp_path):
    evals = _evals(store)
    load = artifact_loader(store["client"])
    comparison = compare(evals, "fid", True, load)
    rows = {r.value: r for r in contrasts(comparison, "sample.guidance", "1.0", load)}
    assert set(rows) == {"0.0", "2.0", "3.0", "4.0"}  # every other weight, against w=1
    assert rows["2.0"].verdict == "within noise" and rows["2.0"].diff == pytest.approx(0.05)
    assert rows["0.0"].verdict == "differs" and rows["0.0"].low > 0
    assert rows["4.0"].verdict == "differs" and rows["3.0"].config.n == 3
    with pytest.raises(ValueError, match="do not vary in 'sample.steps'"):
        contrasts(comparison, "sample.steps", None, load)
    with pytest.raises(ValueError, match="sample.guidance takes 0.0, 1.0, 2.0, 3.0, 4.0"):
        contrasts(comparison, "sample.guidance", "7", load)
    md = write_report(SWEEP, store["uri"], tmp_path, contrast=["sample.guidance=1.0"]).read_text()
    section = md.split("## Contrast: sample.guidance against sample.guidance = 1.0, by fid")[1]
    lines = [x for x in section.split("## Plots")[0].splitlines() if x.startswith("| ")]
    assert lines[0] == (
        "| sample.guidance | fid | at baseline | Δ [95 % CI] | verdict |"
    )  # nothing else varies: no setting columns
    assert len(lines) == 1 + 4 and sum("| within noise |" in x for x in lines) == 1


def test_the_reports_interval_is_the_cells_interval():
    """compare.py keeps a NumPy copy of bootstrap.interval (so that `ddpm-sweep report` does
    not import torch): the two agree."""
    import torch

    from lightning_modules.evaluation.bootstrap import interval as cell_interval
    from orchestrator.compare import interval as report_interval

    rng = np.random.default_rng(0)
    for estimate, confidence in ((1.3, 0.95), (0.2, 0.9), (5.0, 0.99)):
        reps = estimate + rng.gamma(2.0, 0.3, size=200)  # skewed, biased upwards like FID's
        reps[3] = np.nan  # a failed replicate is left out by both
        expected = cell_interval(estimate, torch.from_numpy(reps), confidence)
        assert report_interval(estimate, reps, confidence) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(x) for x in report_interval(math.nan, reps, 0.95))
