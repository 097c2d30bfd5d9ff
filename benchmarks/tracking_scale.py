"""MLflow at sweep scale: 100 and 1,000 evaluation cells recorded the way a trial records them,
on sqlite and on `mlflow server` over PostgreSQL, then `ddpm-sweep report` over that sweep.

The sweep is a synthetic digits sweep built by the product's planner (`build_plan`): each
training evaluates the same 100 sampling cells (25 guidance weights x 4 step counts, one
variance), and a sweep of N cells has N / 100 trainings along `train.p_uncond` (100 cells: one
training; 1,000: ten), which is how a real sweep grows: more trainings, each with the plan's
cells. Nothing is trained or sampled; every MLflow call is the product's. The parent run comes
from `orchestrator.sweep.open_parent_run`; each training, as its trial does, gets a fresh
`MlflowClient`, its training run (`trial._create_run`, role train, with the trial's tags and
three `val/loss_simple` points), the look-up `evaluate_cells` does for earlier cell runs, and
then, per cell, `open_cell_run` (the eval run: tags, params from `tracking.eval_params`) and
`finish_cell_run` (21 metrics at step 0 - fid, guided_accuracy, precision, recall, each with
its interval and noise floor, and sample_seconds -, the cell's `grid.png`, a real 10x10 grid of
8x8 digits written by `save_sample_grid`, and its `bootstrap.json` of 200 replicates of each
metric, then FINISHED).

Figures per backend and N: per-cell tracking ms (open + finish: median, p95, mean; open and
finish apart; each MLflow call's median; the median per tenth of the sweep, to see whether a
cell gets slower as the store fills), the whole tracking time of the sweep over N (training
runs and look-ups included), and the report: `orchestrator.report.write_report` in this
process (what `ddpm-sweep report` runs), with its parts timed again after it (the runs query,
with and without `gc.freeze()`, the learning-curve histories, the rest: plots, files, artifact
uploads) and the garbage collector's full collections during it, then `ddpm-sweep report`
itself in a fresh process (imports included). `growth`: per-cell time at the largest N over the
smallest (1 = linear cost). Every cell run is checked FINISHED with its metrics and `grid.png`
in the store. Beside them: what `run_tags` costs each run created, the import time of the
report command, and on the tracking server what `set_terminated` costs with and without
MLflow's URL printing. `--profile` adds a cProfile of the largest sweep's report.
Goals: <= 50 ms of tracking per cell on sqlite, a 1,000-cell report in <= 10 s.

    .venv/bin/python benchmarks/tracking_scale.py --out /tmp/bench_tracking_scale.json
    .venv/bin/python benchmarks/tracking_scale.py --quick --out /tmp/tracking_scale_quick.json
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import mlflow
import torch
from _common import REPO_ROOT
from mlflow.entities import Metric, Param

from lightning_modules.evaluate import EvalResult
from lightning_modules.evaluation import save_sample_grid
from orchestrator.plan import build_plan, run_name
from orchestrator.report import sweep_runs, write_report
from orchestrator.sweep import open_parent_run
from orchestrator.tracking import eval_params, git_commit, run_tags, train_params, ui_url
from orchestrator.trial import (
    CELL_TAG,
    GRID_ARTIFACT,
    TrialContext,
    _create_run,
    finish_cell_run,
    open_cell_run,
)

sys.path.insert(0, str(REPO_ROOT / "tests"))
from services import (  # noqa: E402
    MlflowServer,
    PostgresCluster,
    ServiceError,
    service_tmpdir,
)

GOAL_CELL_MS = 50.0  # tracking per cell, sqlite
GOAL_REPORT_S = 10.0  # the report of a 1,000-cell sweep
GOAL_REPORT_CELLS = 1000
STEPS = [10, 25, 50, 100]  # sample.steps of every training
VAL_STEPS = (500, 1000, 1500)  # the val/loss_simple points of a training run

SWEEP = """\
name: {name}
base:
  data: {{name: digits, batch_size: 128}}
  network: {{name: unet, preset: digits}}
  diffusion: {{schedule: cosine, timesteps: 1000}}
  train: {{max_steps: 1500, lr: 1.0e-3, warmup_steps: 100, ema_decay: 0.995,
          val_every_n_steps: 500, bpd_subset: 16}}
  sample: {{variance: [fixed_small], per_class: 10}}
  eval: {{num_samples: 500}}
