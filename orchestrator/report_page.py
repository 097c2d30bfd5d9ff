"""The report's page: what `report.md` and `report.html` show of a sweep, and how.

:class:`ReportPage` holds what `write_report` (orchestrator/report.py) gathered from MLflow and
renders it twice: as Markdown for the terminal and editors, and as self-contained HTML (inline
CSS, plots as `data:` URIs, no scripts, everything escaped) for MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .compare import Comparison, Configuration, Contrast


def axes_that_vary(runs, prefix_exclude=("sample.",)) -> list[str]:
    keys = set().union(*(r.data.params for r in runs)) if runs else set()
    vary = [
        k
        for k in sorted(keys)
        if len({r.data.params.get(k) for r in runs}) > 1 and not k.startswith(prefix_exclude)
    ]
    return vary


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


def param_text(value) -> str:
    """A param as shown: a searched cell's drawn value (`2.1879360563134624`) to 4 significant
    digits, anything else as logged."""
    text = str(value)
    if len(text) > 8 and "." in text:
        try:
            return f"{float(text):.4g}"
        except ValueError:
            pass
    return text


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


@dataclass
class ReportPage:
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
    stopped: list = field(default_factory=list)  # searched cells stopped early (not ranked)

    def stopped_sentence(self) -> str:
        """How many searched cells were stopped early, which the tables leave out."""
        if not self.stopped:
            return ""
        n = len(self.stopped)
        return (
            f" {n} searched cell{'s were' if n > 1 else ' was'} stopped early, clearly worse "
            "than the best of its study on fewer samples (MLflow status KILLED, tag "
            "ddpm_sweep.stopped), and not ranked here."
        )

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
        vary = axes_that_vary(self.trains)
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
        setting = ", ".join(f"{k}={param_text(b.data.params.get(k, '?'))}" for k in self.cols)
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
        vals = [param_text(r.data.params.get(k, "")) for k in self.cols]
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
            f"{p.data.tags.get('ddpm_sweep.guidance_convention', '')}. {self.best_sentence()}"
            + self.stopped_sentence(),
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
            f"{e(self.best_sentence() + self.stopped_sentence())}"
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
