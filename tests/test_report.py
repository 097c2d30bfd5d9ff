"""`ddpm-sweep report`: report.md and the self-contained report.html, from a hand-built MLflow
store (a sweep parent, 2 training runs, 6 evaluated pairs), checked locally and as artifacts of
the parent run."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest

from orchestrator.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = "demo & <co>"  # the experiment (sweep) name: shown in titles, must be escaped
ODD_NAME = 'eval <b>bold</b> & "q"'  # one eval run's name
PLOTS = {"quality_vs_guidance", "accuracy_vs_guidance", "quality_vs_steps", "learning_curves"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep as `ddpm-sweep run` records it: tags as `orchestrator.report.sweep_runs` and
    `write_report` select them (ddpm_sweep.role, mlflow.parentRunId, ddpm_sweep.train_run_id)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(SWEEP, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(
        exp,
        run_name="sweep-parent",
        tags={
            "ddpm_sweep.role": "sweep",
            "ddpm_sweep.guidance_convention": "eps = (1+w) eps(x,c) - w eps(x)",
        },
    ).info.run_id
    child = {"mlflow.parentRunId": parent}
    trains = {}
    for i, schedule in enumerate(("linear", "cosine")):
        run = client.create_run(
            exp, run_name=f"train-{schedule}", tags={**child, "ddpm_sweep.role": "train"}
        ).info.run_id
        client.log_param(run, "diffusion.schedule", schedule)
        for step in range(4):
            client.log_metric(run, "val/loss_simple", 0.5 / (step + 1) + 0.01 * i, step=step * 100)
        client.set_terminated(run)
        trains[schedule] = run
    evals = {}
    cells = [(0.0, 100), (1.0, 100), (1.0, 20)]  # w=1 at two step counts: quality_vs_steps
    for i, (schedule, (guidance, steps)) in enumerate(
        (s, c) for s in ("linear", "cosine") for c in cells
    ):
        name = ODD_NAME if i == 4 else f"eval-{schedule}-w{guidance}-s{steps}"
        run = client.create_run(
            exp,
            run_name=name,
            tags={**child, "ddpm_sweep.role": "eval", "ddpm_sweep.train_run_id": trains[schedule]},
        ).info.run_id
        for key, value in (
            ("diffusion.schedule", schedule),
            ("sample.variance", "fixed_small"),
            ("sample.guidance", guidance),
            ("sample.steps", steps),
        ):
            client.log_param(run, key, value)
        for key, value in (
            ("fid", 30.0 - 2 * i),
            ("guided_accuracy", 0.5 + 0.05 * i),
            ("precision", 0.6),
            ("recall", 0.4),
        ):
            client.log_metric(run, key, value)
        client.set_terminated(run)
        evals[run] = name
    return {
        "uri": uri,
        "client": client,
        "exp": exp,
        "parent": parent,
        "trains": trains,
        "evals": evals,
    }


class _Page(HTMLParser):
    """The links (with the table they sit in), images and tags of a page."""

    def __init__(self):
        super().__init__()
        self.table = None
        self.links: list[tuple[str | None, dict]] = []
        self.images: list[dict] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.table = attrs.get("id")
        elif tag == "a":
            self.links.append((self.table, attrs))
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md = write_report(SWEEP, store["uri"], out)
    # Read back now: a later test's report overwrites the parent's artifacts.
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=store["parent"],
        artifact_path="report/report.html",
        dst_path=str(out / "downloaded"),
        tracking_uri=store["uri"],
    )
    return out, md, logged, Path(downloaded).read_text(encoding="utf-8")


def test_write_report_returns_markdown_and_writes_html(report):
    out, md, logged, downloaded = report
    assert md == out / "report.md"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # Both logged to the parent run, next to the plots.
    assert {"report/report.md", "report/report.html"} <= logged
    assert {f"report/{p}.png" for p in PLOTS} <= logged
    assert downloaded == html


def test_html_inlines_every_plot_as_png(report):
    out = report[0]
    page = parse((out / "report.html").read_text(encoding="utf-8"))
    assert {img["alt"] for img in page.images} == PLOTS
    assert len(page.images) == len(PLOTS)
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["src"][:40]
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data.startswith(PNG_MAGIC)
        assert data == (out / f"{img['alt']}.png").read_bytes()


def test_html_links_runs_to_the_mlflow_ui(report, store):
    out = report[0]
    page = parse((out / "report.html").read_text(encoding="utf-8"))
    exp = store["exp"]
    best = [a for table, a in page.links if table == "best"]
    for run_id in store["evals"]:
        want = f"/#/experiments/{exp}/runs/{run_id}"
        hits = [a for a in best if a["href"] == want]
        assert len(hits) == 1, (run_id, best)
        assert hits[0]["target"] == "_top"
    trains = [a for table, a in page.links if table == "trains"]
    assert {a["href"] for a in trains} == {
        f"/#/experiments/{exp}/runs/{r}" for r in store["trains"].values()
    }
    # Every link leaves the artifact frame for the UI's top window.
    assert all(a.get("target") == "_top" for _, a in page.links)
    assert any(a["href"].endswith(f"/runs/{store['parent']}") for _, a in page.links)


def test_html_is_static_and_escaped(report):
    out = report[0]
    html = (out / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    assert not page.tags & {"script", "iframe", "object", "embed", "link", "base"}
    assert not re.search(r"<script|javascript:|\son[a-z]+\s*=", html, re.IGNORECASE)
    assert "<b>" not in html and "<co>" not in html
    assert "eval &lt;b&gt;bold&lt;/b&gt; &amp; &quot;q&quot;" in html
    assert "<title>Sweep report: demo &amp; &lt;co&gt;</title>" in html


def test_html_summary_names_the_best_configuration(report, store):
    out = report[0]
    html = (out / "report.html").read_text(encoding="utf-8")
    summary = re.search(r'<p class="summary">(.*?)</p>', html, re.DOTALL).group(1)
    assert store["parent"] in summary
    assert "2 training run(s), 6 evaluated" in summary
    assert "eps = (1+w) eps(x,c) - w eps(x)" in summary
    # Lowest FID: the last eval run (cosine, w=1, 20 steps), fid = 30 - 2*5.
    assert "diffusion.schedule=cosine" in summary and "sample.steps=20" in summary
    assert "fid = 20 (lower is better)" in summary


def test_markdown_keeps_tables_and_relative_images(report, store):
    out, md = report[:2]
    text = md.read_text()
    assert text.startswith(f"# Sweep report: {SWEEP}\n")
    assert "## Best 6 by fid (lower is better)" in text
    images = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", text)
    assert {stem for stem, _ in images} == PLOTS
    for _, target in images:
        assert "/" not in target and (md.parent / target).is_file()
    for run_id in [*store["evals"], *store["trains"].values(), store["parent"]]:
        assert f"`{run_id}`" in text
    assert "train-linear" in text and "train-cosine" in text
    best = text.split("## Best", 1)[1].split("## Plots", 1)[0]
    rows = [line for line in best.splitlines() if line.startswith("| eval")]
    assert len(rows) == 6
    assert rows[0].startswith("| eval-cosine-w1.0-s20 |")  # fid 20, the lowest
    assert rows[1].startswith('| eval <b>bold</b> & "q" |')  # fid 22


def test_ui_url_makes_links_absolute(store, tmp_path):
    write_report(SWEEP, store["uri"], tmp_path, top=2, ui_url="http://mlflow.example:5000/")
    page = parse((tmp_path / "report.html").read_text(encoding="utf-8"))
    best = [a for table, a in page.links if table == "best"]
    assert len(best) == 2 + 2  # 2 eval runs and their training runs
    assert all(a["href"].startswith("http://mlflow.example:5000/#/experiments/") for a in best)
