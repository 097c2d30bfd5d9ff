"""`ddpm-sweep run`: validation before Ray starts, the train-once/sample-many plan, and an
end-to-end sweep on a real local Ray whose MLflow content is checked run by run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import run_cli

from lightning_modules.config import ConfigError
from orchestrator.phases import PHASES
from orchestrator.plan import build_plan
from orchestrator.sweep_config import is_sampling_time

SWEEPS = Path(__file__).parents[1] / "sweeps"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_shipped_sweeps_plan():
    for path in SWEEPS.glob("*.yaml"):
        if "base:" not in path.read_text():  # the *_single.yaml files are run configs
            continue
        # cifar10_gpu.yaml names a dataset path on a cluster: its files are checked there.
        plan = build_plan(path, local_data="cifar10" not in path.read_text())
        assert plan.costs.trainings >= 1 and plan.costs.cells >= 1, path


def test_plan_trains_once_per_training_configuration():
    plan = build_plan(SWEEPS / "quickstart.yaml")
    sweep = plan.sweep
    assert [a.key for a in sweep.training_axes] == ["diffusion.schedule"]
    assert {a.key for a in sweep.sampling_axes} == {"sample.variance", "sample.guidance"}
    assert [t.params for t in plan.trainings] == [
        {"diffusion.schedule": s} for s in ("linear", "cosine", "sigmoid")
    ]
    # Each training's config is resolved: its own schedule, the plan's sampling values.
    assert [t.config.diffusion.schedule for t in plan.trainings] == ["linear", "cosine", "sigmoid"]
    assert list(plan.trainings[0].config.sample.guidance) == [0.0, 1.0, 2.0, 4.0]
    keys = [c.key for c in plan.cells]
    assert len(keys) == len(set(keys)) == len({c.label for c in plan.cells}) == 8
    assert "w2_fixed_large_25steps" in keys
    assert "fixed_large · w=2 · 25 steps" in [c.label for c in plan.cells]
    assert plan.training_label({"diffusion.schedule": "sigmoid"}, 2) == "sigmoid"
    c = plan.costs
    assert (c.trainings, c.cells, c.evaluated_pairs, c.naive_trainings) == (3, 8, 24, 24)
    assert c.training_steps == 3 * sweep.base.train.max_steps
    # 300 samples (30 per class) x 25 steps per cell; w = 0 and 1 take one forward, others two.
    assert c.sampling_forwards == 3 * 300 * 25 * (2 * 1 + 2 * 1 + 2 * 2 + 2 * 2)
    assert is_sampling_time("sample.eta") and not is_sampling_time("diffusion.variance")
    assert "trainings: 3" in plan.table() and "w4_fixed_small_25steps" in plan.table()


def test_random_search_draws_the_same_points_for_the_same_tune_seed():
    """tune.seed seeds Tune's generator (left to Tune, random search is unseeded), which also
    holds the sweep's concurrency limit."""
    from ray.tune.registry import register_trainable

    from orchestrator.sweep import _searcher, tune_space

    register_trainable("seeded", lambda config: None)

    def draws(seed):
        sweep = build_plan(SWEEPS / "asha_search.yaml", [f"tune.seed={seed}"]).sweep
        generator = _searcher(sweep)
        space = {"run": "seeded", "config": tune_space(sweep.training_axes), "num_samples": 5}
        generator.add_configurations({"x": space})
        trials = iter(generator.next_trial, None)
        return [tuple(sorted(t.config.items())) for t in trials]

    first = draws(0)
    assert len(first) == 2  # max_concurrent_trials: the generator limits itself
    assert draws(0) == first and draws(1) != first