search:
  train.p_uncond: {p_uncond}
  sample.guidance: {guidance}
  sample.steps: {steps}
tune:
  search_alg: grid
  metric: val/loss_simple
"""


def sweep_yaml(name: str, trainings: int, cells_per_training: int) -> str:
    """A digits sweep of `trainings` x `cells_per_training` cells (guidance x 4 step counts)."""
    if cells_per_training % len(STEPS):
        raise SystemExit(f"--cells-per-training must be a multiple of {len(STEPS)}")
    weights = cells_per_training // len(STEPS)
    guidance = [round(6 * i / max(1, weights - 1), 4) for i in range(weights)]
    if weights > 1 and 1.0 not in guidance:  # the report's steps plot takes w = 1
        guidance[1] = 1.0
    p_uncond = [round(0.05 + 0.05 * i, 3) for i in range(trainings)]
    return SWEEP.format(name=name, p_uncond=p_uncond, guidance=sorted(guidance), steps=STEPS)


def digit_grids(folder: Path, count: int = 10) -> list[Path]:
    """`count` PNG grids of 10x10 real 8x8 digits (one row per class), as a cell's grid is."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    by_class = [images[torch.tensor(digits.target) == c] for c in range(10)]
    paths = []
    for k in range(count):
        grid = torch.cat([by_class[c][k * 10 : k * 10 + 10] for c in range(10)]).unsqueeze(1)
        paths.append(save_sample_grid(grid, folder / f"grid_{k}.png", nrow=10))
    return paths


QUALITY = ("fid", "guided_accuracy", "precision", "recall")


