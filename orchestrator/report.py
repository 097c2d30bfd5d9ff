"""`ddpm-sweep report SWEEP`: read a sweep back from MLflow and write a report a researcher reads.

- a Markdown summary with the best configurations (by the sample-quality metric),
- `quality_vs_guidance.png` and `accuracy_vs_guidance.png`: one line per schedule × variance,
- `quality_vs_steps.png`: the quality metric against sampling steps, one line per variance,
- `learning_curves.png`: val/loss_simple of every training run,
all also logged to the sweep's parent run under `report/`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import mlflow
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def rank_evals(evals) -> list:
    """Evaluated pairs, best sample quality first (failed or stopped trials have none)."""
    quality, lower = quality_metric(evals)
    sign = 1 if lower else -1
    return sorted(evals, key=lambda r: sign * r.data.metrics.get(quality, sign * math.inf))


def _axes_that_vary(runs, prefix_exclude=("sample.",)) -> list[str]:
    keys = set().union(*(r.data.params for r in runs)) if runs else set()
    vary = [
        k
        for k in sorted(keys)
        if len({r.data.params.get(k) for r in runs}) > 1 and not k.startswith(prefix_exclude)
    ]
    return vary


def _plot(path: Path, title: str, xlabel: str, ylabel: str, lines: dict, logx=False) -> Path:
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for label, points in sorted(lines.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(name: str, tracking_uri: str, out_dir: str | Path, top: int = 10) -> Path:
    client = mlflow.MlflowClient(tracking_uri)
    parent, children = sweep_runs(client, name)
    evals = [r for r in children if r.data.tags.get("ddpm_sweep.role") == "eval"]
    trains = [r for r in children if r.data.tags.get("ddpm_sweep.role") == "train"]
    if not evals:
        raise ValueError(f"sweep {name!r} has no evaluated runs yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quality, lower = next(
        ((m, lo) for m, lo in QUALITY_METRICS if m in evals[0].data.metrics), (None, True)
    )
    accuracy = next((m for m in ACCURACY_METRICS if m in evals[0].data.metrics), None)
    train_axes = _axes_that_vary(evals)
    group = [k for k in train_axes if k != "diffusion.schedule"]

    def line_label(r, with_variance=True):
        parts = [r.data.params.get("diffusion.schedule", "?")]
        parts += [f"{k.split('.')[-1]}={r.data.params.get(k)}" for k in group]
        if with_variance:
            parts.append(r.data.params.get("sample.variance", "?"))
        return " ".join(parts)

    figures = []
    for metric, fname in (
        (quality, "quality_vs_guidance.png"),
        (accuracy, "accuracy_vs_guidance.png"),
    ):
        if metric is None:
            continue
        lines = defaultdict(list)
        for r in evals:
            lines[line_label(r)].append(
                (float(r.data.params["sample.guidance"]), r.data.metrics[metric])
            )
        figures.append(
            _plot(
                out / fname,
                f"{metric} vs guidance weight w (w=0 uncond., w=1 cond.)",
                "guidance weight w",
                metric,
                lines,
            )
        )
    steps_lines = defaultdict(list)
    for r in evals:
        if quality and float(r.data.params["sample.guidance"]) == 1.0:
            steps_lines[line_label(r)].append(
                (int(r.data.params["sample.steps"]), r.data.metrics[quality])
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
            )
        )
    curves = {}
    for r in trains:
        hist = client.get_metric_history(r.info.run_id, "val/loss_simple")
        if hist:
            curves[line_label(r, with_variance=False)] = [(m.step, m.value) for m in hist]
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

    ranked = sorted(
        evals,
        key=lambda r: (
            r.data.metrics.get(quality, math.inf)
            if lower
            else -r.data.metrics.get(quality, -math.inf)
        ),
    )
    cols = [*train_axes, "sample.variance", "sample.guidance", "sample.steps"]
    mcols = [
        m
        for m in (quality, accuracy, "precision", "recall", "mode_coverage")
        if m and m in evals[0].data.metrics
    ]
    lines = [
        f"# Sweep report: {name}",
        "",
        f"Parent run `{parent.info.run_id}`; {len(trains)} training run(s), {len(evals)} "
        f"evaluated (training × sampling) pairs. Guidance convention: "
        f"{parent.data.tags.get('ddpm_sweep.guidance_convention', '')}.",
        "",
        f"## Best {min(top, len(ranked))} by {quality} ({'lower' if lower else 'higher'} is "
        "better)",
        "",
        "| " + " | ".join(cols + mcols) + " |",
        "|" + "---|" * (len(cols) + len(mcols)),
    ]
    for r in ranked[:top]:
        vals = [r.data.params.get(c, "") for c in cols]
        vals += [f"{r.data.metrics[m]:.4g}" for m in mcols]
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    summary = out / "report.md"
    summary.write_text("\n".join(lines) + "\n")
    for f in [summary, *figures]:
        client.log_artifact(parent.info.run_id, str(f), "report")
    return summary
