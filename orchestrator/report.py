"""`ddpm-sweep report SWEEP`: read a sweep back from MLflow and write a report a researcher reads.

- a Markdown summary with the best configurations (by the sample-quality metric), each with its
  interval, its difference from the best and whether that is within noise (a paired bootstrap,
  orchestrator/compare.py; replicates of one configuration, seeds, grouped: mean, sd, n), and
  the real data's own score at the cells' sample size (the metric's noise floor),
- `quality_vs_guidance.png` and `accuracy_vs_guidance.png`: one line per schedule × variance,
  with the intervals as error bars and the noise floor as a grey band,
- `quality_vs_accuracy.png`: the guidance trade-off, quality against guided accuracy along the
  guidance weights, one line per training and sampling setting,
- `quality_vs_steps.png`: the quality metric against sampling steps, one line per variance,
- `learning_curves.png`: val/loss_simple of every training run,
- `report.html`: the same, self-contained (inline CSS, the plots as `data:` URIs, no JavaScript)
  for MLflow's artifact viewer, with every run linked to its page in the MLflow UI,
all also logged to the sweep's parent run under `report/`.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .compare import (
    REPLICATE_KEYS,
    Comparison,
    Configuration,
    Contrast,
    artifact_loader,
    compare,
    config_key,
    contrasts,
)

# (metric, lower is better) in order of preference: images have FID, 2-D data the distances.
QUALITY_METRICS = (("fid", True), ("sliced_wasserstein", True))
ACCURACY_METRICS = ("guided_accuracy", "label_accuracy")


def sweep_runs(client, name: str, parent_run_id: str | None = None):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {name!r} (the sweep name)")
    parents = client.search_runs(
        [exp.experiment_id],
        "tags.`ddpm_sweep.role` = 'sweep'",
        order_by=["attributes.start_time DESC"],
    )
    if parent_run_id:
        parents = [p for p in parents if p.info.run_id == parent_run_id]
    if not parents:
        raise ValueError(f"experiment {name!r} has no sweep parent run")
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10000
    )
    return parent, children


def quality_metric(evals) -> tuple[str | None, bool]:
    """The sample-quality metric these runs carry and whether lower is better."""
    return next(((m, lo) for m, lo in QUALITY_METRICS if m in evals[0].data.metrics), (None, True))


def compare_evals(client, evals, metric: str | None, lower: bool) -> Comparison:
    """The sweep's configurations compared with its best (orchestrator/compare.py), at the
    confidence the runs were evaluated with (`eval.confidence`)."""
    confidence = float(evals[0].data.params.get("eval.confidence", 0.95)) if evals else 0.95
    return compare(evals, metric or "", lower, artifact_loader(client), confidence)


def comparison_of(comparison: Comparison, evals, metric: str, lower: bool) -> list:
    """The configurations by ``metric``: those of ``comparison`` when it is by that metric,
    else grouped again (means and logged intervals; no replicates read)."""
    if comparison.metric == metric:
        return comparison.configurations
    return compare(evals, metric, lower, lambda run: None, comparison.confidence).configurations


def _band(floor) -> tuple[float, float] | None:
    return floor[:2] if floor else None


def _axes_that_vary(runs, prefix_exclude=("sample.",)) -> list[str]:
    keys = set().union(*(r.data.params for r in runs)) if runs else set()
    vary = [
        k
        for k in sorted(keys)
        if len({r.data.params.get(k) for r in runs}) > 1 and not k.startswith(prefix_exclude)
    ]
    return vary


def noise_floor(evals, metric: str | None) -> tuple[float, float, int] | None:
    """(mean, sd, n) of what real data of the cells' size scores (`<metric>_floor`, logged by
    every eval run); None if the runs carry none. Cells of different sizes: the largest n's."""
    if metric is None:
        return None
    by_n: dict[int, tuple[float, float]] = {}
    for r in evals:
        m = r.data.metrics
        if f"{metric}_floor" in m:
            n = int(r.data.params.get("eval.num_samples", 0))
            by_n[n] = (m[f"{metric}_floor"], m.get(f"{metric}_floor_sd", math.nan))
    if not by_n:
        return None
    n = max(by_n)
    return (*by_n[n], n)