def test_scalar_sampling_axes_multiply_the_cells_and_name_them():
    text = (
        (SWEEPS / "mixture_quick.yaml")
        .read_text()
        .replace("sample.steps: [20]", "sample.steps: [20]\n  sample.sampler: [ancestral, ddim]")
    )
    plan = build_plan(write(Path(__import__("tempfile").mkdtemp()), text))
    assert plan.costs.cells == 12
    assert {c.spec.sampler for c in plan.cells} == {"ancestral", "ddim"}
    assert "w3_fixed_large_20steps sampler=ddim" in [c.key for c in plan.cells]
    assert "fixed_large · w=3 · 20 steps · sampler=ddim" in [c.label for c in plan.cells]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "search:\n  diffusion.schedul: [linear]\n",
            r":3:3: search.diffusion.schedul: unknown config key; "
            r"did you mean 'diffusion.schedule'\?",
        ),
        (
            "search:\n  diffusion.schedule: [linear, quadratic]\n",
            r":3:32: search.diffusion.schedule\[1\] = 'quadratic' is invalid: expected one of",
        ),
        ("search:\n  sample.guidance: []\n", r"search.sample.guidance.grid: expected a non-empty"),
        (
            "search:\n  train.lr: {loguniform: [0, 1]}\ntune: {search_alg: random}\n",
            r"search.train.lr.loguniform = \[0, 1\]: expected low < high and low > 0",
        ),
        ("search:\n  train.lr: {normal: [0, 1]}\n", "unknown distribution 'normal'"),
        ("search:\n  train.lr: {uniform: [0.001, 0.01]}\n", "tune.search_alg = 'grid' takes lists"),
        ("tune: {scheduler: asha, metric: val/fid}\n", r"tune.metric = 'val/fid' is invalid"),
        (
            "base: {data: {name: gaussian_mixture}, train: {bpd_subset: 0}}\n"
            "tune: {metric: val/bpd}\n",
            r"tune.metric = 'val/bpd'",
        ),
        ("tune: {max_concurrent_trials: 0}\n", "tune.max_concurrent_trials = 0"),
        (
            "tune: {resources_per_trial: {node_a: 0}}\n",
            r"tune.resources_per_trial.node_a = 0.0 is invalid: expected a number > 0",
        ),
        (
            "tune: {resources_per_trial: {GPU: 1}}\n",
            r"tune.resources_per_trial.GPU = 1.0 is invalid: expected a custom resource name",
        ),
        ("serach: {}\n", r"serach: unknown top-level key; did you mean 'search'"),
        (
            "base: {diffusion: {timesteps: 50}}\nsearch:\n  sample.steps: [10, 100]\n",
            r"search.sample.steps\[1\] = 100 is invalid: expected an integer in "
            r"\[1, diffusion.timesteps=50\]",
        ),
        (
            "search:\n  train.lr: {choice: [0.001, -1.0]}\ntune: {search_alg: random}\n",
            r":3:30: search.train.lr.choice\[1\] = -1.0 is invalid: expected a number > 0 "
            r"\(in the training with train.lr=-1\)",
        ),
    ],
)
def test_validation_errors_name_file_key_and_expectation(tmp_path, text, message):
    if not text.startswith("base:"):
        text = "base: {data: {name: gaussian_mixture}}\n" + text
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        build_plan(path)
    assert str(err.value).startswith(str(path))


