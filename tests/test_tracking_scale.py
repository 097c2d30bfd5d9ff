"""benchmarks/tracking_scale.py --quick: it records every cell the way a trial does, times it,
and writes the sweep's report; checked here in the stores it leaves behind (`--keep`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from orchestrator.trial import GRID_ARTIFACT, REPLICATES_ARTIFACT

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # about a minute: two small sweeps, two `ddpm-sweep report` runs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking_scale")
    out, keep = tmp / "figures.json", tmp / "stores"
    done = subprocess.run(
        [sys.executable, "benchmarks/tracking_scale.py", "--quick", "--out", str(out),
         "--keep", str(keep)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), keep, done.stdout


def test_figures_per_backend_and_size(quick):
    result, _, stdout = quick
    assert result["settings"]["cells"] == [20, 60]
    sizes = result["backends"]["sqlite"]
    assert set(sizes) == {"20", "60"}
    for n, r in sizes.items():
        assert r["cells"] == int(n) and r["trainings"] == int(n) // 20
        for key in ("median", "p95", "mean"):
            assert 0 < r["cell_ms"][key] < 10_000
        assert r["open_ms"]["median"] > 0 and r["finish_ms"]["median"] > 0
        assert r["tracking_ms_per_cell"] > 0 and r["report_s"] > 0 and r["cli_report_s"] > 0
        assert {"create_run", "log_artifacts", "set_terminated"} <= set(r["cell_calls_ms_median"])
        assert len(r["cell_ms_median_by_tenth"]) == 10
        assert r["verified"] == {
            "eval_runs": int(n), "finished": int(n), "with_metrics": int(n),
            "with_grid": int(n), "ok": True,
        }  # fmt: skip
    growth = result["growth"]["sqlite"]
    assert growth["n"] == [20, 60] and growth["tracking_ms_per_cell_ratio"] > 0
    assert result["goals"]["sqlite_tracking_ms_per_cell"]["goal"] == 50.0
    assert "backend" in stdout and "verified" in stdout  # the table


@pytest.mark.parametrize("n", [20, 60])
def test_every_cell_run_finished_with_its_grid_and_the_report_written(quick, n):
    _, keep, _ = quick
    work = keep / f"sqlite-{n}"
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"tracking-scale-sqlite-{n}")
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    roles = [r.data.tags.get("ddpm_sweep.role") for r in runs]
    assert roles.count("sweep") == 1 and roles.count("train") == n // 20
    evals = [r for r in runs if r.data.tags.get("ddpm_sweep.role") == "eval"]
    assert len(evals) == n
    assert len({(r.data.tags["ddpm_sweep.train_run_id"], r.data.tags["ddpm_sweep.cell"])
                for r in evals}) == n  # fmt: skip
    for r in evals:
        assert r.info.status == "FINISHED"
        quality = {"fid", "guided_accuracy", "precision", "recall"}
        derived = {f"{m}_{d}" for m in quality for d in ("ci_low", "ci_high", "floor", "floor_sd")}
        assert set(r.data.metrics) == quality | derived | {"sample_seconds"}
        assert "sample.guidance" in r.data.params and "eval.num_samples" in r.data.params
        files = {f.path for f in client.list_artifacts(r.info.run_id)}
        assert {GRID_ARTIFACT, REPLICATES_ARTIFACT} <= files
    (parent,) = [r for r in runs if r.data.tags.get("ddpm_sweep.role") == "sweep"]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged
    for folder in ("report", "report-cli"):  # write_report in-process, and the command
        text = (work / folder / "report.md").read_text()
        assert f"{n} evaluated" in text
        assert (work / folder / "report.html").is_file()