def _plot(
    path: Path, title: str, xlabel: str, ylabel: str, lines: dict, logx=False, band=None
) -> Path:
    """One line per label through its points: (x, y) or (x, y, low, high), the interval drawn
    as an error bar; ``band``: (mean, sd) of the real data's score, drawn as mean ± sd."""
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for label, points in sorted(lines.items()):
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if all(len(p) == 4 and math.isfinite(p[2]) for p in points):
            err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    if band and math.isfinite(band[0]):
        mean, sd = band
        ax.axhspan(mean - sd, mean + sd, color="0.85", zorder=0)
        ax.axhline(mean, color="0.5", lw=1, ls="--", label="real data (mean ± sd)")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_href(experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    """The MLflow UI's address of a run: `<ui_url>/#/experiments/<id>/runs/<id>`.

    Without `ui_url` the address is root-relative (`/#/experiments/...`), right when the UI is
    served at the root of its host (`mlflow server`, the compose service) and the page showing
    it was loaded from that host."""
    root = ui_url.rstrip("/") if ui_url else ""
    return (
        f"{root}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(run_id, safe='')}"
    )


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "" if value is None else f"{value:.4g}"


def value_text(c: Configuration) -> str:
    """`1.37 [1.10, 1.72]`: the value (a configuration's mean) and its interval."""
    if math.isnan(c.ci_low):
        return f"{c.mean:.4g}"
    return f"{c.mean:.4g} [{c.ci_low:.3g}, {c.ci_high:.3g}]"


def _diff_text(c: Configuration) -> str:
    """`+0.031 [-0.12, +0.19]`: the difference from the best and its paired interval."""
    if c.verdict == "best" or math.isnan(c.diff):
        return ""
    if math.isnan(c.diff_low):
        return f"{c.diff:+.3g}"
    return f"{c.diff:+.3g} [{c.diff_low:+.3g}, {c.diff_high:+.3g}]"


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_report(
    name: str,
    tracking_uri: str,
    out_dir: str | Path,
    top: int = 10,
    *,
    ui_url: str | None = None,
    contrast: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write `report.md`, `report.html` and the plots to `out_dir`, log them to the sweep's
    parent run under `report/`, and return the path of `report.md`.

    `report.html` is self-contained (inline CSS, plots as `data:` URIs, no JavaScript) so that
    MLflow's artifact viewer can show it. Its run links open the MLflow UI with
    `target="_top"`; `ui_url` is the UI's root address (e.g. `http://127.0.0.1:5000`); without
    it the links are root-relative (`/#/experiments/...`), which works only where the UI is
    served at `/` of the host the page was loaded from. ``contrast``: keys (`KEY` or
    `KEY=BASELINE`) whose values are compared pairwise at every other setting
    (:func:`orchestrator.compare.contrasts`), a table each."""
    client = mlflow.MlflowClient(tracking_uri)
    parent, children = sweep_runs(client, name)
    evals = [r for r in children if r.data.tags.get("ddpm_sweep.role") == "eval"]
    trains = [r for r in children if r.data.tags.get("ddpm_sweep.role") == "train"]
    if not evals:
        raise ValueError(f"sweep {name!r} has no evaluated runs yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quality, lower = quality_metric(evals)
    accuracy = next((m for m in ACCURACY_METRICS if m in evals[0].data.metrics), None)
    comparison = compare_evals(client, evals, quality, lower)
    load = artifact_loader(client)
    tables = {}
    for spec in contrast:
        key, _, baseline = spec.partition("=")
        tables[key] = contrasts(comparison, key, baseline or None, load)
    train_axes = [k for k in _axes_that_vary(evals) if k not in REPLICATE_KEYS]
    group = [k for k in train_axes if k != "diffusion.schedule"]
    # Sampling axes besides the plots' x axes (sampler, guidance rescale, ...): a line each.
    plotted = {"sample.guidance", "sample.steps", "sample.variance", *REPLICATE_KEYS}
    sample_group = [k for k in _axes_that_vary(evals, prefix_exclude=()) if k.startswith("sample.")]
    sample_group = [k for k in sample_group if k not in plotted]

    def line_label(r, with_variance=True):
        params = r.data.params
        parts = [params["diffusion.schedule"]] if "diffusion.schedule" in params else []
        parts += [f"{k.split('.')[-1]}={params.get(k)}" for k in group]
        if with_variance:
            parts.append(params.get("sample.variance", "?"))
            parts += [f"{k.split('.')[-1]}={params.get(k)}" for k in sample_group]
        return " ".join(parts) or r.info.run_name

    floor = noise_floor(evals, quality)
    figures = []
    weights = {r.data.params.get("sample.guidance") for r in evals}
    for metric, fname in (
        (quality, "quality_vs_guidance.png"),
        (accuracy, "accuracy_vs_guidance.png"),
    ):
        if metric is None or len(weights) < 2:
            continue
        lines = defaultdict(list)
        for c in comparison_of(comparison, evals, metric, lower):
            r = c.best_run
            lines[line_label(r)].append(
                (float(r.data.params["sample.guidance"]), c.mean, c.ci_low, c.ci_high)
            )
        figures.append(
            _plot(
                out / fname,
                f"{metric} vs guidance weight w (w=0 uncond., w=1 cond.)",
                "guidance weight w",
                metric,
                lines,
                band=_band(noise_floor(evals, metric)),
            )
        )
    if accuracy is not None and len(weights) > 2:
        # The guidance trade-off: each line runs through a training's guidance weights.
        frontier = defaultdict(list)
        by_accuracy = {
            config_key(c.best_run.data.params): c
            for c in comparison_of(comparison, evals, accuracy, False)
        }
        for c in comparison.configurations:
            acc = by_accuracy.get(config_key(c.best_run.data.params))
            if acc is not None:
                frontier[line_label(c.best_run)].append((acc.mean, c.mean))
        figures.append(
            _plot(
                out / "quality_vs_accuracy.png",
                f"{quality} against {accuracy}, along the guidance weights",
                accuracy,
                quality,
                frontier,
            )
        )
    steps_lines = defaultdict(list)
    for c in comparison.configurations:
        r = c.best_run
        if float(r.data.params["sample.guidance"]) == 1.0:
            steps_lines[line_label(r)].append(
                (int(r.data.params["sample.steps"]), c.mean, c.ci_low, c.ci_high)
            )
    if any(len(v) > 1 for v in steps_lines.values()):
        figures.append(
            _plot(
                out / "quality_vs_steps.png",
                f"{quality} vs sampling steps (w=1)",
                "sampling steps",
                quality,
                steps_lines,
                logx=True,
                band=_band(floor),
            )
        )
    curves = {}
    for r in trains:
        hist = client.get_metric_history(r.info.run_id, "val/loss_simple")
        if hist:
            label = line_label(r, with_variance=False)
            seed = r.data.params.get("train.seed")
            if "train.seed" in _axes_that_vary(trains):
                label += f" seed={seed}"
            curves[label] = [(m.step, m.value) for m in hist]
    if curves:
        figures.append(
            _plot(
                out / "learning_curves.png",
                "validation L_simple",
                "step",
                "val/loss_simple",
                curves,
            )
        )

    cols = [*train_axes, "sample.variance", "sample.guidance", "sample.steps", *sample_group]
    mcols = [
        m
        for m in (quality, accuracy, "precision", "recall", "mode_coverage")
        if m and m in evals[0].data.metrics
    ]
    shown = max(top, 1 + len(comparison.ties))  # every configuration within noise is listed
    report = _Report(
        name=name,
        parent=parent,
        trains=trains,
        evals=evals,
        best=comparison.configurations[:shown],
        comparison=comparison,
        contrasts=tables,
        floor=floor,
        quality=quality,
        lower=lower,
        cols=cols,
        mcols=mcols,
        figures=figures,
        ui_url=ui_url,
    )
    summary = out / "report.md"
    summary.write_text(report.markdown())
    page = out / "report.html"
    page.write_text(report.html(), encoding="utf-8")
    for f in [summary, page, *figures]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return summary


@dataclass
class _Report:
    """What both renderings of the report show."""

    name: str
    parent: Any
    trains: list
    evals: list
    best: list[Configuration]  # best first: the top ones, and every one within noise
    comparison: Comparison
    contrasts: dict[str, list[Contrast]]  # key -> each configuration against its baseline twin
    floor: tuple[float, float, int] | None  # the real data's (mean, sd, n) of `quality`
    quality: str | None
    lower: bool
    cols: list[str]
    mcols: list[str]
    figures: list[Path]
    ui_url: str | None

    @property
    def experiment_id(self) -> str:
        return self.parent.info.experiment_id

    @property
    def direction(self) -> str:
        return "lower" if self.lower else "higher"

    @property
    def train_names(self) -> dict[str, str]:
        return {r.info.run_id: r.info.run_name or r.info.run_id for r in self.trains}

    @property
    def train_cols(self) -> list[str]:
        vary = _axes_that_vary(self.trains)
        if vary:
            return vary
        return [k for k in ("diffusion.schedule",) if any(k in r.data.params for r in self.trains)]

    def best_sentence(self) -> str:
        """The best configuration, its metric with its interval, the others within noise of
        it and the real data's floor, in words (plain text)."""
        if not self.best:
            return f"No evaluated pair has {self.quality} yet."
        c = self.best[0]
        b = c.best_run
        setting = ", ".join(f"{k}={b.data.params.get(k, '?')}" for k in self.cols)
        notes = [] if math.isnan(c.ci_low) else [f"{100 * self.comparison.confidence:g} % interval"]
        notes += [f"mean of {c.n} replicates"] if c.n > 1 else []
        notes.append(f"{self.direction} is better")
        text = (
            f"Best configuration: {setting} (run {b.info.run_name or b.info.run_id}), "
            f"{self.quality} = {value_text(c)} ({', '.join(notes)}). " + self.comparison.sentence()
        )
        return text + (" " + self.floor_sentence() if self.floor else "")

    def floor_sentence(self) -> str:
        mean, sd, n = self.floor
        return (
            f"Real data of the cells' size (n = {n}) scores {self.quality} {mean:.3g} ± "
            f"{sd:.2g} against the same reference (mean ± sd over independent draws): about "
            f"what a perfect model would score, and how much one cell's value moves by chance."
        )

    def contrast_title(self, key: str, rows: list[Contrast]) -> str:
        baseline = rows[0].baseline if rows else "?"
        return f"Contrast: {key} against {key} = {baseline}, by {self.quality}"

    def contrast_table(self, key: str, rows: list[Contrast]) -> tuple[list[str], list[list]]:
        """Each configuration against its twin at the baseline: the setting, both values, the
        difference with its paired interval, and whether it is within noise."""
        pct = f"{100 * self.comparison.confidence:g} %"
        setting = list(rows[0].setting) if rows else []
        header = [*setting, key, self.quality, "at baseline", f"Δ [{pct} CI]", "verdict"]
        body = []
        for r in rows:
            diff = f"{r.diff:+.3g}"
            if not math.isnan(r.low):
                diff += f" [{r.low:+.3g}, {r.high:+.3g}]"
            body.append(
                [
                    *r.setting.values(),
                    r.value,
                    value_text(r.config),
                    value_text(r.reference),
                    diff,
                    r.verdict,
                ]
            )
        return header, body

    @property
    def table_header(self) -> list[str]:
        pct = f"{100 * self.comparison.confidence:g} %"
        q = f"{self.quality} [{pct} CI]"
        reps = ["n", "sd"] if self.comparison.has_replicates else []
        others = [m for m in self.mcols if m != self.quality]
        return ["run", *self.cols, q, *reps, "Δ vs best [CI]", "vs best", *others]

    def table_values(self, c: Configuration) -> list[str]:
        """A configuration's cells after its run link, up to the run ids (plain text)."""
        r = c.best_run
        vals = [str(r.data.params.get(k, "")) for k in self.cols]
        vals.append(value_text(c))
        if self.comparison.has_replicates:
            vals += [str(c.n), "" if math.isnan(c.sd) else f"{c.sd:.3g}"]
        vals += [_diff_text(c), c.verdict]
        for m in self.mcols:
            if m != self.quality:
                values = [x.data.metrics[m] for x in c.runs if m in x.data.metrics]
                vals.append(f"{sum(values) / len(values):.4g}" if values else "")
        return vals

    def evals_of(self, train_run_id: str) -> int:
        return sum(r.data.tags.get("ddpm_sweep.train_run_id") == train_run_id for r in self.evals)

    # -- Markdown, for the terminal and for editors that preview it next to the PNGs ----------

    def markdown(self) -> str:
        p = self.parent
        lines = [
            f"# Sweep report: {self.name}",
            "",
            f"Parent run {p.info.run_name or ''} `{p.info.run_id}` (experiment "
            f"`{self.experiment_id}`); {len(self.trains)} training run(s), {len(self.evals)} "
            f"evaluated (training × sampling) pairs. Guidance convention: "
            f"{p.data.tags.get('ddpm_sweep.guidance_convention', '')}. {self.best_sentence()}",
            "",
            f"## Best {len(self.best)} by {self.quality} ({self.direction} is better)",
            "",
        ]
        header = [*self.table_header, "run id", "training run"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        names = self.train_names
        for c in self.best:
            r = c.best_run
            train_id = r.data.tags.get("ddpm_sweep.train_run_id", "")
            vals = [_md_cell(r.info.run_name or "")]
            vals += [_md_cell(v) for v in self.table_values(c)]
            vals += [f"`{r.info.run_id}`", _md_cell(names.get(train_id, train_id))]
            lines.append("| " + " | ".join(vals) + " |")
        for key, rows in self.contrasts.items():
            header, body = self.contrast_table(key, rows)
            lines += ["", f"## {self.contrast_title(key, rows)}", ""]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in body]
        # Relative names: the PNGs are written next to report.md (and logged next to it).
        lines += ["", "## Plots"]
        for f in self.figures:
            lines += ["", f"![{f.stem}]({f.name})"]
        if self.trains:
            header = ["run", *self.train_cols, "status", "val/loss_simple", "evaluated", "run id"]
            lines += ["", "## Training runs", ""]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in self.trains:
                vals = [_md_cell(r.info.run_name or "")]
                vals += [_md_cell(r.data.params.get(c, "")) for c in self.train_cols]
                vals += [
                    r.info.status,
                    _fmt(r.data.metrics, "val/loss_simple"),
                    str(self.evals_of(r.info.run_id)),
                    f"`{r.info.run_id}`",
                ]
                lines.append("| " + " | ".join(vals) + " |")
        return "\n".join(lines) + "\n"

    # -- HTML, for MLflow's artifact viewer: self-contained, no scripts ------------------------

    def link(self, run) -> str:
        href = run_href(self.experiment_id, run.info.run_id, self.ui_url)
        text = run.info.run_name or run.info.run_id
        return (
            f'<a href="{escape(href)}" target="_top" title="run {escape(run.info.run_id)}">'
            f"{escape(text)}</a>"
        )

    def html(self) -> str:
        e = escape
        p = self.parent
        trains_by_id = {r.info.run_id: r for r in self.trains}
        summary = (
            f"Parent run {self.link(p)} (<code>{e(p.info.run_id)}</code>, experiment "
            f"<code>{e(self.experiment_id)}</code>): {len(self.trains)} training run(s), "
            f"{len(self.evals)} evaluated (training &times; sampling) pairs. Guidance "
            f"convention: {e(p.data.tags.get('ddpm_sweep.guidance_convention', ''))}. "
            f"{e(self.best_sentence())}"
        )
        body = [
            f"<h1>Sweep report: {e(self.name)}</h1>",
            f'<p class="summary">{summary}</p>',
            f"<h2>Best {len(self.best)} by {e(str(self.quality))} ({self.direction} is "
            "better)</h2>",
            '<table id="best"><thead><tr>',
            "".join(f"<th>{e(c)}</th>" for c in [*self.table_header, "run id", "training run"]),
            "</tr></thead><tbody>",
        ]
        for c in self.best:
            r = c.best_run
            train_id = r.data.tags.get("ddpm_sweep.train_run_id", "")
            train = trains_by_id.get(train_id)
            cells = [self.link(r)]
            cells += [e(v) for v in self.table_values(c)]
            cells += [
                f"<code>{e(r.info.run_id)}</code>",
                self.link(train) if train else f"<code>{e(train_id)}</code>",
            ]
            verdict = c.verdict.replace(" ", "-") or "unknown"
            body.append(
                f'<tr class="{verdict}">' + "".join(f"<td>{x}</td>" for x in cells) + "</tr>"
            )
        body.append("</tbody></table>")
        for key, rows in self.contrasts.items():
            header, cells = self.contrast_table(key, rows)
            body += [
                f"<h2>{e(self.contrast_title(key, rows))}</h2>",
                '<table class="contrast"><thead><tr>',
                "".join(f"<th>{e(h)}</th>" for h in header),
                "</tr></thead><tbody>",
            ]
            body += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in cells]
            body.append("</tbody></table>")
        if self.figures:
            body.append("<h2>Plots</h2>")
        for f in self.figures:
            data = base64.b64encode(f.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(f.stem)}">'
                f"<figcaption>{e(f.name)}</figcaption></figure>"
            )
        if self.trains:
            header = ["run", *self.train_cols, "status", "val/loss_simple", "evaluated", "run id"]
            body += [
                "<h2>Training runs</h2>",
                '<table id="trains"><thead><tr>',
                "".join(f"<th>{e(c)}</th>" for c in header),
                "</tr></thead><tbody>",
            ]
            for r in self.trains:
                cells = [self.link(r)]
                cells += [e(r.data.params.get(c, "")) for c in self.train_cols]
                cells += [
                    e(r.info.status),
                    e(_fmt(r.data.metrics, "val/loss_simple")),
                    str(self.evals_of(r.info.run_id)),
                    f"<code>{e(r.info.run_id)}</code>",
                ]
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            body.append("</tbody></table>")
        body.append(
            '<p class="note">Run links open the MLflow UI '
            + (
                f"at {e(self.ui_url)}."
                if self.ui_url
                else "relative to the root of this page's host (<code>/#/experiments/"
                "&hellip;</code>)."
            )
            + " If a link does nothing (MLflow's artifact viewer shows this page in a sandboxed"
            " frame, which can keep links from leaving it), search the experiment's runs for"
            " <code>attributes.run_id = '&lt;run id&gt;'</code>.</p>"
        )
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>Sweep report: {e(self.name)}</title>\n<style>{_CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
        )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em;
       color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.5em; margin: 0 0 .5em; }
h2 { font-size: 1.2em; margin: 1.5em 0 .5em; }
.summary { max-width: 60em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85em; }
a { color: #0969da; }
figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: .8em; color: #59636e; }
.note { font-size: .85em; color: #59636e; margin-top: 2em; }
tr.best td, tr.within-noise td { background: #dafbe1; }
"""