def cell_result(rng: random.Random, spec, png: Path, resamples: int = 200) -> EvalResult:
    """A cell as evaluate_group returns it: its four quality metrics, each with its interval
    and the real data's floor (mean, sd), its sampling seconds, its grid and 200 bootstrap
    replicates of each metric."""
    metrics = {
        "fid": 2.0 + 40.0 * rng.random(),
        "guided_accuracy": 0.1 + 0.9 * rng.random(),
        "precision": rng.random(),
        "recall": rng.random(),
    }
    for k, v in list(metrics.items()):
        metrics |= {f"{k}_ci_low": 0.9 * v, f"{k}_ci_high": 1.1 * v}
        metrics |= {f"{k}_floor": 0.5 * v, f"{k}_floor_sd": 0.1 * v}
    replicates = {
        k: torch.tensor([metrics[k] * (0.9 + 0.2 * rng.random()) for _ in range(resamples)])
        for k in QUALITY
    }
    return EvalResult(spec, metrics, 5.0 + 60.0 * rng.random(), png, replicates=replicates)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def by_tenth(values: list[float]) -> list[float]:
    """Median of each tenth of the sweep, in recording order."""
    n = len(values)
    parts = [values[i * n // 10 : (i + 1) * n // 10] for i in range(10)]
    return [statistics.median(p) for p in parts if p]


@contextlib.contextmanager
def working_dir(path: Path):
    """sqlite experiments put artifacts in ./mlruns of the working directory (as the product
    does): keep them in the benchmark's folder, not the caller's."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class CallTimer:
    """An MlflowClient whose calls are timed by method (as the trial's own `TimedClient` times
    them as one phase): where a cell's milliseconds go. `log_batch` is split into params and
    metrics."""

    def __init__(self, client, ms: dict[str, list[float]]):
        self._client, self._ms = client, ms

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                key = name
                if name == "log_batch":
                    key += "(metrics)" if kwargs.get("metrics") else "(params)"
                self._ms.setdefault(key, []).append(1000 * (time.perf_counter() - start))

        return timed


def record_sweep(uri: str, plan, pngs: list[Path], seed: int = 0) -> dict:
    """Open the parent run and record every training and cell as a trial does; the timings."""
    rng = random.Random(seed)
    start = time.perf_counter()
    experiment_id, parent_run_id = open_parent_run(plan, uri)
    parent_s = time.perf_counter() - start
    ctx = TrialContext(plan, uri, experiment_id, parent_run_id)
    open_ms, finish_ms, params_ms, train_ms, lookup_ms = [], [], [], [], []
    calls: dict[str, list[float]] = {}  # the cells' MLflow calls, by method
    sweep_start = time.perf_counter()
    for index, training in enumerate(plan.trainings):
        t0 = time.perf_counter()
        client = mlflow.MlflowClient(uri)  # each trial opens its own client
        label = plan.training_label(training.params, index)
        trial_id = f"bench_{index:05d}"
        train_run = _create_run(
            client, ctx, run_name("train", label), "train", train_params(training.config),
            {"ddpm_sweep.trial_id": trial_id, "ddpm_sweep.trial": f"train_and_evaluate_{trial_id}"},
        )  # fmt: skip
        client.set_tag(train_run, "ddpm_sweep.pid", str(os.getpid()))
        client.set_tag(train_run, "ddpm_sweep.node_id", "bench-node")
        now = int(time.time() * 1000)
        losses = [
            Metric("val/loss_simple", 0.05 / (1 + k), now, s) for k, s in enumerate(VAL_STEPS)
        ]
        client.log_batch(train_run, metrics=losses)
        t1 = time.perf_counter()
        client.search_runs(  # evaluate_cells: the cells an earlier attempt recorded
            [experiment_id],
            f"tags.`ddpm_sweep.train_run_id` = '{train_run}'",
            max_results=10000,
            order_by=["attributes.start_time ASC"],
        )
        t2 = time.perf_counter()
        train_ms.append(1000 * (t1 - t0))
        lookup_ms.append(1000 * (t2 - t1))
        cell_client = CallTimer(client, calls)
        for k, cell in enumerate(plan.cells_for(training.params)):
            a = time.perf_counter()
            params = eval_params(training.config, training.params, cell.params())
            b = time.perf_counter()
            run_id, have = open_cell_run(cell_client, ctx, cell, params, train_run, label)
            c = time.perf_counter()
            result = cell_result(rng, cell.spec, pngs[k % len(pngs)])
            finish_cell_run(cell_client, run_id, have, result.logged_metrics(), result)
            d = time.perf_counter()
            params_ms.append(1000 * (b - a))
            open_ms.append(1000 * (c - b))
            finish_ms.append(1000 * (d - c))
        client.set_terminated(train_run, "FINISHED")
    sweep_s = time.perf_counter() - sweep_start
    n = len(open_ms)
    cell_ms = [o + f for o, f in zip(open_ms, finish_ms)]
    return {
        "cells": n,
        "trainings": len(plan.trainings),
        "cells_per_training": len(plan.cells),
        "parent_run_s": parent_s,
        "cell_ms": {
            "median": statistics.median(cell_ms),
            "p95": percentile(cell_ms, 0.95),
            "mean": statistics.mean(cell_ms),
            "max": max(cell_ms),
        },
        "open_ms": {"median": statistics.median(open_ms), "p95": percentile(open_ms, 0.95)},
        "finish_ms": {"median": statistics.median(finish_ms), "p95": percentile(finish_ms, 0.95)},
        "cell_ms_median_by_tenth": by_tenth(cell_ms),
        # per cell: the median ms of each MLflow call (the rest of open: run_tags, see there)
        "cell_calls_ms_median": {k: statistics.median(v) for k, v in sorted(calls.items())},
        "cell_calls_ms_median_by_tenth": {k: by_tenth(v) for k, v in sorted(calls.items())},
        "eval_params_ms_median": statistics.median(params_ms),  # not tracking: building params
        "training_run_ms_median": statistics.median(train_ms),
        "lookup_ms": lookup_ms,  # per training, in order (the store holds more runs each time)
        "sweep_tracking_s": sweep_s,
        "tracking_ms_per_cell": 1000 * sweep_s / n,  # everything a trial tracks, over N
        "parent_run_id": parent_run_id,
        "experiment_id": experiment_id,
    }


class FullCollections:
    """The garbage collector's full (generation 2) collections while it is open: how many and
    their seconds. A full collection walks every object of the process; with torch, Lightning
    and MLflow imported that is ~0.5 M objects and ~0.4 s on this machine."""

    def __init__(self) -> None:
        self.count, self.seconds, self._start = 0, 0.0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._callback)


def time_report(uri: str, name: str, work: Path, profile: bool, repeats: int = 3) -> dict:
    """`write_report` as `ddpm-sweep report` calls it, in this process; its parts again, timed
    apart (the runs query `repeats` times, and as often under `gc.freeze()`: the median of
    each); then the CLI itself, a fresh process."""
    out_dir = work / "report"
    with FullCollections() as collections:
        start = time.perf_counter()
        path = write_report(name, uri, out_dir, ui_url=ui_url(uri))
        report_s = time.perf_counter() - start
    client = mlflow.MlflowClient(uri)
    query_ms: dict[str, list[float]] = {"gc": [], "gc_frozen": []}
    collected = []  # full collections during each plain query
    for round_ in range(repeats):  # alternating, so that the machine's load hits both alike
        for variant in ("gc", "gc_frozen") if round_ % 2 == 0 else ("gc_frozen", "gc"):
            children = None
            gc.collect()
            if variant == "gc_frozen":
                gc.freeze()  # full collections skip every object that exists now
            try:
                with FullCollections() as collections_now:
                    start = time.perf_counter()
                    parent, children = sweep_runs(client, name)
                    query_ms[variant].append(time.perf_counter() - start)
            finally:
                gc.unfreeze()
            if variant == "gc":
                collected.append({"count": collections_now.count, "s": collections_now.seconds})
    query_s = statistics.median(query_ms["gc"])
    query_frozen_s = statistics.median(query_ms["gc_frozen"])
    trains = [r for r in children if r.data.tags.get("ddpm_sweep.role") == "train"]
    start = time.perf_counter()
    for r in trains:
        client.get_metric_history(r.info.run_id, "val/loss_simple")
    history_s = time.perf_counter() - start
    start = time.perf_counter()
    logged = [f.path for f in client.list_artifacts(parent.info.run_id, "report")]
    list_s = time.perf_counter() - start
    cli_dir = work / "report-cli"
    start = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "report", name, "--tracking-uri", uri,
         "--out", str(cli_dir)],
        cwd=work, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    cli_s = time.perf_counter() - start
    if cli.returncode != 0:
        raise RuntimeError(f"ddpm-sweep report failed:\n{cli.stdout[-2000:]}{cli.stderr[-2000:]}")
    result = {
        "report_s": report_s,
        "report_full_gc": {"count": collections.count, "s": collections.seconds},
        "report_query_s": query_s,  # sweep_runs: the parent, then every child with its data
        "report_query_full_gc": collected,  # per query
        "report_query_gc_frozen_s": query_frozen_s,
        "report_query_s_all": query_ms["gc"],
        "report_query_gc_frozen_s_all": query_ms["gc_frozen"],
        "report_histories_s": history_s,  # get_metric_history per training run
        "report_rest_s": report_s - query_s - history_s,  # plots, HTML, artifact uploads
        "runs_read": len(children),
        "report_files": sorted(p.name for p in out_dir.iterdir()),
        "report_logged": sorted(logged),
        "list_artifacts_s": list_s,
        "report_written": path.is_file() and (out_dir / "report.html").is_file(),
        "cli_report_s": cli_s,  # `ddpm-sweep report` in a fresh process: imports included
        "cli_report_written": (cli_dir / "report.md").is_file(),
    }
    if profile:
        result["report_profile"] = profile_report(uri, name, work / "report-profiled")
    return result


def profile_report(uri: str, name: str, out_dir: Path, top: int = 15) -> list[dict]:
    """cProfile of a second write_report: the functions with the most cumulative time."""
    profiler = cProfile.Profile()
    profiler.runcall(write_report, name, uri, out_dir, ui_url=ui_url(uri))
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, _tt, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls, "cum_s": cum})
    rows.sort(key=lambda r: -r["cum_s"])
    return rows[:top]


def verify(uri: str, experiment_id: str, parent_run_id: str, n: int) -> dict:
    """Every cell run is in the store, FINISHED, with its metrics and its grid."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`ddpm_sweep.role` = 'eval'",
        max_results=10000,
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    with_metrics = [r for r in finished if {"fid", "sample_seconds"} <= set(r.data.metrics)]
    with_grid = [
        r
        for r in with_metrics
        if GRID_ARTIFACT in {f.path for f in client.list_artifacts(r.info.run_id)}
    ]
    keys = {r.data.tags.get(CELL_TAG) + r.data.tags["ddpm_sweep.train_run_id"] for r in runs}
    ok = len(runs) == len(finished) == len(with_grid) == len(keys) == n
    return {
        "eval_runs": len(runs),
        "finished": len(finished),
        "with_metrics": len(with_metrics),
        "with_grid": len(with_grid),
        "ok": ok,
    }


def set_terminated_cost(uri: str, params: dict, repeats: int = 20) -> dict:
    """On a tracking server, `MlflowClient.set_terminated` first fetches the whole run, only to
    print its URL, unless MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT is set: the median ms of
    both, alternating, on runs with a cell run's tags and params (in an experiment of their
    own, outside the sweep)."""
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(f"tracking-scale-side-{time.time_ns()}")
    ms: dict[str, list[float]] = {"default": [], "url_suppressed": []}
    variable = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(variable)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            for i in range(2 * repeats):
                label = ("default", "url_suppressed")[i % 2]
                run_id = client.create_run(experiment_id, tags=run_tags("sweep.yaml")).info.run_id
                client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
                os.environ[variable] = "true" if label == "url_suppressed" else "false"
                start = time.perf_counter()
                client.set_terminated(run_id, "FINISHED")
                ms[label].append(1000 * (time.perf_counter() - start))
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before
    return {k: statistics.median(v) for k, v in ms.items()}


def run_backend(backend: str, uri: str, work: Path, n: int, args, pngs) -> dict:
    trainings = n // args.cells_per_training
    name = f"tracking-scale-{backend}-{n}"
    sweep_file = work / "sweep.yaml"
    sweep_file.write_text(sweep_yaml(name, trainings, args.cells_per_training))
    plan = build_plan(sweep_file)
    assert plan.costs.evaluated_pairs == n, plan.costs
    print(
        f"--- {backend}: {n} cells ({trainings} training(s) x {len(plan.cells)} cells)", flush=True
    )
    # set_terminated on a tracking server prints two lines with the run's URL: not here
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        result = record_sweep(uri, plan, pngs)
    result |= time_report(uri, name, work, args.profile and n == max(args.cells))
    result["verified"] = verify(uri, result["experiment_id"], result["parent_run_id"], n)
    if uri.startswith("http"):
        training, cell = plan.trainings[0], plan.cells[0]
        params = eval_params(training.config, training.params, cell.params())
        result["set_terminated_ms"] = set_terminated_cost(uri, params)
    print(
        f"    cell median {result['cell_ms']['median']:.1f} ms, p95 {result['cell_ms']['p95']:.1f}"
        f" ms, tracking/cell {result['tracking_ms_per_cell']:.1f} ms, report "
        f"{result['report_s']:.2f} s, verified {result['verified']['ok']}",
        flush=True,
    )
    return result


def sqlite_runs(args, root: Path, pngs) -> dict:
    out = {}
    for n in args.cells:
        work = root / f"sqlite-{n}"
        work.mkdir(parents=True)
        with working_dir(work):
            out[str(n)] = run_backend(
                "sqlite", f"sqlite:///{work / 'mlflow.db'}", work, n, args, pngs
            )
    return out


def postgres_runs(args, root: Path, pngs) -> dict:
    """A fresh PostgreSQL cluster and `mlflow server` per N (a sweep on an empty store)."""
    out = {}
    for n in args.cells:
        work = root / f"postgres-{n}"
        work.mkdir(parents=True)
        with service_tmpdir() as tmp:
            start = time.perf_counter()
            pg = PostgresCluster(tmp / "pg")
            try:
                pg.start()  # a failed start is stopped too (as tests/services.py's fixture does)
                with MlflowServer(pg.uri, tmp / "artifacts", tmp / "mlflow") as server:
                    started = time.perf_counter() - start
                    with working_dir(work):
                        out[str(n)] = run_backend("postgres", server.url, work, n, args, pngs)
                    out[str(n)]["services_start_s"] = started
            finally:
                pg.stop()
    return out


def growth(results: dict) -> dict:
    """Per-cell cost at the largest N over the smallest: 1 is linear in N."""
    ns = sorted(int(n) for n in results)
    if len(ns) < 2:
        return {}
    lo, hi = results[str(ns[0])], results[str(ns[-1])]
    tenths = hi["cell_ms_median_by_tenth"]
    return {
        "n": [ns[0], ns[-1]],
        "cell_ms_median_ratio": hi["cell_ms"]["median"] / lo["cell_ms"]["median"],
        "tracking_ms_per_cell_ratio": hi["tracking_ms_per_cell"] / lo["tracking_ms_per_cell"],
        "report_s_per_cell_ratio": (hi["report_s"] / ns[-1]) / (lo["report_s"] / ns[0]),
        "report_query_s_per_cell_ratio": (hi["report_query_s"] / ns[-1])
        / (lo["report_query_s"] / ns[0]),
        "report_query_gc_frozen_s_per_cell_ratio": (hi["report_query_gc_frozen_s"] / ns[-1])
        / (lo["report_query_gc_frozen_s"] / ns[0]),
        "report_full_gc": [lo["report_full_gc"], hi["report_full_gc"]],
        "last_over_first_tenth": tenths[-1] / tenths[0],  # within the largest sweep
        "lookup_ms_last_over_first": hi["lookup_ms"][-1] / hi["lookup_ms"][0],
    }


def run_tags_ms(function=run_tags, repeats: int = 30) -> float:
    """What `trial._create_run` spends on `run_tags` (a `git rev-parse` and package versions),
    paid once per run, eval runs included: the mean ms of `function()`."""
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - start) / repeats


def import_seconds(modules: str) -> float:
    """Seconds a fresh interpreter takes to import `modules` (interpreter start-up excluded)."""
    code = f"import time; s = time.perf_counter(); import {modules}; print(time.perf_counter() - s)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--cells", type=int, nargs="+", help="sweep sizes (default 100 1000)")
    p.add_argument("--backends", nargs="+", choices=("sqlite", "postgres"), help="(both)")
    p.add_argument("--cells-per-training", type=int, help="cells of each training (100)")
    p.add_argument("--quick", action="store_true", help="20 and 60 cells, 20 a training, sqlite")
    p.add_argument("--require-postgres", action="store_true", help="fail if it cannot start")
    p.add_argument("--profile", action="store_true", help="cProfile the largest sweep's report")
    p.add_argument("--keep", help="keep the stores and reports in this folder (default: removed)")
    args = p.parse_args(argv)
    _common.setup(args)
    args.cells = args.cells or ([20, 60] if args.quick else [100, 1000])
    args.backends = args.backends or (["sqlite"] if args.quick else ["sqlite", "postgres"])
    args.cells_per_training = args.cells_per_training or (20 if args.quick else 100)
    for n in args.cells:
        if n % args.cells_per_training:
            raise SystemExit(f"--cells {n} is not a multiple of {args.cells_per_training}")
    if args.keep:
        root = Path(args.keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-tracking-scale-"))
    try:
        pngs = digit_grids(root / "grids")
        results: dict = {}
        if "sqlite" in args.backends:
            results["sqlite"] = sqlite_runs(args, root, pngs)
        if "postgres" in args.backends:
            try:
                results["postgres"] = postgres_runs(args, root, pngs)
            except ServiceError as exc:
                if args.require_postgres:
                    raise
                reason = str(exc).splitlines()[0]
                print(f"PostgreSQL or mlflow server cannot start: {reason}", flush=True)
                results["postgres"] = {"skipped": reason, "detail": str(exc)[-2000:]}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    measured = {b: r for b, r in results.items() if "skipped" not in r}
    goals = {}
    if "sqlite" in measured:
        worst = max(r["tracking_ms_per_cell"] for r in measured["sqlite"].values())
        goals["sqlite_tracking_ms_per_cell"] = {"worst": worst, "goal": GOAL_CELL_MS,
                                                "met": worst <= GOAL_CELL_MS}  # fmt: skip
    for backend, rs in measured.items():
        if str(GOAL_REPORT_CELLS) in rs:  # write_report in-process, and the command
            for key in ("report_s", "cli_report_s"):
                s = rs[str(GOAL_REPORT_CELLS)][key]
                goals[f"{backend}_{key}_1000"] = {"s": s, "goal": GOAL_REPORT_S,
                                                  "met": s <= GOAL_REPORT_S}  # fmt: skip
    result = {
        "benchmark": "tracking_scale",
        **_common.environment("cpu"),
        "mlflow": mlflow.__version__,
        "load_average_1min": os.getloadavg()[0],
        "settings": {
            "cells": args.cells,
            "backends": args.backends,
            "cells_per_training": args.cells_per_training,
            "quick": args.quick,
        },
        "run_tags_ms": run_tags_ms(),  # per run created, in _create_run
        "git_commit_ms": run_tags_ms(git_commit),  # of which the `git rev-parse HEAD`
        # what `ddpm-sweep report` imports: the report module, and with it orchestrator.tracking
        # (which imports lightning_modules.data, so pytorch_lightning and torch)
        "import_s": {
            "orchestrator.report": import_seconds("orchestrator.report"),
            "orchestrator.report + orchestrator.tracking": import_seconds(
                "orchestrator.report, orchestrator.tracking"
            ),
        },
        "backends": results,
        "growth": {b: growth(r) for b, r in measured.items()},
        "goals": goals,
    }
    rows = [
        [b, int(n), r["trainings"], r["cell_ms"]["median"], r["cell_ms"]["p95"],
         r["open_ms"]["median"], r["finish_ms"]["median"], r["tracking_ms_per_cell"],
         r["report_s"], r["report_query_s"], r["cli_report_s"], r["verified"]["ok"]]
        for b, rs in measured.items() for n, r in rs.items()
    ]  # fmt: skip
    _common.print_table(
        ["backend", "cells", "trainings", "cell ms med", "p95", "open", "finish",
         "total ms/cell", "report s", "query s", "CLI report s", "verified"],
        rows,
    )  # fmt: skip
    for b, g in result["growth"].items():
        if g:
            print(
                f"{b}: per-cell ratio {g['n'][1]} vs {g['n'][0]} cells: tracking "
                f"{g['tracking_ms_per_cell_ratio']:.2f}, report {g['report_s_per_cell_ratio']:.2f}"
                f" (1 = linear), its runs query {g['report_query_s_per_cell_ratio']:.2f} "
                f"({g['report_query_gc_frozen_s_per_cell_ratio']:.2f} with gc.freeze); "
                f"last/first tenth of the largest sweep {g['last_over_first_tenth']:.2f}"
            )
    for key, g in goals.items():
        print(f"goal {key}: {'met' if g['met'] else 'MISSED'} ({g})")
    print(f"run_tags per run: {result['run_tags_ms']:.1f} ms")
    _common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
