"""The trial's metric log: nothing the store has not confirmed is forgotten, nothing is written
twice, and a checkpoint carries what an unreachable store did not take."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
from mlflow.entities import Metric

from orchestrator import metric_log
from orchestrator.metric_log import DurableMLFlowLogger, MetricWriter, dump_metrics, load_metrics


class FlakyStore:
    """A real sqlite MLflow client whose writes fail while ``down`` is set (the store is away),
    and which can be made slow (a busy store)."""

    def __init__(self, client):
        self.client, self.down, self.delay, self.calls = client, threading.Event(), 0.0, 0

    def log_batch(self, run_id, metrics):
        self.calls += 1
        time.sleep(self.delay)
        if self.down.is_set():
            raise mlflow.exceptions.MlflowException("connection refused (test outage)")
        self.client.log_batch(run_id, metrics=metrics)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def store(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("metric-log"))
    return FlakyStore(client), run.info.run_id


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def metrics(key, steps):
    return [Metric(key, float(s), 0, s) for s in steps]


def test_sync_waits_until_the_store_has_every_metric(store):
    flaky, run_id = store
    flaky.delay = 0.2  # a busy store: a write takes 200 ms
    writer = MetricWriter(flaky, run_id)
    writer.log(metrics("train/loss", range(5)))
    assert writer.sync(timeout=30) == []
    # Confirmed means stored: everything is there the moment sync returns.
    assert history(flaky.client, run_id, "train/loss") == [(s, float(s)) for s in range(5)]
    writer.close()


def test_an_outage_keeps_metrics_pending_then_delivers_them_in_order(store, monkeypatch):
    monkeypatch.setattr(metric_log, "RETRY_PAUSE_S", 0.05)
    flaky, run_id = store
    writer = MetricWriter(flaky, run_id)
    flaky.down.set()
    writer.log(metrics("train/loss", [0, 1]))
    writer.log(metrics("train/loss", [2]))
    left = writer.sync(timeout=0.5)
    assert [m.step for m in left] == [0, 1, 2]  # not confirmed: a checkpoint would carry them
    assert flaky.calls >= 2  # it kept trying
    assert history(flaky.client, run_id, "train/loss") == []
    flaky.down.clear()  # the store is back
    assert writer.close(timeout=30) == []
    assert history(flaky.client, run_id, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_pending_metrics_round_trip_through_a_checkpoint_file(tmp_path):
    sent = [Metric("val/loss_simple", 0.25, 1234, 199), Metric("train/loss", 0.5, 1235, 174)]
    dump_metrics(sent, tmp_path / "pending.json")
    assert load_metrics(tmp_path / "pending.json") == sent
    assert load_metrics(tmp_path / "absent.json") == []


def test_a_resumed_logger_logs_what_the_checkpoint_carried_and_nothing_twice(store):
    flaky, run_id = store
    client = flaky.client
    # What reached the store before the worker died: steps 49 and 99.
    client.log_batch(run_id, metrics=metrics("val/loss_simple", [49, 99]))
    # The checkpoint at step 149 carried 149 (never confirmed) and 99 (confirmed after all).
    carried = metrics("val/loss_simple", [99, 149])
    logger = DurableMLFlowLogger(client.tracking_uri, run_id, client, carried)
    # The resumed fit replays steps after 149; 149 itself is not logged a second time.
    logger.log_metrics({"val/loss_simple": 149.0}, step=149)
    logger.log_metrics({"val/loss_simple": 199.0}, step=199)
    assert logger.sync(timeout=30) == []
    steps = [s for s, _ in history(client, run_id, "val/loss_simple")]
    assert steps == [49, 99, 149, 199]


def test_finalize_fails_the_trial_when_the_store_never_takes_its_metrics(store, monkeypatch):
    monkeypatch.setattr(metric_log, "FINAL_TIMEOUT_S", 0.3)
    monkeypatch.setattr(metric_log, "RETRY_PAUSE_S", 0.05)
    flaky, run_id = store
    logger = DurableMLFlowLogger(flaky.client.tracking_uri, run_id, flaky.client)
    logger.writer.client = flaky
    flaky.down.set()
    logger.log_metrics({"train/loss": 1.0}, step=10)
    with pytest.raises(RuntimeError, match="did not take 1 metrics"):
        logger.finalize("success")
