"""The sweep's console: one live progress line instead of Tune's status tables.

`ddpm-sweep run` prints the plan, then this line (trainings and cells done of total, the best
result so far, elapsed and remaining), then a short summary. `--verbose` brings back Tune's
tables and every worker's output (Lightning's tips and warnings); those always go to files: the
trials' logs in the Tune storage path, the workers' in Ray's session directory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from ray import tune

from .compare import compare
from .report import finished_evals, quality_metric, stopped_evals

# Library chatter a sweep's console does not need unless asked (`--verbose`).
QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "mlflow", "alembic", "pytorch_lightning")


# Tune's legacy reporter, which at verbose=0 prints nothing (the new one still prints its
# experiment box and a TensorBoard hint); no snapshot-frequency warning; no download bars.
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def quiet_console() -> None:
    """Keep the driver's console to the plan, the progress line and the summary (errors and
    Ray's own errors still show)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class SweepProgress(tune.Callback):
    """A Tune callback on the driver: every few seconds, one line of where the sweep stands.

    Trainings come from Tune's trials; cells done and the best result so far from MLflow (the
    FINISHED evaluation runs under the sweep's parent run). On a terminal the line is redrawn
    in place; in a log file a new line is written when something changed, at most every
    ``every_s`` seconds. It keeps no open handles, so Tune can pickle it with its state."""

    def __init__(
        self,
        *,
        trainings: int,
        cells: int,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        every_s: float = 5.0,
    ):
        self.trainings, self.cells = trainings, cells
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.every_s = parent_run_id, every_s
        self.start = time.time()
        self._polled = self._last_shown = 0.0
        self._last_line = ""

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_polled": 0.0, "_last_shown": 0.0, "_last_line": ""}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.time() - self._polled >= self.every_s:
            self._polled = time.time()
            self.show(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.show(trials, final=True)

    def evaluated(self) -> tuple[int, int, tuple[str, float, str] | None]:
        """(cells done, of them searched cells stopped early, (metric, value, run name) of
        the best so far or None)."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        runs = client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and "
            "tags.`ddpm_sweep.role` = 'eval' and attributes.status != 'RUNNING'",
            max_results=50000,
        )
        stopped = len(stopped_evals(runs))
        runs = finished_evals(runs)
        if not runs:
            return stopped, stopped, None
        metric, lower = quality_metric(runs)
        if metric is None:
            return len(runs) + stopped, stopped, None
        # As the summary and the registered model pick it (replicates averaged), without
        # reading the runs' bootstrap replicates each time the line is drawn.
        top = compare(runs, metric, lower, lambda run: None).best
        return len(runs) + stopped, stopped, (metric, top.mean, top.best_run.info.run_name)

    def line(self, trials: list) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        errored = sum(t.status == "ERROR" for t in trials)
        try:
            cells_done, stopped, best = self.evaluated()
        except Exception:  # the store is away for a moment: show what Tune knows
            cells_done, stopped, best = 0, 0, None
        elapsed = time.time() - self.start
        total = max(1, self.trainings * self.cells)
        fraction = cells_done / total if cells_done else done / max(1, self.trainings)
        parts = [
            f"[{_clock(elapsed)}] trainings {done}/{self.trainings}"
            + (f" ({errored} failed)" if errored else ""),
            f"cells {cells_done}/{total}" + (f" ({stopped} stopped early)" if stopped else ""),
        ]
        if best:
            metric, value, name = best
            parts.append(f"best {metric} {value:.4g} ({name})")
        if 0 < fraction < 1:
            parts.append(f"~{_clock(elapsed * (1 - fraction) / fraction)} left")
        return " · ".join(parts)

    def show(self, trials: list, final: bool = False) -> None:
        now, stream = time.time(), sys.stdout
        line = self.line(trials)
        if stream.isatty():
            stream.write("\r\033[K" + line + ("\n" if final else ""))
            self._last_shown = now
        else:  # a log: a line when the counts or the best change, else every 6th interval
            state = line.split("] ", 1)[-1].rsplit(" · ~", 1)[0]
            if final or state != self._last_line or now - self._last_shown >= 6 * self.every_s:
                stream.write(line + "\n")
                self._last_shown, self._last_line = now, state
        stream.flush()
