"""A trial's evaluation cells across interruptions: finished cells are skipped before they are
sampled, a cell interrupted half-way is redone in its own run, and no cell is recorded twice.
(The same with real killed processes: tests/test_sweep_faults.py.)"""

from __future__ import annotations

from collections import Counter

import pytest
from sweep_helpers import eval_runs, plan_and_fit, setup_trial

from orchestrator import trial
from orchestrator.trial import CELL_TAG, _create_run, evaluate_cells

SWEEP = """
name: cells
base:
  data: {name: gaussian_mixture, n_train: 512, n_val: 128}
  network: {name: mlp, hidden_dim: 32, num_blocks: 1}
  diffusion: {timesteps: 20}
  train: {max_steps: 4, val_every_n_steps: 4, bpd_subset: 0}
  eval: {num_samples: 40}
search:
  sample.guidance: [0, 1, 2]
  sample.variance: [fixed_small]
  sample.steps: [5]
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return plan_and_fit(tmp_path_factory.mktemp("fit"), SWEEP)


def counting(monkeypatch):
    sampled = []
    real = trial.evaluate_group

    def evaluate_group(*args, **kwargs):
        sampled.extend(args[2])  # the SamplingSpecs drawn together
        return real(*args, **kwargs)

    monkeypatch.setattr(trial, "evaluate_group", evaluate_group)
    return sampled


def test_resumed_cells_skip_finished_ones_before_sampling_and_redo_a_half_done_one(
    tmp_path, fitted, monkeypatch
):
    plan, cfg, result = fitted
    client, ctx, train_run = setup_trial(tmp_path, plan, "cells")
    # An earlier attempt finished cell w=0, and was killed inside cell w=1: its run was opened
    # (RUNNING, no params, no metrics, no PNG) but never finished.
    sampled = counting(monkeypatch)
    first = evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "a", train_run)
    assert [(s.guidance, s.variance, s.steps) for s in sampled] == [
        (0.0, "fixed_small", 5),
        (1.0, "fixed_small", 5),
        (2.0, "fixed_small", 5),
    ]
    runs = {r.data.tags[CELL_TAG]: r for r in eval_runs(client, ctx)}
    assert runs["w1_fixed_small_5steps"].info.run_name == "eval fixed_small · w=1 · 5 steps"
    for r in list(runs.values()):
        if r.data.tags[CELL_TAG] != "w0_fixed_small_5steps":
            client.delete_run(r.info.run_id)
    half = _create_run(
        client,
        ctx,
        "eval fixed_small · w=1 · 5 steps",
        "eval",
        {},
        {"ddpm_sweep.train_run_id": train_run, CELL_TAG: "w1_fixed_small_5steps"},
    )

    sampled.clear()
    again = evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "b", train_run)
    # w=0 was not sampled again; w=1 was redone in the half-done run; w=2 was new.
    assert [(s.guidance, s.steps) for s in sampled] == [(1.0, 5), (2.0, 5)]
    runs = eval_runs(client, ctx)
    names = Counter(r.info.run_name for r in runs)
    assert set(names.values()) == {1} and len(names) == 3  # none recorded twice
    redone = next(r for r in runs if r.data.tags[CELL_TAG] == "w1_fixed_small_5steps")
    assert redone.info.run_id == half and redone.info.status == "FINISHED"
    # Killed between creating its run and logging its params: the redo completes them.
    assert redone.data.params["sample.guidance"] == "1.0"
    assert redone.data.params["eval.num_samples"] == "40"
    for r in runs:  # every FINISHED cell has all its metrics and its PNG
        assert r.info.status == "FINISHED"
        assert (
            set(r.data.metrics) == set(runs[0].data.metrics) and "sample_seconds" in r.data.metrics
        )
        assert "grid.png" in [a.path for a in client.list_artifacts(r.info.run_id)]
    # The same seed and noise: the redone cells measure what the first attempt measured, and
    # the skipped cell's metrics still reach the trial's summary (Tune's final result).
    for key, value in first.items():
        if "sample_seconds" not in key:
            assert again[key] == pytest.approx(value), key

    sampled.clear()
    evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "c", train_run)
    assert sampled == []  # all recorded: nothing sampled


def test_cells_drawn_together_on_a_gpu_get_their_own_runs_and_the_same_metrics(
    tmp_path, fitted, monkeypatch
):
    """On a GPU the cells of one variance and step count are drawn in one batch
    (guidance_groups); each still gets its own run, and measures what it measures alone."""
    plan, cfg, result = fitted
    client, ctx, train_run = setup_trial(tmp_path, plan, "cells")
    alone = evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "a", train_run)
    real = trial.guidance_groups
    groups = []

    def as_on_a_gpu(specs, device, n, batch_size):
        groups.extend(real(specs, "cuda", n, batch_size))
        return groups

    monkeypatch.setattr(trial, "guidance_groups", as_on_a_gpu)
    client, ctx, train_run = setup_trial(tmp_path / "g", plan, "cells")
    together = evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "b", train_run)
    assert [[s.guidance for s in g] for g in groups] == [[0.0, 1.0, 2.0]]
    runs = eval_runs(client, ctx)
    assert sorted(r.info.run_name for r in runs) == sorted(f"eval {c.label}" for c in plan.cells)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert together.keys() == alone.keys()
    for key, value in alone.items():
        if "sample_seconds" not in key:
            assert together[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
