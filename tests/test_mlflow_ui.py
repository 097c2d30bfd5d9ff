"""What a user sees of a sweep in the MLflow UI, in a real browser (headless Chromium).

A small sweep records into `mlflow server` (sqlite); the test then loads, as a user would, the
evaluation runs sorted by quality, a compare page of the two best, and the parent run's HTML
report in MLflow's artifact viewer, and checks what must be visible there: the unique run
names, the sample grids paired on the compare page, the report's plots loaded. Screenshots go
to the test's tmp dir (and to $DDPM_SWEEP_SCREENSHOTS when set, to look at them).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest
from browser import Browser, missing
from cli_helpers import run_cli
from services import MlflowServer

SWEEPS = Path(__file__).parents[1] / "sweeps"


@pytest.fixture(scope="module")
def sweep_in_mlflow(tmp_path_factory):
    problem = missing()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must check the MLflow UI in a browser: {problem}")
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("ui")
    with MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root) as server:
        out = run_cli(
            "run",
            str(SWEEPS / "mixture_quick.yaml"),
            "base.train.max_steps=60",
            "base.train.val_every_n_steps=30",
            "base.eval.num_samples=80",
            "--name",
            "ui",
            "--tracking-uri",
            server.url,
            cwd=root,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        yield server, root


def shots(tmp_path: Path):
    keep = os.environ.get("DDPM_SWEEP_SCREENSHOTS")

    def save(browser: Browser, name: str) -> Path:
        path = browser.screenshot(tmp_path / f"{name}.png")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    return save


@pytest.mark.slow
def test_a_sweep_reads_at_a_glance_in_the_mlflow_ui(sweep_in_mlflow, tmp_path):
    import mlflow

    server, _ = sweep_in_mlflow
    client = mlflow.MlflowClient(server.url)
    exp = client.get_experiment_by_name("ui")
    evals = client.search_runs(
        [exp.experiment_id],
        "tags.`ddpm_sweep.role` = 'eval'",
        order_by=["metrics.sliced_wasserstein ASC"],
    )
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ddpm_sweep.role` = 'sweep'")
    names = [r.info.run_name for r in evals]
    assert len(names) == len(set(names)) == 12
    save = shots(tmp_path)
    ui = f"{server.url}/#/experiments/{exp.experiment_id}"
    with Browser() as browser:
        # The evaluations, flat, best first: every run tells itself apart by name.
        query = urllib.parse.urlencode(
            {
                "workflowType": "machine_learning",
                "searchFilter": "tags.`ddpm_sweep.role` = 'eval'",
                "orderByKey": "metrics.`sliced_wasserstein`",
                "orderByAsc": "true",
            }
        )
        browser.get(f"{ui}/runs?{query}")
        text = browser.wait_for_text("12 matching runs", *names)
        assert text.index(names[0]) < text.index(names[-1])  # sorted by quality
        save(browser, "runs")

        # The two best side by side: their grids share one artifact name.
        ids = [r.info.run_id for r in evals[:2]]
        browser.get(
            f"{server.url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
            f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}"
        )
        text = browser.wait_for_text("Comparing 2 Runs", "grid.png")
        assert "No common artifacts" not in text
        save(browser, "compare")

        # The parent's report, rendered inside MLflow's artifact viewer, plots loaded.
        browser.get(f"{ui}/runs/{parent.info.run_id}/artifacts/report/report.html")
        browser.wait_for(
            lambda b: b.run("return document.querySelectorAll('iframe.mlflow-html-iframe').length"),
            what="the report's frame",
        )
        browser.enter_frame("iframe.mlflow-html-iframe")
        loaded = browser.wait_for(
            lambda b: (
                n
                if (
                    n := b.run(
                        "const i = Array.from(document.images);"
                        "return i.length && i.every(x => x.complete && x.naturalWidth > 0)"
                        " ? i.length : 0;"
                    )
                )
                else None
            ),
            what="the report's plots",
        )
        assert loaded >= 3  # quality and accuracy vs guidance, learning curves
        report = browser.text()
        assert "Sweep report: ui" in report and names[0] in report
        browser.leave_frames()
        save(browser, "report")
