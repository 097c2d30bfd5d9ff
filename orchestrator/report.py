"""`ddpm-sweep report SWEEP`: read a sweep back from MLflow and write a report a researcher reads.

- a Markdown summary with the best configurations (by the sample-quality metric), each with its
  interval, its difference from the best and whether that is within noise (a paired bootstrap,
  orchestrator/compare.py; replicates of one configuration, seeds, grouped: mean, sd, n), and
  the real data's own score at the cells' sample size (the metric's noise floor),
- `quality_vs_guidance.png` and `accuracy_vs_guidance.png`: one line per schedule × variance,
  with the intervals as error bars and the noise floor as a grey band,
- `quality_vs_accuracy.png` and `precision_vs_recall.png`: the guidance trade-offs, quality
  against guided accuracy and precision against recall along the guidance weights, one line per
  training and sampling setting,
- `quality_vs_steps.png`: the quality metric against sampling steps, one line per variance,
- `learning_curves.png`: val/loss_simple of every training run,
- for searched sampling keys (``sample_search``): `search_axes.png`, the quality metric of every
  searched cell against each searched key, and `search_map.png`, the first two keys against each
  other coloured by it (cells stopped early drawn apart, as grey crosses at their last value),
- with ``contrast``, a table per key of every configuration against its twin at the baseline,
- `report.html`: the same, self-contained (inline CSS, the plots as `data:` URIs, no JavaScript)
  for MLflow's artifact viewer, with every run linked to its page in the MLflow UI,
all also logged to the sweep's parent run under `report/`. This module gathers and plots; the
page itself (both renderings) is orchestrator/report_page.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import mlflow
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .compare import (
    REPLICATE_KEYS,
    Comparison,
    artifact_loader,
    compare,
    config_key,
    contrasts,
)
from .report_page import ReportPage, axes_that_vary
from .tracking import SEARCHED_TAG, STOPPED_TAG, STUDY_TAG

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


def finished_evals(children) -> list:
    """The evaluated cells a comparison ranks: eval runs that ran to the end (FINISHED). A cell
    interrupted half-way has no metrics yet; a searched cell stopped early (KILLED, its
    ``ddpm_sweep.stopped`` tag says why) was measured on fewer samples than the others."""
    return [
        r
        for r in children
        if r.data.tags.get("ddpm_sweep.role") == "eval" and r.info.status == "FINISHED"
    ]


def stopped_evals(children) -> list:
    """Searched cells stopped early (orchestrator/sample_search.py)."""
    return [r for r in children if STOPPED_TAG in r.data.tags]


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


def _along_guidance(comparison: Comparison, evals, x_metric: str, y_metric: str, label) -> dict:
    """Lines of (x, y) through each training's guidance weights: every configuration's mean of
    ``x_metric`` against its mean of ``y_metric``."""
    xs = {
        config_key(c.best_run.data.params): c.mean
        for c in comparison_of(comparison, evals, x_metric, False)
    }
    lines = defaultdict(list)
    for c in comparison_of(comparison, evals, y_metric, True):
        key = config_key(c.best_run.data.params)
        if key in xs:
            lines[label(c.best_run)].append((xs[key], c.mean))
    return lines


def _band(floor) -> tuple[float, float] | None:
    return floor[:2] if floor else None


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
    evals = finished_evals(children)
    stopped = stopped_evals(children)
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
    train_axes = [k for k in axes_that_vary(evals) if k not in REPLICATE_KEYS]
    group = [k for k in train_axes if k != "diffusion.schedule"]
    # Sampling axes besides the plots' x axes (sampler, guidance rescale, ...): a line each.
    plotted = {"sample.guidance", "sample.steps", "sample.variance", *REPLICATE_KEYS}
    sample_group = [k for k in axes_that_vary(evals, prefix_exclude=()) if k.startswith("sample.")]
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
    searched = searched_keys(evals)
    figures += search_figures(out, evals, stopped, quality, lower, line_label, floor)
    # Lines through the grid's values; searched cells (every key drawn anew) are points instead.
    weights = {r.data.params.get("sample.guidance") for r in evals} if not searched else set()
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
    has = set(evals[0].data.metrics)
    trade_offs = [
        (accuracy, quality, "quality_vs_accuracy.png"),  # the Inception-score analogue
        ("recall", "precision", "precision_vs_recall.png"),  # fidelity against diversity
    ]
    for x_metric, y_metric, fname in trade_offs if len(weights) > 2 else []:
        if x_metric in has and y_metric in has:
            # The guidance trade-off: each line runs through a training's guidance weights.
            figures.append(
                _plot(
                    out / fname,
                    f"{y_metric} against {x_metric}, along the guidance weights",
                    x_metric,
                    y_metric,
                    _along_guidance(comparison, evals, x_metric, y_metric, line_label),
                )
            )
    steps_lines = defaultdict(list)
    for c in comparison.configurations if not searched else []:
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
            if "train.seed" in axes_that_vary(trains):
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
    report = ReportPage(
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
        stopped=stopped,
    )
    summary = out / "report.md"
    summary.write_text(report.markdown())
    page = out / "report.html"
    page.write_text(report.html(), encoding="utf-8")
    for f in [summary, page, *figures]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return summary


def searched_keys(evals) -> list[str]:
    """The sampling keys a study searched (the runs' ``ddpm_sweep.searched`` tags), in order."""
    keys: dict[str, None] = {}
    for r in evals:
        keys |= dict.fromkeys(k for k in r.data.tags.get(SEARCHED_TAG, "").split(",") if k)
    return list(keys)


def _spans_decades(values) -> bool:
    """Positive values over more than a factor of 10: drawn on a log scale."""
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def _axis_values(runs, key: str) -> tuple[list[float], list[str] | None]:
    """A key's values as x positions: numbers as themselves, anything else as the index of
    its category (returned too, for the ticks)."""
    raw = [r.data.params.get(key, "") for r in runs]
    try:
        return [float(v) for v in raw], None
    except ValueError:
        cats = sorted(set(raw))
        return [float(cats.index(v)) for v in raw], cats


def search_figures(out: Path, evals, stopped, quality, lower, line_label, floor) -> list[Path]:
    """`search_axes.png`: the quality metric of each searched cell against each searched key,
    with its interval, one colour per training and study; `search_map.png`: the first two
    searched keys against each other, coloured by the metric, the best cell starred. Cells
    stopped early are grey crosses at their last (partial) value."""
    keys = searched_keys(evals)
    runs = [r for r in evals if r.data.tags.get(SEARCHED_TAG) and quality in r.data.metrics]
    if not keys or not runs or quality is None:
        return []
    stops = [r for r in stopped if quality in r.data.metrics]

    def group(r) -> str:
        study = r.data.tags.get(STUDY_TAG, "").removeprefix("search").strip()
        return " ".join(x for x in (line_label(r, with_variance=False), study) if x) or "cells"

    all_values = [r.data.metrics[quality] for r in runs + stops]
    fig = Figure(figsize=(4.2 * len(keys), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    groups = defaultdict(list)
    for r in runs:
        groups[group(r)].append(r)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for label, members in sorted(groups.items()):
            xs, cats = _axis_values(members, key)
            m = [r.data.metrics for r in members]
            ys = [x[quality] for x in m]
            low = [y - x.get(f"{quality}_ci_low", y) for y, x in zip(ys, m)]
            high = [x.get(f"{quality}_ci_high", y) - y for y, x in zip(ys, m)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=2, ms=4, label=label)
        if stops:
            xs, _ = _axis_values(stops, key)
            ys = [r.data.metrics[quality] for r in stops]
            ax.scatter(xs, ys, marker="x", color="0.55", label="stopped early (fewer samples)")
        if floor and math.isfinite(floor[0]):
            ax.axhline(floor[0], color="0.5", lw=1, ls="--", label="real data")
        if _spans_decades(all_values):  # a few bad cells would flatten the good ones
            ax.set_yscale("log")
        _, cats = _axis_values(runs, key)
        if cats:
            ax.set_xticks(range(len(cats)), cats)
        ax.set(xlabel=key, ylabel=quality if i == 0 else "")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{quality} of the searched cells ({'lower' if lower else 'higher'} is better)")
    fig.tight_layout()
    figures = [out / "search_axes.png"]
    fig.savefig(figures[0])
    numeric = [k for k in keys if _axis_values(runs, k)[1] is None]
    if len(numeric) >= 2:
        kx, ky = numeric[:2]
        fig = Figure(figsize=(6.4, 5.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        values = [r.data.metrics[quality] for r in runs]
        xs, ys = _axis_values(runs, kx)[0], _axis_values(runs, ky)[0]
        norm = LogNorm() if _spans_decades(values) else None
        cmap = "viridis_r" if lower else "viridis"
        points = ax.scatter(xs, ys, c=values, cmap=cmap, norm=norm, s=40)
        fig.colorbar(points, ax=ax, label=quality)
        best = (min if lower else max)(range(len(runs)), key=values.__getitem__)
        ax.scatter([xs[best]], [ys[best]], marker="*", s=300, facecolor="none", edgecolor="red",
                   label=f"best: {quality} {values[best]:.4g}")  # fmt: skip
        if stops:
            sx, sy = _axis_values(stops, kx)[0], _axis_values(stops, ky)[0]
            ax.scatter(sx, sy, marker="x", color="0.55", label="stopped early")
        ax.set(xlabel=kx, ylabel=ky, title=f"{quality} over {kx} and {ky}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures.append(out / "search_map.png")
        fig.savefig(figures[-1])
    return figures