def test_bad_sweep_exits_before_ray_and_records_nothing(tmp_path):
    path = write(tmp_path, "search:\n  diffusion.schedule: [linear, quadratic]\n")
    out = run_cli("run", str(path), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"ddpm-sweep: error: {path}:2:32: search.diffusion.schedule[1] = 'quadratic' is "
        "invalid: expected one of ['cosine', 'linear', 'sigmoid'] "
        "(in the training with diffusion.schedule=quadratic)"
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ddpm_sweep_runs").exists()


@pytest.mark.slow
def test_sweep_end_to_end_records_one_parent_and_every_pair(tmp_path):
    import mlflow

    out = run_cli(
        "run",
        str(SWEEPS / "mixture_quick.yaml"),
        "base.train.max_steps=150",
        "base.train.val_every_n_steps=75",
        "base.eval.num_samples=160",
        "--name",
        "e2e",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The plan, printed before anything runs (what `ddpm-sweep plan` prints).
    assert "trainings: 2" in out.stdout and "sampling cells per training: 6" in out.stdout
    assert "evaluated pairs: 12" in out.stdout
    # One progress line, a short summary; Tune's tables and the workers' chatter stay in the
    # log files (--verbose brings them back: the nan test below).
    assert "trainings 2/2 · cells 12/12 · best sliced_wasserstein" in out.stdout
    assert "Trial status" not in out.stdout
    assert "litlogger" not in out.stdout + out.stderr
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], max_results=100)
    roles = Counter(r.data.tags["ddpm_sweep.role"] for r in runs)
    assert roles == {"sweep": 1, "train": 2, "eval": 12}
    assert all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "sweep"]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert "w=0 unconditional" in parent.data.tags["ddpm_sweep.guidance_convention"]
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"resolved_config.yaml", "sweep.json", "summary.json", "report", "best"} <= parent_files
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "best")] == ["best/last.ckpt"]
    summary = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))
        ).read_text()
    )
    for trial in summary["trials"]:  # where each trial's time went, as the trial measured it
        phases = {k: v for k, v in trial["metrics"].items() if k.startswith("time/")}
        assert set(phases) == {f"time/{p}_s" for p in PHASES}
        assert phases["time/fit_s"] > 0 and phases["time/evaluate_s"] > 0
        assert phases["time/mlflow_s"] > 0 and phases["time/checkpoint_s"] > 0
    (version,) = client.search_model_versions("name = 'e2e'")
    assert version.tags["ddpm_sweep.parent_run_id"] == parent.info.run_id
    # The best model is a real MLflow model: it loads and samples labels at guidance weights.
    import pandas as pd

    from orchestrator.model import use_tracking_uri

    with use_tracking_uri(client.tracking_uri):
        sampler = mlflow.pyfunc.load_model(f"models:/e2e/{version.version}")
    points = sampler.predict(pd.DataFrame({"label": [0, 3], "guidance": [0.0, 3.0]}))
    assert points.shape == (2, 2)
    assert "best: eval " in out.stdout and "CPU-hours" in out.stdout
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/report.md",
        "report/quality_vs_guidance.png",
        "report/accuracy_vs_guidance.png",
        "report/learning_curves.png",
    } <= report_files
    report = (tmp_path / "reports" / "e2e" / "report.md").read_text()
    assert "| run | diffusion.schedule | sample.variance | sample.guidance |" in report
    best_rows = [line for line in report.splitlines() if line.startswith("| eval ")]
    assert len(best_rows) >= 10  # the top 10 (and any within noise), with its schedule
    # Every number with its uncertainty: the interval, the paired verdict, the real floor.
    assert "sliced_wasserstein [95 % CI]" in report and "| best |" in best_rows[0]
    assert "Real data of the cells' size (n = 160)" in report
    within = report.count("| within noise |")
    sentence = (
        f"{within} configuration{'s' if within > 1 else ''} {'is' if within == 1 else 'are'} "
        "within noise of the best"
        if within
        else "No other configuration is within noise of the best"
    )
    assert sentence in report and sentence in out.stdout
    assert version.tags["ddpm_sweep.within_noise"] == str(within)
    assert sentence in version.description
    assert all(" | linear | " in row or " | cosine | " in row for row in best_rows), best_rows

    trains = {
        r.data.params["diffusion.schedule"]: r
        for r in runs
        if r.data.tags["ddpm_sweep.role"] == "train"
    }
    assert set(trains) == {"linear", "cosine"}
    # What a user compares in the MLflow UI: names from what varies, unique in the experiment;
    # each run's own params; MLflow's own source tags; a parent that describes the sweep.
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), names
    assert {r.info.run_name for r in trains.values()} == {"train linear", "train cosine"}
    assert "eval cosine · fixed_large · w=3 · 20 steps" in names
    for r in trains.values():
        assert not any(k.startswith(("sample.", "eval.")) for k in r.data.params), r.data.params
        assert "data.n_modes" in r.data.params and "data.image_size" not in r.data.params
    evals = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "eval"]
    for r in evals:
        assert not any(k.startswith(("train.", "network.", "data.")) for k in r.data.params)
        assert "diffusion.variance" not in r.data.params  # the training's, not the cell's
        assert set(r.data.metrics) >= {"sample_seconds"}
        assert {
            m.step for k in r.data.metrics for m in client.get_metric_history(r.info.run_id, k)
        } == {0}
        assert {"grid.png", "bootstrap.json"} <= {
            a.path for a in client.list_artifacts(r.info.run_id)
        }
        m = r.data.metrics
        assert m["sliced_wasserstein_ci_low"] <= m["sliced_wasserstein"]
        assert m["sliced_wasserstein"] <= m["sliced_wasserstein_ci_high"]
        assert m["sliced_wasserstein_floor"] > 0 and m["sliced_wasserstein_floor_sd"] > 0
    for r in runs:
        assert len(r.data.tags["mlflow.source.git.commit"]) in (40, len("unknown"))
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.name"]
    assert parent.data.params["sweep.axis.diffusion.schedule"] == "[linear, cosine]"
    assert parent.data.params["sweep.plan.evaluated_pairs"] == "12"
    parent = client.get_run(parent.info.run_id)  # as finished: the best result on it
    assert "best/sliced_wasserstein" in parent.data.metrics
    assert "best/sliced_wasserstein_ci_high" in parent.data.metrics
    assert "best/within_noise" in parent.data.metrics
    assert "**Best:** eval " in parent.data.tags["mlflow.note.content"]
    resolved = Path(
        client.download_artifacts(parent.info.run_id, "resolved_config.yaml", str(tmp_path))
    ).read_text()
    assert "schedule: <axis [linear, cosine]>" in resolved
    for r in trains.values():
        history = client.get_metric_history(r.info.run_id, "val/loss_simple")
        assert [m.step for m in history] == sorted({m.step for m in history})  # no step twice
        assert len(history) == 2
        assert any(a.path == "checkpoints" for a in client.list_artifacts(r.info.run_id))

    evals = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "eval"]
    cells = {
        (
            r.data.params["diffusion.schedule"],
            r.data.params["sample.variance"],
            float(r.data.params["sample.guidance"]),
            r.data.params["sample.steps"],
        )
        for r in evals
    }
    assert cells == {
        (s, v, w, "20")
        for s in ("linear", "cosine")
        for v in ("fixed_small", "fixed_large")
        for w in (0.0, 1.0, 3.0)
    }
    for r in evals:
        assert (
            r.data.tags["ddpm_sweep.train_run_id"]
            == trains[r.data.params["diffusion.schedule"]].info.run_id
        )
        assert {"sliced_wasserstein", "label_accuracy", "mode_coverage"} <= set(r.data.metrics)
    # Guidance works through the whole pipeline: conditional beats unconditional on accuracy.
    acc = {
        float(r.data.params["sample.guidance"]): r.data.metrics["label_accuracy"]
        for r in evals
        if r.data.params["diffusion.schedule"] == "linear"
        and r.data.params["sample.variance"] == "fixed_small"
    }
    assert acc[1.0] > acc[0.0] + 0.3


