"""A trial's training metrics on their way to MLflow, with nothing lost on the way.

Metrics are written by a background thread, so a slow or busy tracking store does not stall
training, and the trial always knows which of them the store has *confirmed*. Before the trial
reports a checkpoint to Tune it waits (briefly) for the store to confirm everything logged so far
(:meth:`MetricWriter.sync`); whatever is still unconfirmed then (the store is down, F4) is written
into the checkpoint, and a trial resumed from that checkpoint logs it again. So a checkpoint
never stands ahead of the metrics: a killed worker, a killed driver or an outage loses none.

A write that fails is retried, in order, until the store takes it; MLflow's own asynchronous
queue drops a batch whose write failed, and its worker threads may write batches out of order.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from mlflow.entities import Metric
from pytorch_lightning.loggers import MLFlowLogger

log = logging.getLogger(__name__)

PENDING_FILE = "pending_metrics.json"  # in a Tune checkpoint: metrics the store had not confirmed
SYNC_TIMEOUT_S = 10.0  # how long a checkpoint waits for the store before carrying the metrics
FINAL_TIMEOUT_S = 600.0  # how long the end of training waits before the trial fails
RETRY_PAUSE_S = 2.0  # between attempts to write to a store that refused a batch
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch


class MetricWriter:
    """Writes one run's metrics from a background thread, in the order logged, retrying each
    batch until the store takes it. ``confirmed`` counts the metrics the store has taken."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._entries: list[Metric] = []  # every metric handed over, in order
        self.confirmed = 0  # how many of them (a prefix) the store has taken
        self._cond = threading.Condition()
        self._closed = False
        self._abandoned = False
        self.last_error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="metric-writer", daemon=True)
        self._thread.start()

    def log(self, metrics: Iterable[Metric]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("MetricWriter is closed")
            self._entries.extend(metrics)
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self.confirmed == len(self._entries) and not self._closed:
                    self._cond.wait()
                if self.confirmed == len(self._entries) or self._abandoned:
                    return  # closed and drained, or given up
                batch = self._entries[self.confirmed : self.confirmed + MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # the store is down or refused: keep the batch, retry
                self.last_error = err
                log.warning(
                    "MLflow did not take %d metrics of run %s (%s); retrying in %.0f s",
                    len(batch),
                    self.run_id,
                    err,
                    RETRY_PAUSE_S,
                )
                with self._cond:
                    self._cond.wait(RETRY_PAUSE_S)
                continue
            with self._cond:
                self.confirmed += len(batch)
                self.last_error = None
                self._cond.notify_all()

    def pending(self) -> list[Metric]:
        """The metrics handed over that the store has not confirmed yet."""
        with self._cond:
            return list(self._entries[self.confirmed :])

    def sync(self, timeout: float | None) -> list[Metric]:
        """Wait until the store has confirmed everything logged so far, at most ``timeout``
        seconds (None: no limit); return what it has not confirmed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = len(self._entries)
            while self.confirmed < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return list(self._entries[self.confirmed :])

    def close(self, timeout: float | None = None) -> list[Metric]:
        """Sync, then stop the thread; return what was not confirmed (and will not be written
        by this writer: a retry of the trial logs it from its checkpoint instead)."""
        left = self.sync(timeout)
        with self._cond:
            self._closed = True
            self._abandoned = bool(left)
            self._cond.notify_all()
        if not left:
            self._thread.join()
        return left


def dump_metrics(metrics: list[Metric], path: Path) -> None:
    rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
    path.write_text(json.dumps(rows))


def load_metrics(path: Path) -> list[Metric]:
    if not path.is_file():
        return []
    return [Metric(k, v, ts, step) for k, v, ts, step in json.loads(path.read_text())]


class DurableMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger writing through a :class:`MetricWriter`.

    It never logs a (metric, step) pair twice: a trial resumed from a checkpoint replays the steps
    between that checkpoint and the crash, and those already in MLflow are skipped. ``carried``
    are the metrics a checkpoint brought along because the store had not confirmed them; those
    the store does not have are logged first.
    """

    def __init__(self, tracking_uri: str, run_id: str, client, carried: Iterable[Metric] = ()):
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, synchronous=True)
        self.writer = MetricWriter(client, run_id)
        self._steps: dict[str, set[int]] = defaultdict(set)  # (key, step) pairs logged or stored
        for key in client.get_run(run_id).data.metrics:
            self._steps[key] = {m.step for m in client.get_metric_history(run_id, key)}
        missing = [m for m in carried if m.step not in self._steps[m.key]]
        if missing:
            log.info("run %s: logging %d metrics a checkpoint carried", run_id, len(missing))
        self._write(missing)

    def _write(self, metrics: list[Metric]) -> None:
        for m in metrics:
            self._steps[m.key].add(m.step)
        if metrics:
            self.writer.log(metrics)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = step or 0
        now = int(time.time() * 1000)
        fresh = []
        for key, value in metrics.items():
            key = re.sub(r"[^a-zA-Z0-9_/. -]+", "", key)  # what MLflow accepts, as Lightning does
            if step not in self._steps[key] and isinstance(value, (int, float)):
                fresh.append(Metric(key, float(value), now, step))
        self._write(fresh)

    def sync(self, timeout: float | None = SYNC_TIMEOUT_S) -> list[Metric]:
        """Before a checkpoint: wait for the store; return the metrics it has not confirmed."""
        left = self.writer.sync(timeout)
        if left:
            log.warning(
                "run %s: MLflow has not confirmed %d metrics after %.0f s (%s); the checkpoint "
                "carries them",
                self.run_id,
                len(left),
                timeout,
                self.writer.last_error,
            )
        return left

    def finalize(self, status: str = "success") -> None:
        # Every metric is in the store before the run is closed; if the store stays away, the
        # trial fails here and its retry logs them from its last checkpoint.
        ok = status == "success"
        left = self.writer.close(timeout=FINAL_TIMEOUT_S if ok else SYNC_TIMEOUT_S)
        if left and ok:
            raise RuntimeError(
                f"MLflow did not take {len(left)} metrics of run {self.run_id} in "
                f"{FINAL_TIMEOUT_S:.0f} s ({self.writer.last_error})"
            )
        # Not MLFlowLogger.finalize: it would end the run FINISHED or FAILED, and the status is
        # the trial's to set (FINISHED after its evaluations, KILLED when Tune stops it, FAILED
        # on an error). Lightning finalizes "failed" on *any* interruption, Tune's stop
        # (SystemExit) included; when Tune then tore the stopped last trial's actor down before
        # the trial's own KILLED, the run was left FAILED (tests/test_sweep.py, ASHA).