@pytest.mark.slow
def test_nan_trial_fails_alone_and_the_sweep_goes_on(tmp_path):
    import mlflow

    text = (SWEEPS / "mixture_quick.yaml").read_text()
    text = text.replace("diffusion.schedule: [linear, cosine]", "train.lr: [0.003, 1.0e+30]")
    path = write(tmp_path, text)
    out = run_cli(
        "run",
        str(path),
        "base.train.max_steps=100",
        "base.train.val_every_n_steps=50",
        "base.eval.num_samples=80",
        "base.train.grad_clip=0",
        "base.train.warmup_steps=0",
        "tune.max_failures=0",
        "--name",
        "nan",
        "--verbose",
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # one trial errored
    assert "1 trial(s) errored" in out.stdout
    assert "Trial status" in out.stdout  # --verbose: Tune's tables too
    assert "trainings 2/2 (1 failed)" in out.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    trains = {
        r.data.params["train.lr"]: r for r in runs if r.data.tags["ddpm_sweep.role"] == "train"
    }
    assert trains["1e+30"].info.status == "FAILED"
    assert trains["0.003"].info.status == "FINISHED"
    evals = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "eval"]
    assert len(evals) == 6 and all(r.data.params["train.lr"] == "0.003" for r in evals)
    report = (tmp_path / "reports" / "nan" / "report.md").read_text()
    best_rows = [line for line in report.splitlines() if line.startswith("| eval ")]
    assert best_rows and not any("1e+30" in row for row in best_rows)  # not among the best
    assert "| train lr=1e+30 | 1e+30 | FAILED |" in report  # listed with the trainings


@pytest.mark.slow
def test_asha_on_sample_quality_stops_bad_trials_and_skips_their_evaluations(tmp_path):
    """ASHA on a sample-quality metric measured during training (eval.periodic): the trials
    report it at every validation, the worst is stopped on it, and its evaluations never run."""
    import mlflow

    text = (SWEEPS / "mixture_quick.yaml").read_text()
    text = text.replace(
        "diffusion.schedule: [linear, cosine]", "train.lr: [3.0e-3, 2.0e-3, 1.0e-7]"
    )
    text = text.replace("max_concurrent_trials: 2", "max_concurrent_trials: 1\n  scheduler: asha")
    path = write(tmp_path, text)
    out = run_cli(
        "run",
        str(path),
        "base.train.max_steps=200",
        "base.train.val_every_n_steps=50",
        "base.eval.num_samples=80",
        "base.eval.periodic.every_n_steps=50",
        "base.eval.periodic.num_samples=80",
        "tune.metric=eval/sliced_wasserstein",
        "tune.mode=min",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "--name",
        "asha",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    trains = {
        r.data.params["train.lr"]: r for r in runs if r.data.tags["ddpm_sweep.role"] == "train"
    }
    stopped = trains["1e-07"]  # far worse than the two before it at the first rung
    assert stopped.info.status == "KILLED"
    assert len(client.get_metric_history(stopped.info.run_id, "val/loss_simple")) < 4
    evals = [r for r in runs if r.data.tags["ddpm_sweep.role"] == "eval"]
    assert {r.data.params["train.lr"] for r in evals} <= {"0.003", "0.002"}
    assert evals and not any(
        r.data.tags["ddpm_sweep.train_run_id"] == stopped.info.run_id for r in evals
    )
    for lr, run in trains.items():  # quality against the step, at every validation
        quality = client.get_metric_history(run.info.run_id, "eval/sliced_wasserstein")
        losses = client.get_metric_history(run.info.run_id, "val/loss_simple")
        assert [m.step for m in quality] == [m.step for m in losses] and quality, lr
    assert stopped.data.metrics["time/periodic_eval_s"] > 0  # its cost, though it never ended
    finished = trains["0.003"]
    assert len(client.get_metric_history(finished.info.run_id, "eval/sliced_wasserstein")) == 4
    assert 0 < finished.data.metrics["time/periodic_eval_fraction"] < 1
    assert finished.data.metrics["time/periodic_eval_s"] > 0
